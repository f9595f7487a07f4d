"""Noise calibration and epsilon for replace-one adjacency, with ``dp_accounting``'s PLD.

Why replace-one and not add/remove (Opacus' accountants): what a site releases depends on
its size n. Its sampling rate q = 1/ceil(n/B) and step counts are in its privacy claim, and
every round's aggregate carries the sum of the sample counts. Removing one record can change
all of them, so an add/remove epsilon would not bound what an observer learns. Under
replace-one adjacency (one record substituted by any other; n stays the same) those releases
are identical in both neighbouring data sets, and the epsilon covers everything that leaves
the site. It is larger than the add/remove figure for the same noise, so sigma is larger too.

The PLD accountant is pessimistic (its discretisation rounds privacy loss up), so an epsilon
computed here is an upper bound.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from securefed.config import SIGMA_SEARCH, SIGMA_SEARCHES
from securefed.errors import ConfigError, PrivacyBudgetError

__all__ = [
    "ACCOUNTANT",
    "ADJACENCY",
    "calibrate_noise",
    "compute_epsilon",
    "default_delta",
    "run_delta_bound",
    "site_delta",
    "steps_per_epoch",
    "site_batch",
    "site_lr",
    "sample_rate",
]

#: The only accountant: dp_accounting's privacy-loss-distribution accountant.
ACCOUNTANT = "pld"
#: The neighbouring relation every epsilon in securefed is stated for.
ADJACENCY = "replace-one"
#: Default upper bound on delta before the per-site cap (see :func:`site_delta`).
DEFAULT_DELTA = 1e-5

#: PLD grid for claims made during training; the audit recomputes on a finer one.
_DISCRETIZATION = 1e-3
#: Largest noise multiplier calibration will consider.
_MAX_SIGMA = 1e4
#: Calibration stops at a sigma whose epsilon is within this much below the target.
_EPS_SLACK = 0.01
#: Significant bits a secant probe keeps (:func:`_dyadic`).
_PROBE_BITS = 17


def steps_per_epoch(*, num_samples: int, batch_size: int, min_steps: int = 1) -> int:
    """Optimizer steps per local epoch: ``max(ceil(n / B), min_steps)``.

    ``B`` is the largest batch; a site with fewer than ``min_steps * B`` records takes
    ``min_steps`` steps of about ``n / min_steps`` records instead of one or two large ones.
    The count is not capped at ``n``: under DP the sampling rate ``1/steps`` is published, and
    ``1/n`` would name a tiny site's exact size (Poisson batches may be empty; the non-private
    loader takes at most ``n`` batches). The rule uses only the site's own size.
    """
    return max(1, math.ceil(num_samples / batch_size), min_steps)


def sample_rate(*, num_samples: int, batch_size: int, min_steps: int = 1) -> float:
    """Poisson sampling rate ``q = 1 / steps_per_epoch``, so an epoch is exactly ``1/q`` steps."""
    return 1.0 / steps_per_epoch(
        num_samples=num_samples, batch_size=batch_size, min_steps=min_steps
    )


def site_batch(*, num_samples: int, batch_size: int, min_steps: int = 1) -> int:
    """A site's (expected) batch: ``ceil(n / steps_per_epoch)``, at most ``batch_size``."""
    spe = steps_per_epoch(num_samples=num_samples, batch_size=batch_size, min_steps=min_steps)
    return max(1, min(batch_size, math.ceil(num_samples / spe)))


def site_lr(*, lr: float, num_samples: int, batch_size: int, min_steps: int = 1) -> float:
    """A site's learning rate: ``lr * n / (min_steps * B)`` where ``min_steps`` set its steps.

    Only a site that ``min_steps`` splits into more steps than ``ceil(n / B)`` scales ``lr``,
    linearly with its batch of about ``n / min_steps`` (Goyal et al. 2017): the step per
    record's gradient is then ``lr / B``, as at a site with full batches, and under DP-SGD each
    step's noise in parameter space, ``lr * sigma * C / batch``, is ``lr * sigma * C / B`` times
    that site's own sigma. Every other site, and every site under ``min_steps = 1`` (the rule
    before it existed, so that recorded runs replay exactly), uses ``lr`` as given.
    """
    if min_steps <= math.ceil(num_samples / batch_size):
        return float(lr)
    return float(lr) * min(1.0, num_samples / (min_steps * batch_size))


def run_delta_bound(run_delta: float | None) -> float:
    """The largest delta a run lets a site use: ``--dp-delta``, or 1e-5 when not given."""
    return DEFAULT_DELTA if run_delta is None else float(run_delta)


def site_delta(*, num_samples: int, run_delta: float | None = None) -> float:
    """The delta one site uses: the run's (default 1e-5), capped at ``1/(10 n)`` for this site.

    The cap is rounded down to a power of ten, so the delta a site reports reveals only the
    order of magnitude of its size (its sampling rate already says more). Every site's delta
    is therefore below ``1/n`` of that site, whatever the sizes of the others.

    Raises:
        ConfigError: If ``num_samples`` < 1 or ``run_delta`` is not in (0, 1).

    """
    if num_samples < 1:
        raise ConfigError("`num_samples` must be at least 1.")
    bound = run_delta_bound(run_delta)
    if not 0 < bound < 1:
        raise ConfigError(f"`dp_delta` must be in (0, 1) (got {run_delta}).")
    cap = 10.0 ** -math.ceil(math.log10(10 * num_samples))
    return min(bound, cap)


def default_delta(*, largest_site: int) -> float:
    """A delta below ``1/(10 n)`` for every site of a federation: set by the largest site."""
    return site_delta(num_samples=largest_site)


def _grouped(history: Sequence[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    counts: dict[tuple[float, float], int] = defaultdict(int)
    for sigma, q, steps in history:
        if int(steps) > 0:
            counts[(float(sigma), float(q))] += int(steps)
    return tuple((s, q, n) for (s, q), n in sorted(counts.items()))


def pld_epsilon(
    *,
    history: Sequence[tuple[float, float, int]],
    delta: float,
    discretization: float = _DISCRETIZATION,
) -> float:
    """Replace-one epsilon of Poisson-subsampled Gaussian steps ``[(sigma, q, steps), ...]``.

    Composition is commutative, so steps with the same ``(sigma, q)`` fold into one
    self-composition; the result is 0 for no steps. On the training grid (the default
    ``discretization``) the pieces are cached (:func:`_group_pld`); any other grid (the
    audit's finer one) composes from scratch, so the audit shares no cached state with the
    claims it checks.
    """
    grouped = _grouped(history)
    if not grouped:
        return 0.0
    if float(discretization) != _DISCRETIZATION:
        return _pld_from_scratch(grouped, float(delta), float(discretization))
    return _pld_cached(grouped, float(delta), float(discretization))


def _pld_from_scratch(grouped: tuple, delta: float, discretization: float) -> float:
    """dp_accounting's own composition of the grouped history (one accountant, no cache)."""
    from dp_accounting import NeighboringRelation, dp_event, pld

    event = dp_event.ComposedDpEvent(
        [
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
            )
            for sigma, q, steps in grouped
        ]
    )
    acc = pld.PLDAccountant(
        neighboring_relation=NeighboringRelation.REPLACE_ONE,
        value_discretization_interval=discretization,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc.compose(event)
        return float(acc.get_epsilon(delta))


# Why three caches: each round's progress epsilon, the server's copy of it and every probe of
# the sigma bisection used to compose a fresh PLD, rebuilding the subsampled-Gaussian PLD of
# one step (the costly part) each time. The pieces below are exactly what dp_accounting's
# PLDAccountant builds for the same events, in the same order, so an epsilon is the same
# number as a from-scratch composition, only computed once. Memory: a piece on the 1e-3 grid
# is two dense pmfs of some 10^4-10^5 floats (under 1 MB each); the sizes bound the caches to
# tens of MB at most.


@lru_cache(maxsize=64)
def _step_pld(sigma: float, q: float, discretization: float) -> Any:
    """PLD of one Poisson-subsampled Gaussian step (what PLDAccountant builds per event)."""
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pld_lib.from_gaussian_mechanism(
            standard_deviation=sigma,
            value_discretization_interval=discretization,
            sampling_prob=q,
            neighboring_relation=NeighboringRelation.REPLACE_ONE,
        )


@lru_cache(maxsize=64)
def _group_pld(sigma: float, q: float, steps: int, discretization: float) -> Any:
    """PLD of ``steps`` such steps: the cached one-step PLD, self-composed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _step_pld(sigma, q, discretization).self_compose(steps)


@lru_cache(maxsize=4096)
def _pld_cached(grouped: tuple, delta: float, discretization: float) -> float:
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    # PLDAccountant's rules for degenerate events: q = 0 releases nothing, sigma = 0 with
    # q > 0 releases the sum in clear.
    live = [(s, q, n) for s, q, n in grouped if q != 0]
    if any(s == 0 for s, _, _ in live):
        return math.inf
    composed = pld_lib.identity(value_discretization_interval=discretization)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sigma, q, steps in live:
            composed = composed.compose(_group_pld(sigma, q, steps, discretization))
        return float(composed.get_epsilon_for_delta(delta))


def _check_accountant(accountant: str) -> None:
    if accountant != ACCOUNTANT:
        raise ConfigError(
            f"accountant {accountant!r} is not supported: securefed accounts replace-one "
            f"adjacency, which only the {ACCOUNTANT!r} accountant computes"
        )


def compute_epsilon(
    *, history: Sequence[tuple[float, float, int]], delta: float, accountant: str = ACCOUNTANT
) -> float:
    """Replace-one epsilon of a composition ``[(sigma, q, steps), ...]`` at ``delta``.

    Every entry counts (a history of several rounds is composed, never just its last entry).
    """
    _check_accountant(accountant)
    return pld_epsilon(history=history, delta=delta)


# typed: `search=True` must not hit `search=1`'s entry (bool is refused below).
@lru_cache(maxsize=256, typed=True)
def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = ACCOUNTANT,
    extra: tuple[tuple[float, float, int], ...] = (),
    search: int = SIGMA_SEARCH,
) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) whose replace-one epsilon is <= target.

    Epsilon decreases as sigma grows. The result's epsilon is at most the target and, unless
    sigma hit the search's resolution (1e-4 relative), within 0.01 of it. ``extra`` are fixed
    entries composed with the steps (e.g. the decision calibration's release,
    :func:`securefed.dp.calibration.planned_entries`): sigma leaves room for them.

    ``search`` picks how sigma is found (:data:`securefed.config.SIGMA_SEARCHES`); both meet
    that guarantee but stop at different sigmas, and ``securefed audit`` re-derives a run's
    sigma with the search it recorded. 1: bisection from sigma = 1 (15 accountant calls for
    the quick start's plan). 2: a safeguarded secant on log epsilon against log sigma from an
    analytic guess (:func:`_sigma_guess`): 3-4 calls for the quick start's plan and most plans
    whose sigma is above 1, up to about 18 where sigma is small (few steps at small q); it also
    stops within half the target below it, which only matters for targets under 0.02. Each
    secant probe is rounded to 17 significant bits, so that accountants differing in their
    last bits (another machine's FFT) change sigma only when a probe or a comparison falls
    that close to a boundary, as with the bisection's comparisons (a server checks a site's
    sigma for equality, :func:`securefed.fl.planning.check_site_plan`: it then refuses the
    plan, it does not accept another).

    Raises:
        PrivacyBudgetError: No noise multiplier reaches the target (search 1 probes up to
            8192, search 2 up to 1e4).
        ConfigError: ``search`` is not a known search.

    """
    _check_accountant(accountant)
    if search not in SIGMA_SEARCHES or isinstance(search, bool):
        raise ConfigError(f"`sigma_search` must be one of {SIGMA_SEARCHES} (got {search!r})")

    def eps(sigma: float) -> float:
        return pld_epsilon(history=[(sigma, sample_rate, steps), *extra], delta=delta)

    if extra and pld_epsilon(history=list(extra), delta=delta) >= target_epsilon:
        raise PrivacyBudgetError(
            f"epsilon={target_epsilon} at delta={delta:.2g} cannot be reached: the decision "
            "calibration, q-FFL's loss releases and the class prior alone "
            f"spend {pld_epsilon(history=list(extra), delta=delta):.3g}; raise "
            "--calibration-noise, --fair-loss-noise, --prior-noise or --dp-epsilon, or pass "
            "--no-calibrate, --fair-q 0 or --no-logit-adjust"
        )
    unreachable = PrivacyBudgetError(
        f"epsilon={target_epsilon} at delta={delta:.2g} cannot be reached with {steps} "
        f"steps at sampling rate {sample_rate:.4g}: raise --dp-epsilon, or lower "
        "--rounds, --local-epochs or --batch-size"
    )
    if search == 1:
        return _bisection(eps, float(target_epsilon), unreachable)
    guess = _sigma_guess(float(target_epsilon), float(delta), float(sample_rate), int(steps))
    return _secant(eps, float(target_epsilon), guess, unreachable)


def _bisection(eps: Any, target: float, unreachable: Exception) -> float:
    """Search 1: double sigma from 1 until epsilon <= target, then bisect on [0, that]."""
    hi = 1.0
    while eps(hi) > target:
        hi *= 2
        if hi > _MAX_SIGMA:
            raise unreachable
    lo = 0.0
    # Invariant: eps(hi) <= target < eps(lo) (eps(0) is infinite).
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        e = eps(mid)
        if e <= target:
            hi = mid
            if e >= target - _EPS_SLACK:
                break
        else:
            lo = mid
    return float(hi)


def _sigma_guess(target: float, delta: float, q: float, steps: int) -> float:
    """Search 2's first probe: sigma from the Gaussian-DP central limit (Dong, Roth & Su 2022).

    ``steps`` Poisson-subsampled Gaussian steps of sensitivity 2 (replace-one) behave like
    mu-GDP with ``mu = q sqrt(steps (exp(4 / sigma^2) - 1))``, and mu-GDP meets
    (epsilon, delta) about where ``mu = sqrt(2 L + 2 epsilon) - sqrt(2 L)``, ``L = ln(1/delta)``.
    Only a starting point: it ran 10-100 % above the calibrated sigma over q in [0.01, 1],
    epsilon in [0.5, 50] and 10-1000 steps (more for tiny targets), and the search corrects it.
    """
    log_inv_delta = math.log(1.0 / delta)
    mu = math.sqrt(2 * log_inv_delta + 2 * target) - math.sqrt(2 * log_inv_delta)
    ratio = mu / (q * math.sqrt(steps))
    guess = 2.0 / math.sqrt(math.log1p(ratio * ratio)) if ratio > 0 else _MAX_SIGMA
    return _dyadic(min(max(guess, 0.05), _MAX_SIGMA))


def _dyadic(sigma: float) -> float:
    """``sigma`` rounded to :data:`_PROBE_BITS` significant bits (a probe both sides agree on)."""
    mantissa, exponent = math.frexp(sigma)
    return math.ldexp(round(mantissa * 2**_PROBE_BITS) / 2**_PROBE_BITS, exponent)


def _secant(eps: Any, target: float, guess: float, unreachable: Exception) -> float:
    """Search 2: safeguarded secant on (log sigma, log epsilon), aiming mid-way into the slack.

    Keeps a bracket ``eps(hi) <= target < eps(lo)``. With both ends known, a probe the local
    power law puts outside the bracket's inner 96 %, or one after a step that did not halve the
    bracket, is the bracket's midpoint instead, so the search ends like a bisection at worst.
    Before any sigma above the target is known (``lo = 0``) the probe is kept to
    ``[hi / 8, 0.98 hi]`` (small sigmas are the accountant's costliest probes), or ``hi / 2``
    after a step that did not halve ``hi``.
    """
    slack = min(_EPS_SLACK, target / 2)  # a target under 0.02 still gets a sigma near it
    aim = target - slack / 2
    lo, hi = 0.0, math.inf
    points: list[tuple[float, float]] = []
    sigma, bisect_next = guess, False
    while True:
        e = eps(sigma)
        span = hi - lo
        if e <= target:
            hi = sigma
            if e >= target - slack:
                return float(sigma)
        else:
            lo = sigma
        if math.isfinite(hi) and hi - lo <= 1e-4 * hi:
            return float(hi)
        if math.isfinite(e) and e > 0:
            points = [*points[-1:], (sigma, e)]
        if math.isinf(hi):
            # No sigma has met the target yet: grow by the power law, 1.25x to 8x.
            if lo >= _MAX_SIGMA:
                raise unreachable
            step = _power_step(points, aim) if points else 8 * lo
            sigma = _dyadic(min(max(step, 1.25 * lo), 8 * lo, _MAX_SIGMA))
            continue
        middle = (lo + hi) / 2
        step = _power_step(points, aim) if points else middle
        if lo > 0:
            if bisect_next or not lo + 0.02 * (hi - lo) < step < hi - 0.02 * (hi - lo):
                step = middle
        else:
            step = middle if bisect_next else min(max(step, hi / 8), 0.98 * hi)
        bisect_next = math.isfinite(span) and hi - lo > span / 2
        sigma = _dyadic(step)
        if not lo < sigma < hi:
            return float(hi)


def _power_step(points: list[tuple[float, float]], aim: float) -> float:
    """Sigma at which ``epsilon = c sigma^-k`` through the last probes reaches ``aim``.

    ``k`` from the last two probes, or 1 with one probe (or a slope out of (0.05, 20)).
    """
    s2, e2 = points[-1]
    k = 1.0
    if len(points) == 2:
        s1, e1 = points[0]
        if s1 != s2 and e1 != e2:
            slope = -math.log(e2 / e1) / math.log(s2 / s1)
            if 0.05 < slope < 20:
                k = slope
    return s2 * (e2 / aim) ** (1.0 / k)
