"""``securefed pretrain``: train a model on data declared public, for federated transfer learning.

Pretraining touches no site's private data, so it runs without DP and costs no privacy
budget; what makes that true is that the data really are public. The weights file carries
metadata (data set fingerprint, public fraction and seed, a digest of the public indices)
that ``securefed train --pretrained`` checks, so a run refuses weights pretrained on what
its sites hold as private.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from securefed.data.dataset import ArraySplit, load_dataset
from securefed.dp.report import json_ready, write_json
from securefed.errors import ConfigError
from securefed.fl.planning import resolve_device, seed_for
from securefed.fl.tasks import build_task
from securefed.fl.transfer import pretrain_metadata, public_split

__all__ = [
    "CHANCE_MARGIN",
    "PRETRAIN_SCHEMA_VERSION",
    "RISING_EPOCHS",
    "chance_warnings",
    "overfitting_warning",
    "pretrain",
]

#: ``pretrain.json``'s version. 2.0: ``history`` is per-epoch figures on the validation split
#: (it was the test split), ``heldout`` and ``warnings`` added.
PRETRAIN_SCHEMA_VERSION = "2.0"
#: Balanced accuracy within this of 1/K counts as chance: a few held-out samples more or
#: less right is noise, not a backbone worth transferring.
CHANCE_MARGIN = 0.02
#: Optimizer steps an unset ``epochs`` aims for: public data cost no privacy, so pretraining
#: runs long enough to converge on small public sets (10 epochs of 500 images are 80 steps).
PRETRAIN_STEPS = 1000
#: Bounds on the epochs that rule picks.
MIN_PRETRAIN_EPOCHS, MAX_PRETRAIN_EPOCHS = 10, 200


def default_epochs(*, num_samples: int, batch_size: int) -> int:
    """Epochs for about :data:`PRETRAIN_STEPS` optimizer steps, within [10, 200]."""
    steps = max(1, math.ceil(num_samples / batch_size))
    return min(MAX_PRETRAIN_EPOCHS, max(MIN_PRETRAIN_EPOCHS, math.ceil(PRETRAIN_STEPS / steps)))


#: Held-out loss rising this many epochs in a row is read as overfitting, not noise.
RISING_EPOCHS = 3


def chance_warnings(*, split: str, metrics: Mapping[str, Any], num_classes: int) -> list[str]:
    """Warnings when a classifier does no better than chance on ``split``.

    Chance is either bar: balanced accuracy at most 1/K + :data:`CHANCE_MARGIN` (what a model
    that ignores the image scores on every class mix), or accuracy at most the majority-class
    accuracy (what always answering the split's most frequent class scores).

    Args:
        split: The split's name, for the message.
        metrics: Its figures, with ``accuracy``, ``balanced_accuracy`` and
            ``majority_class_accuracy``.
        num_classes: K.

    Returns:
        Zero, one or two one-line warnings.

    """
    out = []
    bar = 1.0 / num_classes + CHANCE_MARGIN
    balanced = metrics["balanced_accuracy"]
    if balanced <= bar:
        out.append(
            f"no better than chance on {split}: balanced accuracy {balanced:.3f} <= 1/K + "
            f"{CHANCE_MARGIN:g} = {bar:.3f} (K = {num_classes})"
        )
    accuracy, majority = metrics["accuracy"], metrics["majority_class_accuracy"]
    if accuracy <= majority:
        out.append(
            f"no better than chance on {split}: accuracy {accuracy:.3f} <= majority-class "
            f"accuracy {majority:.3f}"
        )
    return out


def overfitting_warning(losses: Sequence[float], *, epochs: int = RISING_EPOCHS) -> str | None:
    """A warning when the held-out loss rose in each of the last ``epochs`` epochs, else None.

    The rises must add up to at least 1 % of the loss they started from.

    Args:
        losses: Held-out loss after each epoch, in order.
        epochs: How many consecutive rises count.

    """
    if len(losses) <= epochs:
        return None
    tail = list(losses[-(epochs + 1) :])
    # A flat loss wobbles by float noise and batch order: a rise under 1 % is no trend.
    if not all(b > a for a, b in zip(tail, tail[1:])) or tail[-1] <= 1.01 * tail[0]:
        return None
    shown = " -> ".join(f"{v:.4g}" for v in tail)
    return (
        f"held-out (val) loss rose in each of the last {epochs} epochs ({shown}): the model is "
        "overfitting the public data; use fewer epochs, a smaller lr or more public data"
    )


def _heldout(
    task: Any, net: torch.nn.Module, split: ArraySplit, *, num_classes: int, dev: torch.device
) -> dict[str, Any]:
    """The task's headline figures on ``split``; for classification also the chance bars."""
    res = task.evaluate(model=net, split=split, device=dev)
    out: dict[str, Any] = {"num_samples": len(split), **{k: res.get(k) for k in task.headline}}
    if task.name == "classification":
        counts = split.class_counts(num_classes=num_classes)
        out["majority_class_accuracy"] = float(counts.max() / len(split))
        out["chance_balanced_accuracy"] = 1.0 / num_classes
    return out


def pretrain(
    *,
    out: Path,
    dataset: str = "synthetic",
    data_dir: str | None = None,
    data: str | None = None,
    data_options: Mapping[str, Any] | None = None,
    model: str = "auto",
    public_fraction: float = 0.0,
    public_seed: int = 0,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
    device: str = "auto",
    fusion: str = "early",
    progress: bool = True,
    task: str = "auto",
) -> Path:
    """Pretrain ``model`` on a public source and write ``out/model.safetensors``.

    Args:
        out: Output folder (must not already hold a model).
        dataset: Source data set name (``synthetic``, a MedMNIST name, ``synthetic-seg``).
        data_dir: Folder with MedMNIST ``.npz`` files.
        data: A data folder or ``.npz`` file instead of ``dataset``.
        data_options: Loader options (``--data-option``), as for ``securefed train``: e.g.
            ``{"image_size": 64}`` for an image folder whose images differ in size.
        model: Registered model name.
        public_fraction: 0 uses the whole training split of a data set the sites do not hold;
            in (0, 1) uses only that declared-public share of it (the sites later train on
            the rest with ``--public-fraction`` and the same ``public_seed``).
        public_seed: Seed of the public/private split.
        epochs: Passes over the public data (``None``: :func:`default_epochs`, about 1,000
            steps). The learning rate follows a cosine schedule to 0 over them, so the last
            epochs settle the weights rather than bounce around.
        batch_size: Mini-batch size.
        lr: SGD learning rate.
        momentum: SGD momentum.
        seed: Seeds model init and shuffling.
        device: ``auto``, ``cpu`` or ``cuda``.
        fusion: ``early`` or ``late`` multi-modal fusion.
        progress: Show a progress bar.
        task: ``auto`` (the data set's), ``classification`` or ``segmentation``; a task the
            data set does not have is refused (a teacher for ``--strategy teacher-student``
            is pretrained with ``segmentation``).

    Returns:
        The path of the written weights.

    Raises:
        ConfigError: Bad arguments or loader options, a ``task`` the data do not have, or
            ``out`` already holds a model.
        DataError: The data are missing or malformed.

    """
    from tqdm.auto import tqdm

    from securefed.models import ModelSpec, build_model
    from securefed.models.transfer import save_weights

    if (epochs is not None and epochs < 1) or batch_size < 1 or not (math.isfinite(lr) and lr > 0):
        raise ConfigError("`epochs` and `batch_size` must be >= 1 and `lr` positive")
    out = Path(out)
    if (out / "model.safetensors").exists():
        raise ConfigError(f"--out {out}: already holds model.safetensors; choose another folder")
    bundle = load_dataset(
        name=dataset, data_dir=data_dir, data=data, seed=seed, **dict(data_options or {})
    )
    if public_fraction > 0:
        _, public = public_split(bundle.train, fraction=public_fraction, seed=public_seed)
    else:
        public = np.arange(len(bundle.train), dtype=np.int64)
    source = bundle.train.subset(indices=public)
    if source.unlabelled_count:
        # Pretraining is supervised: a zero map would be read as "all background".
        raise ConfigError(
            f"{bundle.source}: pretraining needs label maps, and {source.unlabelled_count} of "
            f"its {len(source)} records are unlabelled; declare a labelled public part with "
            "--public-fraction (it is drawn from the labelled records)."
        )
    if epochs is None:
        epochs = default_epochs(num_samples=len(source), batch_size=batch_size)
    task_name = getattr(bundle, "task", "classification")
    if task not in ("auto", task_name):
        raise ConfigError(
            f"--task {task} does not match the data: {bundle.name} is a {task_name} data set"
        )
    task = build_task(
        name=task_name,
        num_classes=bundle.num_classes,
        label_convention=getattr(bundle, "label_convention", None),
    )
    dev = resolve_device(device)
    torch.manual_seed(seed_for(seed, 0x9E7))
    built = build_model(
        name=model,
        spec=ModelSpec(
            in_channels=bundle.in_channels,
            num_classes=bundle.num_classes,
            spatial_dims=bundle.spatial_dims,
            task=task_name,
            image_shape=tuple(bundle.image_shape),
            fusion=fusion,
        ),
    )
    model = built.name  # what "auto" resolved to, recorded in the file's metadata
    net = built.module.to(dev)
    gen = torch.Generator().manual_seed(seed_for(seed, 0x9E8))
    loader = DataLoader(source.to_torch(), batch_size=batch_size, shuffle=True, generator=gen)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    history: list[dict[str, Any]] = []
    k = bundle.num_classes
    for epoch in tqdm(range(1, epochs + 1), desc="pretrain", disable=not progress, file=sys.stderr):
        net.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            task.loss_fn(net(x.to(dev)), y.to(dev)).backward()
            opt.step()
            schedule.step()
        # Per epoch on val only: the test split is scored once, after training, so that no
        # figure from it can have steered the run.
        history.append({"epoch": epoch, **_heldout(task, net, bundle.val, num_classes=k, dev=dev)})
    heldout = {
        "val": {key: v for key, v in history[-1].items() if key != "epoch"},
        "test": _heldout(task, net, bundle.test, num_classes=k, dev=dev),
    }
    warnings: list[str] = []
    if task.name == "classification":
        for name, figures in heldout.items():
            warnings += chance_warnings(split=name, metrics=figures, num_classes=k)
    rising = overfitting_warning([h["loss"] for h in history])
    if rising is not None:
        warnings.append(rising)
    meta = pretrain_metadata(
        bundle=bundle,
        model=model,
        public_fraction=public_fraction,
        public_seed=public_seed,
        public_indices=public,
        epochs=epochs,
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.safetensors"
    digest = save_weights(net, path=path, metadata=meta)
    write_json(
        out / "pretrain.json",
        json_ready(
            {
                "schema_version": PRETRAIN_SCHEMA_VERSION,
                "weights": {"file": path.name, "sha256": digest},
                "metadata": meta,
                "source": {
                    "dataset": bundle.describe(),
                    "data_options": dict(data_options or {}),
                    "public_samples": len(public),
                    "public_fraction": public_fraction,
                    "public_seed": public_seed,
                },
                "privacy": "No DP and no privacy cost: the operator declared this data public. "
                "It must be disjoint from every site's private data; `securefed train "
                "--pretrained` checks that from the metadata above.",
                "model": {"name": model, "num_parameters": built.num_parameters},
                "training": {
                    "epochs": epochs,
                    "batch_size": batch_size,
                    "lr": lr,
                    "momentum": momentum,
                    "seed": seed,
                },
                "history": history,
                "heldout": heldout,
                "final": heldout["test"],
                "warnings": warnings,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
        ),
    )
    return path
