"""What differs between classification and segmentation: the loss, evaluation, key metric."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.data.dataset import ArraySplit
from securefed.errors import ConfigError
from securefed.fl.evaluation import evaluate
from securefed.metrics import HEADLINE_METRICS

__all__ = ["Task", "build_task", "evaluate_segmentation"]


@dataclass(frozen=True)
class Task:
    """The task-specific pieces the federation needs.

    Attributes:
        name: ``classification`` or ``segmentation``.
        primary_metric: The figure used for the best round, convergence and progress
            (``accuracy`` or ``mean_dice``).
        headline: Scalar metrics shown in tables, in display order.
        loss_fn: Training loss, a mean of per-sample terms (what per-sample clipping needs).
        evaluate: ``f(model, split, device) -> metrics dict``.

    """

    name: str
    primary_metric: str
    headline: tuple[str, ...]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[..., dict[str, Any]]


class _DiceCE(nn.Module):
    """MONAI ``DiceCELoss`` with the Dice term per sample (``batch=False``).

    With ``batch=True`` MONAI pools voxels over the whole batch, so one record's gradient
    would depend on the other records in its batch and per-sample clipping would no longer
    bound its influence; per-sample Dice keeps the loss a mean of per-record terms.
    """

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        self.inner = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner(logits, target.unsqueeze(1))


@torch.no_grad()
def evaluate_segmentation(
    *,
    model: nn.Module,
    split: ArraySplit,
    num_classes: int,
    device: torch.device,
    label_convention: str | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Dice-CE loss and the segmentation metrics of ``model`` on ``split``."""
    from securefed.seg_metrics import segmentation_metrics

    model.eval()
    loss_fn = _DiceCE()
    images, labels = torch.tensor(split.images), torch.tensor(split.labels)
    preds, loss_sum = [], 0.0
    for i in range(0, len(split), batch_size):
        x, y = images[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        logits = model(x).float()
        loss_sum += float(loss_fn(logits, y)) * len(y)
        preds.append(logits.argmax(1).cpu().numpy())
    out: dict[str, Any] = {"loss": loss_sum / len(split), "num_samples": len(split)}
    out.update(
        segmentation_metrics(
            y_true=np.asarray(split.labels),
            y_pred=np.concatenate(preds).astype(np.int64),
            num_classes=num_classes,
            label_convention=label_convention,
        )
    )
    return out


def build_task(
    *,
    name: str,
    num_classes: int,
    label_convention: str | None = None,
    unlabelled_weight: float | None = None,
) -> Task:
    """The :class:`Task` for ``name``.

    With ``unlabelled_weight`` (segmentation, ``--strategy teacher-student``) the training
    loss also takes pseudo-labelled volumes in the encoded form of
    :class:`~securefed.fl.teacher_student.SemiSupervisedLoss`; evaluation is unchanged.

    Raises:
        ConfigError: Unknown task.

    """
    if name == "classification":
        return Task(
            name=name,
            primary_metric="accuracy",
            headline=HEADLINE_METRICS,
            loss_fn=nn.CrossEntropyLoss(),
            evaluate=lambda *, model, split, device: evaluate(
                model=model, split=split, num_classes=num_classes, device=device
            ),
        )
    if name == "segmentation":
        from securefed.seg_metrics import SEG_HEADLINE_METRICS

        loss_fn: nn.Module = _DiceCE()
        if unlabelled_weight is not None:
            from securefed.fl.teacher_student import SemiSupervisedLoss

            loss_fn = SemiSupervisedLoss(
                num_classes=num_classes, unlabelled_weight=unlabelled_weight, supervised=loss_fn
            )
        return Task(
            name=name,
            primary_metric="mean_dice",
            headline=tuple(SEG_HEADLINE_METRICS),
            loss_fn=loss_fn,
            evaluate=lambda *, model, split, device: evaluate_segmentation(
                model=model,
                split=split,
                num_classes=num_classes,
                device=device,
                label_convention=label_convention,
            ),
        )
    raise ConfigError(f"unknown task {name!r}; known: classification, segmentation")
