"""Evaluate a model on a split: loss plus the classification metrics of ``securefed.metrics``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.data.dataset import ArraySplit
from securefed.metrics import classification_metrics

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    *,
    model: nn.Module,
    split: ArraySplit,
    num_classes: int,
    device: torch.device,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Mean cross-entropy and every classification metric of ``model`` on ``split``.

    ``batch_size`` bounds the activations held at once. 128 rather than more: the CNN's
    forward pass costs nearly twice as much per image at 512 on a CPU (its first block's
    activations leave the caches; ``benchmarks/eval_batch.py``: 134 against 77 ms for 800
    28-px images), and larger images or volumes would need that much more memory.
    """
    model.eval()
    probs, loss_sum = [], 0.0
    # torch.tensor copies: the split's arrays are read-only (they are fingerprinted).
    images = torch.tensor(split.images)
    labels = torch.tensor(split.labels)
    for i in range(0, len(split), batch_size):
        x = images[i : i + batch_size].to(device)
        y = labels[i : i + batch_size].to(device)
        logits = model(x).float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
    p = np.concatenate(probs).astype(np.float64)
    out: dict[str, Any] = {"loss": loss_sum / len(split), "num_samples": len(split)}
    out.update(
        classification_metrics(y_true=np.asarray(split.labels), probs=p, num_classes=num_classes)
    )
    return out
