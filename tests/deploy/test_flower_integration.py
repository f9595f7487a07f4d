"""Real Flower processes on loopback: a SuperLink and three SuperNodes, TLS and node auth.

Three promises of the Flower runtime, each against the in-process runtime with the same seed:
two rounds of DP-SGD with ``--secure-agg mask`` give the same final weights (to the
fixed-point quantum, after rounding to float32), a server killed after round 1 resumes from
its checkpoint and loses nothing, and a site process killed mid-round is survived through
Bonawitz dropout recovery. Every process is killed (by process group) at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from safetensors.torch import load_file  # noqa: E402

from securefed.config import RunConfig  # noqa: E402
from securefed.crypto.secagg import SecAggConfig  # noqa: E402
from securefed.deploy.local import LocalDeployment  # noqa: E402
from securefed.fl.simulation import Federation  # noqa: E402
from tests.conftest import write_small_npz  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUTS = {"fit_timeout": 240.0, "stage_timeout": 60.0, "connect_timeout": 120.0}


def _config(npz: Path, **changes) -> RunConfig:
    return RunConfig(
        data=str(npz),
        clients=3,
        rounds=2,
        local_epochs=1,
        batch_size=32,
        lr=0.5,
        dp_epsilon=8.0,
        device="cpu",
        accountant="rdp",
        secure_agg="mask",
        seed=0,
    ).replace(**changes)


def _assert_same_weights(ours: dict, ref: dict, config: RunConfig) -> None:
    """Equal up to float32 arithmetic: the masked sum is exact to the fixed-point quantum, but
    a site process's float32 training may differ from the in-process one in the last bits.

    The bound (1e-7 + 1e-6 relative) is ~1000x below one DP-SGD step's noise on a weight,
    so a wrong mask, a lost site or a skipped round could not pass it.
    """
    quantum = SecAggConfig(
        n_clients=config.clients, clip_range=config.secagg_clip, ring_bits=config.secagg_ring_bits
    ).codec.quantum
    assert quantum < 1e-8
    assert set(ours) == set(ref)
    for key, value in ref.items():
        diff = (ours[key].double() - value.double()).abs()
        bound = 1e-7 + 1e-6 * value.double().abs()
        assert bool((diff <= bound).all()), f"{key}: max diff {float(diff.max()):.3g}"


def _groups_gone(pgids: list[int]) -> bool:
    for pgid in pgids:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    return write_small_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="module")
def restarted_run(tmp_path_factory, tiny_npz):
    """Two rounds over Flower, the SuperLink killed after round 1 and restarted."""
    root = tmp_path_factory.mktemp("flower")
    config = _config(tiny_npz)
    out = root / "run"
    dep = LocalDeployment(root / "deployment", sites=3)
    try:
        dep.start()
        pgids = [dep.server.pid, *(p.pid for p in dep.site_procs.values())]
        dep.submit(config, out=out, stop_after=1, **TIMEOUTS)
        after_round_1 = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
        dep.kill_server()
        assert not (out / "privacy.json").exists()
        dep.start_server()
        pgids.append(dep.server.pid)
        dep.submit(config, out=out, resume=True, **TIMEOUTS)
    finally:
        dep.close()
    return {"out": out, "config": config, "after_round_1": after_round_1, "pgids": pgids}


@pytest.fixture(scope="module")
def in_process(restarted_run, tmp_path_factory):
    from securefed.fl.run import train

    return train(restarted_run["config"], out_dir=tmp_path_factory.mktemp("ref"), progress=False)


def test_two_rounds_over_flower_equal_the_in_process_run(restarted_run, in_process) -> None:
    ours = load_file(str(restarted_run["out"] / "model.safetensors"))
    ref = load_file(str(in_process / "model.safetensors"))
    _assert_same_weights(ours, ref, restarted_run["config"])
    metrics = json.loads((restarted_run["out"] / "metrics.json").read_text())
    assert metrics["runtime"] == "flower"
    assert [r["applied"] for r in metrics["rounds"]] == [True, True]
    assert all(r["survivors"] == [0, 1, 2] for r in metrics["rounds"])


def test_privacy_report_matches_and_passes_the_audit(restarted_run, in_process) -> None:
    ours = json.loads((restarted_run["out"] / "privacy.json").read_text())
    ref = json.loads((in_process / "privacy.json").read_text())
    assert ours["events"] == ref["events"]
    for a, b in zip(ours["clients"], ref["clients"]):
        assert a["epsilon_per_round"] == pytest.approx(b["epsilon_per_round"], abs=1e-12)
        assert a["noise_multiplier"] == b["noise_multiplier"]
    assert ours["epsilon"] <= 8.0
    assert any("training-set size" in d for d in ours["disclosures"])
    audit = subprocess.run(
        [sys.executable, "-m", "securefed.cli", "audit", str(restarted_run["out"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    for name in ("config.json", "metrics.json", "model.safetensors", "summary.md"):
        assert (restarted_run["out"] / name).exists()


def test_server_restart_resumes_from_its_checkpoint(restarted_run) -> None:
    ck = restarted_run["after_round_1"]
    assert ck["round"] == 1 and len(ck["records"]) == 1
    assert sorted(e["client_id"] for e in ck["events"]) == [0, 1, 2]
    log = [json.loads(line) for line in (restarted_run["out"] / "deploy-log.jsonl").open()]
    kinds = [(e["event"], e.get("round")) for e in log]
    assert kinds.index(("stopped", 1)) < kinds.index(("resume", 1)) < kinds.index(("round", 2))
    assert ("round", 1) in kinds and kinds.count(("round", 1)) == 1  # round 1 never re-run
    privacy = json.loads((restarted_run["out"] / "privacy.json").read_text())
    assert sorted((e["round"], e["client_id"]) for e in privacy["events"]) == [
        (r, s) for r in (1, 2) for s in (0, 1, 2)
    ]


def test_every_process_is_gone_afterwards(restarted_run) -> None:
    assert _groups_gone(restarted_run["pgids"])


def test_a_site_killed_mid_round_is_recovered(tmp_path, tiny_npz) -> None:
    # Prepare: one round; site 2 is killed once every site has shared its keys, so the
    # others hold shares of its mask key and the server must remove its masks.
    # A threshold of 2 of 3 tolerates one dropout (the default for 3 sites, 3, tolerates none).
    config = _config(tiny_npz, rounds=1, secagg_threshold=2)
    out = tmp_path / "run"
    dep = LocalDeployment(tmp_path / "deployment", sites=3)
    killed: dict[str, float] = {}

    def kill_after_shares() -> None:
        log = out / "deploy-log.jsonl"
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not killed:
            if log.exists():
                for line in log.read_text().splitlines():
                    event = json.loads(line)
                    if event["event"] == "replies" and event.get("stage") == "share":
                        dep.kill_site(2)
                        killed["at"] = time.time()
                        return
            time.sleep(0.02)

    # Execute
    try:
        dep.start()
        watcher = threading.Thread(target=kill_after_shares, daemon=True)
        watcher.start()
        dep.submit(config, out=out, **{**TIMEOUTS, "stage_timeout": 30.0})
        watcher.join(timeout=10)
    finally:
        dep.close()

    # Assert: the round is applied without site 2, equal to the in-process run in which
    # site 2 vanishes after sharing its keys and before uploading.
    assert killed, "site 2 was never killed"
    record = json.loads((out / "metrics.json").read_text())["rounds"][0]
    assert record["applied"], record["error"]
    assert record["survivors"] == [0, 1] and record["dropped"] == [2]
    assert "2" in record["transport"]["site_errors"]
    fed = Federation(config, dropout_schedule=lambda r, chosen: ({2}, set()))
    fed.run_round(1)
    _assert_same_weights(
        load_file(str(out / "model.safetensors")), fed.global_model.state_dict(), config
    )
