"""Run a federation from a configuration and write the files a run leaves behind."""

from __future__ import annotations

import csv
import datetime as _dt
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from securefed.config import RunConfig
from securefed.dp.report import SCHEMA_VERSION, THREAT_MODEL, json_ready, report_hash, write_json
from securefed.errors import ConfigError
from securefed.fl.simulation import Federation
from securefed.metrics import HEADLINE_METRICS

__all__ = ["train", "package_versions", "default_out_dir"]

_PACKAGES = (
    "securefed",
    "torch",
    "opacus",
    "dp-accounting",
    "numpy",
    "cryptography",
    "tenseal",
    "monai",
    "torchio",
    "safetensors",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on, for reproducibility."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def default_out_dir() -> Path:
    """A fresh timestamped folder under ``runs/``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return Path("runs") / stamp


def _prepare_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if (out / "privacy.json").exists():
        raise ConfigError(f"--out {out}: already holds a run; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(
    config: RunConfig,
    *,
    out_dir: Path | None = None,
    progress: bool = True,
    federation: Federation | None = None,
) -> Path:
    """Run ``config`` to completion and write config, metrics, privacy report, model, summary.

    Args:
        config: What to run.
        out_dir: Where to write (default: :func:`default_out_dir`).
        progress: Show progress bars on stderr.
        federation: A pre-built federation (tests use this to inject dropouts).

    Returns:
        The run directory.

    """
    from tqdm.auto import tqdm

    out = _prepare_out(Path(out_dir) if out_dir else default_out_dir())
    fed = federation or Federation(config)
    bar = tqdm(
        range(1, config.rounds + 1),
        desc="rounds",
        unit="round",
        disable=not progress,
        file=sys.stderr,
    )
    for r in bar:
        rec = fed.run_round(r)
        g = rec.data["global"]
        eps = [c["epsilon"] for c in rec.data["clients"] if c["epsilon"] is not None]
        bar.set_postfix(
            acc=f"{g['accuracy']:.3f}",
            loss=f"{g['loss']:.3f}",
            eps=f"{max(eps):.2f}" if eps else "off",
            applied=rec.applied,
        )
        if not rec.applied and progress:
            tqdm.write(f"round {r} not applied: {rec.data['error']}", file=sys.stderr)
    write_outputs(fed, out)
    return out


def _config_json(fed: Federation) -> dict[str, Any]:
    cfg = fed.config
    return {
        "schema_version": SCHEMA_VERSION,
        "run": cfg.to_dict(),
        "resolved": {
            "device": str(fed.device),
            "delta": fed.delta,
            "dataset": fed.bundle.describe(),
            "sites": [
                {
                    "client_id": s.client_id,
                    "num_samples": len(s.train),
                    "num_heldout": len(s.heldout) if s.heldout is not None else 0,
                    "class_counts": s.train.class_counts(
                        num_classes=fed.bundle.num_classes
                    ).tolist(),
                }
                for s in fed.sites
            ],
            "model": {"name": cfg.model, "num_parameters": fed.built.num_parameters},
            "secure_aggregation": fed.aggregator.describe(),
        },
        "versions": package_versions(),
        "platform": {"machine": platform.machine(), "system": platform.system()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _privacy_json(fed: Federation) -> dict[str, Any]:
    cfg = fed.config
    clients = []
    for s in fed.sites:
        plan = fed.plans.get(s.client_id)
        events = fed.ledger.for_client(s.client_id)
        clients.append(
            {
                "client_id": s.client_id,
                "num_samples": len(s.train),
                "sample_rate": plan.sample_rate if plan else None,
                "noise_multiplier": plan.noise_multiplier if plan else None,
                "max_grad_norm": plan.max_grad_norm if plan else None,
                "planned_steps": plan.planned_steps if plan else None,
                "steps": sum(e.steps for e in events),
                "rounds_participated": sorted({e.round for e in events}),
                "epsilon": s.epsilon_per_round[-1] if plan and s.epsilon_per_round else None,
                "epsilon_per_round": list(s.epsilon_per_round) if plan else [],
            }
        )
    eps = [c["epsilon"] for c in clients if c["epsilon"] is not None]
    return {
        "schema_version": SCHEMA_VERSION,
        "dp": cfg.dp_enabled,
        "target_epsilon": cfg.dp_epsilon,
        "delta": fed.delta,
        "accountant": cfg.accountant if cfg.dp_enabled else None,
        "epsilon": max(eps) if eps else None,
        "guarantee": "record-level (epsilon, delta)-DP per site, over all rounds",
        "sampling": "poisson" if cfg.dp_enabled else "shuffle",
        "clipping": "flat per-sample L2" if cfg.dp_enabled else None,
        "noise_source": "torch.Generator seeded from --seed (reproducible; not a CSPRNG)",
        "calibration": (
            "per site: smallest sigma whose epsilon after rounds x local_epochs x ceil(n/B) "
            "steps is at most the target (Opacus get_noise_multiplier); server-side site "
            "sampling and dropouts are not counted as amplification"
        ),
        "rounds": cfg.rounds,
        "local_epochs": cfg.local_epochs,
        "batch_size": cfg.batch_size,
        "clients": clients,
        "events": [e.to_dict() for e in fed.ledger.events],
        "secure_aggregation": fed.aggregator.name,
        "secure_aggregation_params": fed.aggregator.describe(),
        "model": {
            "name": cfg.model,
            "num_parameters": fed.built.num_parameters,
            "opacus_validator": "passed",
        },
        "model_changes": list(fed.built.changes),
        "dataset": {
            "name": fed.bundle.name,
            "fingerprint": fed.bundle.fingerprint,
            "source": fed.bundle.source,
            "partition": cfg.partition,
        },
        "seed": cfg.seed,
        "package_versions": package_versions(),
        "threat_model": THREAT_MODEL,
        "hash": {
            "algorithm": "sha256",
            "covers": "canonical JSON of privacy.json without 'sha256', config.json, metrics.json",
        },
    }


def _metrics_csv(metrics: dict[str, Any], path: Path) -> None:
    keys = list(HEADLINE_METRICS)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["round", "scope", "client_id", *keys, "epsilon", "seconds", "applied"])
        for r in metrics["rounds"]:
            g = r["global"]
            w.writerow(
                [
                    r["round"],
                    "global",
                    "",
                    *[g.get(k) for k in keys],
                    "",
                    r["seconds"],
                    r["applied"],
                ]
            )
            for c in r["clients"]:
                w.writerow(
                    [
                        r["round"],
                        "site",
                        c["client_id"],
                        *[c.get(k) for k in keys],
                        c["epsilon"],
                        "",
                        "",
                    ]
                )


def write_outputs(fed: Federation, out: Path) -> None:
    """Write every run artifact into ``out``; the privacy report last, with its hash."""
    from safetensors.torch import save_file

    from securefed.report.summary import write_summary

    config = json_ready(_config_json(fed))
    metrics = json_ready(fed.metrics())
    privacy = json_ready(_privacy_json(fed))
    privacy["sha256"] = report_hash(privacy=privacy, config=config, metrics=metrics)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in fed.global_model.state_dict().items()},
        str(out / "model.safetensors"),
        metadata={"model": fed.config.model, "securefed": "0.1.0"},
    )
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    _metrics_csv(metrics, out / "metrics.csv")
    write_json(out / "privacy.json", privacy)
    write_summary(out, config=config, metrics=metrics, privacy=privacy)
