"""An empirical lower bound on a site's DP-SGD epsilon from one training run.

The analytical epsilon is only as good as the code that claims it: seeded noise, a step the
ledger missed or a release outside the accountant leaves the arithmetic unchanged. This module
measures what the mechanism that ran actually hides, in the manner of Steinke, Nasr and
Jagielski (2023, "Privacy auditing with one (1) training run", section 5's white-box gradient
canaries).

What it audits. ``K`` *Dirac canaries* are inserted into one site's DP-SGD: canary ``i`` owns
one secret coordinate ``j_i`` of the flattened trainable parameters and a secret coin
``s_i`` (+1 or -1, probability 1/2 each). At every noisy step the canary is Poisson-sampled
with the site's own rate ``q`` (coins from the site's :class:`~securefed.dp.noise.NoiseSource`,
like the real records) and, when sampled, adds ``s_i * C * e_{j_i}`` to the clipped sum before
the noise: a per-sample gradient of norm exactly ``C``, clipped and noised like a real one.
The two values of the coin are two records whose clipped gradients are ``+C e_j`` and
``-C e_j``: replace-one neighbours, the adjacency every securefed epsilon is stated for, and
its worst case (sensitivity ``2C``). After training, canary ``i``'s score is the sum over all
steps of coordinate ``j_i`` of the released noisy sum (white box: DP-SGD's claim covers every
step's noisy gradient, so the auditor may look at each of them). The auditor guesses the
``k`` highest scores to be ``+1`` and the ``k`` lowest ``-1``, abstains on the rest, and
:func:`epsilon_lower_bound` turns ``v`` correct of ``r`` guesses into the largest epsilon that
an ``(eps, delta)``-DP mechanism could exceed with probability at most ``1 - confidence``.

What it does not audit: the federation around the site (secure aggregation, the update clip,
the server), other sites, input-space attacks on the model, or the privacy of the real
records (the canaries are synthetic gradients). A lower bound far below the analytical
epsilon is expected and is no evidence that the claim is tight; a lower bound *above* it is
evidence, at the stated confidence, that the mechanism does not do what the ledger claims.

The canaries change the trained model, so a run with canaries is an audit run, not a model to
deploy (the report says so). Their coins, coordinates and scores are the site's own secret
randomness (:class:`~securefed.dp.noise.SecretNoise`, never ``--seed``) and stay at the site.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from securefed.dp.noise import NoiseSource, SecretNoise
from securefed.dp.trainer import NoiseDPOptimizer, SiteTrainer
from securefed.errors import AuditError, ConfigError

__all__ = [
    "RECORD_FILE",
    "CONFIDENCE",
    "GUESS_FRACTIONS",
    "METHOD",
    "AuditedSiteTrainer",
    "EmpiricalResult",
    "GradientCanaries",
    "check_audit_run",
    "empirical_epsilon",
    "epsilon_lower_bound",
    "p_value",
]

#: What :func:`empirical_epsilon` reports as its method.
METHOD = "one-run white-box Dirac gradient canaries (Steinke, Nasr & Jagielski 2023)"
#: The audit run's record (per canary: secret coin and score), beside privacy.json.
RECORD_FILE = "empirical_audit.json"
#: Default confidence of the lower bound.
CONFIDENCE = 0.95
#: Guesses tried, as a fraction of the canaries (half guessed +1, half -1). Fixed before the
#: run; the bound pays for trying several with a Bonferroni split of ``1 - confidence``.
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _log_binom_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(x - top) for x in values))


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of ``v`` or more correct of ``r`` guesses under ``(epsilon, delta)``-DP.

    Steinke, Nasr and Jagielski (2023), Theorem 5.2 with its delta term: for ``m`` canaries
    with independent uniform coins, an ``(eps, delta)``-DP mechanism and any guesser,
    ``P[V >= v] <= P[Binomial(r, p) >= v] + 2 m delta * max_{i=1..v} P[v - i <= B < v] / i``
    with ``p = e^eps / (1 + e^eps)`` and ``B ~ Binomial(r, p)``. Pure Python, log-space.

    Args:
        m: Canaries (each with its own coin).
        r: Guesses made (the rest abstain).
        v: Correct guesses.
        epsilon: Epsilon of the null hypothesis (>= 0).
        delta: Delta of the null hypothesis.

    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m (got v={v}, r={r}, m={m})")
    if epsilon < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError("need epsilon >= 0 and delta in [0, 1]")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    logs = [_log_binom_pmf(k, r, p) for k in range(r + 1)]
    tail = math.exp(_logsumexp(logs[v:])) if v <= r else 0.0
    extra = 0.0
    if delta > 0 and v > 0:
        below, best = 0.0, 0.0
        for i in range(1, v + 1):  # P[v - i <= B < v], grown one term at a time
            below += math.exp(logs[v - i])
            best = max(best, below / i)
        extra = 2.0 * m * delta * best
    return min(1.0, tail + extra)


def epsilon_lower_bound(
    *, m: int, r: int, v: int, delta: float = 0.0, confidence: float = CONFIDENCE
) -> float:
    """The largest epsilon that ``v`` correct of ``r`` guesses refute at ``confidence``.

    ``sup {eps : p_value(eps) < 1 - confidence}`` (0 when even eps = 0 is not refuted): no
    ``(eps, delta)``-DP mechanism with an epsilon below it gives this many correct guesses
    with probability more than ``1 - confidence``. Bisection to 1e-6.

    Args:
        m: Canaries.
        r: Guesses.
        v: Correct guesses.
        delta: The claim's delta.
        confidence: In (0, 1), e.g. 0.95.

    """
    if not 0.0 < confidence < 1.0:
        raise ValueError("`confidence` must be in (0, 1)")
    alpha = 1.0 - confidence
    if r == 0 or p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < alpha:
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:  # cannot happen for r < 1e300; a guard against an endless loop
            return lo
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class EmpiricalResult:
    """An empirical epsilon and the guesses it rests on.

    Attributes:
        eps_emp: The lower bound (0 when the guesses refute nothing).
        canaries: m.
        guesses: r, at the guess count that gave the bound.
        correct: v.
        confidence: Of the whole statement (the per-count tests share it, Bonferroni).
        delta: The claim's delta the bound allows for.
        method: :data:`METHOD`.

    """

    eps_emp: float
    canaries: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    method: str = METHOD

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (privacy.json's ``empirical`` block uses these names)."""
        return {
            "method": self.method,
            "K": self.canaries,
            "confidence": self.confidence,
            "delta": self.delta,
            "eps_emp": self.eps_emp,
            "guesses": self.guesses,
            "correct": self.correct,
        }


def empirical_epsilon(
    scores: Sequence[float] | torch.Tensor,
    signs: Sequence[int] | torch.Tensor,
    *,
    delta: float,
    confidence: float = CONFIDENCE,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> EmpiricalResult:
    """eps_emp from canary scores and their secret coins.

    For each fraction ``f`` the auditor guesses ``+1`` for the ``round(f m / 2)`` highest
    scores and ``-1`` for as many lowest, abstaining on the rest. Trying ``len(fractions)``
    counts costs a Bonferroni split: each is tested at ``1 - (1 - confidence) / len``, so the
    best of them holds at ``confidence``.

    Args:
        scores: One score per canary (higher: more likely +1).
        signs: The secret coins, +1 or -1.
        delta: The claim's delta.
        confidence: Of the statement.
        fractions: Guess counts to try, as fractions of m in (0, 1].

    Raises:
        AuditError: If scores and signs differ in length, are empty, a coin is not +1/-1,
            or a score is not finite.

    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    c = torch.as_tensor(signs).flatten()
    m = int(s.numel())
    if m == 0 or int(c.numel()) != m:
        raise AuditError(f"empirical audit: {m} scores for {int(c.numel())} canary coins")
    if not bool(((c == 1) | (c == -1)).all()):
        raise AuditError("empirical audit: a canary coin is neither +1 nor -1")
    if not bool(torch.isfinite(s).all()):
        raise AuditError("empirical audit: a canary score is not finite")
    order = torch.argsort(s, descending=True, stable=True)
    ranked = c[order]
    per_test = 1.0 - (1.0 - confidence) / len(fractions)
    best = EmpiricalResult(0.0, m, 0, 0, confidence, delta)
    for f in fractions:
        k = max(1, min(m // 2, round(f * m / 2)))
        v = int((ranked[:k] == 1).sum()) + int((ranked[m - k :] == -1).sum())
        eps = epsilon_lower_bound(m=m, r=2 * k, v=v, delta=delta, confidence=per_test)
        if eps > best.eps_emp or best.guesses == 0:
            best = EmpiricalResult(eps, m, 2 * k, v, confidence, delta)
    return best


class GradientCanaries:
    """K Dirac canaries inside one site's DP-SGD (see the module docstring).

    Coordinates and coins are drawn from ``secret`` the first time the canaries meet a model
    (so they fit its parameter count) and kept for every later round; the per-step Poisson
    coins come from the step's own mechanism noise source.

    Args:
        count: K, the number of canaries (at most the trainable parameter count).
        secret: Where coordinates and coins come from (default: a fresh
            :class:`~securefed.dp.noise.SecretNoise`, never the run's seed).

    Attributes:
        scores: Per canary, the sum over steps of its coordinate of the noisy clipped sum.
        steps: Noisy steps observed.

    """

    def __init__(self, *, count: int, secret: NoiseSource | None = None) -> None:
        if count < 2:
            raise ValueError("an audit needs at least 2 canaries")
        self.count = count
        self._secret = secret if secret is not None else SecretNoise()
        self.coordinates: torch.Tensor | None = None
        self.signs: torch.Tensor | None = None
        self.scores = torch.zeros(count, dtype=torch.float64)
        self.steps = 0

    def _draw(self, num_params: int) -> None:
        if self.count > num_params:
            raise ConfigError(
                f"--audit-canaries {self.count}: each canary needs a trainable parameter of its "
                f"own and the model has {num_params}"
            )
        # A secret uniform permutation: sort uniform 64-bit keys; the first K are the places.
        keys = torch.frombuffer(
            bytearray(self._secret.random_bytes(8 * num_params)), dtype=torch.int64
        )
        self.coordinates = torch.argsort(keys, stable=True)[: self.count].clone()
        coins = self._secret.bernoulli(self.count, 0.5)
        self.signs = torch.where(coins, 1, -1).to(torch.int64)

    def attach(self, optimizer: NoiseDPOptimizer, *, noise: NoiseSource, sample_rate: float):
        """Insert the canaries into ``optimizer``'s noisy steps and record their scores.

        Wraps the optimizer's ``add_noise``: before it, each canary sampled at rate
        ``sample_rate`` (coins from ``noise``) adds ``sign * C`` at its coordinate of the
        clipped sum; after it, the canary's coordinate of the noisy sum is added to its score.

        Args:
            optimizer: A DP optimizer holding ``summed_grad`` per parameter before its noise.
            noise: The step's mechanism randomness (the site's NoiseSource).
            sample_rate: The site's Poisson rate q.

        """
        params = list(optimizer.params)
        sizes = [p.numel() for p in params]
        if self.coordinates is None:
            self._draw(sum(sizes))
        assert self.coordinates is not None and self.signs is not None
        if sum(sizes) <= int(self.coordinates.max()):
            raise ValueError("the canaries were drawn for a larger model")
        bounds = torch.tensor([0, *sizes]).cumsum(0)
        owner = torch.bucketize(self.coordinates, bounds[1:], right=True)
        places = []
        for i in range(len(params)):
            idx = (owner == i).nonzero().flatten()
            places.append((idx, self.coordinates[idx] - bounds[i]))
        step_size = float(optimizer.max_grad_norm)
        original = optimizer.add_noise

        def add_noise() -> None:
            sampled = noise.bernoulli(self.count, sample_rate)
            for p, (idx, off) in zip(params, places):
                if len(idx) == 0:
                    continue
                pick = sampled[idx]
                if bool(pick.any()):
                    if not p.summed_grad.is_contiguous():  # view() must alias the sum
                        p.summed_grad = p.summed_grad.contiguous()
                    flat = p.summed_grad.view(-1)
                    values = (self.signs[idx][pick] * step_size).to(flat.dtype).to(flat.device)
                    flat.index_add_(0, off[pick].to(flat.device), values)
            original()
            for p, (idx, off) in zip(params, places):
                if len(idx):
                    self.scores[idx] += p.grad.reshape(-1)[off.to(p.grad.device)].double().cpu()
            self.steps += 1

        optimizer.add_noise = add_noise  # type: ignore[method-assign]

    def result(self, *, delta: float, confidence: float = CONFIDENCE) -> EmpiricalResult:
        """eps_emp from the scores so far.

        Raises:
            AuditError: If no step ran with the canaries attached.

        """
        if self.signs is None or self.steps == 0:
            raise AuditError("empirical audit: the canaries saw no DP-SGD step")
        return empirical_epsilon(self.scores, self.signs, delta=delta, confidence=confidence)

    def record(self) -> dict[str, Any]:
        """What the site keeps to let ``securefed audit --empirical`` recompute the bound."""
        if self.signs is None:
            raise AuditError("empirical audit: the canaries were never drawn")
        return {
            "canaries": self.count,
            "steps": self.steps,
            "signs": self.signs.tolist(),
            "scores": self.scores.tolist(),
        }


class AuditedSiteTrainer(SiteTrainer):
    """A :class:`~securefed.dp.trainer.SiteTrainer` whose DP-SGD carries gradient canaries.

    Training, sampling, noise and the ledger are the parent's; only the DP optimizer's noise
    step is wrapped (:meth:`GradientCanaries.attach`). Needs a DP plan (a noise multiplier of
    0 audits clipping without noise).

    Args:
        canaries: The site's canaries.
        **kwargs: :class:`~securefed.dp.trainer.SiteTrainer`'s arguments.

    """

    def __init__(self, *, canaries: GradientCanaries, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.plan is None:
            raise ValueError("gradient canaries audit DP-SGD: the trainer needs a DP plan")
        self.canaries = canaries

    def _make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer, noise):
        made = super()._make_private(model, optimizer, noise)
        assert self.plan is not None
        # Either clipping mode: the canaries go into the clipped sum the noise step reads.
        self.canaries.attach(made[1], noise=noise, sample_rate=self.plan.sample_rate)
        return made


def check_audit_run(
    run_dir: Path | str, *, site_keys: dict[str, str] | None = None
) -> dict[str, Any]:
    """Recompute an audit run's eps_emp from its record and compare it with the claim.

    Checks, in order: privacy.json's hash over itself, config.json and metrics.json; the
    audited site's signature over the empirical block (its eps_emp and the record's digest)
    by its key, pinned by ``site_keys`` (``{site id: public key hex}``) or else the report's
    own; the record's SHA-256 against privacy.json's ``empirical.record_sha256``; the
    record's shape; that eps_emp recomputed from the record's coins and scores is the
    reported one.

    Returns:
        ``eps_emp``, ``epsilon`` (the audited site's analytical claim), ``site``, ``K``,
        ``guesses``, ``correct``, ``confidence``, and ``holds``: eps_emp <= epsilon (a lower
        bound above the claim refutes it at the stated confidence).

    Raises:
        AuditError: One line, for a missing, unreadable or tampered file or a run that is
            no audit run.

    """
    from securefed.dp.report import malformed_as_audit_error

    with malformed_as_audit_error(run_dir, "audit record"):
        return _check_audit_run(Path(run_dir), site_keys=site_keys)


def _check_audit_run(run: Path, *, site_keys: dict[str, str] | None) -> dict[str, Any]:
    """:func:`check_audit_run`'s checks."""
    from securefed.dp.report import MAX_JSON_BYTES, file_sha256, read_json, report_hash

    privacy = read_json(run / "privacy.json")
    if not isinstance(privacy, dict):
        raise AuditError(f"{run / 'privacy.json'}: not a privacy report")
    block = privacy.get("empirical")
    if not isinstance(block, dict):
        raise AuditError(
            f"{run}: no empirical audit in privacy.json (train with --audit-canaries K)"
        )
    config, metrics = read_json(run / "config.json"), read_json(run / "metrics.json")
    if privacy.get("sha256") != report_hash(privacy=privacy, config=config, metrics=metrics):
        raise AuditError(f"{run / 'privacy.json'}: sha256 does not match its contents (edited)")
    from securefed.dp.signing import empirical_message, verify_message

    keys = site_keys if site_keys is not None else privacy.get("site_keys") or {}
    key = keys.get(str(block.get("site"))) if isinstance(keys, dict) else None
    try:
        message = empirical_message(block)
    except KeyError as exc:
        raise AuditError(f"{run / 'privacy.json'}: empirical block lacks {exc}") from None
    if not verify_message(message, block.get("signature"), key):
        pinned = "pinned" if site_keys is not None else "reported"
        raise AuditError(
            f"{run / 'privacy.json'}: the empirical block's signature does not verify against "
            f"site {block.get('site')}'s {pinned} key (edited, or signed by another key)"
        )
    name = str(block.get("record", RECORD_FILE))
    if Path(name).name != name or name in ("", ".", ".."):
        # A bare file name in the run folder: a report cannot point the audit at any file.
        raise AuditError(f"{run / 'privacy.json'}: the empirical record must be a file in the run")
    path = run / name
    if not path.is_file():
        raise AuditError(f"{path}: file not found")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise AuditError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB")
    if block.get("K") != (config.get("run") or {}).get("audit_canaries"):
        # The canary count is in the run the site signed: a record cannot grow past it.
        raise AuditError(f"{run / 'privacy.json'}: K is not the run's --audit-canaries")
    if file_sha256(path) != block.get("record_sha256"):
        raise AuditError(f"{path}: does not match privacy.json's record_sha256 (edited)")
    record = read_json(path)
    try:
        signs, scores = record["signs"], record["scores"]
        count, site = int(block["K"]), int(block["site"])
        delta, confidence = float(block["delta"]), float(block["confidence"])
        reported = float(block["eps_emp"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditError(f"{path}: not an empirical audit record ({exc!r})") from exc
    if not isinstance(signs, list) or len(signs) != count:
        raise AuditError(f"{path}: {count} canaries declared, record holds another number")
    result = empirical_epsilon(scores, signs, delta=delta, confidence=confidence)
    if abs(result.eps_emp - reported) > 1e-6:
        raise AuditError(
            f"{run}: eps_emp recomputed from the record is {result.eps_emp:.4f}, the report "
            f"says {reported:.4f}"
        )
    claims = {c.get("client_id"): c.get("epsilon") for c in privacy.get("clients", [])}
    epsilon = claims.get(site)
    if not isinstance(epsilon, (int, float)):
        raise AuditError(f"{run / 'privacy.json'}: no analytical epsilon for site {site}")
    # The epsilon compared with is the one the site signed: the report's hash is unkeyed, so
    # an edited epsilon (raised above eps_emp, the hash recomputed) must fail here.
    from securefed.dp.signing import claim_from_report, claim_version

    entry = next(c for c in privacy.get("clients", []) if c.get("client_id") == site)
    try:
        claim = claim_from_report(privacy, config["run"], site)
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditError(
            f"{run / 'privacy.json'}: site {site}'s claim is malformed ({exc!r})"
        ) from exc
    if claim_version(claim, entry.get("signature"), key) is None:
        raise AuditError(
            f"{run / 'privacy.json'}: site {site}'s signed claim (its epsilon) does not verify "
            "against its key (edited, or signed by another key)"
        )
    return {
        **result.to_dict(),
        "site": site,
        "epsilon": float(epsilon),
        "holds": result.eps_emp <= float(epsilon),
    }
