"""Fairness across sites (metrics.json 2.3): the pure function, summary.md, and a real run."""

import json
import math

import pytest

from securefed.fl.simulation import Federation
from securefed.metrics import site_fairness
from securefed.report.artifacts import write_outputs
from securefed.report.summary import fairness_lines
from tests.conftest import tiny_config

# The last round's per-site held-out accuracy of a recorded 10-round PneumoniaMNIST run (DP,
# seed 0, 5 label-skewed sites), with each site's held-out size.
RECORDED = [
    {"client_id": 0, "accuracy": 0.7652173913043478, "num_samples": 115},
    {"client_id": 1, "accuracy": 0.21052631578947367, "num_samples": 95},
    {"client_id": 2, "accuracy": 0.25, "num_samples": 12},
    {"client_id": 3, "accuracy": 1.0, "num_samples": 23},
    {"client_id": 4, "accuracy": 0.9713261648745519, "num_samples": 279},
]


def test_worst_best_spread_std_and_unweighted_mean_of_recorded_sites():
    # Execute
    f = site_fairness(RECORDED, metric="accuracy")

    # Assert
    values = [c["accuracy"] for c in RECORDED]
    mean = sum(values) / 5
    assert f["sites"] == [0, 1, 2, 3, 4]
    assert f["worst_site"] == {"client_id": 1, "value": 0.21052631578947367}
    assert f["best_site"] == {"client_id": 3, "value": 1.0}
    assert f["spread"] == pytest.approx(1.0 - 0.21052631578947367)
    # every site weighs the same: site 4's 279 records count as much as site 2's 12
    assert f["mean"] == pytest.approx(mean)
    assert f["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 5))
    assert f["excluded"] == {"no_heldout": [], "no_metrics": [], "not_finite": []}


def test_a_site_without_held_out_data_is_left_out_and_counted():
    # Prepare: site 5 has no held-out split, so it reported no figures; site 6 failed the round
    rows = [*RECORDED, {"client_id": 5, "participated": True}, {"client_id": 6}]

    # Execute
    f = site_fairness(rows, metric="accuracy", num_heldout={5: 0, 6: 40})

    # Assert
    assert f["sites"] == [0, 1, 2, 3, 4]
    assert f["excluded"] == {"no_heldout": [5], "no_metrics": [6], "not_finite": []}
    assert f["worst_site"]["client_id"] == 1


def test_a_single_site_has_no_spread():
    # Execute
    f = site_fairness([{"client_id": 3, "mean_dice": 0.7, "num_samples": 4}], metric="mean_dice")

    # Assert
    assert f["worst_site"] == f["best_site"] == {"client_id": 3, "value": 0.7}
    assert (f["spread"], f["std"], f["mean"]) == (0.0, 0.0, 0.7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_figure_is_left_out_not_ranked(bad):
    # Prepare
    rows = [
        {"client_id": 0, "accuracy": 0.9},
        {"client_id": 1, "accuracy": bad},
        {"client_id": 2, "accuracy": 0.6},
    ]

    # Execute
    f = site_fairness(rows, metric="accuracy")

    # Assert
    assert f["sites"] == [0, 2]
    assert f["excluded"]["not_finite"] == [1]
    assert f["worst_site"]["client_id"] == 2 and f["spread"] == pytest.approx(0.3)
    assert all(math.isfinite(f[k]) for k in ("mean", "std", "spread"))


def test_no_site_to_compare_gives_nulls():
    # Execute
    f = site_fairness([{"client_id": 0, "num_samples": 0}], metric="accuracy")

    # Assert
    assert f["sites"] == [] and f["excluded"]["no_heldout"] == [0]
    assert all(f[k] is None for k in ("mean", "std", "spread", "worst_site", "best_site"))


def test_ties_pick_the_smallest_site_id():
    # Execute
    f = site_fairness([{"client_id": i, "accuracy": 0.5} for i in (4, 2, 7)], metric="accuracy")

    # Assert
    assert f["worst_site"]["client_id"] == 2 and f["best_site"]["client_id"] == 2


def test_twins_are_compared_by_their_own_figures():
    # Prepare: site 1's twin is the worst although its served model is the best
    rows = [
        {"client_id": 0, "accuracy": 0.6, "twin": {"accuracy": 0.9, "num_samples": 10}},
        {"client_id": 1, "accuracy": 0.8, "twin": {"accuracy": 0.7, "num_samples": 10}},
        {"client_id": 2, "accuracy": 0.7, "num_samples": 10},  # no twin this round
    ]

    # Execute
    f = site_fairness(rows, metric="accuracy", twin=True)

    # Assert
    assert f["worst_site"] == {"client_id": 1, "value": 0.7}
    assert f["best_site"] == {"client_id": 0, "value": 0.9}
    assert f["excluded"]["no_metrics"] == [2]


def test_summary_line_names_the_worst_site_and_the_spread():
    # Prepare
    block = site_fairness([*RECORDED, {"client_id": 5, "num_samples": 0}], metric="accuracy")

    # Execute
    lines = fairness_lines({"primary_metric": "accuracy", "final_fairness": block})

    # Assert
    assert lines[0] == (
        "- across sites (served model, accuracy on each site's held-out data): worst site 1 "
        "**0.211**, spread **0.789**, mean 0.639 over 5 sites; left out: 1 without held-out data"
    )
    assert fairness_lines({"primary_metric": "accuracy"}) == []  # a file before 2.3


def test_a_site_without_a_twin_figure_is_named_as_such_in_the_summary():
    # A site that kept its twin's metric (`--keep-twin-metric`) sends no twin: the summary
    # says why it is missing rather than "without a figure this round".
    rows = [
        {"client_id": 0, "accuracy": 0.6, "twin": {"accuracy": 0.9, "num_samples": 10}},
        {"client_id": 1, "accuracy": 0.8, "twin": {"accuracy": 0.7, "num_samples": 10}},
        {"client_id": 2, "accuracy": 0.7, "num_samples": 10},
    ]
    metrics = {
        "primary_metric": "accuracy",
        "final_fairness": site_fairness(rows, metric="accuracy"),
        "final_fairness_twins": site_fairness(rows, metric="accuracy", twin=True),
    }

    served, twins = fairness_lines(metrics)[:2]

    assert "left out" not in served
    assert twins.endswith(
        "left out: 1 without a twin figure (kept at the site, or the twin failed)"
    )


@pytest.mark.slow
def test_a_run_writes_fairness_per_round_and_for_the_run(small_npz, tmp_path):
    # Prepare: plaintext, 3 sites, 2 rounds, a twin per site after the last round
    fed = Federation(tiny_config(small_npz, dp_epsilon=None, personalize=1))

    # Execute
    fed.run_round(1)
    fed.run_round(2)
    write_outputs(fed, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())

    # Assert
    assert metrics["schema_version"] == "2.4"
    for record in metrics["rounds"]:
        expected = site_fairness(record["clients"], metric="accuracy")
        assert record["fairness"] == expected
        assert record["fairness"]["sites"] == [0, 1, 2]
    last = metrics["rounds"][-1]
    assert metrics["final_fairness"] == last["fairness"]
    assert metrics["final_fairness_twins"] == last["fairness_twins"]
    assert last["fairness_twins"]["sites"] == [0, 1, 2]
    assert "fairness_twins" not in metrics["rounds"][0]  # twins only after the last round
    assert metrics["final"] == last["global"]  # final stays the global test figures
    summary = (tmp_path / "summary.md").read_text()
    worst = metrics["final_fairness"]["worst_site"]
    assert f"worst site {worst['client_id']} **{worst['value']:.3f}**" in summary
    assert metrics["convergence_criteria"]["rule"] == "trend-window"
