"""What every secure-sum mode provides: a site side, a server side, and its report entry.

A mode is registered under the name ``--secure-agg`` takes (:mod:`securefed.protocol.modes`).
Adding a mode is one module that subclasses :class:`SecureSumMode` and registers itself,
plus its test; the round engine, both runtimes and the CLI's choices pick it up.

The flow in a round, identical in-process and over Flower:

1. The server sends ``fit`` to each chosen site. The site trains and calls
   :meth:`SiteProtection.protect` on its update vector ``[n_i u_i..., n_i]``; the fields it
   returns ride in the fit reply (a plaintext vector, a ciphertext, a key advertisement).
2. The server calls :meth:`SumCollector.collect` with those fit replies. It may run more
   stages over the link (masking's share/masked/unmask, CKKS' decrypt); each arrives at the
   site as :meth:`SiteProtection.step`.
3. ``collect`` returns a :class:`SumOutcome`: the sum over survivors, never one update.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from securefed.persistent import PersistentStore

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from securefed.config import RunConfig
    from securefed.crypto.roster import Roster
    from securefed.protocol.link import Link

__all__ = [
    "TIMING_DETAIL",
    "SecureSumMode",
    "SiteProtection",
    "SumCollector",
    "SumOutcome",
    "SiteState",
    "run_session",
]

#: What a ``protect_seconds`` field reveals (for :meth:`SecureSumMode.releases`).
TIMING_DETAIL = "seconds spent encoding/masking/encrypting (depends on the model size only)"

#: A site's protocol state between stages: stays at the site. Values are bytes, str, int or
#: float only, so a runtime can keep it where Flower keeps a ClientApp's state.
SiteState = MutableMapping[str, Any]


def run_session(config: Any) -> bytes:
    """The session id of a run: SHA-256 over its canonical configuration.

    Server and sites compute it from the run configuration they hold (a deployed site from the
    configuration its round's fit ran under), so every signature of the round (masking's round
    keys, CKKS' signed contributions) is bound to the run; the round index binds it to the
    round itself (see docs/secure-aggregation.md).
    """
    import json

    from securefed.crypto.secagg.active import session_id

    canonical = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return session_id(b"run-config", canonical.encode())


@dataclass
class SumOutcome:
    """The server's view after one secure sum.

    Attributes:
        total: Sum over survivors of each site's vector ``[n_i u_i..., n_i]``; None when the
            sum failed (then nothing may be applied).
        survivors: Sites whose input is in ``total``.
        error: Why the sum failed, else None.
        clipped: Coordinates a fixed-point encoder clipped (as the sites reported them).
        server_seconds: The server's own time in the protocol.
        protect_seconds: Per site, seconds it reported spending to protect its input.
        site_errors: Per site, why one of its protocol steps failed.

    """

    total: np.ndarray | None
    survivors: list[int]
    error: str | None = None
    clipped: int = 0
    server_seconds: float = 0.0
    protect_seconds: dict[int, float] = field(default_factory=dict)
    site_errors: dict[int, str] = field(default_factory=dict)


class SiteProtection(ABC):
    """A site's side of a mode, for one site and one run."""

    #: Stages after ``fit`` this side answers (Flower message types).
    stages: ClassVar[tuple[str, ...]] = ()

    _persistent: PersistentStore | None = None

    @property
    def persistent(self) -> PersistentStore:
        """What this site must remember across sessions of the run (:mod:`securefed.persistent`).

        A fresh store per object unless a runtime hands it the site's own (a
        :class:`~securefed.fl.site_runtime.SiteRuntime` shares its store; a deployed site's
        comes from its state file on disk, :func:`securefed.persistent.read_site_file`).
        """
        if self._persistent is None:
            self._persistent = PersistentStore()
        return self._persistent

    @persistent.setter
    def persistent(self, store: PersistentStore) -> None:
        self._persistent = store

    @abstractmethod
    def protect(
        self, vector: np.ndarray, *, round_index: int, n_sites: int, state: SiteState
    ) -> dict[str, Any]:
        """Protect the site's update; returns the fields for its fit reply."""

    def answer(self, stage: str, fields: dict[str, Any], *, state: SiteState) -> dict[str, Any]:
        """:meth:`step`, with the seconds it took as ``protect_seconds`` (what runtimes call)."""
        import time

        start = time.perf_counter()
        reply = self.step(stage, fields, state=state)
        reply["protect_seconds"] = time.perf_counter() - start
        return reply

    def step(self, stage: str, fields: dict[str, Any], *, state: SiteState) -> dict[str, Any]:
        """Answer one later protocol stage; returns the reply fields."""
        from securefed.errors import ProtocolError

        raise ProtocolError(f"this site's {type(self).__name__} has no stage {stage!r}")


class SumCollector(ABC):
    """The server's side of a mode, for one run."""

    @abstractmethod
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
        """Turn the fit replies of the sites that answered into their sum.

        Args:
            link: To run further stages.
            fits: Fit replies by site (the sites that trained and answered).
            round_index: The round.
            chosen: The sites sampled this round (the masking graph is over them).
            dim: Length of each vector (update + weight).
            timeout: Seconds a site may take for one protocol step.
            drop_before_upload: In-process simulation only: sites that vanish before their
                protected input reaches the server (left out of the sum).
            drop_after_upload: In-process simulation only: sites that vanish after it did
                (still in the sum).

        Never raises for a site's failure: the outcome's ``error`` says why no sum came out.
        """

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The ``secure_aggregation`` entry of privacy.json."""


class SecureSumMode(ABC):
    """A registered ``--secure-agg`` mode."""

    #: The ``--secure-agg`` value.
    name: ClassVar[str]
    #: Whether the server sees only a sum (False for the plaintext baseline).
    protects: ClassVar[bool] = True
    #: Stages after ``fit`` (Flower message types the ClientApp must answer).
    stages: ClassVar[tuple[str, ...]] = ()
    #: Whether the mode needs the federation's roster (and each site its identity key): the
    #: runtimes then pass ``roster`` to :meth:`server` and ``identity``/``roster`` to
    #: :meth:`site`.
    uses_roster: ClassVar[bool] = False

    @abstractmethod
    def server(
        self,
        config: RunConfig,
        *,
        n_sites: int,
        he_public: bytes | None = None,
        roster: Roster | None = None,
    ) -> SumCollector:
        """The server side for ``config`` (``roster``: the federation's, when the mode uses it)."""

    @abstractmethod
    def site(
        self,
        config: RunConfig,
        *,
        site_id: int,
        he_secret: bytes | None = None,
        identity: Ed25519PrivateKey | None = None,
        roster: Roster | None = None,
    ) -> SiteProtection:
        """The side of site ``site_id`` for ``config``.

        ``identity`` is the site's Ed25519 identity key and ``roster`` the federation's roster
        as the site verified it (modes with :attr:`uses_roster`).
        """
