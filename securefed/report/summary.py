"""``summary.md`` and PNG plots of a run, for a person rather than a program."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from securefed.metrics import HEADLINE_METRICS

__all__ = [
    "write_summary",
    "plot_run",
    "curves_figure",
    "epsilon_figure",
    "headline_for",
    "curve_metrics",
    "fairness_lines",
]

_LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "macro_precision": "macro precision",
    "macro_recall": "macro recall",
    "macro_f1": "macro F1",
    "auc": "AUC",
    "loss": "loss",
    "mean_dice": "mean Dice",
    "mean_iou": "mean IoU",
    "dice_et": "Dice ET",
    "dice_tc": "Dice TC",
    "dice_wt": "Dice WT",
}


def headline_for(metrics: dict[str, Any]) -> tuple[str, ...]:
    """The table columns for a run's task (classification or segmentation)."""
    if metrics.get("task") == "segmentation":
        from securefed.seg_metrics import SEG_HEADLINE_METRICS

        return tuple(SEG_HEADLINE_METRICS)
    return HEADLINE_METRICS


_LEFT_OUT = {
    "no_heldout": "without held-out data",
    "no_metrics": "without a figure this round",
    # A twin with no figure: kept at its site (`--keep-twin-metric`), or its fine-tuning failed.
    "no_metrics_twins": "without a twin figure (kept at the site, or the twin failed)",
    "not_finite": "with a non-finite figure",
}


def fairness_lines(metrics: dict[str, Any]) -> list[str]:
    """The last round's spread across sites (served model, and twins), one line each.

    Beside the global figure, which can hide a site the model serves badly: the worst site,
    the spread (best minus worst) and the unweighted mean, from ``final_fairness`` and
    ``final_fairness_twins`` in ``metrics.json``. Nothing for a file without them (< 2.3).
    """
    primary = metrics.get("primary_metric", "accuracy")
    label = _LABELS.get(primary, primary)
    lines = []
    for key, who in (("final_fairness", "served model"), ("final_fairness_twins", "twins")):
        block = metrics.get(key)
        if not block:
            continue
        left = block.get("excluded", {})
        notes = [
            f"{len(ids)} {_LEFT_OUT.get(f'{why}_twins' if who == 'twins' else why, _LEFT_OUT[why])}"
            for why, ids in left.items()
            if ids
        ]
        tail = f"; left out: {', '.join(notes)}" if notes else ""
        worst = block.get("worst_site")
        if worst is None:
            lines.append(f"- across sites ({who}, {label}): no site reported a figure{tail}")
            continue
        lines.append(
            f"- across sites ({who}, {label} on each site's held-out data): worst site "
            f"{worst['client_id']} **{_fmt(worst['value'])}**, spread "
            f"**{_fmt(block['spread'])}**, mean {_fmt(block['mean'])} over "
            f"{len(block['sites'])} sites{tail}"
        )
    return [*lines, ""] if lines else []


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


# What curves.png shows for a classification run: the figures the README tells users to read
# (accuracy alone misleads on imbalanced sets, hence balanced accuracy, AUC and macro F1).
CURVE_METRICS = ("accuracy", "balanced_accuracy", "auc", "macro_f1")
# Line style and marker per curve, so that overlapping curves (accuracy and balanced accuracy
# coincide on a balanced test split) stay distinguishable, in colour or not.
_STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1)), "v"))
_SITE_MARKERS = "os^Dv<>pP*Xh"
_SITE_LINES = ("-", "--", "-.", ":")


def curve_metrics(metrics: dict[str, Any]) -> tuple[str, ...]:
    """The metrics curves.png plots against the round (loss has its own panel)."""
    if metrics.get("task") == "segmentation":
        return tuple(k for k in headline_for(metrics) if k != "loss")
    return CURVE_METRICS


def _integer_rounds(ax, xs: list[int]) -> None:
    """Round numbers only on the x axis, also for a 1-round run (one integer in view)."""
    from matplotlib.ticker import MaxNLocator

    # min_n_ticks=1: MaxNLocator's default (2) falls back to fractional ticks when the view
    # holds a single integer, as a 1-round run's does.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if xs:
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)


def plot_run(out: Path, *, metrics: dict[str, Any], privacy: dict[str, Any]) -> list[str]:
    """Write ``curves.png`` (test metrics and loss vs round) and ``epsilon.png``; return names.

    See :func:`curves_figure` and :func:`epsilon_figure` for what each shows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {"curves.png": curves_figure(metrics)}
    if privacy.get("dp"):
        figures["epsilon.png"] = epsilon_figure(metrics, privacy)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return list(figures)


def curves_figure(metrics: dict[str, Any]):
    """Test metrics (left) and test loss (right) of the global model per round.

    Classification: accuracy, balanced accuracy, AUC and macro F1; segmentation: the task's
    headline metrics (:func:`curve_metrics`). Each curve has its own line style and marker,
    and later curves are drawn thinner with smaller markers, so coinciding curves (accuracy
    and balanced accuracy on a balanced test split) both stay visible.
    """
    import matplotlib.pyplot as plt

    rounds = metrics["rounds"]
    xs = [r["round"] for r in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    plotted = 0
    for key in curve_metrics(metrics):
        ys = [r["global"].get(key) for r in rounds]
        if all(y is None for y in ys):
            continue  # e.g. the BraTS regions of a data set without BraTS labels
        ls, marker = _STYLES[plotted % len(_STYLES)]
        ax1.plot(
            xs,
            [float("nan") if y is None else y for y in ys],
            ls=ls,
            marker=marker,
            markersize=9 - plotted,
            markerfacecolor="none",  # hollow: a marker on top of another leaves it visible
            markeredgewidth=1.5,
            lw=2.2 - 0.3 * plotted,
            label=_LABELS.get(key, key),
        )
        plotted += 1
    primary = metrics.get("primary_metric", "accuracy")
    twin = [r.get("site_mean", {}).get("twin_" + primary) for r in rounds]
    if any(t is not None for t in twin):
        ax1.plot(xs, twin, marker="*", ls=":", label=f"twins, site mean {_LABELS[primary]}")
    ax1.set_xlabel("round")
    ax1.set_ylabel("global test metric")
    ax1.set_ylim(0, 1.02)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title("Global model on the test split")
    ax2.plot(xs, [r["global"]["loss"] for r in rounds], marker="o", color="tab:red", label="loss")
    ax2.set_xlabel("round")
    seg = metrics.get("task") == "segmentation"
    ax2.set_ylabel("Dice + CE loss" if seg else "cross-entropy loss")
    ax2.grid(alpha=0.3)
    ax2.set_title("Test loss")
    conv = metrics.get("convergence")
    if conv:
        for ax in (ax1, ax2):
            ax.axvline(conv["round"], color="grey", ls="--", lw=1)
    for ax in (ax1, ax2):
        _integer_rounds(ax, xs)
    fig.tight_layout()
    return fig


def epsilon_figure(metrics: dict[str, Any], privacy: dict[str, Any]):
    """ε spent per site after each round, against the target.

    Sites usually spend the same ε, so each site has its own marker and line style and is
    drawn a little to the side (a quarter round at most, all sites together): equal curves sit
    next to each other instead of one hiding the rest.
    """
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in metrics["rounds"]]
    clients = privacy["clients"]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = min(0.25, 0.05 * (len(clients) - 1))
    for i, c in enumerate(clients):
        shift = (i / (len(clients) - 1) - 0.5) * width if len(clients) > 1 else 0.0
        eps = c["epsilon_per_round"]
        ax.plot(
            [x + shift for x in xs[: len(eps)]],
            eps,
            marker=_SITE_MARKERS[i % len(_SITE_MARKERS)],
            markerfacecolor="none",
            ls=_SITE_LINES[i % len(_SITE_LINES)],
            label=f"site {c['client_id']}",
        )
    ax.axhline(privacy["target_epsilon"], color="black", ls="--", lw=1, label="target ε")
    ax.set_xlabel("round (sites drawn slightly apart)" if len(clients) > 1 else "round")
    ax.set_ylabel(f"spent ε (δ = {privacy['delta']:.1e}, {privacy['accountant']})")
    ax.set_title("Privacy spent per site")
    ax.set_ylim(bottom=0)
    _integer_rounds(ax, xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, (len(clients) + 1) // 10))
    fig.tight_layout()
    return fig


def _local_twins(privacy: dict[str, Any]) -> bool:
    """A DP run whose twins were trained without DP (``--twin-privacy local``)."""
    return (
        bool(privacy.get("dp")) and (privacy.get("strategy") or {}).get("twin_privacy") == "local"
    )


def _local_twins_clause(privacy: dict[str, Any], metrics: dict[str, Any]) -> str:
    """What the ε line says of local twins: outside ε only if some site sent a twin's figure.

    A site with ``--keep-twin-metric`` trains its twin without DP and sends nothing about it;
    when every site did, no released value is outside ε, and the line says so.
    """
    if not _local_twins(privacy):
        return ""
    primary = metrics.get("primary_metric", "accuracy")
    sent = [
        row
        for row in metrics.get("personalization") or []
        if row.get("twin_" + primary) is not None
    ]
    if sent:
        return (
            ". The digital twins' held-out figures are **not covered** by it (trained "
            "without DP, `--twin-privacy local`)"
        )
    return (
        ". The digital twins were trained without DP at their sites (`--twin-privacy local`), "
        "and no site sent a twin's figure"
    )


def _strategy_line(privacy: dict[str, Any]) -> str:
    st = privacy.get("strategy") or {"name": "fedavg"}
    text = f"- strategy: `{st['name']}`"
    if st.get("schedule") == "cyclic":
        text += ", cyclic schedule"
    if st.get("prox_mu"):
        text += f", FedProx μ = {st['prox_mu']}"
    opt = st.get("server_optimizer") or {}
    if opt.get("name", "none") != "none":
        text += f", server optimizer {opt['name']} (lr {opt['lr']})"
    pre = (privacy.get("transfer") or {}).get("pretrained")
    if pre:
        text += f"; pretrained on {pre.get('source')} (no privacy cost)"
        # Reports from before issue 16 have no convention: their files were securefed's own.
        if pre.get("convention", "securefed") != "securefed":
            text += (
                f", {pre['convention']} names mapped, {len(pre.get('dropped', []))} BatchNorm "
                "statistics dropped"
            )
    if st.get("freeze", "none") != "none":
        text += f"; frozen: {st['freeze']}"
    if st.get("personalize_epochs"):
        text += f"; digital twins: {st['personalize_epochs']} epoch(s) ({st['personalize_when']})"
        if _local_twins(privacy):
            text += ", trained without DP (`--twin-privacy local`: outside ε, at the site)"
    return text


def _failures(metrics: dict[str, Any]) -> list[str]:
    """Rounds not applied and sites left out, with the reasons (none: no section)."""
    lines = []
    for r in metrics["rounds"]:
        bound = r.get("update_bound") or {}
        if bound.get("refused"):
            lines.append(f"- round {r['round']}: **refused** (poisoning bound): {bound['refused']}")
        elif not r.get("applied", True):
            lines.append(f"- round {r['round']}: not applied: {r.get('error')}")
        for sid, why in (r.get("dropped_reasons") or {}).items():
            if r.get("applied", True):
                lines.append(f"- round {r['round']}: site {sid} left out: {why}")
    if not lines:
        return []
    return [
        "",
        "## Rounds not applied and sites left out",
        "",
        "A refused round left the global model unchanged; see docs/poisoning.md.",
        "",
        *lines,
    ]


#: Segmentation: the voxel-level figures (foreground vs background) and their labels.
_VOXEL = (
    ("voxel_sensitivity", "sensitivity"),
    ("voxel_specificity", "specificity"),
    ("voxel_f1", "F1 (Dice)"),
    ("voxel_iou", "IoU"),
)


def _voxel_lines(metrics: dict[str, Any]) -> list[str]:
    """Segmentation: voxel-level sensitivity, specificity, F1 and IoU, global and per site."""
    final = metrics.get("final") or {}
    if metrics.get("task") != "segmentation" or "voxel_f1" not in final:
        return []  # classification, or a run recorded before these figures existed
    lines = [
        "",
        "## Voxel level: tumour (any label > 0) vs background",
        "",
        "Pooled over every voxel of the split (global: test split; sites: their held-out "
        "split, last round).",
        "",
        "| model on | " + " | ".join(label for _, label in _VOXEL) + " |",
        "|---" * (len(_VOXEL) + 1) + "|",
        "| global (test) | " + " | ".join(_fmt(final.get(k)) for k, _ in _VOXEL) + " |",
    ]
    last = metrics["rounds"][-1]["clients"] if metrics.get("rounds") else []
    for c in last:
        if "voxel_f1" in c:
            lines.append(
                f"| site {c['client_id']} | " + " | ".join(_fmt(c.get(k)) for k, _ in _VOXEL) + " |"
            )
    return lines


def _privacy_unit_line(privacy: dict[str, Any]) -> str:
    """The privacy unit, first thing a DP run's summary says: a record or a patient."""
    if privacy.get("privacy_unit") == "patient":
        return (
            "**Privacy unit: one patient (all of a patient's training records) at one site.** "
            "ε is "
            "patient-level (replace-one adjacency over patients, from the site's patient ids); "
            "it holds as far as those ids are right."
        )
    return (
        "**Privacy unit: one training record (one image or volume) at one site.** ε is "
        "record-level (replace-one adjacency); a patient with k records in a site's data is "
        "protected at about k·ε, not ε."
    )


def _empirical_lines(empirical: dict[str, Any] | None) -> list[str]:
    """eps_emp beside the analytical epsilon, with what a lower bound means (audit runs)."""
    if not empirical:
        return []
    return [
        f"- empirical ε (site {empirical['site']}, {empirical['K']} white-box gradient "
        f"canaries, {empirical['confidence']:.0%} confidence): eps_emp = "
        f"**{_fmt(empirical['eps_emp'])}** ≤ analytical ε = {_fmt(empirical['epsilon'])}"
        if empirical["eps_emp"] <= (empirical["epsilon"] or 0.0)
        else f"- empirical ε (site {empirical['site']}): eps_emp = "
        f"**{_fmt(empirical['eps_emp'])}** EXCEEDS the analytical ε = "
        f"{_fmt(empirical['epsilon'])}: the mechanism does not do what the ledger claims",
        "  (a lower bound: the mechanism that ran leaks at least this much, at that "
        "confidence; it is no estimate of the true ε, and a value far below the claim does "
        "not show the claim is loose. `securefed audit --empirical RUN_DIR` recomputes it)",
    ]


def write_summary(
    out: Path, *, config: dict[str, Any], metrics: dict[str, Any], privacy: dict[str, Any]
) -> Path:
    """Write ``summary.md`` (with plots) into ``out``."""
    plots = plot_run(out, metrics=metrics, privacy=privacy)
    headline = headline_for(metrics)
    primary = metrics.get("primary_metric", "accuracy")
    run = config["run"]
    training = config.get("resolved", {}).get("training") or {}
    final = metrics["final"] or {}
    conv = metrics.get("convergence")
    ds = privacy["dataset"]
    lines = ["# securefed run summary", ""]
    if privacy.get("dp"):
        lines += [_privacy_unit_line(privacy), ""]
    empirical = privacy.get("empirical")
    if empirical:
        lines += [
            "> **AUDIT RUN: do not deploy this model.** Site "
            f"{empirical['site']}'s DP-SGD carried {empirical['K']} gradient canaries "
            "(`--audit-canaries`), which change the model; the run exists to measure privacy.",
            "",
        ]
    if privacy.get("dp") and privacy.get("noise") != "secret":
        lines += [
            "> **WARNING: reproducible noise.** This run drew its DP noise and sampling from "
            "--seed (`--reproducible-noise`). Its ε does NOT hold against anyone who knows the "
            "seed: they can replay training and decide membership. `securefed audit` fails it.",
            "",
        ]
    lines += [
        f"- data set: **{ds['name']}** (fingerprint `{ds['fingerprint'][:16]}…`), "
        f"{run['clients']} sites, partition `{run['partition']}`",
        f"- model: `{privacy['model']['name']}` ({privacy['model']['num_parameters']:,} "
        "parameters)",
        f"- rounds: {run['rounds']} × {run['local_epochs']} local epoch(s), "
        f"batch ≤ {training.get('batch_size', run['batch_size'])} "
        f"(≥ {training.get('min_steps', 1)} steps an epoch), "
        f"lr {training.get('lr', run['lr'])}, momentum {training.get('momentum', run['momentum'])}"
        + (", no clipping" if training and training.get("max_grad_norm") is None else ""),
        f"- secure aggregation: `{privacy['secure_aggregation']}`",
        _strategy_line(privacy),
        (
            f"- DP-SGD: {privacy.get('privacy_unit') or 'record'}-level, replace-one "
            f"adjacency; target ε = "
            f"{privacy['target_epsilon']}, δ ≤ {privacy['delta']:.2e} (each site's own), "
            f"accountant `{privacy['accountant']}`; spent ε (max over sites) = "
            f"**{_fmt(privacy['epsilon'])}**"
            + (
                " per patient"
                if privacy.get("privacy_unit") == "patient"
                else ". A patient with k records is protected at about k·ε, not ε"
            )
            + _local_twins_clause(privacy, metrics)
            if privacy.get("dp")
            else "- DP-SGD: **off** (non-private baseline)"
        ),
        *_empirical_lines(empirical),
        f"- wall time: {_fmt(metrics['total_seconds'], 1)} s; convergence: "
        + (f"round {conv['round']} ({_fmt(conv['seconds'], 1)} s)" if conv else "not reached"),
        "",
        "## Final global metrics (test split)",
        "",
        "| " + " | ".join(_LABELS.get(k, k) for k in headline) + " |",
        "|---" * len(headline) + "|",
        "| " + " | ".join(_fmt(final.get(k)) for k in headline) + " |",
        "",
        *fairness_lines(metrics),
    ]
    if final.get("confusion_matrix"):
        lines += ["Confusion matrix (rows = true class, columns = predicted):", ""]
    cm = final.get("confusion_matrix") or []
    names = config["resolved"]["dataset"]["class_names"]
    if cm:
        lines.append("| true \\ pred | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for name, row in zip(names, cm):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += [
        "",
        "## Per site (last round; held-out split of each site)",
        "",
        f"| site | train samples | held-out | {_LABELS[primary]} | {_LABELS[headline[1]]} | "
        "σ | q | steps | spent ε |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    last = metrics["rounds"][-1]["clients"] if metrics["rounds"] else []
    for c, p in zip(last, privacy["clients"]):
        lines.append(
            f"| {c['client_id']} | {p.get('num_samples', 'not disclosed')} | "
            f"{c.get('num_samples', 0)} | "
            f"{_fmt(c.get(primary))} | {_fmt(c.get(headline[1]))} | "
            f"{_fmt(p['noise_multiplier'])} | {_fmt(p['sample_rate'], 4)} | {p['steps']} | "
            f"{_fmt(p['epsilon'])} |"
        )
    lines += _voxel_lines(metrics)
    table = metrics.get("personalization") or []
    if table:
        lines += [
            "",
            "## Digital twins: global vs twin on each site's held-out data",
            "",
            "Each site fine-tuned its own copy of the model it receives; the twin never leaves "
            "the site."
            + (
                " The twins were trained without DP (`--twin-privacy local`): these figures "
                "are not covered by ε."
                if _local_twins(privacy)
                else ""
            ),
            "",
            f"| site | held-out | global {_LABELS[primary]} | twin {_LABELS[primary]} | gain |",
            "|---|---|---|---|---|",
        ]
        for row in table:
            lines.append(
                f"| {row['client_id']} | {row['num_heldout']} | "
                f"{_fmt(row['global_' + primary])} | {_fmt(row['twin_' + primary])} | "
                + ("n/a |" if row["twin_gain"] is None else f"{row['twin_gain']:+.3f} |")
            )
    lines += _failures(metrics)
    clusters = metrics.get("clusters")
    if clusters:
        lines += [
            "",
            "## Clusters (IFCA)",
            "",
            "Final membership (disclosed to the server): "
            + ", ".join(f"site {k} → {v}" for k, v in clusters["final_membership"].items())
            + f"; model.safetensors holds cluster {clusters['served_cluster']} (the largest).",
        ]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    close = privacy.get("close") if isinstance(privacy, dict) else None
    unclosed = close.get("not_closed") if isinstance(close, dict) else None
    if unclosed:
        lines += [
            "",
            f"**Sites that did not close the run: {', '.join(sorted(unclosed))}.** Nothing shows "
            "where their spending ended, so `securefed audit` fails this run for them "
            "(privacy.json `close.not_closed` says why).",
        ]
    lines += ["", "Audit this run with `securefed audit <this folder>`.", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path
