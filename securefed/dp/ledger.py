"""An append-only ledger of the DP events each site ran, kept apart from accounting."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["PrivacyEvent", "PrivacyLedger"]


@dataclass(frozen=True)
class PrivacyEvent:
    """One site's DP-SGD work in one round: ``steps`` Poisson-subsampled Gaussian steps.

    Attributes:
        round: 1-based federated round.
        client_id: The site.
        noise_multiplier: sigma (noise std = sigma * max_grad_norm).
        sample_rate: Poisson sampling probability q.
        steps: Optimizer steps actually taken (counted by a hook on the DP optimizer).
        max_grad_norm: Per-sample clipping bound C.
        phase: ``federated`` (training whose update is aggregated) or ``personalize``
            (digital-twin fine-tuning that never leaves the site; accounted all the same).

    """

    round: int
    client_id: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    phase: str = "federated"

    def to_dict(self) -> dict:
        """JSON-ready view."""
        return asdict(self)


class PrivacyLedger:
    """What happened, in order; accountants replay it (dp_accounting's habit).

    The ledger never forgets: a site's epsilon is always computed over every event of every
    round it took part in, so a fresh optimizer per round cannot reset the budget.
    """

    def __init__(self) -> None:
        self._events: list[PrivacyEvent] = []

    def record(self, event: PrivacyEvent) -> None:
        """Append one event."""
        self._events.append(event)

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """All events, in the order recorded."""
        return tuple(self._events)

    def for_client(self, client_id: int, *, up_to_round: int | None = None) -> list[PrivacyEvent]:
        """Events of one site, optionally only up to and including ``up_to_round``."""
        return [
            e
            for e in self._events
            if e.client_id == client_id and (up_to_round is None or e.round <= up_to_round)
        ]

    def history(self, client_id: int, *, up_to_round: int | None = None) -> list[tuple]:
        """Opacus accountant history ``[(sigma, q, steps), ...]`` for one site."""
        return [
            (e.noise_multiplier, e.sample_rate, e.steps)
            for e in self.for_client(client_id, up_to_round=up_to_round)
            if e.steps > 0
        ]
