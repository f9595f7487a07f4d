"""Issue-2 benchmarks: main command wall time, PneumoniaMNIST utility vs epsilon, DP step cost.

Usage (from the repository root, ../shared/data beside it):

    python benchmarks/train_bench.py --out bench-out/train            # everything
    python benchmarks/train_bench.py --out bench-out/train --only main
    python benchmarks/train_bench.py --out bench-out/train --only pneumonia
    python benchmarks/train_bench.py --out bench-out/train --only steptime

Writes results.json (a list of rows) and summary.md into --out. Rows already in results.json are
skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _load(out: Path) -> list[dict]:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else []


def _save(out: Path, rows: list[dict]) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


def _done(rows: list[dict], key: str) -> bool:
    return any(r.get("key") == key for r in rows)


def _meta() -> dict:
    from securefed.run import package_versions

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "versions": package_versions(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


def bench_main(rows: list[dict], out: Path) -> None:
    """Wall time of the README's main command, run as a user would."""
    key = "main-command"
    if _done(rows, key):
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "securefed.cli",
            "train",
            "--dp-epsilon",
            "8",
            "--secure-agg",
            "--quiet",
            "--out",
            str(run_dir),
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"main command failed: {proc.stderr.strip()}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        privacy = json.loads((run_dir / "privacy.json").read_text())
        protection = sum(
            r["timing"]["protection"] + r["timing"]["aggregation"] for r in metrics["rounds"]
        )
    rows.append(
        {
            "key": key,
            "command": "securefed train --dp-epsilon 8 --secure-agg",
            "wall_seconds": wall,
            "run_seconds": metrics["total_seconds"],
            "secure_agg_seconds": protection,
            "secure_agg_share": protection / wall,
            "accuracy": metrics["final"]["accuracy"],
            "macro_f1": metrics["final"]["macro_f1"],
            "auc": metrics["final"]["auc"],
            "epsilon": privacy["epsilon"],
            **_meta(),
        }
    )
    _save(out, rows)


def _train(config, tmp: Path) -> dict:
    from securefed.run import train

    run_dir = train(config, out_dir=tmp, progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    conv = metrics["convergence"]
    return {
        "accuracy": metrics["final"]["accuracy"],
        "balanced_accuracy": metrics["final"]["balanced_accuracy"],
        "macro_f1": metrics["final"]["macro_f1"],
        "auc": metrics["final"]["auc"],
        "best_accuracy": metrics["best"]["accuracy"],
        "epsilon": privacy["epsilon"],
        "delta": privacy["delta"],
        "convergence_round": conv["round"] if conv else None,
        "seconds": metrics["total_seconds"],
    }


def bench_pneumonia(rows: list[dict], out: Path, seeds: list[int]) -> None:
    """PneumoniaMNIST, 5 non-IID sites (dirichlet:0.5), default hyper-parameters."""
    from securefed.config import RunConfig

    if not (SHARED / "pneumoniamnist.npz").exists():
        raise SystemExit(f"{SHARED / 'pneumoniamnist.npz'} not found")
    base = RunConfig(
        dataset="pneumoniamnist", data_dir=str(SHARED), clients=5, partition="dirichlet:0.5"
    )
    cells = [(f"eps={e}", base.replace(dp_epsilon=e)) for e in (1.0, 4.0, 8.0)]
    cells.append(("no-dp", base.replace(dp_epsilon=None)))
    cells.append(("centralized-no-dp", base.replace(dp_epsilon=None, clients=1, partition="iid")))
    for seed in seeds:
        for name, cfg in cells:
            key = f"pneumonia/{name}/seed={seed}"
            if _done(rows, key):
                continue
            print(f"running {key}", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                res = _train(cfg.replace(seed=seed), Path(tmp) / "run")
            rows.append(
                {
                    "key": key,
                    "setting": name,
                    "seed": seed,
                    "clients": cfg.clients,
                    "partition": cfg.partition,
                    **res,
                    **_meta(),
                }
            )
            _save(out, rows)


def bench_steptime(rows: list[dict], out: Path) -> None:
    """Seconds per optimizer step: Opacus DP-SGD vs plain SGD, same model, same batch."""
    key = "steptime"
    if _done(rows, key):
        return
    import torch
    from opacus import PrivacyEngine

    from securefed.models import ModelSpec, build_model

    def make():
        torch.manual_seed(0)
        return build_model(name="cnn", spec=ModelSpec(in_channels=1, num_classes=2)).module

    x, y = torch.rand(512, 1, 28, 28), torch.randint(0, 2, (512,))
    data = torch.utils.data.TensorDataset(x, y)

    def time_steps(model, opt, loader, n=20):
        it = iter(loader)
        xb, yb = next(it)
        for _ in range(3):  # warm-up
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        start = time.perf_counter()
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        return (time.perf_counter() - start) / n

    batch = 64
    plain = make()
    t_plain = time_steps(
        plain,
        torch.optim.SGD(plain.parameters(), lr=0.1),
        torch.utils.data.DataLoader(data, batch_size=batch),
    )
    dp = make()
    opt = torch.optim.SGD(dp.parameters(), lr=0.1)
    dp, opt, loader = PrivacyEngine(accountant="rdp").make_private(
        module=dp,
        optimizer=opt,
        data_loader=torch.utils.data.DataLoader(data, batch_size=batch),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    t_dp = time_steps(dp, opt, loader)
    rows.append(
        {
            "key": key,
            "batch_size": batch,
            "model": "cnn",
            "plain_step_seconds": t_plain,
            "dp_step_seconds": t_dp,
            "ratio": t_dp / t_plain,
            **_meta(),
        }
    )
    _save(out, rows)


def summarize(rows: list[dict], out: Path) -> None:
    """summary.md with the tables the README quotes."""
    import statistics as st

    lines = ["# Training benchmarks", ""]
    for r in rows:
        if r["key"] == "main-command":
            lines += [
                f"- `{r['command']}`: **{r['wall_seconds']:.1f} s** wall "
                f"(secure aggregation {r['secure_agg_seconds']:.2f} s = "
                f"{100 * r['secure_agg_share']:.1f}%), accuracy {r['accuracy']:.3f}, "
                f"ε = {r['epsilon']:.2f}",
            ]
        if r["key"] == "steptime":
            lines.append(
                f"- DP-SGD step / plain step (cnn, batch {r['batch_size']}): "
                f"{r['dp_step_seconds'] * 1e3:.1f} ms / {r['plain_step_seconds'] * 1e3:.1f} ms = "
                f"**{r['ratio']:.2f}x**"
            )
    pn = [r for r in rows if r["key"].startswith("pneumonia/")]
    if pn:
        lines += [
            "",
            "| setting | sites | spent ε | accuracy | balanced acc. | macro F1 | AUC | "
            "converged (round) | seconds | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for setting in dict.fromkeys(r["setting"] for r in pn):
            rs = [r for r in pn if r["setting"] == setting]

            def ms(k, rs=rs):
                vals = [r[k] for r in rs if r[k] is not None]
                if not vals:
                    return "–"
                if len(vals) == 1:
                    return f"{vals[0]:.3f}"
                return f"{st.mean(vals):.3f} ± {st.stdev(vals):.3f}"

            conv = [r["convergence_round"] for r in rs]
            lines.append(
                f"| {setting} | {rs[0]['clients']} | {ms('epsilon')} | {ms('accuracy')} | "
                f"{ms('balanced_accuracy')} | {ms('macro_f1')} | {ms('auc')} | "
                f"{', '.join(str(c) for c in conv)} | {ms('seconds')} | {len(rs)} |"
            )
    if rows:
        m = rows[0]
        lines += [
            "",
            f"Measured {m['date']} on {m['cpu']} ({m['cpus']} CPUs); "
            f"torch {m['versions'].get('torch')}, opacus {m['versions'].get('opacus')}.",
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/train"))
    ap.add_argument("--only", choices=["main", "pneumonia", "steptime"], default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = _load(args.out)
    if args.only in (None, "main"):
        bench_main(rows, args.out)
    if args.only in (None, "steptime"):
        bench_steptime(rows, args.out)
    if args.only in (None, "pneumonia"):
        bench_pneumonia(rows, args.out, args.seeds)
    summarize(rows, args.out)


if __name__ == "__main__":
    main()
