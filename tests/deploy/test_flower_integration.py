"""Real Flower processes on loopback: a SuperLink and three SuperNodes, TLS and node auth.

One deployment serves every test (each Flower message starts a site process, so runs are
slow). A first run (one round) uses ``--secure-agg he``. The second is two rounds of DP-SGD
with ``--secure-agg mask``:

1. after round 1 the server (SuperLink) is SIGKILLed and restarted, and the run resumes from
   the server's checkpoint;
2. in round 2, site 2's process is SIGKILLed once every site has trained (answered fit): it
   never uploads its masked input (with warm site processes the protocol steps take
   milliseconds, so the kill comes before them rather than between them), and the round must
   complete through Bonawitz dropout recovery;
3. the final weights must equal the in-process runtime with the same seed and the same
   dropout; the privacy report must match it and pass the audit.

Before the masked run (which kills a site), clustered FL (IFCA), and FTL from a public backbone
with a DP digital twin per site, each one round over Flower against the in-process run.

Every process group is gone at the end.
"""

from __future__ import annotations

import json
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
from tests.conftest import pretrain_public, write_small_npz  # noqa: E402

# Real SuperLink/SuperNode processes: minutes, so not in the default `pytest -q` (see pyproject).
pytestmark = [pytest.mark.slow, pytest.mark.integration]

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
        accountant="pld",
        secure_agg="mask",
        # Runtime parity over several rounds: training amplifies any rounding difference
        # between two runs, so these use the 64-bit ring, whose quantum (< 1e-8) keeps the
        # runs within 1e-7; the default ring is compared round by round with its
        # stated bound in test_parity.py.
        secagg_ring_bits=64,
        seed=0,
        # Compared with the in-process run: the same DP noise in both (the sites allow it).
        reproducible_noise=True,
    ).replace(**changes)


def _assert_same_weights(ours: dict, ref: dict, config: RunConfig) -> None:
    """Equal up to float32 rounding after several rounds.

    Each round's masked sum is exact to the fixed-point quantum, but masking rounds with
    fresh random coins, so a weight near a float32 rounding boundary can land one ulp either
    way, and the next round's training carries that on: two in-process masked runs with the
    same seed differ by as much (3e-8 here). One round is checked with the same bound below.

    The bound (1e-7 + 1e-6 relative) is ~1000x below one DP-SGD step's noise on a weight,
    so a wrong mask, a lost site or a skipped round could not pass it.
    """
    quantum = SecAggConfig(
        n_clients=config.clients, clip_range=config.secagg_clip, ring_bits=config.resolved_ring_bits
    ).codec.quantum
    assert quantum < 1e-8
    assert set(ours) == set(ref)
    for key, value in ref.items():
        diff = (ours[key].double() - value.double()).abs()
        bound = 1e-7 + 1e-6 * value.double().abs()
        assert bool((diff <= bound).all()), f"{key}: max diff {float(diff.max()):.3g}"


def _live_members(pgids: list[int]) -> list[str]:
    """Processes still running in these process groups (zombies awaiting a reaper excluded)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its ")".
        fields = text.rsplit(")", 1)[1].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp in pgids and state != "Z":
            alive.append(text.split(")", 1)[0] + ")")
    return alive


def _assert_one_round_equal(ours: dict, ref: dict) -> None:
    """One round from the same weights: equal up to float32 arithmetic noise.

    The masked sums agree to the fixed-point quantum (~1e-11 on an averaged weight), but the
    sites' float32 training runs in other processes, where thread scheduling and the number of
    threads a loaded machine grants can reorder reductions. We have seen 2 ulps on an idle CI
    runner and a 7.45e-9 difference (over 4 ulps of that small weight) on a loaded 2-core one.
    So the bound is not counted in ulps: |ours - ref| <= 1e-7 + 1e-6 |ref| (1e-6 relative is
    8-17 float32 ulps; the 1e-7 floor covers weights near 0, whose ulps are tiny). That is still
    ~1e5 times below what a wrong mask, a lost site or a skipped round changes: DP noise alone
    moves a weight by ~1e-2 a step.
    """
    for key, value in ref.items():
        diff = (ours[key].double() - value.double()).abs()
        bound = 1e-7 + 1e-6 * value.double().abs()
        assert bool((diff <= bound).all()), f"{key}: max diff {float(diff.max()):.3g}"


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    return write_small_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """SuperLink + 3 SuperNodes (TLS, node auth); the sites share a CKKS key set."""
    from securefed.crypto.ckks import CKKSParams, generate_keys, write_key_files

    root = tmp_path_factory.mktemp("flower")
    (root / "he").mkdir()
    secret, _ = write_key_files(generate_keys(params=CKKSParams()), directory=root / "he")
    dep = LocalDeployment(
        root / "deployment",
        sites=3,
        site_options={
            "he_key": secret,
            "allow_reproducible_noise": True,
            "allow_local_twins": True,
        },
        # The federation admits one dropout of 3 (the masked run kills a site mid-round).
        roster_threshold=2,
    )
    dep.pgids = []  # every process group ever started, for the clean-up check
    try:
        dep.start()
        dep.pgids += [dep.server.pid, *(p.pid for p in dep.site_procs.values())]
        yield dep, root
    finally:
        dep.close()


def _kill_when(dep: LocalDeployment, log: Path, site: int, *, stage: str, round_index: int):
    """Watch the server's log; SIGKILL ``site`` once every site answered ``stage``."""
    killed: dict[str, float] = {}

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if log.exists():
                for line in log.read_text().splitlines():
                    event = json.loads(line)
                    if (event["event"], event.get("stage"), event.get("round")) == (
                        "replies",
                        stage,
                        round_index,
                    ):
                        dep.kill_site(site)
                        killed["at"] = time.time()
                        return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


def _audit(out: Path, dep: LocalDeployment, tmp_path: Path) -> tuple[int, str]:
    """``securefed audit`` of a deployed run, with the keys the sites printed pinned."""
    keys = tmp_path / "site-keys.json"
    keys.write_text(json.dumps({str(k): v for k, v in dep.site_keys.items()}))
    audit = subprocess.run(
        [
            sys.executable,
            "-m",
            "securefed.cli",
            "audit",
            str(out),
            "--site-keys",
            str(keys),
            # the runs are compared with in-process runs, so both use the seed's noise
            "--allow-reproducible-noise",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return audit.returncode, audit.stdout + audit.stderr


def test_ckks_over_flower_equals_the_plaintext_sum(deployment, tiny_npz, tmp_path) -> None:
    dep, root = deployment
    config = _config(tiny_npz, rounds=1, secure_agg="he")
    out = dep.submit(config, out=root / "he-run", **TIMEOUTS)
    record = json.loads((out / "metrics.json").read_text())["rounds"][0]
    assert record["applied"] and record["survivors"] == [0, 1, 2]
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["secure_aggregation_params"]["server_holds_secret_key"] is False
    # Every site closed the run over Flower (query.close), naming the roster it pinned and the
    # model file the server wrote; the audit holds with the keys the sites printed.
    assert privacy["close"]["roster_sha256"] is not None
    code, out_text = _audit(out, dep, tmp_path)
    assert code == 0, out_text
    assert "3 sites closed after round 1 of 1" in out_text
    fed = Federation(config.replace(secure_agg="none"))
    fed.run_round(1)
    # CKKS is approximate (scale 2^40): agreement to float32 arithmetic, not to the ulp.
    _assert_same_weights(
        load_file(str(out / "model.safetensors")), fed.global_model.state_dict(), config
    )


@pytest.fixture(scope="module")
def public_backbone(tmp_path_factory) -> Path:
    """FTL weights pretrained on another (public) data set, as a hospital network would."""
    return pretrain_public(tmp_path_factory.mktemp("public"))


@pytest.mark.parametrize(
    "name, changes",
    [
        # IFCA: the sites pick their cluster over Flower; one masked sum per cluster.
        ("cfl", {"strategy": "cfl", "clusters": 2, "dp_epsilon": None}),
        # Transfer learning from a public backbone, and a DP digital twin at every site.
        ("ftl-twins", {"strategy": "ftl", "personalize": 1, "pretrained": "BACKBONE"}),
        # Twins without DP (docs/twins.md): no claim at the held-out step, no twin events.
        ("local-twins", {"personalize": 1, "twin_privacy": "local"}),
    ],
)
def test_cfl_ftl_and_twins_over_flower_equal_the_in_process_run(
    deployment, tiny_npz, public_backbone, name, changes
) -> None:
    dep, root = deployment
    if changes.get("pretrained") == "BACKBONE":
        changes = {**changes, "pretrained": str(public_backbone)}
    config = _config(tiny_npz, rounds=1, secagg_threshold=2, **changes)
    out = dep.submit(config, out=root / f"{name}-run", **TIMEOUTS)
    fed = Federation(config)
    fed.run_round(1)
    _assert_same_weights(
        load_file(str(out / "model.safetensors")), fed.global_model.state_dict(), config
    )
    metrics = json.loads((out / "metrics.json").read_text())
    record = metrics["rounds"][0]
    assert record["applied"], record["error"]
    if config.strategy == "cfl":
        assert record["clusters"] == fed.records[0].data["clusters"]
    if config.personalize:
        assert all("twin" in c for c in record["clients"])
        privacy = json.loads((out / "privacy.json").read_text())
        # (and the decision calibration's release after the last round, a DP classification run)
        twins = {"personalize"} if config.twin_privacy == "dp" else set()
        assert {e["phase"] for e in privacy["events"]} == {"federated", "calibrate"} | twins
        # Each site closed the run after its twin (a local twin's site refuses every step
        # but evaluation and the close once it answered for it).
        assert all(c.get("close_signature") for c in privacy["clients"])
        assert "not_closed" not in privacy["close"]


@pytest.fixture(scope="module")
def masked_run(deployment, tiny_npz):
    """Two masked rounds: a server restart after round 1, site 2 killed in round 2 (after fit)."""
    dep, root = deployment
    # t = 2 of 3 tolerates one dropout (the default for 3 sites, 3, tolerates none).
    config = _config(tiny_npz, secagg_threshold=2)
    out = root / "run"
    dep.submit(config, out=out, stop_after=1, **TIMEOUTS)
    after_round_1 = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    state_round_1 = load_file(str(out / "checkpoint" / "state.safetensors"))
    dep.kill_server()
    assert not (out / "privacy.json").exists()
    dep.start_server()
    dep.pgids.append(dep.server.pid)
    watcher, killed = _kill_when(dep, out / "deploy-log.jsonl", 2, stage="fit", round_index=2)
    dep.submit(config, out=out, resume=True, **{**TIMEOUTS, "stage_timeout": 20.0})
    watcher.join(timeout=10)
    return {
        "out": out,
        "config": config,
        "killed": killed,
        "after_round_1": after_round_1,
        "state_round_1": {k[len("model.") :]: v for k, v in state_round_1.items()},
    }


def _site_2_drops_in_round_2(round_index: int, chosen: list[int]) -> tuple[set[int], set[int]]:
    return ({2}, set()) if round_index == 2 else (set(), set())


@pytest.fixture(scope="module")
def in_process(masked_run, tmp_path_factory):
    """The same run in one process, site 2 vanishing before its upload in round 2.

    Whether a site drops before or after sharing its keys, it is left out of the sum and the
    others' masks are removed: the sum, and so the model, is the same.
    """
    from securefed.run import train

    config = masked_run["config"]
    fed = Federation(config, dropout_schedule=_site_2_drops_in_round_2)
    out = train(config, out_dir=tmp_path_factory.mktemp("ref"), progress=False, federation=fed)
    # Round 2 alone, from the deployed run's own round-1 weights: isolates the recovery.
    from_checkpoint = Federation(config, dropout_schedule=_site_2_drops_in_round_2)
    from_checkpoint.models[0].load_state_dict(masked_run["state_round_1"], strict=True)
    from_checkpoint.run_round(2)
    return {"out": out, "round_2_from_checkpoint": from_checkpoint.global_model.state_dict()}


def test_a_site_killed_mid_round_is_recovered(masked_run, in_process) -> None:
    assert masked_run["killed"], "site 2 was never killed"
    rec = json.loads((masked_run["out"] / "metrics.json").read_text())["rounds"][1]
    assert rec["applied"], rec["error"]
    assert rec["survivors"] == [0, 1] and rec["dropped"] == [2]
    assert "2" in rec["transport"]["site_errors"]
    # From the same round-1 weights, the recovered round equals the in-process one up to
    # float32 arithmetic noise.
    ours = load_file(str(masked_run["out"] / "model.safetensors"))
    _assert_one_round_equal(ours, in_process["round_2_from_checkpoint"])


def test_two_rounds_over_flower_equal_the_in_process_run(masked_run, in_process) -> None:
    ours = load_file(str(masked_run["out"] / "model.safetensors"))
    ref = load_file(str(in_process["out"] / "model.safetensors"))
    _assert_same_weights(ours, ref, masked_run["config"])
    metrics = json.loads((masked_run["out"] / "metrics.json").read_text())
    assert metrics["runtime"] == "flower"
    assert [r["applied"] for r in metrics["rounds"]] == [True, True]
    assert metrics["rounds"][0]["survivors"] == [0, 1, 2]


def test_privacy_report_matches_and_passes_the_audit(
    masked_run, in_process, deployment, tmp_path
) -> None:
    dep, _ = deployment
    ours = json.loads((masked_run["out"] / "privacy.json").read_text())
    ref = json.loads((in_process["out"] / "privacy.json").read_text())
    assert ours["events"] == ref["events"]
    # Site 2 dropped out of the last round (killed over Flower, lost in-process): only the
    # other two release calibration statistics, and metrics.json accounts exactly those.
    released = sorted(e["client_id"] for e in ours["events"] if e["phase"] == "calibrate")
    metrics = json.loads((masked_run["out"] / "metrics.json").read_text())
    assert released == metrics["rounds"][-1]["decision_calibration"]["accounted"] == [0, 1]
    for a, b in zip(ours["clients"], ref["clients"]):
        assert a["epsilon_per_round"] == pytest.approx(b["epsilon_per_round"], abs=1e-12)
        assert a["noise_multiplier"] == b["noise_multiplier"]
    assert ours["epsilon"] <= 8.0
    assert ("setup", "fingerprint") in {(d["message"], d["field"]) for d in ours["disclosures"]}
    assert all("num_samples" not in c for c in ours["clients"])  # sizes stay at the sites
    # The report carries the keys the sites made and printed at start-up: pin them.
    assert ours["site_keys"] == {str(k): v for k, v in dep.site_keys.items()}
    # Sites 0 and 1 closed the run; site 2 was killed in the last round and never came back,
    # so nothing shows where its spending ended: the audit fails that one line, and only it.
    assert sorted(c["client_id"] for c in ours["clients"] if "close_signature" in c) == [0, 1]
    assert set(ours["close"]["not_closed"]) == {"2"}
    code, out_text = _audit(masked_run["out"], dep, tmp_path)
    assert code == 1, out_text
    failed = [line for line in out_text.splitlines() if line.startswith("[FAIL]")]
    assert len(failed) == 1 and "closing claims" in failed[0], out_text
    assert "site 2: no closing signature" in failed[0]
    for name in ("config.json", "metrics.json", "model.safetensors", "summary.md"):
        assert (masked_run["out"] / name).exists()


def test_server_restart_resumes_from_its_checkpoint(masked_run) -> None:
    ck = masked_run["after_round_1"]
    assert ck["round"] == 1 and len(ck["records"]) == 1
    assert sorted(e["client_id"] for e in ck["events"]) == [0, 1, 2]
    log = [json.loads(line) for line in (masked_run["out"] / "deploy-log.jsonl").open()]
    kinds = [(e["event"], e.get("round")) for e in log]
    assert kinds.index(("stopped", 1)) < kinds.index(("resume", 1)) < kinds.index(("round", 2))
    assert kinds.count(("round", 1)) == 1  # round 1 is never re-run
    # Site 2 trained in round 2 (and was accounted) before it was killed.
    privacy = json.loads((masked_run["out"] / "privacy.json").read_text())
    trained = [e for e in privacy["events"] if e["phase"] == "federated"]
    assert sorted((e["round"], e["client_id"]) for e in trained) == [
        (r, s) for r in (1, 2) for s in (0, 1, 2)
    ]


def test_every_process_is_gone_after_close(deployment) -> None:
    dep, _ = deployment
    dep.close()
    assert dep.pgids and not _live_members(dep.pgids)
