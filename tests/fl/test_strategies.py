"""Strategies of issue #4 in the in-process runtime: FedProx, FTL, CFL, twins, cyclic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from securefed.config import RunConfig
from securefed.errors import ConfigError
from securefed.fl.simulation import Federation
from securefed.fl.site_runtime import local_update


def _vec(fed, k=0):
    return fed.layout.flatten(fed.models[k].state_dict())


def _run(cfg, rounds=None, **kw):
    fed = Federation(cfg, **kw)
    for r in range(1, (rounds or cfg.rounds) + 1):
        fed.run_round(r)
    return fed


# -- FedProx ----------------------------------------------------------------------------------
def test_fedprox_keeps_local_models_closer_to_the_global_model(small_config):
    # Same DP noise in both runs, so only the proximal step differs.
    cfg = small_config.replace(rounds=1, local_epochs=2, lr=0.5, reproducible_noise=True)
    plain = Federation(cfg)
    prox = Federation(cfg.replace(strategy="fedprox", prox_mu=1.0))
    site_p, site_q = plain.sites[0], prox.sites[0]
    far, _, _, _ = local_update(
        cfg, trainer=site_p.trainer, layout=plain.layout, model=plain.models[0], round_index=1
    )
    near, _, _, _ = local_update(
        prox.config, trainer=site_q.trainer, layout=prox.layout, model=prox.models[0], round_index=1
    )
    assert np.linalg.norm(near[:-1]) < 0.9 * np.linalg.norm(far[:-1])
    # the proximal step depends on no data: the same DP steps are accounted either way
    assert [e.steps for e in site_p.ledger.events] == [e.steps for e in site_q.ledger.events]
    assert plain.plans[0] == prox.plans[0]


def test_fedprox_defaults_mu_and_rejects_negative_mu():
    assert RunConfig(strategy="fedprox").effective_prox_mu == 0.01
    assert RunConfig().effective_prox_mu == 0.0
    with pytest.raises(ConfigError, match="prox_mu"):
        RunConfig(prox_mu=-1.0)


def test_server_optimizer_runs_under_secure_aggregation_and_changes_the_step(small_config):
    cfg = small_config.replace(rounds=1, secure_agg="mask")
    avg = _run(cfg)
    adam = _run(cfg.replace(server_opt="adam", server_lr=0.01))
    assert not np.allclose(_vec(avg), _vec(adam))
    # FedAdam moves every coordinate by at most lr / (1 - beta1) in one step
    start = Federation(cfg)
    assert np.abs(_vec(adam) - _vec(start)).max() <= 0.01 * 0.1 / 1e-3 * 1.01


# -- federated transfer learning --------------------------------------------------------------
@pytest.fixture
def pretrained_file(tmp_path, small_npz):
    from securefed.fl.pretrain import pretrain

    return pretrain(
        out=tmp_path / "pre",
        data=str(small_npz),
        public_fraction=0.2,
        epochs=1,
        batch_size=32,
        device="cpu",
        progress=False,
    )


@pytest.mark.parametrize("mode", ["none", "mask"])
def test_ftl_leaves_frozen_parameters_bit_identical(small_config, pretrained_file, mode):
    from safetensors.torch import load_file

    cfg = small_config.replace(
        strategy="ftl",
        pretrained=str(pretrained_file),
        public_fraction=0.2,
        rounds=2,
        secure_agg=mode,
    )
    fed = _run(cfg)
    pre = load_file(str(pretrained_file))
    frozen = set(fed.transfer["frozen"])
    assert frozen, "freeze backbone froze nothing"
    state = fed.global_model.state_dict()
    for name in frozen:
        assert torch.equal(state[name], pre[name]), name
    trainable = [n for n, p in fed.global_model.named_parameters() if p.requires_grad]
    assert trainable and not any(torch.equal(state[n], pre[n]) for n in trainable)
    # only the trainable parameters are aggregated (and so sent)
    assert fed.layout.keys == trainable
    assert fed.layout.size == fed.transfer["trainable_parameters"] < fed.built.num_parameters
    sent = fed.records[-1].data["bytes_per_client"]
    assert sent and all(b < 4 * fed.built.num_parameters for b in sent.values())


def test_privacy_report_counts_frozen_and_trainable_in_scalars_and_in_tensors(
    small_config, pretrained_file, tmp_path
):
    # Prepare
    import json

    from securefed.run import train

    cfg = small_config.replace(
        strategy="ftl",
        pretrained=str(pretrained_file),
        public_fraction=0.2,
        rounds=1,
        local_epochs=1,
        dp_epsilon=None,
    )
    fed = Federation(cfg)
    params = dict(fed.global_model.named_parameters())
    frozen = fed.transfer["frozen"]

    # Execute
    out = train(cfg, out_dir=tmp_path / "run", progress=False)

    # Assert: "parameters" are scalars (as in num_parameters), "tensors" are arrays
    privacy = json.loads((out / "privacy.json").read_text())
    transfer = privacy["transfer"]
    assert transfer["frozen_tensors"] == len(frozen) > 0
    assert transfer["trainable_tensors"] == len(params) - len(frozen) > 0
    assert transfer["frozen_parameters"] == sum(params[n].numel() for n in frozen)
    total = transfer["frozen_parameters"] + transfer["trainable_parameters"]
    assert total == privacy["model"]["num_parameters"]


def test_ftl_sites_never_hold_a_public_sample(small_config, pretrained_file):
    cfg = small_config.replace(strategy="ftl", pretrained=str(pretrained_file), public_fraction=0.2)
    fed = Federation(cfg)
    n_public = len(fed.public_indices)
    assert n_public == pytest.approx(0.2 * len(fed.bundle.train), abs=4)
    assert sum(len(s.train) for s in fed.sites) == len(fed.bundle.train) - n_public
    pub = {fed.bundle.train.images[i].tobytes() for i in fed.public_indices}
    for s in fed.sites:
        assert not pub & {img.tobytes() for img in s.train.images}
    assert fed.transfer["pretrained"]["verified_disjoint"] is True


def test_ftl_backbone_except_last_aggregates_the_head_and_the_last_block(
    small_config, pretrained_file
):
    cfg = small_config.replace(
        strategy="ftl",
        pretrained=str(pretrained_file),
        public_fraction=0.2,
        freeze="backbone-except-last",
    )

    fed = Federation(cfg)

    # cnn's last block is its last conv (features.8) and norm (features.9)
    expected = [
        f"{m}.{w}" for m in ("features.8", "features.9", "head") for w in ("weight", "bias")
    ]
    assert sorted(fed.layout.keys) == sorted(expected)
    assert fed.transfer["freeze"] == "backbone-except-last"


def test_ftl_refuses_weights_pretrained_on_the_sites_private_data(small_config, pretrained_file):
    base = small_config.replace(strategy="ftl", pretrained=str(pretrained_file))
    with pytest.raises(ConfigError, match="--public-fraction 0.2"):
        Federation(base)  # sites would train on the public 20% too
    with pytest.raises(ConfigError, match="public-seed"):
        Federation(base.replace(public_fraction=0.2, public_seed=7))


def test_ftl_needs_pretrained_weights():
    with pytest.raises(ConfigError, match="pretrained"):
        RunConfig(strategy="ftl")


# -- clustered FL (IFCA) ----------------------------------------------------------------------
def test_cfl_membership_is_per_site_and_secure_sums_per_cluster_match_plaintext(small_config):
    # IFCA runs only without DP (its cluster choice is not a DP release)
    cfg = small_config.replace(strategy="cfl", clusters=2, clients=4, rounds=1, dp_epsilon=None)
    plain = _run(cfg)
    masked = _run(cfg.replace(secure_agg="mask"))
    start = Federation(cfg.replace(secure_agg="mask"))
    p, m = plain.records[0].data, masked.records[0].data
    assert [c["members"] for c in p["clusters"]] == [c["members"] for c in m["clusters"]]
    members = sorted(c for cl in m["clusters"] for c in cl["members"])
    assert members == [0, 1, 2, 3]  # every site in exactly one cluster
    assert {c["client_id"]: c["cluster"] for c in m["clients"]} == {
        c: k for k, cl in enumerate(m["clusters"]) for c in cl["members"]
    }
    compared = 0
    for k, cl in enumerate(m["clusters"]):
        if cl["applied"]:
            # same seed, same local training: the secure per-cluster sum is the plaintext one
            np.testing.assert_allclose(_vec(masked, k), _vec(plain, k), atol=1e-4, rtol=0)
            assert len(cl["members"]) >= 2
            compared += 1
        else:
            np.testing.assert_array_equal(_vec(masked, k), _vec(start, k))
    assert compared >= 1


def _choose(fed, pick):
    """Each site picks its cluster by ``pick(site id)`` (the choice is the site's own step)."""
    for site in fed.sites:
        site.select_cluster = lambda models, cid=site.client_id: pick(cid)


def test_cfl_skips_a_single_site_cluster_under_secure_aggregation(small_config):
    cfg = small_config.replace(
        strategy="cfl", clusters=3, clients=3, rounds=1, secure_agg="mask", dp_epsilon=None
    )
    fed = Federation(cfg)
    _choose(fed, lambda cid: [0, 0, 1][cid])
    before = _vec(fed, 1)
    rec = fed.run_round(1)
    by_k = {c["cluster"]: c for c in rec.data["clusters"]}
    assert by_k[0]["applied"] and by_k[0]["members"] == [0, 1]
    assert not by_k[1]["applied"] and "reveal" in by_k[1]["skipped"]
    np.testing.assert_array_equal(_vec(fed, 1), before)
    # every site alone in its cluster: nothing can be aggregated, the round is not applied
    _choose(fed, lambda cid: cid)
    rec = fed.run_round(2)
    assert not rec.applied and "no cluster could be aggregated" in rec.data["error"]


# -- digital twins ----------------------------------------------------------------------------
def test_twins_beat_or_match_the_global_model_on_heterogeneous_sites(small_config):
    # by-label:1: every site sees one class, so one shared model cannot fit them all
    cfg = small_config.replace(
        clients=4, partition="by-label:1", rounds=2, personalize=2, dp_epsilon=None
    )
    fed = _run(cfg)
    table = fed.personalization_table()
    assert len(table) == 4
    for row in table:
        assert row["twin_accuracy"] >= row["global_accuracy"]
    assert np.mean([r["twin_gain"] for r in table]) > 0.1


def test_twin_fine_tuning_is_accounted_and_stays_within_the_budget(small_config):
    cfg = small_config.replace(rounds=2, personalize=1)
    fed = _run(cfg)
    phases = {e.phase for e in fed.ledger.events}
    assert phases == {"federated", "personalize", "calibrate"}
    for s in fed.sites:
        assert s.trainer.epsilon() <= cfg.dp_epsilon + 1e-6
        per = sum(e.steps for e in fed.ledger.for_client(s.client_id) if e.phase == "personalize")
        assert per > 0
    without = Federation(cfg.replace(personalize=0))
    assert fed.plans[0].planned_steps > without.plans[0].planned_steps


# -- cyclic schedule --------------------------------------------------------------------------
def test_cyclic_with_one_site_equals_parallel_with_one_site(small_config):
    cfg = small_config.replace(clients=1, rounds=1, reproducible_noise=True)
    a = _run(cfg)
    b = _run(cfg.replace(schedule="cyclic"))
    # parallel goes through the float64 weighted average n*u/n; cyclic hands weights on as is
    np.testing.assert_allclose(_vec(a), _vec(b), atol=1e-6, rtol=0)


def test_cyclic_schedule_cannot_be_combined_with_secure_aggregation():
    with pytest.raises(ConfigError, match="cyclic"):
        RunConfig(schedule="cyclic", secure_agg="mask")


# -- every strategy x DP x secure aggregation, end to end through the audit -------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy, mode",
    # FTL under CKKS runs in tests/test_cli_strategies.py, twins under CKKS add nothing new
    [(s, "mask") for s in ("fedprox", "ftl", "twins")] + [("fedprox", "he")],
)
def test_every_strategy_runs_with_dp_and_secure_aggregation(
    tmp_path, small_config, pretrained_file, strategy, mode
):
    from securefed.dp.audit import audit_run
    from securefed.run import train

    changes = {
        "fedprox": {"strategy": "fedprox", "server_opt": "avgm"},
        "ftl": {"strategy": "ftl", "pretrained": str(pretrained_file), "public_fraction": 0.2},
        "twins": {"personalize": 1},
    }[strategy]
    cfg = small_config.replace(rounds=1, secure_agg=mode, **changes)
    run = train(cfg, out_dir=tmp_path / "run", progress=False)
    result = audit_run(run)
    assert result.ok, [c for c in result.checks if not c.ok]
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rounds"][0]["applied"]
    assert metrics["strategy"] == cfg.strategy


@pytest.mark.slow
def test_cfl_runs_without_dp_under_masking(tmp_path, small_config):
    from securefed.run import train

    cfg = small_config.replace(
        strategy="cfl", clusters=2, clients=4, rounds=1, secure_agg="mask", dp_epsilon=None
    )
    run = train(cfg, out_dir=tmp_path / "run", progress=False)
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rounds"][0]["applied"] and metrics["strategy"] == "cfl"


def test_cfl_under_ckks_is_refused(small_config):
    # CFL needs one sum per cluster; CKKS decrypts one sum per round (at one site, fixed by
    # the session and the round), or a server could have overlapping subsets decrypted.
    with pytest.raises(ConfigError, match="cfl sums each cluster separately"):
        small_config.replace(strategy="cfl", clusters=2, secure_agg="he", dp_epsilon=None)


@pytest.mark.slow
@pytest.mark.integration
def test_segmentation_federation_with_dp_masking_and_twins(tmp_path):
    from securefed.run import train

    cfg = RunConfig(
        dataset="synthetic-seg",
        data_options={"n_train": 18, "n_val": 9, "n_test": 6, "image_size": 16, "n_groups": 3},
        model="unet",
        clients=3,
        partition="by-group",
        rounds=1,
        local_epochs=1,
        batch_size=2,
        lr=0.1,
        dp_epsilon=8.0,
        accountant="pld",
        secure_agg="mask",
        personalize=1,
        augment=True,
        device="cpu",
    )
    run = train(cfg, out_dir=tmp_path / "seg", progress=False)
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and metrics["primary_metric"] == "mean_dice"
    final = metrics["final"]
    for key in ("mean_dice", "mean_iou", "dice_et", "dice_tc", "dice_wt"):
        assert 0.0 <= final[key] <= 1.0, key
    assert len(metrics["personalization"]) == 3
    # each site's held-out data comes from its own hospital (group)
    assert all(c["num_samples"] >= 1 for c in metrics["rounds"][0]["clients"])
    assert "mean Dice" in (run / "summary.md").read_text()


def test_task_must_match_the_data(small_config):
    with pytest.raises(ConfigError, match="classification data set"):
        Federation(small_config.replace(task="segmentation"))


@pytest.mark.slow
def test_late_fusion_segmentation_runs_one_dp_round():
    cfg = RunConfig(
        dataset="synthetic-seg",
        data_options={"n_train": 6, "n_val": 3, "n_test": 3, "image_size": 16, "n_groups": 3},
        model="unet",
        fusion="late",
        clients=3,
        partition="by-group",
        rounds=1,
        local_epochs=1,
        batch_size=2,
        lr=0.1,
        accountant="pld",
        device="cpu",
    )
    fed = _run(cfg)
    assert fed.records[0].applied
    # one encoder per modality (T1, T1ce, T2, FLAIR), each with its own head
    assert len(fed.built.head_prefixes) == 4


# -- plug-ins ---------------------------------------------------------------------------------
def test_a_registered_server_optimizer_and_strategy_run_without_touching_the_engine(
    small_config, monkeypatch
):
    from securefed import plugins
    from securefed.fl.strategies import FedAvg, Strategy

    class Frozen(FedAvg):
        """Never moves the model: proves the registered class, not a built-in, ran."""

        name = "frozen"

        def step(self, *, current, delta):
            return current

    class TwoModels(Strategy):
        name = "two"

        def num_models(self, config):
            return 2

    monkeypatch.setattr(
        plugins.SERVER_OPTIMIZERS, "_entries", dict(plugins.SERVER_OPTIMIZERS._entries)
    )
    monkeypatch.setattr(plugins.STRATEGIES, "_entries", dict(plugins.STRATEGIES._entries))
    plugins.register_server_optimizer("frozen", Frozen)
    plugins.register_strategy("two", TwoModels())
    cfg = small_config.replace(rounds=1, server_opt="frozen", strategy="two")
    fed = Federation(cfg)
    assert len(fed.models) == 2
    before = _vec(fed)
    rec = fed.run_round(1)
    assert rec.applied
    np.testing.assert_array_equal(_vec(fed), before)
    with pytest.raises(ConfigError, match="strategy"):
        RunConfig(strategy="not-registered")
