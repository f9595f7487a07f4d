"""What an in-process run's files reveal about each site: only what disclosures list."""

from __future__ import annotations

import json

import pytest

from securefed.config import RunConfig
from securefed.dp.disclosures import PROTECTIONS, site_releases
from securefed.errors import ConfigError
from securefed.fl.simulation import Federation
from securefed.run import train

#: Per-site keys the server-side files may hold without a disclosure opt-in.
_HELD_OUT = {
    "loss", "num_samples", "n_samples", "accuracy", "balanced_accuracy", "macro_precision",
    "macro_recall", "macro_f1", "auc", "per_class", "confusion_matrix",
}  # fmt: skip


def _files(out):
    return tuple(
        json.loads((out / f"{f}.json").read_text()) for f in ("config", "metrics", "privacy")
    )


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    from tests.conftest import write_small_npz

    root = tmp_path_factory.mktemp("disclosures")
    npz = write_small_npz(root / "tiny.npz")
    config = RunConfig(
        data=str(npz), clients=3, rounds=2, local_epochs=1, batch_size=32, lr=0.5, device="cpu"
    )
    fed = Federation(config)
    out = train(config, out_dir=root / "run", progress=False, federation=fed)
    return config, fed, out


@pytest.mark.slow
def test_sizes_class_counts_and_training_loss_stay_at_the_sites(default_run):
    config, fed, out = default_run
    cfg, metrics, privacy = _files(out)
    for site in cfg["resolved"]["sites"]:
        assert set(site) == {"client_id", "num_heldout"}
    for c in privacy["clients"]:
        assert "num_samples" not in c and "class_counts" not in c
    for r in metrics["rounds"]:
        for c in r["clients"]:
            assert set(c) <= {"client_id", "participated", "epsilon"} | _HELD_OUT, c.keys()
    # the loss is still there for the site itself, in its own log
    assert [e["round"] for e in fed.sites[0].train_log] == [1, 2]
    assert metrics["schema_version"] == "2.4" and privacy["schema_version"] == "3.12"


@pytest.mark.slow
def test_each_site_picks_a_delta_below_one_over_ten_n_and_says_which_adjacency(default_run):
    config, fed, out = default_run
    _, _, privacy = _files(out)
    assert privacy["adjacency"] == "replace-one" and privacy["privacy_unit"] == "record"
    assert privacy["accountant"] == "pld" and privacy["noise"] == "secret"
    for c, site in zip(privacy["clients"], fed.sites):
        assert c["delta"] <= 1 / (10 * len(site.train))
    assert privacy["delta"] == max(c["delta"] for c in privacy["clients"])


@pytest.mark.slow
def test_disclosures_name_every_release_with_its_protection(default_run):
    config, _, out = default_run
    _, _, privacy = _files(out)
    assert privacy["disclosures"] == [
        {"message": r.message, "field": r.field, "protection": r.protection, "detail": r.detail}
        for r in site_releases(config)
    ]
    assert all(d["protection"] in PROTECTIONS for d in privacy["disclosures"])
    fields = {(d["message"], d["field"]) for d in privacy["disclosures"]}
    assert ("heldout", "metrics") in fields and ("fit", "plan") in fields
    assert not any(f in {"num_samples", "class_counts", "train_loss"} for _, f in fields)


@pytest.mark.parametrize(
    "secure_agg, field, protection",
    [("none", "vector", "dp-accounted"), ("mask", "message", "secure-sum")],
)
def test_the_update_is_dp_output_or_inside_the_secure_sum(secure_agg, field, protection):
    releases = site_releases(RunConfig(secure_agg=secure_agg))
    update = [r for r in releases if r.field == field and r.message in ("fit", "masked")]
    assert [r.protection for r in update] == [protection]


@pytest.mark.slow
def test_a_site_that_opts_in_discloses_its_size(small_config, tmp_path):
    out = train(
        small_config.replace(disclose_site_sizes=True), out_dir=tmp_path / "r", progress=False
    )
    cfg, metrics, privacy = _files(out)
    assert sum(c["num_samples"] for c in privacy["clients"]) == 240
    assert all(len(s["class_counts"]) == 4 for s in cfg["resolved"]["sites"])
    # One round engine: in-process sites disclose at set-up, as deployed ones do.
    assert ("setup", "num_samples") in {(d["message"], d["field"]) for d in privacy["disclosures"]}
    assert ("fit", "num_samples") not in {
        (d["message"], d["field"]) for d in privacy["disclosures"]
    }


def test_clustered_fl_is_refused_under_dp():
    # IFCA's cluster choice is the argmin of un-noised training losses: no finite epsilon.
    with pytest.raises(ConfigError, match="un-noised training loss"):
        RunConfig(strategy="cfl", dp_epsilon=8.0)
    RunConfig(strategy="cfl", dp_epsilon=None)


@pytest.mark.parametrize("name", ["prv", "rdp", "gdp"])
def test_add_remove_accountants_are_refused_with_the_reason(name):
    with pytest.raises(ConfigError, match="replace-one"):
        RunConfig(accountant=name)
