"""DP accuracy over seeds, next to the non-private run: the README's per-data-set tables.

Each cell is one ``securefed train`` run with the command line's defaults plus the options
given here, at ε = 8 (default flags: DP-SGD, decision calibration) and without DP
(``--no-dp``), for every seed. A cell whose run folder is complete is read back, not re-run,
so an interrupted invocation resumes.

Usage (from the repository root):

    python benchmarks/dp_accuracy.py --out bench-out/pneumonia \\
        --dataset pneumoniamnist --data-dir ../shared/data --clients 5 --partition dirichlet:0.5
    python benchmarks/dp_accuracy.py --out bench-out/breast \\
        --dataset breastmnist --data-dir ../shared/data --clients 3 --partition dirichlet:0.5
    python benchmarks/dp_accuracy.py --out bench-out/ftl --strategy ftl --public-fraction 0.1 \\
        --pretrained bench-out/pre/model.safetensors --no-baseline \\
        --dataset pneumoniamnist --data-dir ../shared/data --clients 5 --partition dirichlet:0.5
    python benchmarks/dp_accuracy.py --out bench-out/adrenal3d --seeds 0 1 2 \\
        --dataset adrenalmnist3d --data-dir ../shared/data --clients 3 --partition dirichlet:0.5
    python benchmarks/dp_accuracy.py --out bench-out/pn-cosine --no-baseline \\
        --option lr_schedule=cosine \\
        --dataset pneumoniamnist --data-dir ../shared/data --clients 5 --partition dirichlet:0.5

Writes ``results.json`` (one row per run: seed, ε, the model ``auto`` built, final accuracy,
AUC, balanced accuracy, macro F1, the worst site's held-out accuracy, whether the decision
calibration applied, whether the final model calls one class for everything, seconds) and
``table.md`` (mean ± std and min over seeds, a line per ε and model) into ``--out``; the runs
go to ``OUT/runs``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from securefed.bench.common import environment, is_one_class, mean_std_min, write_atomic
from securefed.config import RunConfig
from securefed.run import train

FIGURES = ("accuracy", "auc", "balanced_accuracy", "macro_f1")


def _model(run: Path) -> str | None:
    """The model the run built (``--model auto`` resolves by a rule that changes between
    releases, e.g. rule 3: a folder of older runs must not average two models in one row)."""
    try:
        config = json.loads((run / "config.json").read_text())
        return config["resolved"]["model"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _row(run: Path, *, seed: int, epsilon: float | None) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text())
    final = metrics["final"]
    last = metrics["rounds"][-1]
    calibration = last.get("decision_calibration") or {}
    fairness = metrics.get("final_fairness") or {}
    return {
        "seed": seed,
        "epsilon": epsilon,
        "model": _model(run),
        **{k: final.get(k) for k in FIGURES},
        "worst_site_accuracy": (fairness.get("worst_site") or {}).get("value"),
        "calibrated": calibration.get("applied"),
        "one_class": is_one_class(final["confusion_matrix"]),
        "seconds": metrics.get("total_seconds"),
        "run": str(run),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per ε and model, mean ± std (min) over seeds of each figure."""
    head = ["ε", "model", "seeds", *FIGURES, "worst site accuracy", "one-class runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = {(r["epsilon"], r.get("model") or "?") for r in rows}
    for eps, model in sorted(groups, key=lambda g: (g[0] is None, g[0] or 0.0, g[1])):
        cell = [r for r in rows if r["epsilon"] == eps and (r.get("model") or "?") == model]
        values = [mean_std_min([r[k] for r in cell]) for k in (*FIGURES, "worst_site_accuracy")]
        label = "∞ (no DP)" if eps is None else f"{eps:g}"
        seeds = ",".join(str(r["seed"]) for r in sorted(cell, key=lambda r: r["seed"]))
        ones = sum(bool(r["one_class"]) for r in cell)
        lines.append(f"| {label} | {model} | {seeds} | " + " | ".join(values) + f" | {ones} |")
    return "\n".join(lines) + "\n"


def _option(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` as a RunConfig keyword: the value read as JSON when it parses."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise SystemExit(f"--option wants FIELD=VALUE (got {text!r})")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the grid; print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epsilon", type=float, default=8.0, help="inf: only the non-private runs")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--pretrained", default=None, help="safetensors weights (ftl)")
    p.add_argument("--public-fraction", type=float, default=0.0)
    p.add_argument("--no-baseline", action="store_true", help="skip the non-private runs")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other RunConfig field for every run, VALUE read as JSON when it parses "
        "(e.g. --option lr_schedule=cosine); repeatable",
    )
    args = p.parse_args(argv)
    extra = dict(_option(text) for text in args.option)
    base = RunConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        clients=args.clients,
        partition=args.partition,
        strategy=args.strategy,
        pretrained=args.pretrained,
        public_fraction=args.public_fraction,
        **extra,
    )
    first = None if args.epsilon == float("inf") else args.epsilon  # inf: no DP
    epsilons: list[float | None] = [first] + ([] if args.no_baseline or first is None else [None])
    rows = []
    for eps in epsilons:
        for seed in args.seeds:
            name = f"eps{'inf' if eps is None else f'{eps:g}'}-seed{seed}"
            run = args.out / "runs" / name
            if not (run / "metrics.json").exists():
                train(base.replace(dp_epsilon=eps, seed=seed), out_dir=run, progress=False)
            rows.append(_row(run, seed=seed, epsilon=eps))
            print(f"[dp-accuracy] {name}: accuracy {rows[-1]['accuracy']:.3f}", file=sys.stderr)
    out = {"environment": environment(), "settings": vars(args) | {"out": str(args.out)}}
    write_atomic(args.out / "results.json", json.dumps({**out, "rows": rows}, indent=1) + "\n")
    text = table(rows)
    write_atomic(args.out / "table.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
