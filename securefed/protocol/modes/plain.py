"""``--secure-agg none``: the baseline. The server receives every site's plaintext update."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from securefed.errors import ProtocolError
from securefed.protocol.link import Link
from securefed.protocol.modes.base import (
    SecureSumMode,
    SiteProtection,
    SiteState,
    SumCollector,
    SumOutcome,
)
from securefed.protocol.wire import vector_from_bytes, vector_to_bytes

__all__ = ["PlainMode"]


class _PlainSite(SiteProtection):
    def protect(
        self, vector: np.ndarray, *, round_index: int, n_sites: int, state: SiteState
    ) -> dict[str, Any]:
        return {"vector": vector_to_bytes(vector)}


class _PlainServer(SumCollector):
    def collect(
        self,
        link: Link,
        fits: Mapping[int, Mapping[str, Any]],
        *,
        round_index: int,
        chosen: list[int],
        dim: int,
        timeout: float,
        drop_before_upload: Collection[int] = (),
        drop_after_upload: Collection[int] = (),
    ) -> SumOutcome:
        # Dropout semantics match the secure modes: a site gone before its upload arrived is
        # left out; one gone after it arrived is in the sum.
        start = time.perf_counter()
        gone = set(drop_before_upload)
        total = np.zeros(dim)
        survivors: list[int] = []
        errors: dict[int, str] = {}
        for sid in sorted(fits):
            if sid in gone:
                continue
            try:
                total += vector_from_bytes(fits[sid]["vector"], length=dim, what=f"site {sid}")
            except (KeyError, ProtocolError) as exc:
                errors[sid] = f"vector: {exc}"
                continue
            survivors.append(sid)
        if not survivors:
            return SumOutcome(
                None,
                [],
                error=f"round {round_index}: every sampled site dropped out; the round is not "
                "applied",
                site_errors=errors,
            )
        return SumOutcome(
            total,
            survivors,
            server_seconds=time.perf_counter() - start,
            protect_seconds=dict.fromkeys(survivors, 0.0),
            site_errors=errors,
        )

    def describe(self) -> dict[str, Any]:
        return {"protocol": "none"}


class PlainMode(SecureSumMode):
    """The plaintext baseline (no protection)."""

    name = "none"
    protects = False

    def releases(self, config: Any) -> list[tuple[str, str, str, str]]:
        """The update itself, in the clear (DP output when DP is on)."""
        dp = config.dp_enabled
        return [
            (
                "fit",
                "vector",
                "dp-accounted" if dp else "clear",
                "n_i times the site's model update, then n_i: the update is DP-SGD output "
                "(post-processing); n_i, the site's size, is sent in the clear"
                if dp
                else "n_i times the site's model update, then n_i, in the clear (no DP)",
            )
        ]

    def server(self, config: Any, *, n_sites: int, he_public: bytes | None = None) -> SumCollector:
        """The server side: adds the plaintext vectors."""
        return _PlainServer()

    def site(self, config: Any, *, site_id: int, he_secret: bytes | None = None) -> SiteProtection:
        """The site side: sends the vector as it is."""
        return _PlainSite()
