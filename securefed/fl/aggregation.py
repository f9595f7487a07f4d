"""Aggregators: how the server obtains the sum of the sites' weighted updates."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from securefed.errors import ConfigError, DropoutRecoveryError

__all__ = [
    "AggregateOutcome",
    "Aggregator",
    "HEAggregator",
    "MaskingAggregator",
    "PlainAggregator",
    "build_aggregator",
]


@dataclass(frozen=True)
class AggregateOutcome:
    """The server's view after one aggregation: a sum, never an individual update.

    Attributes:
        total: Sum over survivors of each site's vector ``[n_i * u_i, n_i]``.
        survivors: Sites whose input is in ``total``.
        dropped: Sites that were sampled but are not in ``total``.
        client_seconds: Per site, seconds spent protecting its input (encode/mask/encrypt).
        server_seconds: Seconds the server spent aggregating (and unmasking/recovering).
        bytes_per_client: Per site, bytes it sent for this aggregation.
        clipped: Coordinates clipped by a fixed-point encoder (0 when none is used).

    """

    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    client_seconds: dict[int, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    bytes_per_client: dict[int, int] = field(default_factory=dict)
    clipped: int = 0


class Aggregator(ABC):
    """Turns the sites' vectors into their sum; subclasses decide what the server sees."""

    name: str = ""

    @abstractmethod
    def aggregate(
        self,
        inputs: Mapping[int, np.ndarray],
        *,
        round_index: int,
        drop_before_upload: Collection[int] = (),
        drop_after_upload: Collection[int] = (),
    ) -> AggregateOutcome:
        """Aggregate one round.

        Raises:
            DropoutRecoveryError: Too few sites survived; nothing may be applied.

        """

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Protocol name and parameters for the privacy report."""


class PlainAggregator(Aggregator):
    """No protection: the server receives every site's plaintext update (the baseline).

    Dropout semantics match the secure aggregators, so a plaintext run and a secure run with
    the same dropouts average the same sites: a site that drops before uploading is left
    out; one that drops after its upload arrived is still in the sum.
    """

    name = "none"

    def aggregate(
        self,
        inputs: Mapping[int, np.ndarray],
        *,
        round_index: int,
        drop_before_upload: Collection[int] = (),
        drop_after_upload: Collection[int] = (),
    ) -> AggregateOutcome:
        """Sum the plaintext vectors of the surviving sites."""
        start = time.perf_counter()
        gone = set(drop_before_upload)
        survivors = tuple(sorted(c for c in inputs if c not in gone))
        if not survivors:
            raise DropoutRecoveryError(
                f"round {round_index}: every sampled site dropped out; the round is not applied"
            )
        total = np.sum([np.asarray(inputs[c], dtype=np.float64) for c in survivors], axis=0)
        return AggregateOutcome(
            total=total,
            survivors=survivors,
            dropped=tuple(sorted(set(inputs) - set(survivors))),
            client_seconds={c: 0.0 for c in survivors},
            server_seconds=time.perf_counter() - start,
            bytes_per_client={c: int(inputs[c].size * 4) for c in survivors},
        )

    def describe(self) -> dict[str, Any]:
        """The baseline has no parameters."""
        return {"protocol": "none"}


class MaskingAggregator(Aggregator):
    """Pairwise masking (Bonawitz et al. 2017; SecAgg+ neighbourhoods, Bell et al. 2020).

    Every round runs the four-step protocol of :mod:`securefed.crypto.secagg` with fresh
    keys; the server object only ever receives bytes of masked vectors and encrypted shares.

    Args:
        config: Protocol parameters (threshold, neighbours, ring, clip range).

    """

    name = "mask"

    def __init__(self, *, config: Any) -> None:
        self.config = config

    def aggregate(
        self,
        inputs: Mapping[int, np.ndarray],
        *,
        round_index: int,
        drop_before_upload: Collection[int] = (),
        drop_after_upload: Collection[int] = (),
    ) -> AggregateOutcome:
        """Mask at each site, sum and unmask at the server, recovering dropped sites."""
        from securefed.protocol.harness import secure_sum

        res = secure_sum(
            inputs,
            config=self.config,
            round_index=round_index,
            drop_before_upload=drop_before_upload,
            drop_after_upload=drop_after_upload,
        )
        return AggregateOutcome(
            total=res.total,
            survivors=tuple(res.survivors),
            dropped=tuple(res.dropped),
            client_seconds=dict(res.client_seconds),
            server_seconds=res.server_seconds,
            bytes_per_client=dict(res.bytes_sent),
            clipped=res.clipped,
        )

    def describe(self) -> dict[str, Any]:
        """Protocol parameters and the fixed-point encoding."""
        return self.config.describe()


class HEAggregator(Aggregator):
    """CKKS homomorphic encryption (TenSEAL): the server adds ciphertexts it cannot decrypt.

    Keys are set up once per run (the key set stays with the sites' key holder; the server
    side of :func:`~securefed.crypto.ckks.he_sum` only ever gets the public context).

    Args:
        params: CKKS parameters (defaults: N = 8192, moduli 60/40/40/60, scale 2^40).
        subset: Coordinates to encrypt (e.g. trainable parameters); None for all.

    """

    name = "he"

    def __init__(self, *, params: Any = None, subset: np.ndarray | None = None) -> None:
        from securefed.crypto.ckks import CKKSParams, generate_keys

        self.params = params or CKKSParams()
        self.subset = subset
        self._keys = generate_keys(params=self.params)

    def aggregate(
        self,
        inputs: Mapping[int, np.ndarray],
        *,
        round_index: int,
        drop_before_upload: Collection[int] = (),
        drop_after_upload: Collection[int] = (),
    ) -> AggregateOutcome:
        """Encrypt at each site, add on the server, decrypt the sum at the key holder.

        A site that drops after its ciphertext arrived is still in the sum: CKKS needs no
        later step from it.
        """
        from securefed.protocol.harness import he_sum

        res = he_sum(
            inputs,
            params=self.params,
            keys=self._keys,
            drop_before_upload=drop_before_upload,
            subset=self.subset,
            round_index=round_index,
        )
        return AggregateOutcome(
            total=res.total,
            survivors=res.survivors,
            dropped=res.dropped,
            client_seconds=dict(res.client_seconds),
            server_seconds=res.server_seconds + res.decrypt_seconds,
            bytes_per_client=dict(res.bytes_per_client),
        )

    def describe(self) -> dict[str, Any]:
        """CKKS parameters and key placement."""
        return {
            "protocol": "ckks",
            "library": "tenseal",
            "server_holds_secret_key": False,
            **self.params.describe(),
        }


def build_aggregator(*, mode: str, n_clients: int, **options: Any) -> Aggregator:
    """Create the aggregator for ``--secure-agg MODE``.

    Raises:
        ConfigError: Unknown mode.

    """
    if mode == "none":
        return PlainAggregator()
    if mode == "mask":
        from securefed.crypto.secagg import SecAggConfig

        return MaskingAggregator(config=SecAggConfig(n_clients=n_clients, **options))
    if mode == "he":
        from securefed.crypto.ckks import CKKSParams

        return HEAggregator(params=CKKSParams(**options))
    raise ConfigError(f"unknown secure aggregation mode {mode!r}; known: none, mask, he")
