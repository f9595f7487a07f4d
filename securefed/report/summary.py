"""``summary.md`` and PNG plots of a run, for a person rather than a program."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from securefed.metrics import HEADLINE_METRICS

__all__ = ["write_summary", "plot_run"]


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
    ax1.plot(xs, [r["global"]["accuracy"] for r in rounds], marker="o", label="accuracy")
    ax1.plot(
        xs, [r["global"]["balanced_accuracy"] for r in rounds], marker="s", label="balanced acc."
    )
    auc = [r["global"].get("auc") for r in rounds]
    if all(a is not None for a in auc):
        ax1.plot(xs, auc, marker="^", label="AUC")
    ax1.set_xlabel("round")
    ax1.set_ylabel("global test metric")
    ax1.set_ylim(0, 1.02)
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax1.set_title("Global model on the test split")
    ax2.plot(xs, [r["global"]["loss"] for r in rounds], marker="o", color="tab:red")
    ax2.set_xlabel("round")
    ax2.set_ylabel("cross-entropy loss")
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


def write_summary(
    out: Path, *, config: dict[str, Any], metrics: dict[str, Any], privacy: dict[str, Any]
) -> Path:
    """Write ``summary.md`` (with plots) into ``out``."""
    plots = plot_run(out, metrics=metrics, privacy=privacy)
    run = config["run"]
    final = metrics["final"] or {}
    conv = metrics.get("convergence")
    ds = privacy["dataset"]
    lines = [
        "# securefed run summary",
        "",
        f"- data set: **{ds['name']}** (fingerprint `{ds['fingerprint'][:16]}…`), "
        f"{run['clients']} sites, partition `{run['partition']}`",
        f"- model: `{run['model']}` ({privacy['model']['num_parameters']:,} parameters)",
        f"- rounds: {run['rounds']} × {run['local_epochs']} local epoch(s), "
        f"batch {run['batch_size']}, lr {run['lr']}",
        f"- secure aggregation: `{privacy['secure_aggregation']}`",
        (
            f"- DP-SGD: target ε = {privacy['target_epsilon']}, δ = {privacy['delta']:.2e}, "
            f"accountant `{privacy['accountant']}`; spent ε (max over sites) = "
            f"**{_fmt(privacy['epsilon'])}**"
            if privacy.get("dp")
            else "- DP-SGD: **off** (non-private baseline)"
        ),
        f"- wall time: {_fmt(metrics['total_seconds'], 1)} s; convergence: "
        + (f"round {conv['round']} ({_fmt(conv['seconds'], 1)} s)" if conv else "not reached"),
        "",
        "## Final global metrics (test split)",
        "",
        "| accuracy | balanced acc. | macro precision | macro recall | macro F1 | AUC | loss |",
        "|---|---|---|---|---|---|---|",
        "| " + " | ".join(_fmt(final.get(k)) for k in HEADLINE_METRICS) + " |",
        "",
        "Confusion matrix (rows = true class, columns = predicted):",
        "",
    ]
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
        "| site | train samples | held-out | accuracy | macro F1 | AUC | σ | q | steps | spent ε |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    last = metrics["rounds"][-1]["clients"] if metrics["rounds"] else []
    for c, p in zip(last, privacy["clients"]):
        lines.append(
            f"| {c['client_id']} | {p['num_samples']} | {c.get('num_samples', 0)} | "
            f"{_fmt(c.get('accuracy'))} | {_fmt(c.get('macro_f1'))} | {_fmt(c.get('auc'))} | "
            f"{_fmt(p['noise_multiplier'])} | {_fmt(p['sample_rate'], 4)} | {p['steps']} | "
            f"{_fmt(p['epsilon'])} |"
        )
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "Audit this run with `securefed audit <this folder>`.", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path
