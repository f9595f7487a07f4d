"""The files a run leaves behind, written from the round engine's state.

``config.json``, ``metrics.json`` (+ csv), ``privacy.json`` (signed by the sites, hashed),
``model.safetensors`` and ``summary.md``: the same writer for both runtimes, reading the
typed state of a :class:`~securefed.fl.engine.RoundEngine`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from securefed.config import RunConfig
from securefed.dp import calibration, class_prior, fair_loss
from securefed.dp.accounting import ADJACENCY
from securefed.dp.disclosures import disclosures_json
from securefed.dp.empirical import RECORD_FILE as EMPIRICAL_RECORD
from securefed.dp.releases import PHASES
from securefed.dp.report import (
    SCHEMA_VERSION,
    file_sha256,
    json_ready,
    report_hash,
    report_texts,
    write_json,
)
from securefed.errors import ConfigError
from securefed.fl.claims import noise_description
from securefed.fl.engine import RoundEngine
from securefed.fl.transfer import indices_digest
from securefed.metrics import HEADLINE_METRICS
from securefed.report.summary import write_summary

__all__ = ["canonical_safetensors", "package_versions", "prepare_out", "write_outputs"]

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


def _config_json(fed: RoundEngine) -> dict[str, Any]:
    cfg = fed.config
    return {
        "schema_version": SCHEMA_VERSION,
        "run": cfg.to_dict(),
        "resolved": {
            "device": str(fed.device),
            "delta": fed.delta,
            "dataset": {**fed.bundle.describe(), "loaded_from": _loaded_from(cfg)},
            "sites": [
                {k: v for k, v in s.items() if k != "epsilon_per_round"}
                for s in fed.site_summaries()
            ],
            "model": {
                "name": fed.built.name,
                "num_parameters": fed.built.num_parameters,
                "trainable_parameters": fed.transfer["trainable_parameters"],
                "head_prefixes": list(fed.built.head_prefixes),
            },
            "task": fed.task.name,
            # What unset flags resolved to (securefed.config's effective_* rules); a site's
            # own batch and lr follow from these and its size (docs/defaults.md).
            "training": {
                "batch_size": cfg.effective_batch_size,
                "min_steps": cfg.min_steps,
                "lr": cfg.effective_lr,
                "momentum": cfg.effective_momentum,
                "max_grad_norm": cfg.effective_max_grad_norm,
                # The server's device; a deployed site applies its own (CPU: 64).
                "max_physical_batch_size": cfg.physical_batch(fed.device.type),
            },
            "strategy": _strategy_json(fed),
            "public_samples": len(fed.public_indices) if fed.public_indices is not None else 0,
            "secure_aggregation": fed.aggregator.describe(),
        },
        "versions": package_versions(),
        "platform": {"machine": platform.machine(), "system": platform.system()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _loaded_from(cfg: RunConfig) -> dict[str, Any]:
    """Which setting chose the data, so a reader need not infer it from ``run``.

    ``run.dataset`` keeps its default ``"synthetic"`` when ``--data`` names the data, and
    read on its own it has been taken for the data set a run used.
    """
    if cfg.data is not None:
        return {"option": "--data", "path": str(Path(cfg.data).expanduser().resolve())}
    return {"option": "--dataset", "name": cfg.dataset}


def _strategy_json(fed: RoundEngine) -> dict[str, Any]:
    cfg = fed.config
    out: dict[str, Any] = {
        "name": cfg.strategy,
        "schedule": cfg.schedule,
        "prox_mu": cfg.effective_prox_mu,
        "server_optimizer": fed.server_opts[0].describe(),
        "freeze": fed.transfer["freeze"],
        "personalize_epochs": cfg.personalize,
        "personalize_when": cfg.personalize_when if cfg.personalize else None,
        # Unset: each site's own lr (site_lr), which depends on its size; recorded as null.
        "personalize_lr": cfg.personalize_lr if cfg.personalize else None,
        # Schema 3.6: "dp" twins are inside epsilon, "local" ones are not (docs/twins.md).
        "twin_privacy": cfg.twin_privacy if cfg.personalize and cfg.dp_enabled else None,
    }
    out.update(fed.strategy.describe(cfg))
    return out


def _disclosures(fed: RoundEngine) -> list[dict[str, str]]:
    """Every field a site releases, with its protection (:mod:`securefed.dp.disclosures`)."""
    return disclosures_json(fed.config, runtime=fed.runtime)


def _privacy_json(fed: RoundEngine) -> dict[str, Any]:
    cfg = fed.config
    texts = report_texts(
        dp=cfg.dp_enabled,
        unit=cfg.privacy_unit,
        frozen=bool(fed.transfer["frozen"]),
        teacher_student=cfg.strategy == "teacher-student",
        local_twins=cfg.local_twins,
    )
    noise, noise_source = noise_description(cfg)
    releases = PHASES
    clients = []
    for s in fed.site_summaries():
        plan = fed.plans.get(s["client_id"])
        events = fed.ledger.for_client(s["client_id"])
        history = s["epsilon_per_round"]
        entry = {
            "client_id": s["client_id"],
            "delta": plan.delta if plan else None,
            "sample_rate": plan.sample_rate if plan else None,
            "noise_multiplier": plan.noise_multiplier if plan else None,
            "max_grad_norm": plan.max_grad_norm if plan else None,
            "planned_steps": plan.planned_steps if plan else None,
            # DP-SGD steps; the releases (securefed.dp.releases) are counted apart.
            "steps": sum(e.steps for e in events if e.phase not in releases),
            "personalization_steps": sum(e.steps for e in events if e.phase == "personalize"),
            "calibration_releases": sum(e.phase == calibration.PHASE for e in events),
            "rounds_participated": sorted({e.round for e in events if e.phase not in releases}),
            "epsilon": history[-1] if plan and history else None,
            "epsilon_per_round": list(history) if plan else [],
        }
        if cfg.fair_q:
            # Schema 3.4: q-FFL's per-round loss releases (phase fair-loss), counted apart.
            entry["fair_loss_releases"] = sum(e.phase == fair_loss.PHASE for e in events)
        if cfg.logit_adjust:
            # Schema 3.4: logit adjustment's class-prior release (phase class-prior), 0 or 1.
            entry["class_prior_releases"] = sum(e.phase == class_prior.PHASE for e in events)
        if "num_samples" in s:  # only when the site chose to disclose its size
            entry["num_samples"] = s["num_samples"]
        clients.append(entry)
    eps = [c["epsilon"] for c in clients if c["epsilon"] is not None]
    return {
        "schema_version": SCHEMA_VERSION,
        "dp": cfg.dp_enabled,
        "target_epsilon": cfg.dp_epsilon,
        "delta": fed.delta,
        "accountant": cfg.accountant if cfg.dp_enabled else None,
        "adjacency": ADJACENCY if cfg.dp_enabled else None,
        "privacy_unit": cfg.privacy_unit if cfg.dp_enabled else None,
        "epsilon": max(eps) if eps else None,
        "guarantee": texts["guarantee"],
        "sampling": texts["sampling"],
        "clipping": texts["clipping"],
        "noise": noise if cfg.dp_enabled else None,
        "noise_source": noise_source if cfg.dp_enabled else None,
        "calibration": (
            "per site: smallest sigma whose replace-one epsilon (dp_accounting PLD) after "
            "(rounds x local_epochs + DP twin fine-tuning epochs) x ceil(n/B) steps is at most the "
            "target, at the site's own delta = min(--dp-delta or 1e-5, 10^-ceil(log10(10 n))); "
            "server-side site sampling and dropouts are not counted as amplification"
        ),
        "strategy": _strategy_json(fed),
        "dp_applies_to": texts["dp_applies_to"],
        "transfer": {
            "pretrained": fed.transfer["pretrained"],
            "frozen_parameters": fed.transfer["frozen_parameters"],
            "trainable_parameters": fed.transfer["trainable_parameters"],
            "frozen_tensors": fed.transfer["frozen_tensors"],
            "trainable_tensors": fed.transfer["trainable_tensors"],
            "reinitialised": fed.transfer["reinitialised"],
            "public_fraction": fed.config.public_fraction,
            "public_seed": fed.config.public_seed if fed.config.public_fraction else None,
            "public_indices_sha256": (
                indices_digest(fed.public_indices) if fed.public_indices is not None else None
            ),
            "public_samples": (len(fed.public_indices) if fed.public_indices is not None else 0),
        },
        "disclosures": _disclosures(fed),
        "rounds": cfg.rounds,
        "local_epochs": cfg.local_epochs,
        "batch_size": cfg.effective_batch_size,
        "clients": clients,
        "events": [e.to_dict() for e in fed.ledger.events],
        "secure_aggregation": cfg.secure_agg,
        "secure_aggregation_params": fed.aggregator.describe(),
        "model": {
            "name": fed.built.name,
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
        "threat_model": texts["threat_model"],
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


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted (same tensors, same bytes).

    safetensors writes ``__metadata__`` from a hash map, so two saves of one model can differ
    in the header's key order. The sites close the run on each model file's SHA-256, and a run
    resumed after the close must write the very file they signed for.
    """
    import json

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def _model_files(fed: RoundEngine, *, audit_run: bool) -> dict[str, bytes]:
    """The run's model files, as the bytes that will be written (digested before the close)."""
    from safetensors.torch import save

    meta = {"model": fed.built.name, "securefed": "0.1.0", "task": fed.task.name}
    if audit_run:  # the weights carry the canaries: say so in the file itself
        meta["audit_run"] = "gradient canaries inside; do not deploy"

    def tensors(model: Any) -> dict[str, Any]:
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    files = {"model.safetensors": save(tensors(fed.global_model), metadata=meta)}
    if len(fed.models) > 1:
        for k, m in enumerate(fed.models):
            files[f"model_cluster{k}.safetensors"] = save(
                tensors(m), metadata={**meta, "cluster": str(k)}
            )
    return {name: canonical_safetensors(data) for name, data in files.items()}


def write_outputs(fed: RoundEngine, out: Path) -> None:
    """Write every run artifact into ``out``; the privacy report last, with its hash.

    Under DP the sites first close the run (:meth:`RoundEngine.close_sites`) over the digests
    of the model files written here, so the report's ``close`` block names them.
    """
    config = json_ready(_config_json(fed))
    metrics = json_ready(fed.metrics())
    privacy = json_ready(_privacy_json(fed))
    audit = fed.empirical_audit() if hasattr(fed, "empirical_audit") else None
    files = _model_files(fed, audit_run=audit is not None)
    if audit is not None:
        # An audit run (--audit-canaries): eps_emp beside the claim, bound by the report's hash
        # to the record (secret coins and scores) `securefed audit --empirical` recomputes it from.
        block, record = audit
        write_json(out / EMPIRICAL_RECORD, record)
        privacy["empirical"] = json_ready(
            {
                **block,
                "record": EMPIRICAL_RECORD,
                "record_sha256": file_sha256(out / EMPIRICAL_RECORD),
            }
        )
        # Signed by the audited site, as its claim is: an edited record, rehashed, does not
        # verify against the key the site published.
        privacy["empirical"]["signature"] = fed.sign_empirical(privacy["empirical"])
    if fed.config.dp_enabled:
        close = fed.close_sites({n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
        if close is not None:
            privacy["close"] = json_ready(close)
            if fed.close_errors:
                privacy["close"]["not_closed"] = {
                    str(k): v for k, v in sorted(fed.close_errors.items())
                }
        # Signing precedes the hash so that the hash covers keys and signatures too.
        fed.sign_privacy(privacy, run=config["run"])
    privacy["sha256"] = report_hash(privacy=privacy, config=config, metrics=metrics)
    for name, data in files.items():
        (out / name).write_bytes(data)
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    _metrics_csv(metrics, out / "metrics.csv")
    write_json(out / "privacy.json", privacy)
    write_summary(out, config=config, metrics=metrics, privacy=privacy)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on, for reproducibility."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def prepare_out(out: Path) -> Path:
    """The deployed server's run folder: created, refused when it holds a finished run."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if (out / "privacy.json").exists():
        raise ConfigError(f"--out {out}: already holds a run; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    return out
