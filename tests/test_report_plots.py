"""A run's plots show what the README tells users to read, and every curve can be told apart.

Checked on matplotlib's objects (lines, labels, styles, ticks), not on pixels.
"""

from __future__ import annotations

import json

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from securefed.report.summary import curves_figure, epsilon_figure  # noqa: E402
from securefed.run import train  # noqa: E402


@pytest.fixture(scope="module")
def one_round_run(tmp_path_factory):
    """A real 1-round DP run over 3 equal-sized sites (so every site spends the same ε)."""
    from tests.conftest import tiny_config, write_small_npz

    tmp = tmp_path_factory.mktemp("plots")
    config = tiny_config(write_small_npz(tmp / "tiny.npz"), rounds=1)
    out = train(config, out_dir=tmp / "run", progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    privacy = json.loads((out / "privacy.json").read_text())
    return out, metrics, privacy


def _lines(ax) -> dict:
    return {
        line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")
    }


def _assert_integer_round_ticks(ax) -> None:
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks, "no round tick"
    assert all(float(t).is_integer() for t in ticks), ticks


def test_the_run_writes_both_plots(one_round_run):
    out, _, _ = one_round_run
    assert (out / "curves.png").stat().st_size > 0 and (out / "epsilon.png").stat().st_size > 0


def test_curves_show_accuracy_balanced_accuracy_auc_f1_and_loss_apart(one_round_run):
    _, metrics, _ = one_round_run
    fig = curves_figure(metrics)
    try:
        metrics_ax, loss_ax = fig.axes
        lines = _lines(metrics_ax)
        assert set(lines) >= {"accuracy", "balanced acc.", "AUC", "macro F1"}
        assert "macro precision" not in lines
        # No two curves share a line style and marker: overlapping ones stay distinguishable.
        styles = [(line.get_linestyle(), line.get_marker()) for line in lines.values()]
        assert len(set(styles)) == len(styles), styles
        assert all(line.get_marker() not in (None, "None", "") for line in lines.values())
        assert list(_lines(loss_ax)) == ["loss"]
        legend = [t.get_text() for t in metrics_ax.get_legend().get_texts()]
        assert set(legend) >= {"accuracy", "balanced acc.", "AUC", "macro F1"}
        for ax in (metrics_ax, loss_ax):  # one round: the tick is 1, not 0.96, 0.98, ...
            _assert_integer_round_ticks(ax)
    finally:
        plt.close(fig)


def test_sites_with_equal_epsilon_stay_distinguishable(one_round_run):
    _, metrics, privacy = one_round_run
    spent = [c["epsilon_per_round"] for c in privacy["clients"]]
    assert all(s == spent[0] for s in spent), "expected equal ε: the point of this test"
    fig = epsilon_figure(metrics, privacy)
    try:
        (ax,) = fig.axes
        sites = {k: v for k, v in _lines(ax).items() if k.startswith("site ")}
        assert set(sites) == {f"site {c['client_id']}" for c in privacy["clients"]}
        styles = {(line.get_linestyle(), line.get_marker()) for line in sites.values()}
        assert len(styles) == len(sites)
        # Drawn side by side (equal values would otherwise lie exactly on top of each other).
        xs = {tuple(line.get_xdata()) for line in sites.values()}
        assert len(xs) == len(sites)
        assert all(abs(x - 1) <= 0.125 for line in sites.values() for x in line.get_xdata())
        legend = {t.get_text() for t in ax.get_legend().get_texts()}
        assert set(sites) <= legend and "target ε" in legend
        _assert_integer_round_ticks(ax)
    finally:
        plt.close(fig)


def test_segmentation_runs_plot_their_headline_metrics():
    rounds = [
        {"round": r, "global": {"mean_dice": 0.1 * r, "mean_iou": 0.05 * r, "loss": 1.0 / r}}
        for r in (1, 2, 3)
    ]
    metrics = {"task": "segmentation", "primary_metric": "mean_dice", "rounds": rounds}
    fig = curves_figure(metrics)
    try:
        metrics_ax, _ = fig.axes
        # The BraTS regions are None without BraTS labels: no empty curves for them.
        assert set(_lines(metrics_ax)) == {"mean Dice", "mean IoU"}
        _assert_integer_round_ticks(metrics_ax)
    finally:
        plt.close(fig)
