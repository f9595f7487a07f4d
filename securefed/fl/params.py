"""Flat float64 vectors <-> model state dicts: the only form an update takes on the wire."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from securefed.errors import ProtocolError

__all__ = ["ParamLayout"]


class ParamLayout:
    """The order, shapes and dtypes of a model's floating-point state.

    Integer buffers (e.g. counters) are not averaged and so are not part of the vector.

    Args:
        state: A reference state dict (the global model's).
        keys: Only these entries (e.g. the trainable parameters when the backbone is
            frozen: what is frozen never travels); default every floating entry.

    """

    def __init__(
        self, state: Mapping[str, torch.Tensor], *, keys: Sequence[str] | None = None
    ) -> None:
        if keys is None:
            keys = [k for k, v in state.items() if torch.is_floating_point(v)]
        missing = [k for k in keys if k not in state]
        if missing:
            raise ProtocolError(f"parameter layout names {missing[0]!r}, absent from the model")
        self.keys = list(keys)
        self.shapes = [tuple(state[k].shape) for k in self.keys]
        self.dtypes = [state[k].dtype for k in self.keys]
        self.sizes = [int(np.prod(s)) if s else 1 for s in self.shapes]
        self.size = int(sum(self.sizes))

    def flatten(self, state: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Concatenate the floating tensors of ``state`` into one float64 vector."""
        return (
            np.concatenate(
                [state[k].detach().cpu().reshape(-1).to(torch.float64).numpy() for k in self.keys]
            )
            if self.keys
            else np.zeros(0)
        )

    def unflatten(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`flatten`; checks the length first.

        Raises:
            ProtocolError: The vector does not have this layout's length.

        """
        if vector.shape != (self.size,):
            raise ProtocolError(
                f"parameter vector has shape {vector.shape}, expected ({self.size},)"
            )
        out, offset = {}, 0
        for k, shape, dtype, size in zip(self.keys, self.shapes, self.dtypes, self.sizes):
            chunk = vector[offset : offset + size].reshape(shape)
            out[k] = torch.from_numpy(np.ascontiguousarray(chunk)).to(dtype)
            offset += size
        return out
