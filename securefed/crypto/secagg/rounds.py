"""What a round's parties share: its phases, step timers, id checks and the result type."""

from __future__ import annotations

import enum
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from securefed.crypto.fixedpoint import FixedPointCodec
from securefed.crypto.graph import NeighbourGraph
from securefed.crypto.messages import SERVER_ID
from securefed.crypto.secagg.config import SecAggConfig, is_int
from securefed.errors import ConfigError, DropoutRecoveryError

__all__ = [
    "Phase",
    "SecAggResult",
    "StepTimer",
    "check_dim",
    "check_round",
    "check_site_id",
    "require_connected",
]


class StepTimer:
    """Wall-clock (perf_counter) and CPU (process_time) seconds spent inside a party's steps."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self.wall = 0.0
        self.cpu = 0.0
        self._depth = 0

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step; a step nested in another is reported apart but counted once in total."""
        wall, cpu = time.perf_counter(), time.process_time()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            spent = time.perf_counter() - wall
            self.steps[name] = self.steps.get(name, 0.0) + spent
            if self._depth == 0:
                self.wall += spent
                self.cpu += time.process_time() - cpu


class Phase(enum.IntEnum):
    """Where a party is in the round; each step checks it is called in order."""

    ADVERTISE = 0
    SHARE = 1
    MASK = 2
    #: Active variant only: signing the survivor list.
    CONSISTENCY = 3
    UNMASK = 4
    DONE = 5


def check_site_id(site_id: int) -> None:
    """Refuse a site id that is not a u32 below the server's id."""
    if not is_int(site_id) or not 0 <= site_id < SERVER_ID:
        raise ConfigError(f"site id must be an integer in [0, 2^32 - 1) (got {site_id!r}).")


def check_dim(dim: int) -> None:
    """Refuse a vector length below 1."""
    if not is_int(dim) or dim < 1:
        raise ConfigError(f"`dim` must be a positive integer (got {dim!r}).")


def check_round(round_index: int) -> None:
    """Refuse a round index outside [0, 2^64)."""
    if not is_int(round_index) or not 0 <= round_index < 1 << 64:
        raise ConfigError(f"`round_index` must be an integer in [0, 2^64) (got {round_index!r}).")


def require_connected(graph: NeighbourGraph, survivors: Collection[int], round_index: int) -> None:
    """Refuse survivors split in the SecAgg+ graph: unmasking would reveal each part's sum."""
    if graph.is_complete:
        return
    parts = graph.components(survivors)
    if len(parts) > 1:
        raise DropoutRecoveryError(
            f"the {len(survivors)} survivors of round {round_index} split into "
            f"{len(parts)} disconnected groups (sizes {[len(p) for p in parts]}) of the SecAgg+ "
            "graph; unmasking would reveal each group's sum, so the round is abandoned."
        )


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """Outcome and cost of one :func:`secure_sum` round.

    Attributes:
        total: float64 sum of the survivors' (clipped) inputs, within n * quantum.
        survivors: Sites whose input is in ``total`` (U3).
        dropped: Sites whose input is not in ``total``.
        dropped_after_upload: Survivors that did not answer the unmasking round.
        clipped: Coordinates clipped by the survivors' encoders, summed.
        bytes_sent: Bytes each site sent to the server.
        bytes_received: Bytes each site received from the server.
        client_seconds: Wall-clock seconds (perf_counter) inside each site's steps.
        client_cpu_seconds: CPU seconds (process_time) inside each site's steps.
        client_step_seconds: Per site, wall-clock seconds per step (``advertise_keys``,
            ``share_keys``, ``masked_input``, ``mask`` (encode + masks, part of
            ``masked_input``), ``unmask``).
        server_seconds: Wall-clock seconds inside the server's steps.
        server_cpu_seconds: CPU seconds inside the server's steps.
        codec: The fixed-point codec (ring bits, fractional bits, quantum, clip range).
        config: The configuration used.

    """

    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    dropped_after_upload: tuple[int, ...]
    clipped: int
    bytes_sent: Mapping[int, int]
    bytes_received: Mapping[int, int]
    client_seconds: Mapping[int, float]
    client_cpu_seconds: Mapping[int, float]
    client_step_seconds: Mapping[int, Mapping[str, float]]
    server_seconds: float
    server_cpu_seconds: float
    codec: FixedPointCodec
    config: SecAggConfig

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for reports: protocol parameters, participation, cost."""
        return {
            **self.config.describe(),
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
            "dropped_after_upload": list(self.dropped_after_upload),
            "clipped": self.clipped,
            "bytes_sent": {str(k): v for k, v in self.bytes_sent.items()},
            "client_seconds": {str(k): v for k, v in self.client_seconds.items()},
            "server_seconds": self.server_seconds,
        }
