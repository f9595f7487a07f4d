"""The mechanisms a site plans besides DP-SGD, in one place: their phases and their plans.

Each is a Gaussian release accounted like one DP-SGD step with q = 1 (its own module says
what it releases and why): the decision calibration (:mod:`securefed.dp.calibration`), q-FFL's
loss (:mod:`securefed.dp.fair_loss`) and logit adjustment's class prior
(:mod:`securefed.dp.class_prior`). DP-SGD's sigma leaves room for all of them; the site, the
server's claim book and the audit check their events against :func:`planned`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from securefed.dp import calibration, class_prior, fair_loss

__all__ = ["PHASES", "entries", "planned"]

#: Ledger phases of the releases (DP-SGD's are ``federated`` and ``personalize``).
PHASES = (calibration.PHASE, fair_loss.PHASE, class_prior.PHASE)


def entries(run: Mapping[str, Any]) -> tuple[tuple[float, float, int], ...]:
    """Accountant entries ``(sigma, q, steps)`` of every release ``run`` plans.

    Raises:
        ValueError: A release's noise multiplier no run can have.

    """
    return (
        calibration.planned_entries(run)
        + fair_loss.planned_entries(run)
        + class_prior.planned_entries(run)
    )


def planned(run: Mapping[str, Any]) -> dict[str, frozenset[tuple[float, float, int, float]]]:
    """Phase -> the ``(sigma, q, steps, C)`` an event of that phase may have in ``run``.

    Raises:
        ValueError: As :func:`entries`.

    """
    return {
        calibration.PHASE: calibration.planned_releases(run),
        fair_loss.PHASE: fair_loss.planned_releases(run),
        class_prior.PHASE: class_prior.planned_releases(run),
    }
