"""A run's checkpoint after each completed round, so a restarted or interrupted run loses nothing.

Shared by both runtimes (the deployed server and the in-process :func:`securefed.run.train`).
Two files in ``<out>/checkpoint/``: ``state.safetensors`` (the global weights, the server
optimizer's running state, and any further tensor groups such as CFL's other cluster models)
and ``checkpoint.json`` (round number, configuration, every site's privacy events and epsilon
history, the metrics so far). Both are written under temporary names and renamed, the weights
first; the JSON names the weights' SHA-256, so a torn or swapped pair is refused on resume
rather than silently mixed. Nothing is pickled: tensors are safetensors, the rest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from securefed.errors import ConfigError, IntegrityError

__all__ = ["Checkpoint", "CHECKPOINT_VERSION", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """What a resumed server needs.

    Attributes:
        round: The last round completed (applied or not).
        model_state: Global model state dict.
        optimizer_state: The server optimizer's arrays.
        meta: Everything else (configuration, sites, events, epsilon history, records).
        extra: Further named tensor groups (e.g. ``model1``: CFL's second cluster model).

    """

    round: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, np.ndarray]
    meta: dict[str, Any]
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def _folder(out: Path) -> Path:
    return Path(out) / "checkpoint"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _replace(tmp: Path, final: Path) -> None:
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(final)


def save_checkpoint(
    out: Path,
    *,
    round_index: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, np.ndarray],
    meta: dict[str, Any],
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the checkpoint of ``round_index`` into ``out/checkpoint`` (atomically).

    Args:
        out: The run folder.
        round_index: The last round completed.
        model_state: The (first) global model's state dict.
        optimizer_state: The (first) server optimizer's arrays.
        meta: JSON-ready rest of the state.
        extra: Further named tensor groups; names are plain words (no dots).

    Returns:
        The checkpoint folder.

    """
    from safetensors.torch import save_file

    folder = _folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    tensors.update(
        {
            f"server_opt.{k}": torch.from_numpy(np.asarray(v, np.float64))
            for k, v in optimizer_state.items()
        }
    )
    for group, state in (extra or {}).items():
        if not group or "." in group:
            raise ValueError(f"checkpoint tensor group {group!r}: must be a non-empty word")
        tensors.update(
            {f"extra.{group}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
        )
    weights = folder / "state.safetensors"
    tmp = folder / "state.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"round": str(round_index)})
    _replace(tmp, weights)
    doc = {
        "version": CHECKPOINT_VERSION,
        "round": round_index,
        "state_sha256": _sha256(weights),
        **meta,
    }
    tmp_json = folder / "checkpoint.json.tmp"
    tmp_json.write_text(json.dumps(doc, indent=1, allow_nan=True))
    _replace(tmp_json, folder / "checkpoint.json")
    return folder


def load_checkpoint(out: Path) -> Checkpoint:
    """Read ``out/checkpoint``.

    Raises:
        ConfigError: If there is no checkpoint or it is unreadable.
        IntegrityError: If the weights are not the ones the JSON names.

    """
    from safetensors.torch import load_file

    folder = _folder(out)
    try:
        doc = json.loads((folder / "checkpoint.json").read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{folder}: no checkpoint to resume from") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{folder}/checkpoint.json: unreadable ({exc})") from exc
    if doc.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{folder}: checkpoint version {doc.get('version')!r} is not supported")
    weights = folder / "state.safetensors"
    if not weights.exists() or _sha256(weights) != doc.get("state_sha256"):
        raise IntegrityError(f"{weights}: does not match checkpoint.json (torn or replaced)")
    tensors = load_file(str(weights))
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    opt = {
        k[len("server_opt.") :]: v.numpy()
        for k, v in tensors.items()
        if k.startswith("server_opt.")
    }
    extra: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("extra."):
            group, _, name = k[len("extra.") :].partition(".")
            extra.setdefault(group, {})[name] = v
    meta = {k: v for k, v in doc.items() if k not in ("version", "round", "state_sha256")}
    return Checkpoint(
        round=int(doc["round"]), model_state=model, optimizer_state=opt, meta=meta, extra=extra
    )
