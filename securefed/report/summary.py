"""``summary.md`` and PNG plots of a run, for a person rather than a program."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from securefed.metrics import HEADLINE_METRICS

__all__ = ["write_summary", "plot_run", "headline_for"]

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


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def plot_run(out: Path, *, metrics: dict[str, Any], privacy: dict[str, Any]) -> list[str]:
    """Write ``curves.png`` (accuracy and loss vs round) and ``epsilon.png``; return names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = metrics["rounds"]
    xs = [r["round"] for r in rounds]
    names = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    keys = [k for k in headline_for(metrics) if k != "loss"][:3]
    for key, marker in zip(keys, "os^"):
        ys = [r["global"].get(key) for r in rounds]
        if all(y is not None for y in ys):
            ax1.plot(xs, ys, marker=marker, label=_LABELS.get(key, key))
    primary = metrics.get("primary_metric", "accuracy")
    twin = [r.get("site_mean", {}).get("twin_" + primary) for r in rounds]
    if any(t is not None for t in twin):
        ax1.plot(xs, twin, marker="*", ls=":", label=f"twins, site mean {_LABELS[primary]}")
    ax1.set_xlabel("round")
    ax1.set_ylabel("global test metric")
    ax1.set_ylim(0, 1.02)
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax1.set_title("Global model on the test split")
    ax2.plot(xs, [r["global"]["loss"] for r in rounds], marker="o", color="tab:red")
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    names.append("curves.png")
    if privacy.get("dp"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in privacy["clients"]:
            ax.plot(
                xs[: len(c["epsilon_per_round"])],
                c["epsilon_per_round"],
                marker="o",
                label=f"site {c['client_id']}",
            )
        ax.axhline(privacy["target_epsilon"], color="black", ls="--", lw=1, label="target ε")
        ax.set_xlabel("round")
        ax.set_ylabel(f"spent ε (δ = {privacy['delta']:.1e}, {privacy['accountant']})")
        ax.set_title("Privacy spent per site")
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "epsilon.png", dpi=110)
        plt.close(fig)
        names.append("epsilon.png")
    return names


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
    if st.get("freeze", "none") != "none":
        text += f"; frozen: {st['freeze']}"
    if st.get("personalize_epochs"):
        text += f"; digital twins: {st['personalize_epochs']} epoch(s) ({st['personalize_when']})"
    return text


def write_summary(
    out: Path, *, config: dict[str, Any], metrics: dict[str, Any], privacy: dict[str, Any]
) -> Path:
    """Write ``summary.md`` (with plots) into ``out``."""
    plots = plot_run(out, metrics=metrics, privacy=privacy)
    headline = headline_for(metrics)
    primary = metrics.get("primary_metric", "accuracy")
    run = config["run"]
    final = metrics["final"] or {}
    conv = metrics.get("convergence")
    ds = privacy["dataset"]
    lines = ["# securefed run summary", ""]
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
        f"- model: `{run['model']}` ({privacy['model']['num_parameters']:,} parameters)",
        f"- rounds: {run['rounds']} × {run['local_epochs']} local epoch(s), "
        f"batch {run['batch_size']}, lr {run['lr']}",
        f"- secure aggregation: `{privacy['secure_aggregation']}`",
        _strategy_line(privacy),
        (
            f"- DP-SGD: record-level, replace-one adjacency; target ε = "
            f"{privacy['target_epsilon']}, δ ≤ {privacy['delta']:.2e} (each site's own), "
            f"accountant `{privacy['accountant']}`; spent ε (max over sites) = "
            f"**{_fmt(privacy['epsilon'])}**. A patient with k records is protected at about "
            "k·ε, not ε"
            if privacy.get("dp")
            else "- DP-SGD: **off** (non-private baseline)"
        ),
        f"- wall time: {_fmt(metrics['total_seconds'], 1)} s; convergence: "
        + (f"round {conv['round']} ({_fmt(conv['seconds'], 1)} s)" if conv else "not reached"),
        "",
        "## Final global metrics (test split)",
        "",
        "| " + " | ".join(_LABELS.get(k, k) for k in headline) + " |",
        "|---" * len(headline) + "|",
        "| " + " | ".join(_fmt(final.get(k)) for k in headline) + " |",
        "",
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
    table = metrics.get("personalization") or []
    if table:
        lines += [
            "",
            "## Digital twins: global vs twin on each site's held-out data",
            "",
            "Each site fine-tuned its own copy of the model it receives; the twin never leaves "
            "the site.",
            "",
            f"| site | held-out | global {_LABELS[primary]} | twin {_LABELS[primary]} | gain |",
            "|---|---|---|---|---|",
        ]
        for row in table:
            lines.append(
                f"| {row['client_id']} | {row['num_heldout']} | "
                f"{_fmt(row['global_' + primary])} | {_fmt(row['twin_' + primary])} | "
                f"{row['twin_gain']:+.3f} |"
            )
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
    lines += ["", "Audit this run with `securefed audit <this folder>`.", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path
