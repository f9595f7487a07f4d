"""Real unlabelled volumes: NIfTI subjects without a label map under teacher-student.

A tiny two-hospital NIfTI folder (built with nibabel in tmp_path): hospital ``a`` holds
labelled subjects, hospital ``b`` only subjects without a label map (read with the loader's
``unlabelled`` option). Partitioned by hospital, site 1 has no labelled record at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from securefed.config import RunConfig
from securefed.errors import ConfigError
from securefed.fl.teacher_student import SemiSupervisedLoss, labelled_indices, site_labelled
from tests.data.test_nifti import _subject

K = 4  # BraTS
OPTIONS = {"image_size": 16, "unlabelled": True}
PUBLIC = 0.25


@pytest.fixture(scope="module")
def semi_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("semi") / "hospitals"
    for s in range(6):
        _subject(root / "a" / f"lab{s}", seed=s)
    for s in range(4):
        _subject(root / "b" / f"unl{s}", seed=20 + s)
        (root / "b" / f"unl{s}" / "seg.nii.gz").unlink()
    return root


@pytest.fixture(scope="module")
def teacher(semi_root, tmp_path_factory) -> Path:
    """Pretrained on a declared-public part of the same folder: drawn from labelled subjects."""
    from securefed.fl.pretrain import pretrain

    return pretrain(
        out=tmp_path_factory.mktemp("teacher") / "pre",
        data=str(semi_root),
        data_options=OPTIONS,
        model="unet",
        public_fraction=PUBLIC,
        epochs=1,
        batch_size=2,
        seed=3,
        device="cpu",
        progress=False,
    )


def _config(semi_root: Path, teacher: Path, **changes) -> RunConfig:
    """The teacher-student test run, on the NIfTI folder with every label map kept."""
    from tests.fl.test_teacher_student import _config as teacher_student_config

    return teacher_student_config(
        teacher,
        dataset=RunConfig().dataset,
        data=str(semi_root),
        data_options=OPTIONS,
        labelled_fraction=1.0,
        public_fraction=PUBLIC,
    ).replace(**changes)


def test_the_public_part_is_drawn_from_labelled_subjects_only(semi_root):
    from securefed.data import load_dataset
    from securefed.fl.transfer import public_split

    train = load_dataset(data=semi_root, seed=0, **OPTIONS).train
    for seed in range(5):
        private, public = public_split(train, fraction=PUBLIC, seed=seed)
        assert public.size and train.labelled[public].all()
        assert np.array_equal(np.union1d(private, public), np.arange(len(train)))


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_a_supervised_strategy_refuses_unlabelled_training_records(semi_root, teacher, strategy):
    from securefed.fl.simulation import Federation

    with pytest.raises(ConfigError, match=r"4 unlabelled record\(s\).*teacher-student") as info:
        Federation(_config(semi_root, teacher, strategy=strategy))
    assert "\n" not in str(info.value)


def test_a_deployed_site_refuses_them_too_under_a_supervised_strategy(semi_root, teacher):
    # The same check sits in the site runtime, which a deployed site builds from its own data.
    from securefed.data import load_dataset
    from securefed.fl.site_runtime import SiteRuntime

    config = _config(semi_root, teacher, strategy="fedavg")
    train = load_dataset(data=semi_root, seed=0, **OPTIONS).train
    with pytest.raises(ConfigError, match=r"site 1: .*4 unlabelled record\(s\)"):
        SiteRuntime(
            config,
            client_id=1,
            train=train,
            heldout=None,
            spec=None,
            task=None,
            spatial_dims=3,
            device=torch.device("cpu"),
            dataset_name="x",
            fingerprint="x",
        )


def test_labelled_set_is_the_flagged_records_within_the_fraction(semi_root):
    from securefed.data import load_dataset

    train = load_dataset(data=semi_root, seed=0, **OPTIONS).train
    flagged = np.flatnonzero(train.labelled)
    assert np.array_equal(site_labelled(train, seed=0, fraction=1.0, site_id=0), flagged)
    sizes = set()
    for seed in range(10):
        drawn = labelled_indices(seed=seed, fraction=0.5, num_samples=len(train), site_id=0)
        half = site_labelled(train, seed=seed, fraction=0.5, site_id=0)
        assert np.array_equal(half, np.intersect1d(drawn, flagged))
        sizes.add(half.size)
    assert min(sizes) < flagged.size  # the fraction does drop flagged-labelled records


def test_one_round_trains_and_the_loss_never_supervises_an_unlabelled_map(
    semi_root, teacher, tmp_path, monkeypatch
):
    from securefed.fl.simulation import Federation
    from securefed.run import train

    # Setup: record every target the loss receives
    seen: list[torch.Tensor] = []
    original = SemiSupervisedLoss.forward

    def recording(self, logits, target):
        seen.append(target.detach().cpu().clone())
        return original(self, logits, target)

    monkeypatch.setattr(SemiSupervisedLoss, "forward", recording)
    config = _config(semi_root, teacher)
    fed = Federation(config)
    labelled_site, unlabelled_site = fed.sites
    assert len(labelled_site.labelled) == len(labelled_site.train)
    assert len(unlabelled_site.labelled) == 0  # hospital b: pseudo-labels only
    true_maps = [torch.from_numpy(np.array(m)) for m in labelled_site.train.labels]

    # Execute
    run = train(config, out_dir=tmp_path / "run", progress=False)

    # Assert: the run completed; both sites trained
    assert (run / "metrics.json").is_file() and seen
    targets = torch.cat([t.reshape(t.shape[0], -1) for t in seen])
    supervised = targets[(targets < K).all(dim=1)]
    pseudo = targets[(targets >= K).any(dim=1)]
    assert len(pseudo) >= len(unlabelled_site.train)  # every unlabelled record, pseudo-labelled
    # Each supervised target is a labelled subject's true map, never an all-zero one.
    assert len(supervised) and all(row.any() for row in supervised)
    flat = torch.stack([m.reshape(-1) for m in true_maps])
    assert all((flat == row).all(dim=1).any() for row in supervised)


def test_a_deployed_site_reads_unlabelled_subjects_only_when_its_node_config_says_so(
    semi_root, teacher, caplog
):
    from securefed.deploy.site import NodeSettings, _load_site_data
    from securefed.errors import DataError

    run = _config(semi_root, teacher)  # the run asks for unlabelled=true
    # The run's option alone does not make a site read them: the loader refuses (in its log).
    with pytest.raises(DataError, match="site's log"):
        _load_site_data(run, NodeSettings(site_id=0, data=str(semi_root)))
    assert "unlabelled=true" in caplog.text
    mine = NodeSettings.from_node_config({"site-id": 0, "data": str(semi_root), "unlabelled": True})
    assert _load_site_data(run, mine).train.unlabelled_count == 4
    # Nor can a run turn it off for a site that chose it.
    plain = run.replace(data_options={"image_size": 16})
    assert _load_site_data(plain, mine).train.unlabelled_count == 4
    # A shard trial (the run's data) needs the site's setting and the run's to agree.
    with pytest.raises(ConfigError, match="in a shard trial they must agree"):
        _load_site_data(run, NodeSettings(site_id=0, shard=True))
    shard_mine = NodeSettings(site_id=0, shard=True, unlabelled=True)
    with pytest.raises(ConfigError, match="in a shard trial they must agree"):
        _load_site_data(plain.replace(data=str(semi_root)), shard_mine)
    # The label map's file name decides which subjects are labelled: never the run's.
    relabel = run.replace(data_options={**OPTIONS, "label_name": "flair"})
    with pytest.raises(ConfigError, match="never from the run"):
        _load_site_data(relabel, mine)
    with pytest.raises(ConfigError, match="`unlabelled` must be true or false"):
        NodeSettings.from_node_config({"site-id": 0, "unlabelled": "yes"})


def test_a_site_reading_unlabelled_subjects_refuses_other_strategies_before_reading(
    semi_root, teacher
):
    # Refused by policy, before any data is read: an error after loading would quote the
    # number of unlabelled subjects to the server.
    from securefed.deploy.site import NodeSettings
    from securefed.errors import PrivacyBudgetError

    node = NodeSettings(site_id=0, data=str(semi_root), unlabelled=True)
    with pytest.raises(PrivacyBudgetError) as info:
        node.check_policy(_config(semi_root, teacher, strategy="fedavg"))
    assert "only --strategy teacher-student" in str(info.value)
    assert not any(ch.isdigit() for ch in str(info.value).replace("site 0", ""))
    node.check_policy(_config(semi_root, teacher))  # teacher-student passes


def test_a_folder_without_any_label_map_is_one_data_error(tmp_path):
    from securefed.data import load_dataset
    from securefed.errors import DataError

    for s in range(4):
        _subject(tmp_path / "all" / f"unl{s}", seed=40 + s)
        (tmp_path / "all" / f"unl{s}" / "seg.nii.gz").unlink()
    with pytest.raises(DataError, match="no subject has a label map|labelled"):
        load_dataset(data=tmp_path / "all", seed=0, **OPTIONS)


def test_pretraining_on_all_training_records_refuses_unlabelled_ones(semi_root, tmp_path):
    from securefed.fl.pretrain import pretrain

    with pytest.raises(ConfigError, match=r"pretraining needs label maps, and 4 of its"):
        pretrain(
            out=tmp_path / "pre",
            data=str(semi_root),
            data_options=OPTIONS,
            model="unet",
            epochs=1,
            device="cpu",
            progress=False,
        )
