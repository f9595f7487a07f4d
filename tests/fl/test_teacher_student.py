"""``--strategy teacher-student``: pseudo-labels, the encoded loss, the labelled split, privacy.

Tiny 16^3 synthetic-seg volumes, two sites, one or two rounds: the properties that matter
(thresholding, unlabelled maps never read, every DP step accounted, the audit, the
refusals), not how well the student learns (that is ``securefed bench semi-supervised``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from securefed.config import RunConfig
from securefed.errors import ConfigError
from securefed.fl.tasks import _DiceCE
from securefed.fl.teacher_student import (
    SemiSupervisedLoss,
    TeacherStudentDataset,
    drop_labels,
    encode_pseudo,
    labelled_indices,
    pseudo_label_maps,
)

K = 4
OPTIONS = {"n_train": 8, "n_val": 4, "n_test": 4, "image_size": 16, "n_groups": 2}


def pretrain_teacher(root):
    """A segmentation teacher pretrained (briefly) on another synthetic-seg draw (public)."""
    from securefed.fl.pretrain import pretrain

    return pretrain(
        out=root / "pre",
        dataset="synthetic-seg",
        data_options=OPTIONS,
        model="unet",
        epochs=1,
        batch_size=4,
        seed=99,
        device="cpu",
        progress=False,
    )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The module's teacher weights."""
    return pretrain_teacher(tmp_path_factory.mktemp("teacher"))


def _config(teacher_file, /, **changes) -> RunConfig:
    return RunConfig(
        dataset="synthetic-seg",
        data_options=OPTIONS,
        model="unet",
        clients=2,
        partition="by-group",
        rounds=1,
        local_epochs=1,
        batch_size=2,
        lr=0.1,
        dp_epsilon=None,
        device="cpu",
        strategy="teacher-student",
        pretrained=str(teacher_file),
        labelled_fraction=0.5,
        pseudo_threshold=0.5,
    ).replace(**changes)


# -- pseudo-labels ----------------------------------------------------------------------------


def test_pseudo_labels_never_include_voxels_below_the_threshold():
    # Hand-made teacher output over 2 x 3 voxels: confidences 0.95, 0.9 (= threshold), 0.89,
    # 0.5, 0.97, 0.25 (uniform).
    probs = torch.tensor(
        [
            [[0.95, 0.02, 0.02, 0.01], [0.05, 0.9, 0.03, 0.02], [0.01, 0.05, 0.05, 0.89]],
            [[0.5, 0.3, 0.1, 0.1], [0.01, 0.01, 0.97, 0.01], [0.25, 0.25, 0.25, 0.25]],
        ]
    )  # (spatial 2 x 3, K)
    probs = probs.permute(2, 0, 1)[None]  # (1, K, 2, 3)

    encoded = encode_pseudo(probs, threshold=0.9, num_classes=K)

    assert encoded.tolist() == [[[K + 0, K + 1, 2 * K], [2 * K, K + 2, 2 * K]]]
    conf = probs.max(dim=1).values
    assert bool((encoded[conf < 0.9] == 2 * K).all())  # nothing below the threshold


class _FixedTeacher(nn.Module):
    """Logits fixed in advance: voxel confidence decides, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), *self.logits.shape[1:]) * self.scale


def test_the_teacher_labels_only_confident_voxels_and_stays_in_its_mode():
    logits = torch.zeros(1, K, 4, 4, 4)
    logits[0, 2, :2] = 10.0  # half the volume: class 2 with probability ~0.9999
    teacher = _FixedTeacher(logits).train()
    images = np.zeros((3, 1, 4, 4, 4), dtype=np.float32)

    encoded = pseudo_label_maps(
        teacher, images, num_classes=K, threshold=0.9, device=torch.device("cpu"), batch_size=2
    )

    assert encoded.shape == (3, 4, 4, 4)
    assert bool((encoded[:, :2] == K + 2).all())
    assert bool((encoded[:, 2:] == 2 * K).all())  # uniform (0.25): ignored
    assert teacher.training  # put back as it was


# -- the encoded loss ---------------------------------------------------------------------------


def test_the_loss_decodes_each_sample_and_ignored_voxels_add_nothing():
    torch.manual_seed(0)
    loss = SemiSupervisedLoss(num_classes=K, unlabelled_weight=0.5, supervised=_DiceCE())
    logits = torch.randn(2, K, 4, 4, 4)
    true = torch.randint(0, K, (1, 4, 4, 4))
    pseudo = torch.full((1, 4, 4, 4), 2 * K)
    pseudo[0, 0] = K + 1  # 16 of 64 voxels pseudo-labelled class 1
    target = torch.cat([true, pseudo])

    got = loss(logits, target)

    ce = nn.functional.cross_entropy(logits[1:, :, 0], torch.ones(1, 4, 4, dtype=torch.long))
    want = (_DiceCE()(logits[:1], true) + 0.5 * ce * 16 / 64) / 2
    assert torch.allclose(got, want, atol=1e-6)
    # The logits of ignored voxels do not move the loss.
    changed = logits.clone()
    changed[1, :, 1:] = torch.randn(K, 3, 4, 4) * 10
    assert torch.allclose(loss(changed, target), got, atol=1e-6)


# -- which records are labelled ------------------------------------------------------------------


def test_labelled_indices_are_round_f_n_at_least_one_and_seeded_per_site():
    a = labelled_indices(seed=0, fraction=0.25, num_samples=10, site_id=0)
    assert len(a) == 2 and list(a) == sorted(a)
    assert np.array_equal(a, labelled_indices(seed=0, fraction=0.25, num_samples=10, site_id=0))
    others = [labelled_indices(seed=0, fraction=0.25, num_samples=10, site_id=s) for s in (1, 2)]
    assert any(not np.array_equal(a, b) for b in others)
    assert len(labelled_indices(seed=0, fraction=0.01, num_samples=10, site_id=0)) == 1
    assert len(labelled_indices(seed=0, fraction=1.0, num_samples=10, site_id=0)) == 10


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_labelled_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ConfigError, match="labelled-fraction") as info:
        RunConfig(labelled_fraction=fraction)
    assert "\n" not in str(info.value)


def test_the_cli_refuses_a_labelled_fraction_outside_zero_one(tmp_path):
    from click.testing import CliRunner

    from securefed.cli import cli

    result = CliRunner().invoke(
        cli, ["train", "--labelled-fraction", "0", "--out", str(tmp_path / "o")]
    )
    # `securefed` prints a ConfigError as one line (securefed.cli.main).
    assert isinstance(result.exception, ConfigError)
    assert "--labelled-fraction" in str(result.exception) and "(0, 1]" in str(result.exception)


def test_the_dataset_reads_only_the_labelled_maps():
    from securefed.data.bundle import ArraySplit

    rng = np.random.default_rng(0)
    images = rng.random((4, 1, 4, 4, 4), dtype=np.float32)
    labels = rng.integers(0, K, (4, 4, 4, 4))
    split = ArraySplit(images=images, labels=labels)
    labelled = np.array([1, 3])

    stripped = drop_labels(split, labelled)
    data = TeacherStudentDataset(
        stripped, labelled=labelled, num_classes=K, augment_labelled=False, spatial_dims=3, seed=1
    )

    assert not stripped.labels[[0, 2]].any()  # the true maps are gone
    assert np.array_equal(data[1][1].numpy(), labels[1])
    assert bool((data[0][1] == 2 * K).all())  # ignored until the teacher labels it
    data.set_pseudo_labels(np.full((2, 4, 4, 4), K + 3))
    assert set(np.unique(data[2][1].numpy())) <= {0, K + 3}  # 0: augmentation's padding


# -- the strategy in a federation ------------------------------------------------------------


def _fit_fields(fed, round_index: int = 1) -> dict:
    """A round's fit message as the server builds it (the teacher too, under --teacher fixed)."""
    from securefed.fl.site_runtime import weights_to_bytes

    fields = {
        "weights": weights_to_bytes(fed.models[0].state_dict()),
        "layout_keys": list(fed.layout.keys),
        "round": round_index,
        "n_sites": 2,
        "history": [],
    }
    if fed.teacher_blob is not None:
        fields["teacher"] = fed.teacher_blob
    return fields


def _fit_vector(fed, site) -> np.ndarray:
    return np.frombuffer(site.fit(_fit_fields(fed))["vector"], dtype=np.uint8).copy()


def _zeroed(fed) -> bytes:
    """The model's weights, every floating tensor 0: a teacher that labels nothing alike."""
    from securefed.fl.site_runtime import weights_to_bytes

    state = {
        k: torch.zeros_like(v) if v.is_floating_point() else v
        for k, v in fed.models[0].state_dict().items()
    }
    return weights_to_bytes(state)


def test_unlabelled_volumes_never_enter_the_loss_corrupting_their_maps_changes_nothing(teacher):
    import dataclasses

    from securefed.fl.simulation import Federation
    from securefed.fl.site_runtime import SiteRuntime

    config = _config(teacher)
    fed = Federation(config)
    site = fed.sites[0]
    assert not site.train.labels[~np.isin(np.arange(len(site.train)), site.labelled)].any()

    def twin(corrupt_labelled: bool) -> SiteRuntime:
        # The site's original shard, with the maps of the unlabelled (or labelled) records
        # replaced by garbage.
        from securefed.fl.planning import site_splits

        train, _ = site_splits(config, train=fed.bundle.train, val=fed.bundle.val)[0]
        hit = np.isin(np.arange(len(train)), site.labelled) == corrupt_labelled
        labels = np.array(train.labels)
        labels[hit] = (labels[hit] + 1) % K
        return SiteRuntime(
            config,
            client_id=0,
            train=dataclasses.replace(train, labels=labels),
            heldout=None,
            spec=fed.spec,
            task=fed.task,
            spatial_dims=3,
            device=torch.device("cpu"),
            dataset_name="synthetic-seg",
            fingerprint=fed.bundle.fingerprint,
        )

    reference = _fit_vector(fed, site)
    assert np.array_equal(_fit_vector(fed, twin(corrupt_labelled=False)), reference)
    # The check can fail: corrupting the labelled maps does change the update.
    assert not np.array_equal(_fit_vector(fed, twin(corrupt_labelled=True)), reference)


@pytest.mark.parametrize("mode", ["fixed", "global"])
def test_the_teacher_is_the_pretrained_model_under_fixed_and_the_global_one_under_global(
    teacher, mode
):
    # The server's global model labels nothing (all-zero weights: uniform softmax, below the
    # threshold); the pretrained teacher labels voxels. A fixed-teacher site that took the
    # global model instead would pseudo-label nothing.
    from securefed.fl.simulation import Federation

    fed = Federation(_config(teacher, teacher=mode))
    assert (fed.teacher_blob is not None) == (mode == "fixed")
    fields = {**_fit_fields(fed), "weights": _zeroed(fed)}
    site = fed.sites[0]
    site.fit(fields)
    coverage = site.train_log[-1]["pseudo_coverage"]
    if mode == "fixed":
        assert coverage > 0.5
    else:
        assert coverage == 0.0


@pytest.mark.parametrize("mode, labelled", [("fixed", 1), ("global", 2)])
def test_a_site_labels_again_only_when_its_teacher_changes(teacher, monkeypatch, mode, labelled):
    # Fixed: the same teacher each round, labelled once. Global: the teacher is the round's
    # model, so stale pseudo-labels from round 1 would be a wrong recipe, not a saving.
    import securefed.fl.site_runtime as runtime
    from securefed.fl.simulation import Federation

    calls = []
    real = runtime.pseudo_label_maps
    monkeypatch.setattr(
        runtime, "pseudo_label_maps", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    fed = Federation(_config(teacher, teacher=mode, rounds=2))
    site = fed.sites[0]
    site.fit(_fit_fields(fed, 1))
    site.fit({**_fit_fields(fed, 2), "weights": _zeroed(fed)})
    assert len(calls) == labelled


def test_a_fixed_teacher_site_refuses_a_fit_without_the_teacher(teacher):
    from securefed.errors import ProtocolError
    from securefed.fl.simulation import Federation

    fed = Federation(_config(teacher))
    fields = _fit_fields(fed)
    del fields["teacher"]
    with pytest.raises(ProtocolError, match="--teacher fixed") as info:
        fed.sites[0].fit(fields)
    assert "\n" not in str(info.value)


def test_the_server_sends_the_pretrained_teacher_unchanged_in_every_round(teacher):
    from securefed.fl.simulation import Federation
    from securefed.fl.site_runtime import weights_to_bytes
    from securefed.protocol.wire import Stage

    fed = Federation(_config(teacher, rounds=2))
    pretrained = weights_to_bytes(fed.models[0].state_dict())
    sent = []
    exchange = fed.logged.exchange

    def spy(payloads, **kwargs):
        sent.extend(f for stage, f in payloads.values() if stage == Stage.FIT)
        return exchange(payloads, **kwargs)

    fed.logged.exchange = spy
    fed.run_round(1)
    fed.run_round(2)
    assert len(sent) == 4
    assert all(f["teacher"] == pretrained for f in sent)
    assert sent[-1]["weights"] != pretrained  # the global model moved; the teacher did not


def test_a_run_recorded_before_schema_3_5_replays_with_the_global_teacher(teacher):
    recorded = _config(teacher).to_dict()
    del recorded["teacher"]
    assert RunConfig.from_recorded(recorded).teacher == "global"
    assert RunConfig.from_dict(recorded).teacher == "fixed"  # a new run's default


def test_supervised_only_trains_on_the_labelled_records_alone(teacher):
    from securefed.fl.simulation import Federation

    fed = Federation(_config(teacher, strategy="fedavg"))
    full = Federation(_config(teacher, strategy="fedavg", labelled_fraction=1.0))
    for site, whole in zip(fed.sites, full.sites):
        assert len(site.trainer.dataset) == round(0.5 * len(whole.train))
    ts = Federation(_config(teacher))
    assert [len(s.trainer.dataset) for s in ts.sites] == [len(s.train) for s in full.sites]


@pytest.mark.integration
def test_dp_with_masking_passes_the_audit_and_accounts_every_step_like_fedavg(teacher, tmp_path):
    from securefed.dp.audit import audit_run
    from securefed.run import train

    dp = {"dp_epsilon": 8.0, "secure_agg": "mask", "rounds": 2}
    run = train(_config(teacher, **dp), out_dir=tmp_path / "ts", progress=False)
    base = train(
        _config(teacher, **dp, strategy="fedavg", labelled_fraction=1.0),
        out_dir=tmp_path / "fedavg",
        progress=False,
    )

    assert audit_run(run).ok
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["strategy"]["name"] == "teacher-student"
    assert "pseudo-labels" in privacy["dp_applies_to"] and "DP-SGD" in privacy["dp_applies_to"]
    keep = ("round", "client_id", "steps", "noise_multiplier", "sample_rate", "phase")
    events = [{k: e[k] for k in keep} for e in privacy["events"]]
    fedavg = json.loads((base / "privacy.json").read_text())["events"]
    # One event per site and round with the planned steps: the same as FedAvg at the same n.
    assert events == [{k: e[k] for k in keep} for e in fedavg]
    assert len(events) == 2 * 2
    for c in privacy["clients"]:
        assert (
            sum(e["steps"] for e in events if e["client_id"] == c["client_id"])
            == c["planned_steps"]
        )
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("voxel_sensitivity", "voxel_specificity", "voxel_f1", "voxel_iou"):
        assert key in metrics["final"]
        assert all(key in c for c in metrics["rounds"][-1]["clients"])
    assert "Voxel level" in (run / "summary.md").read_text()


# -- refusals and deployment -------------------------------------------------------------------


def test_classification_with_teacher_student_is_refused_in_one_line(small_npz, teacher):
    from securefed.fl.simulation import Federation

    config = RunConfig(
        data=str(small_npz), clients=2, strategy="teacher-student", pretrained=str(teacher)
    )
    with pytest.raises(ConfigError, match="teacher-student is for segmentation") as info:
        Federation(config)
    assert "\n" not in str(info.value)


def test_teacher_student_needs_a_teacher():
    with pytest.raises(ConfigError, match="needs a teacher"):
        RunConfig(strategy="teacher-student")


@pytest.mark.parametrize("secure_agg", ["none", "mask", "he"])
def test_the_deploy_path_accepts_teacher_student(teacher, secure_agg):
    from securefed.deploy.coordinator import check_deployable

    check_deployable(_config(teacher, secure_agg=secure_agg, dp_epsilon=8.0))


def test_pretrain_checks_the_task_it_is_asked_for(tmp_path):
    from securefed.fl.pretrain import pretrain

    with pytest.raises(ConfigError, match="--task classification does not match"):
        pretrain(
            out=tmp_path / "pre",
            dataset="synthetic-seg",
            data_options=OPTIONS,
            task="classification",
            epochs=1,
            device="cpu",
            progress=False,
        )


def test_a_fixed_teacher_without_a_fitting_head_is_refused_in_one_line(teacher, tmp_path):
    # The loader re-initialises an output layer the file lacks; as a fixed teacher it would
    # pseudo-label at random for the whole run.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from securefed.fl.simulation import Federation

    fed = Federation(_config(teacher, teacher="global"))
    heads = tuple(fed.built.head_prefixes)
    with safe_open(str(teacher), "pt") as f:
        meta = f.metadata()
    state = {k: v for k, v in load_file(str(teacher)).items() if not k.startswith(heads)}
    headless = tmp_path / "headless.safetensors"
    save_file(state, str(headless), metadata=meta)
    assert Federation(_config(headless, teacher="global")).transfer["reinitialised"]

    with pytest.raises(ConfigError, match="--teacher fixed") as info:
        Federation(_config(headless))
    assert "\n" not in str(info.value)


def test_a_fixed_teacher_site_refuses_another_teacher_or_non_finite_weights(teacher):
    # The pin keeps the recipe honest (one teacher for the run); a refused teacher does not
    # use up the round: the same round with the right teacher then trains.
    from securefed.errors import ProtocolError
    from securefed.fl.simulation import Federation

    fed = Federation(_config(teacher, rounds=2))
    site = fed.sites[0]
    site.fit(_fit_fields(fed, 1))
    with pytest.raises(ProtocolError, match="another teacher"):
        site.fit({**_fit_fields(fed, 2), "teacher": _zeroed(fed)})

    other = Federation(_config(teacher, rounds=2))
    nan = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in other.models[0].state_dict().items()
    }
    from securefed.fl.site_runtime import weights_to_bytes

    with pytest.raises(ProtocolError, match="non-finite") as info:
        other.sites[0].fit({**_fit_fields(other, 1), "teacher": weights_to_bytes(nan)})
    assert "\n" not in str(info.value)
    with pytest.raises(ProtocolError, match="the teacher's weights"):
        other.sites[0].fit({**_fit_fields(other, 1), "teacher": b"not safetensors"})
    other.sites[0].fit(_fit_fields(other, 1))  # round 1 was not used up
    assert other.sites[0].train_log[-1]["pseudo_coverage"] > 0


def test_a_run_recorded_before_schema_3_5_of_another_strategy_takes_todays_default(teacher):
    # Other strategies have no teacher: resuming their old checkpoints with today's flags
    # must not see a spurious difference.
    recorded = _config(teacher, strategy="fedavg").to_dict()
    del recorded["teacher"]
    assert RunConfig.from_recorded(recorded).teacher == "fixed"
    assert not RunConfig.from_recorded(recorded).differences(_config(teacher, strategy="fedavg"))


@pytest.mark.integration
def test_a_resumed_fixed_teacher_run_trains_the_model_of_the_uninterrupted_one(teacher, tmp_path):
    # The resumed server must send the pretrained teacher again, not the checkpoint's global
    # model; without DP the run is seeded, so a wrong teacher in round 2 changes the model.
    from safetensors.torch import load_file

    from securefed.run import RunInterrupted, train
    from tests.fl.test_resume import _partials, _StopAt

    config = _config(teacher, rounds=2)
    whole = train(config, out_dir=tmp_path / "whole", progress=False)
    fed = _StopAt(config, stop_at=2, exc=KeyboardInterrupt())
    with pytest.raises(RunInterrupted):
        train(config, out_dir=tmp_path / "cut", federation=fed, progress=False)
    (partial,) = _partials(tmp_path)
    resumed = train(resume=partial, progress=False)

    a = load_file(str(whole / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_global_teacher_run_with_todays_default_names_the_option(teacher, tmp_path):
    from securefed.run import RunInterrupted, train
    from tests.fl.test_resume import _partials, _StopAt

    config = _config(teacher, rounds=2, teacher="global")
    fed = _StopAt(config, stop_at=2, exc=KeyboardInterrupt())
    with pytest.raises(RunInterrupted):
        train(config, out_dir=tmp_path / "cut", federation=fed, progress=False)
    (partial,) = _partials(tmp_path)
    with pytest.raises(ConfigError, match=r"\(teacher\).*--teacher global") as info:
        train(config.replace(teacher="fixed"), resume=partial, progress=False)
    assert "\n" not in str(info.value)
