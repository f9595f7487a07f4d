"""The deployed server's checkpoint: the shared format of :mod:`securefed.fl.checkpoint`.

Kept as an import path so the coordinator and older code keep working; the format, the atomic
writes and the tamper check live in one place for both runtimes.
"""

from __future__ import annotations

from securefed.fl.checkpoint import (
    CHECKPOINT_VERSION,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["Checkpoint", "CHECKPOINT_VERSION", "load_checkpoint", "save_checkpoint"]
