"""Late fusion of imaging modalities: one network per modality, logits averaged."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from securefed.errors import ConfigError, DataError

__all__ = ["LateFusion"]


class LateFusion(nn.Module):
    """Run branch ``i`` on modality ``i`` alone and average the branches' logits.

    Early fusion (modalities stacked as input channels) lets the first layer mix them;
    late fusion keeps one encoder per modality (e.g. T1, T1ce, T2, FLAIR for BraTS) and
    combines only the decisions, which tolerates modalities with very different contrast
    and lets a branch be pretrained on single-modality data. Each example still flows
    through every branch, so Opacus' per-sample gradients and clipping are unchanged.

    Args:
        branches: One module per modality; each takes (N, 1, *spatial) and returns logits of
            the same shape as the others.

    Raises:
        ConfigError: ``branches`` is empty.

    """

    def __init__(self, branches: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(branches) == 0:
            raise ConfigError("`branches` of LateFusion must not be empty.")
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Average of ``branches[i](x[:, i:i+1])`` over modalities ``i``.

        Raises:
            DataError: ``x`` does not have one channel per branch.

        """
        if x.dim() < 2 or x.shape[1] != len(self.branches):
            got = x.shape[1] if x.dim() >= 2 else "no channel axis"
            raise DataError(
                f"late fusion expects {len(self.branches)} modalities along dim 1 (got {got})."
            )
        logits = [branch(x[:, i : i + 1]) for i, branch in enumerate(self.branches)]
        return torch.stack(logits, dim=0).mean(dim=0)
