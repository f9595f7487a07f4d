"""``securefed audit``: re-check a run's privacy claims with an independent accountant.

Training accounts with Opacus; the audit replays the report's ledger with Google's
``dp_accounting`` (PLD, the tight reference, and RDP) and checks every claim an outsider can.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securefed.dp.report import SCHEMA_VERSION, read_json, report_hash
from securefed.errors import AuditError

__all__ = ["AuditResult", "Check", "audit_run", "independent_epsilon", "TOLERANCE"]

#: Claimed epsilon may sit below the independent PLD value by at most this much
#: (absolute + relative): PRV and PLD discretise differently (Opacus' PRV uses eps_error 0.01).
TOLERANCE = {"absolute": 0.01, "relative": 0.01}

_PLD_DISCRETIZATION = 1e-3


@dataclass(frozen=True)
class Check:
    """One audited claim."""

    name: str
    ok: bool
    detail: str


@dataclass
class AuditResult:
    """Everything the audit checked, and the per-site recomputation table."""

    checks: list[Check] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every claim holds."""
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        """Record one check."""
        self.checks.append(Check(name=name, ok=bool(ok), detail=detail))


def independent_epsilon(
    *, events: list[tuple[float, float, int]], delta: float, method: str = "pld"
) -> float:
    """Epsilon of a Poisson-subsampled Gaussian composition, with ``dp_accounting``.

    Args:
        events: ``[(sigma, q, steps), ...]``.
        delta: Target delta.
        method: ``pld`` (privacy loss distributions, pessimistic; tight) or ``rdp``.

    """
    from dp_accounting import dp_event, pld, rdp

    grouped: dict[tuple[float, float], int] = defaultdict(int)
    for sigma, q, steps in events:
        if steps > 0:
            grouped[(float(sigma), float(q))] += int(steps)
    if not grouped:
        return 0.0
    # Composition is commutative, so events with the same (sigma, q) fold into one
    # self-composition; that keeps PLD convolutions few.
    event = dp_event.ComposedDpEvent(
        [
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
            )
            for (sigma, q), steps in sorted(grouped.items())
        ]
    )
    if method == "pld":
        acc = pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)
    elif method == "rdp":
        acc = rdp.RdpAccountant()
    else:
        raise ValueError(f"unknown method {method!r}")
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _require(obj: dict, key: str, where: str) -> Any:
    if key not in obj:
        raise AuditError(f"{where}: missing key {key!r}")
    return obj[key]


#: Largest total coefficient-modulus bits for 128-bit security, by CKKS ring degree
#: (HomomorphicEncryption.org security standard, 2018, ternary secrets, classical attacks).
_HE_MAX_COEFF_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


def _check_secure_aggregation(result: AuditResult, privacy: dict, config: Any, where: str) -> None:
    """Consistency of the secure-aggregation claims with the configuration and each other."""
    mode = privacy.get("secure_aggregation")
    params = privacy.get("secure_aggregation_params") or {}
    run = config.get("run", {}) if isinstance(config, dict) else {}
    result.add(
        "secure aggregation matches the configuration",
        mode == run.get("secure_agg"),
        f"report {mode!r}, config {run.get('secure_agg')!r}",
    )
    try:
        if mode == "mask":
            t, m = int(params["threshold"]), int(params["neighbourhood_size"])
            result.add(
                "masking: threshold is a strict majority of a neighbourhood",
                2 * t > m and t <= m,
                f"t={t}, neighbourhood {m}",
            )
            ring, frac = int(params["ring_bits"]), int(params["frac_bits"])
            clip, summands = float(params["clip_range"]), int(params["max_summands"])
            # The sum of every site's encoding must fit the signed ring: no wrap-around.
            fits = summands * math.ceil(clip * 2**frac) <= 2 ** (ring - 1) - 1
            result.add(
                "masking: fixed-point sum cannot wrap",
                ring in (32, 64) and fits and math.isclose(float(params["quantum"]), 2.0**-frac),
                f"{summands} x ceil({clip:g} x 2^{frac}) vs 2^{ring - 1}",
            )
        elif mode == "he":
            degree = int(params["poly_modulus_degree"])
            bits = [int(b) for b in params["coeff_mod_bit_sizes"]]
            scale = int(params["global_scale_bits"])
            limit = _HE_MAX_COEFF_BITS.get(degree, 0)
            result.add(
                "CKKS: 128-bit parameters and a public-only server context",
                sum(bits) <= limit
                and (len(bits) < 3 or scale <= min(bits[1:-1]))
                and "no secret key" in str(params.get("server_keys", ""))
                and params.get("server_holds_secret_key") is False,
                f"N={degree}, moduli {bits} ({sum(bits)} <= {limit} bits), scale 2^{scale}",
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditError(f"{where}: malformed secure_aggregation_params ({exc!r})") from exc


def audit_run(run_dir: str | Path) -> AuditResult:
    """Audit the run in ``run_dir``.

    Raises:
        AuditError: The directory or one of its files is missing or malformed (exit 2).

    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditError(f"{run_dir}: not a run directory")
    privacy = read_json(run_dir / "privacy.json")
    config = read_json(run_dir / "config.json")
    metrics = read_json(run_dir / "metrics.json")
    if not isinstance(privacy, dict):
        raise AuditError(f"{run_dir / 'privacy.json'}: must be a JSON object")
    where = str(run_dir / "privacy.json")
    result = AuditResult()

    version = str(_require(privacy, "schema_version", where))
    result.add(
        "schema version",
        version.split(".")[0] == SCHEMA_VERSION.split(".")[0],
        f"{version} (this auditor reads {SCHEMA_VERSION.split('.')[0]}.x)",
    )
    claimed_hash = _require(privacy, "sha256", where)
    actual_hash = report_hash(privacy=privacy, config=config, metrics=metrics)
    result.add(
        "sha256 of report, config and metrics",
        claimed_hash == actual_hash,
        "matches" if claimed_hash == actual_hash else f"claimed {claimed_hash}, got {actual_hash}",
    )

    _check_secure_aggregation(result, privacy, config, where)

    clients = _require(privacy, "clients", where)
    if not isinstance(clients, list) or not clients:
        raise AuditError(f"{where}: 'clients' must be a non-empty list")
    dp_on = privacy.get("target_epsilon") is not None
    if not dp_on:
        result.add("differential privacy", True, "off: this run makes no DP claim")
        return result

    target = float(_require(privacy, "target_epsilon", where))
    delta = float(_require(privacy, "delta", where))
    events = privacy.get("events", [])
    try:
        per_client_events: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
        for e in events:
            per_client_events[int(e["client_id"])].append(
                (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
            )
        max_claim = 0.0
        for c in clients:
            cid = int(c["client_id"])
            n = int(c["num_samples"])
            claim = float(c["epsilon"])
            sigma, q, steps = float(c["noise_multiplier"]), float(c["sample_rate"]), int(c["steps"])
            per_round = [float(x) for x in c.get("epsilon_per_round", [])]
            max_claim = max(max_claim, claim)
            ev = per_client_events.get(cid, [])
            eps_pld = independent_epsilon(events=ev, delta=delta, method="pld")
            eps_rdp = independent_epsilon(events=ev, delta=delta, method="rdp")
            tol = TOLERANCE["absolute"] + TOLERANCE["relative"] * eps_pld
            result.rows.append(
                {
                    "client_id": cid,
                    "num_samples": n,
                    "sample_rate": q,
                    "noise_multiplier": sigma,
                    "steps": steps,
                    "claimed": claim,
                    "pld": eps_pld,
                    "rdp": eps_rdp,
                }
            )
            name = f"site {cid}"
            ledger_steps = sum(s for _, _, s in ev)
            result.add(
                f"{name}: ledger steps = reported steps",
                ledger_steps == steps,
                f"{ledger_steps} vs {steps}",
            )
            result.add(
                f"{name}: ledger matches reported sigma and q",
                all(math.isclose(s, sigma) and math.isclose(qq, q) for s, qq, _ in ev),
                f"sigma={sigma:.6g}, q={q:.6g}",
            )
            result.add(
                f"{name}: claimed epsilon >= independent PLD epsilon - tolerance",
                claim >= eps_pld - tol,
                f"claimed {claim:.4f}, PLD {eps_pld:.4f}, tolerance {tol:.4f}",
            )
            result.add(
                f"{name}: epsilon <= target",
                claim <= target + 1e-9 and eps_pld <= target + tol,
                f"claimed {claim:.4f}, PLD {eps_pld:.4f}, target {target}",
            )
            result.add(
                f"{name}: delta < 1/num_samples",
                delta < 1.0 / n,
                f"delta {delta:.3g}, 1/n {1.0 / n:.3g}",
            )
            result.add(
                f"{name}: epsilon non-decreasing over rounds",
                all(b >= a - 1e-12 for a, b in zip(per_round, per_round[1:]))
                and (not per_round or math.isclose(per_round[-1], claim)),
                f"{len(per_round)} rounds",
            )
        result.add(
            "report epsilon = max over sites",
            math.isclose(float(_require(privacy, "epsilon", where)), max_claim),
            f"{privacy.get('epsilon')} vs {max_claim}",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditError(f"{where}: malformed entry ({exc!r})") from exc
    return result
