"""Run folders are safe and in-process runs resume: a kill mid-run costs no privacy accounting."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from securefed.config import RunConfig
from securefed.errors import ConfigError, IntegrityError
from securefed.fl.checkpoint import load_checkpoint, save_checkpoint
from securefed.fl.simulation import Federation
from securefed.run import PARTIAL_MARK, RunInterrupted, train
from tests.conftest import dp_72px_config, tiny_config, write_small_npz


def securefed(*args, cwd=None, script=None):
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "securefed.cli"]
    return subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def _one_line(proc, *fragments):
    # Start-up warnings (a site's small batches: docs/defaults.md) come before; the failure
    # itself is one line.
    err = "\n".join(
        line for line in proc.stderr.strip().splitlines() if not line.startswith("warning: ")
    )
    assert "Traceback" not in err, err
    assert err.count("\n") == 0, err
    for f in fragments:
        assert f in err, err


def _npz(tmp_path):
    return write_small_npz(tmp_path / "t.npz", n_train=120, n_val=30, n_test=40)


def _config(npz, **changes) -> RunConfig:
    return tiny_config(npz, **{"clients": 2, "rounds": 3, **changes})


class _StopAt(Federation):
    """A federation whose user presses Ctrl-C (or whose machine fails) at one round."""

    def __init__(self, config, *, stop_at: int, exc: BaseException, **kw):
        super().__init__(config, **kw)
        self.stop_at, self.exc = stop_at, exc

    def run_round(self, round_index):
        if round_index == self.stop_at:
            raise self.exc
        return super().run_round(round_index)


def _partials(parent):
    return sorted(p for p in parent.iterdir() if PARTIAL_MARK in p.name)


def _same_accounting(a, b):
    """Two runs' privacy claims and participation agree: events, steps, epsilons."""
    pa = json.loads((a / "privacy.json").read_text())
    pb = json.loads((b / "privacy.json").read_text())
    assert pa["events"] == pb["events"]
    keys = ("steps", "epsilon", "epsilon_per_round", "rounds_participated", "noise_multiplier")
    for ca, cb in zip(pa["clients"], pb["clients"], strict=True):
        for key in keys:
            assert ca[key] == pytest.approx(cb[key], rel=1e-9), key
    assert pa["epsilon"] == pytest.approx(pb["epsilon"], rel=1e-9)
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    assert [r["participants"] for r in ma["rounds"]] == [r["participants"] for r in mb["rounds"]]
    assert [r["round"] for r in ma["rounds"]] == [1, 2, 3]


# -- run folders ---------------------------------------------------------------------------------
def test_out_that_holds_a_users_files_is_refused_and_keeps_them(tmp_path):
    npz = _npz(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.md").write_text("my notes\n")
    proc = securefed("train", "--data", npz, "--rounds", 1, "--out", out, "--quiet")
    assert proc.returncode == 2
    _one_line(proc, "--out", "not empty and is not a securefed run")
    assert (out / "summary.md").read_text() == "my notes\n"
    assert sorted(p.name for p in out.iterdir()) == ["summary.md"]
    assert _partials(tmp_path) == []


def test_an_empty_out_folder_takes_the_run(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    run = train(_config(_npz(tmp_path), rounds=1), out_dir=out, progress=False)
    assert run == out
    assert (out / "privacy.json").exists() and (out / "model.safetensors").exists()
    assert not (out / "checkpoint").exists()  # a finished run needs no checkpoint
    assert _partials(tmp_path) == []
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_config(tmp_path / "t.npz", rounds=1), out_dir=out, progress=False)


def test_a_run_failing_in_its_first_round_leaves_no_folder(tmp_path):
    config = _config(_npz(tmp_path))
    fed = _StopAt(config, stop_at=1, exc=RuntimeError("disk on fire"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(config, out_dir=tmp_path / "run", federation=fed, progress=False)
    assert not (tmp_path / "run").exists()
    assert _partials(tmp_path) == []


def test_a_run_failing_later_keeps_its_completed_rounds_and_says_where(tmp_path):
    config = _config(_npz(tmp_path))
    fed = _StopAt(config, stop_at=3, exc=ConfigError("simulated failure"))
    with pytest.raises(ConfigError, match="simulated failure") as info:
        train(config, out_dir=tmp_path / "run", federation=fed, progress=False)
    assert not (tmp_path / "run").exists()
    (partial,) = _partials(tmp_path)
    assert f"securefed train --resume {partial}" in str(info.value)
    assert "rounds 1-2 kept" in str(info.value)
    assert load_checkpoint(partial).round == 2


def test_a_cli_run_failing_after_start_up_leaves_no_runs_folder(tmp_path):
    npz = _npz(tmp_path)
    proc = securefed("train", "--data", npz, "--rounds", 2, "--quiet", cwd=tmp_path, script=_FAIL)
    assert proc.returncode == 2
    _one_line(proc, "the first round failed")
    assert not (tmp_path / "runs").exists()


# -- resume --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({}, id="fedavg"),
        # FedAdam's moments survive; twins are fine-tuned (and accounted) every round.
        pytest.param(
            {
                "server_opt": "adam",
                "server_lr": 0.05,
                "personalize": 1,
                "personalize_when": "every",
            },
            id="adam-twins",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_an_interrupted_run_resumes_with_the_same_accounting(tmp_path, changes):
    npz = _npz(tmp_path)
    config = _config(npz, **changes)
    whole = train(config, out_dir=tmp_path / "whole", progress=False)

    fed = _StopAt(config, stop_at=3, exc=KeyboardInterrupt())
    with pytest.raises(RunInterrupted, match="securefed train --resume") as info:
        train(config, out_dir=tmp_path / "cut", federation=fed, progress=False)
    assert isinstance(info.value, KeyboardInterrupt)
    (partial,) = _partials(tmp_path)
    ck = load_checkpoint(partial)
    assert ck.round == 2
    assert {e["round"] for e in ck.meta["events"]} == {1, 2}
    if changes:
        assert ck.optimizer_state  # FedAdam's moments
        assert {e["phase"] for e in ck.meta["events"]} == {"federated", "personalize"}

    resumed = train(resume=partial, progress=False)
    assert resumed == tmp_path / "cut"
    assert not partial.exists() and not (resumed / "checkpoint").exists()
    _same_accounting(resumed, whole)
    if changes:
        metrics = json.loads((resumed / "metrics.json").read_text())
        assert "twin" in metrics["rounds"][-1]["clients"][0]
    audit = securefed("audit", resumed)
    assert audit.returncode == 0, audit.stdout + audit.stderr


@pytest.mark.slow
def test_cfl_clusters_and_membership_survive_a_resume(tmp_path):
    # IFCA runs without DP (its cluster choice is an unaccounted release); without DP the
    # training randomness is seeded, so the resumed run repeats the uninterrupted one.
    config = _config(_npz(tmp_path), dp_epsilon=None, strategy="cfl", clusters=2)
    whole = train(config, out_dir=tmp_path / "whole", progress=False)
    fed = _StopAt(config, stop_at=3, exc=KeyboardInterrupt())
    with pytest.raises(RunInterrupted):
        train(config, out_dir=tmp_path / "cut", federation=fed, progress=False)
    (partial,) = _partials(tmp_path)
    ck = load_checkpoint(partial)
    assert "model1" in ck.extra  # the second cluster model
    assert all(c is not None for c in ck.meta["clusters"].values())
    resumed = train(resume=partial, progress=False)
    a = json.loads((resumed / "metrics.json").read_text())
    b = json.loads((whole / "metrics.json").read_text())
    assert a["clusters"] == b["clusters"]
    assert [r["clusters"] for r in a["rounds"]] == [r["clusters"] for r in b["rounds"]]
    assert (resumed / "model_cluster1.safetensors").exists()


def test_resume_refuses_other_options_and_changed_data(tmp_path):
    npz = _npz(tmp_path)
    config = _config(npz, rounds=3)
    fed = _StopAt(config, stop_at=2, exc=KeyboardInterrupt())
    with pytest.raises(RunInterrupted):
        train(config, out_dir=tmp_path / "run", federation=fed, progress=False)
    (partial,) = _partials(tmp_path)

    with pytest.raises(ConfigError, match=r"options differ from the checkpoint's \(lr\)"):
        train(config.replace(lr=0.1), resume=partial, progress=False)
    proc = securefed("train", "--resume", partial, "--rounds", 5, "--quiet")
    assert proc.returncode == 2
    _one_line(proc, "options differ", "rounds")

    write_small_npz(
        npz, n_train=120, n_val=30, n_test=40, seed=1
    )  # the same file name, other records
    with pytest.raises(ConfigError, match="data set changed"):
        train(resume=partial, progress=False)
    assert load_checkpoint(partial).round == 1  # a refused resume changes nothing


_FAIL = textwrap.dedent(
    """
    import sys
    from securefed.cli import main
    from securefed.errors import ProtocolError
    from securefed.fl.simulation import Federation

    def fails(self, r):
        raise ProtocolError("the first round failed")

    Federation.run_round = fails
    sys.argv = ["securefed", *sys.argv[1:]]
    main()
    """
)

_CTRL_C = textwrap.dedent(
    """
    import sys
    from securefed.cli import main
    from securefed.fl.simulation import Federation

    run_round = Federation.run_round

    def pressed_ctrl_c_in_round_3(self, r):
        if r == 3:
            raise KeyboardInterrupt
        return run_round(self, r)

    Federation.run_round = pressed_ctrl_c_in_round_3
    sys.argv = ["securefed", *sys.argv[1:]]
    main()
    """
)


@pytest.mark.slow
def test_ctrl_c_in_the_cli_keeps_the_rounds_and_resume_finishes_the_run(tmp_path):
    npz = _npz(tmp_path)
    out = tmp_path / "run"
    flags = ("--data", npz, "--clients", 2, "--rounds", 3, "--local-epochs", 1, "--batch-size", 32)
    flags += ("--lr", 0.5, "--dp-epsilon", 8, "--accountant", "pld", "--device", "cpu", "--quiet")
    proc = securefed("train", *flags, "--out", out, script=_CTRL_C)
    assert proc.returncode == 130, proc.stderr
    (partial,) = _partials(tmp_path)
    _one_line(proc, "rounds 1-2 kept", f"securefed train --resume {partial}")
    assert not out.exists()

    done = securefed("train", "--resume", partial, "--quiet")
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    assert not partial.exists()
    whole = train(_config(npz, lr=0.5, batch_size=32), out_dir=tmp_path / "whole", progress=False)
    _same_accounting(out, whole)
    assert securefed("audit", out).returncode == 0


# -- the shared checkpoint format ---------------------------------------------------------------
def test_checkpoint_extra_groups_round_trip_and_tampering_is_refused(tmp_path):
    save_checkpoint(
        tmp_path,
        round_index=3,
        model_state={"w": torch.ones(2)},
        optimizer_state={},
        meta={"runtime": "in-process"},
        extra={"model1": {"layer.w": torch.zeros(3)}},
    )
    ck = load_checkpoint(tmp_path)
    assert ck.round == 3 and torch.equal(ck.extra["model1"]["layer.w"], torch.zeros(3))
    weights = tmp_path / "checkpoint" / "state.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(IntegrityError):
        load_checkpoint(tmp_path)


def _large_images(**changes) -> RunConfig:
    """A 2-round DP run on 72 px images (where `--model auto` depends on the rule)."""
    return dp_72px_config(rounds=2, **changes)


def _cut_after_round_1(config: RunConfig, tmp_path):
    fed = _StopAt(config, stop_at=2, exc=KeyboardInterrupt())
    with pytest.raises(RunInterrupted):
        train(config, out_dir=tmp_path / "run", federation=fed, progress=False)
    (partial,) = _partials(tmp_path)
    return partial


def test_a_checkpoint_from_before_auto_rule_2_resumes_with_the_model_it_trained(tmp_path):
    # A DP run on 72 px images checkpointed before `auto_rule` existed trained resnet-small;
    # today's rule would build scatter-linear, whose weights the checkpoint cannot fill.
    # Its sigma was bisected too (before schema 3.10): the resumed rounds must keep that sigma.
    # And it masked in auto's 32-bit ring (before 3.12): the resumed rounds must keep it.
    config = _large_images(auto_rule=1, sigma_search=1, secure_agg="mask", ring_auto_rule=1)
    partial = _cut_after_round_1(config, tmp_path)
    ck_json = partial / "checkpoint" / "checkpoint.json"
    doc = json.loads(ck_json.read_text())
    assert doc["config"].pop("auto_rule") == 1  # as written before schema 3.3
    assert doc["config"].pop("sigma_search") == 1  # and before 3.10
    assert doc["config"].pop("calibration_clip") is None  # and before 3.11 (R = 4)
    assert doc["config"].pop("ring_auto_rule") == 1  # and before 3.12
    ck_json.write_text(json.dumps(doc))

    # A user resuming with the same options cannot type the rule; deploy's resume adopts it.
    from securefed.cli.deploy import _with_recorded_settings

    today = config.replace(auto_rule=2, sigma_search=2, ring_auto_rule=2)
    assert _with_recorded_settings(today, partial).auto_rule == 1
    assert _with_recorded_settings(today, partial).sigma_search == 1
    assert _with_recorded_settings(today, partial).ring_auto_rule == 1
    # R is a flag: the same options now mean "by model" (16 here), which the run never had.
    with pytest.raises(ConfigError, match="pass --calibration-clip 4"):
        train(today, resume=partial, progress=False)
    today = today.replace(calibration_clip=4.0)
    resumed = train(today, resume=partial, progress=False)

    recorded = json.loads((resumed / "config.json").read_text())
    assert recorded["resolved"]["model"]["name"] == "resnet-small"
    assert recorded["run"]["auto_rule"] == 1 and recorded["run"]["sigma_search"] == 1
    assert recorded["run"]["ring_auto_rule"] == 1
    ring = json.loads((resumed / "privacy.json").read_text())["secure_aggregation_params"]
    assert ring["ring_bits"] == 32 and today.replace(ring_auto_rule=2).resolved_ring_bits < 32
    sigmas = {
        e["noise_multiplier"]
        for e in json.loads((resumed / "privacy.json").read_text())["events"]
        if e["phase"] == "federated"
    }
    from securefed.fl.planning import plan_site_privacy

    n = 16  # each site's training records
    bisected = plan_site_privacy(config, num_samples=n).noise_multiplier
    assert sigmas == {bisected}  # both rounds, both (equal) sites
    assert recorded["run"]["calibration_clip"] == 4.0
    assert bisected != plan_site_privacy(today, num_samples=n).noise_multiplier


def test_a_checkpoint_whose_weights_do_not_fit_is_refused_in_one_line(tmp_path):
    config = _large_images()
    partial = _cut_after_round_1(config, tmp_path)
    engine = Federation(config.replace(model="resnet-small"))
    with pytest.raises(ConfigError, match=r"another configuration \(model differ\)"):
        engine.restore(load_checkpoint(partial))
    # Same configuration, but weights from another architecture (a swapped state file).
    engine = Federation(config)
    ck = load_checkpoint(partial)
    ck.model_state.clear()
    ck.model_state["stem.0.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match="do not fit the scatter-linear"):
        engine.restore(ck)
