"""Noise calibration and epsilon computation with Opacus' accountants."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from securefed.errors import ConfigError, PrivacyBudgetError

__all__ = ["calibrate_noise", "compute_epsilon", "default_delta", "steps_per_epoch", "sample_rate"]


def steps_per_epoch(*, num_samples: int, batch_size: int) -> int:
    """Expected optimizer steps per epoch, Opacus' convention: ``ceil(n / B)``."""
    return max(1, math.ceil(num_samples / batch_size))


def sample_rate(*, num_samples: int, batch_size: int) -> float:
    """Poisson sampling rate as Opacus' DPDataLoader derives it: ``1 / ceil(n / B)``."""
    return 1.0 / steps_per_epoch(num_samples=num_samples, batch_size=batch_size)


def default_delta(*, smallest_site: int) -> float:
    """``min(1e-5, 1 / (10 n_min))``: well below 1/n for every site, as DP practice asks."""
    if smallest_site < 1:
        raise ConfigError("`smallest_site` must be at least 1.")
    return min(1e-5, 1.0 / (10 * smallest_site))


def _create(accountant: str):
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=accountant)


def compute_epsilon(
    *, history: Sequence[tuple[float, float, int]], delta: float, accountant: str
) -> float:
    """Epsilon of a composition ``[(sigma, q, steps), ...]`` at ``delta``; 0 for no steps."""
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    return _compute_cached(tuple(tuple(h) for h in history), delta, accountant)


@lru_cache(maxsize=4096)
def _compute_cached(history: tuple, delta: float, accountant: str) -> float:
    acc = _create(accountant)
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # Opacus warns that GDP is experimental and that RDP hit its largest order; both
        # facts are in the report (accountant name; audit's independent check), not stderr.
        # PRV takes log(0) at the edge of its domain, harmlessly.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) whose epsilon after ``steps`` is <= target.

    Raises:
        PrivacyBudgetError: No noise multiplier up to Opacus' bound reaches the target.

    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # Hopeless targets make Opacus' search take logs of 0 on its way to failing.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
    except (ValueError, OverflowError, FloatingPointError) as exc:
        raise PrivacyBudgetError(
            f"epsilon={target_epsilon} at delta={delta:.2g} cannot be reached with {steps} steps "
            f"at sampling rate {sample_rate:.4g} ({accountant}): raise --dp-epsilon, or lower "
            f"--rounds, --local-epochs or --batch-size"
        ) from exc
    return float(sigma)
