"""``securefed audit``: check a run's privacy claims against what ran, independently.

What the audit proves, given ``privacy.json``, ``config.json`` and ``metrics.json``:

* every DP site's claim (its sigma, q, C, delta, planned steps, ledger events and epsilon,
  bound to the run configuration by ``run_sha256``) carries a valid Ed25519 signature by the
  site's key; with ``--site-keys`` those keys must equal keys the auditor trusts, otherwise
  they are self-asserted by the report and only show that the claims were not edited after
  signing;
* the report agrees with the configuration (DP on/off, target epsilon, rounds, local epochs,
  batch size, secure aggregation, accountant) and its ledger with the execution recorded in
  metrics.json (one federated event per round a site took part in, each of exactly
  local_epochs x ceil(n/B) steps; twin fine-tuning as configured);
* sigma is what calibration gives for the configured target and the planned steps, and the
  epsilon of the ledger, recomputed with Google's ``dp_accounting`` (PLD, replace-one
  adjacency), is within the target and not above the claim;
* the noise was declared secret (``reproducible`` noise fails unless explicitly allowed);
* ``disclosures`` lists every field the run's configuration makes a site release, with its
  protection (:func:`securefed.dp.disclosures.disclosures_json`), when config.json's run has
  this release's fields: with DP and pinned keys the configuration is what the signed claims
  bind, so a report that drops a disclosure or claims a stronger protection fails even with
  its hash recomputed. Another release's configuration, or one naming a plug-in the auditor
  lacks, is not compared (the line says so).

What it cannot prove: that noise was drawn or added at all (a site that skips it signs the
same claim), or that a key belongs to the site it names unless the keys are pinned.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import dropwhile
from pathlib import Path
from typing import Any

from securefed.config import DP_BATCH, DP_CLIP, SIGMA_SEARCHES, planned_epochs
from securefed.dp import calibration, class_prior, fair_loss
from securefed.dp.releases import PHASES
from securefed.dp.report import (
    COLLUSION_BOUND_FROM,
    THREAT_MODEL_3_6,
    file_sha256,
    malformed_as_audit_error,
    read_json,
    report_hash,
    report_texts,
)
from securefed.dp.signing import (
    MODEL_FILE,
    claim_from_report,
    claim_version,
    run_digest,
    verify_close,
)
from securefed.errors import AuditError, PrivacyBudgetError, SecureFedError

__all__ = [
    "AuditResult",
    "Check",
    "EXIT_FAIL",
    "EXIT_MALFORMED",
    "EXIT_NO_DP",
    "EXIT_OK",
    "READS_SCHEMA_MAJOR",
    "TOLERANCE",
    "audit_run",
    "independent_epsilon",
    "load_site_keys",
]

#: Exit codes of ``securefed audit``.
EXIT_OK, EXIT_FAIL, EXIT_MALFORMED, EXIT_NO_DP = 0, 1, 2, 3

#: The newest privacy.json major version this auditor reads. 1.x reports predate secret
#: noise, replace-one accounting and signed claims: there is nothing in them to bind.
READS_SCHEMA_MAJOR = 3
#: Every major version it reads: 3.0 changed only the `transfer` counts, which no check
#: reads, so 2.x reports stay auditable.
_READS_MAJORS = ("2", "3")
_READS = " and ".join(f"{m}.x" for m in _READS_MAJORS)

#: Claimed epsilon may sit below the independent PLD value by at most this much
#: (absolute + relative): accountants discretise differently.
TOLERANCE = {"absolute": 0.01, "relative": 0.01}

#: sigma must equal the calibrated value to this relative tolerance: the same function on
#: the same inputs, so only float formatting may differ.
SIGMA_RTOL = 1e-9

_PLD_DISCRETIZATION = 1e-4

#: The per-round curve is recomputed on the training's grid, from scratch (not training's
#: cache): per round, the finer grid costs about 10x more (27 s against 2.2 s for 200 rounds of
#: q = 0.01), while the two differed by 4e-4 at epsilon 3, far inside the tolerance; the
#: coarser grid is the more pessimistic, so the check is only stricter for it.
_CURVE_DISCRETIZATION = 1e-3

#: A longer curve is not recomputed (the line fails and says so): R rounds cost R PLD
#: compositions per distinct ledger (about 11 ms each at q = 0.01).
_MAX_CURVE_ROUNDS = 2000

#: Ledger events recomputed for the curves of one report, distinct ledgers only (a hostile
#: report of many sites, each skipping another round, would otherwise cost 10 s or more a
#: site); beyond it the remaining sites' curve lines fail, saying so.
_CURVE_EVENT_BUDGET = 10000


@dataclass(frozen=True)
class Check:
    """One audited claim."""

    name: str
    ok: bool
    detail: str


@dataclass
class AuditResult:
    """Everything the audit checked, and the per-site recomputation table.

    Attributes:
        checks: Every check, in order.
        rows: Per-site recomputation (client_id, num_samples or None, q, sigma, steps,
            claimed, pld).
        dp_claim: False when config and report agree that the run used no DP.
        keys: ``pinned`` (``--site-keys``) or ``self-asserted`` (the report's own keys).
        unit: The privacy unit each recomputed epsilon is for (``record`` or ``patient``),
            as the configuration the sites signed states it.

    """

    checks: list[Check] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    dp_claim: bool = True
    keys: str = "self-asserted"
    unit: str = "record"

    @property
    def ok(self) -> bool:
        """True when every claim holds."""
        return all(c.ok for c in self.checks)

    @property
    def exit_code(self) -> int:
        """1 when a claim fails, 3 when the run makes no DP claim, 0 otherwise."""
        if not self.ok:
            return EXIT_FAIL
        return EXIT_OK if self.dp_claim else EXIT_NO_DP

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        """Record one check."""
        self.checks.append(Check(name=name, ok=bool(ok), detail=detail))


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence accountant chatter (absl's "_compute_log_a_frac failed to converge", numpy).

    The audit's verdict is in its checks; warnings on stderr would only bury it.
    """
    import numpy as np

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        absl.setLevel(level)


def independent_epsilon(*, events: list[tuple[float, float, int]], delta: float) -> float:
    """Replace-one epsilon of a Poisson-subsampled Gaussian composition (dp_accounting PLD).

    Recomputed from the ledger on a 10x finer grid than training's claims use (1e-4 vs 1e-3):
    the same library, so this checks the claim and its arithmetic, not dp_accounting itself.
    RDP is not offered: dp_accounting's RDP accountant cannot account replace-one adjacency
    under Poisson sampling.

    Args:
        events: ``[(sigma, q, steps), ...]``.
        delta: The site's delta.

    """
    return _independent_epsilon(tuple(sorted(events)), float(delta))


@lru_cache(maxsize=32)
def _independent_epsilon(events: tuple, delta: float) -> float:
    # Cached: the sites of one plan usually share one ledger, and their audits one answer.
    from securefed.dp.accounting import pld_epsilon

    with _quiet():
        return pld_epsilon(history=list(events), delta=delta, discretization=_PLD_DISCRETIZATION)


def independent_epsilons_by_round(
    *, rounds: list[list[tuple[float, float, int]]], delta: float
) -> list[float]:
    """Replace-one epsilon after each round: ``out[r]`` covers the events of rounds ``0..r``.

    dp_accounting's PLD as in :func:`independent_epsilon`, but on the training's grid (1e-3,
    built from scratch, see ``_CURVE_DISCRETIZATION``) and incrementally: each ``(sigma, q)``
    Poisson-subsampled Gaussian PLD is built once and each round's events are composed onto
    the previous round's distribution, so a run of R rounds costs R compositions instead of R
    from-scratch accountants. Results are cached on the whole history (sites of one plan that
    took part in every round share one computation).

    Args:
        rounds: Per round, ``[(sigma, q, steps), ...]`` (possibly empty).
        delta: The site's delta.

    """
    key = tuple(tuple(sorted(r)) for r in rounds)
    return list(_epsilons_by_round(key, float(delta)))


@lru_cache(maxsize=32)
def _epsilons_by_round(rounds: tuple, delta: float) -> tuple[float, ...]:
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    base: dict[tuple[float, float], Any] = {}
    current = None
    out = []
    with _quiet():
        for events in rounds:
            for sigma, q, steps in events:
                if steps <= 0:
                    continue
                if (sigma, q) not in base:
                    base[(sigma, q)] = pld_lib.from_gaussian_mechanism(
                        sigma,
                        sensitivity=1.0,
                        value_discretization_interval=_CURVE_DISCRETIZATION,
                        sampling_prob=q,
                        neighboring_relation=NeighboringRelation.REPLACE_ONE,
                    )
                step = base[(sigma, q)].self_compose(int(steps))
                current = step if current is None else current.compose(step)
            out.append(0.0 if current is None else float(current.get_epsilon_for_delta(delta)))
    return tuple(out)


def load_site_keys(path: str | Path) -> dict[str, str]:
    """Read trusted site keys: a JSON object ``{"<client_id>": "<64 hex chars>"}``.

    Raises:
        AuditError: Unreadable file or a malformed entry.

    """
    data = read_json(Path(path))
    if not isinstance(data, dict) or not data:
        raise AuditError(f"{path}: site keys must be a non-empty JSON object")
    out: dict[str, str] = {}
    for k, v in data.items():
        try:
            cid = int(k)
            ok = isinstance(v, str) and len(bytes.fromhex(v)) == 32
        except ValueError:
            ok = False
        if not ok:
            raise AuditError(f"{path}: entry {k!r} is not '<client_id>': '<64 hex chars>'")
        out[str(cid)] = v.lower()
    return out


def load_roster_file(path: str | Path) -> Any:
    """The federation's roster from its signed file (``securefed deploy roster``), for the audit.

    Its federation signature is not checked here (the auditor may not hold the federation
    key): the report's ``roster_sha256`` must equal this roster's digest, which binds the
    report to the file the auditor trusts.

    Raises:
        AuditError: The file is unreadable or not a roster.

    """
    from securefed.crypto.roster import Roster

    body = read_json(Path(path))
    try:
        return Roster.from_dict(body["roster"] if "roster" in body else body)
    except (KeyError, TypeError, ValueError, SecureFedError) as exc:
        raise AuditError(f"{path}: not a roster file ({str(exc)[:160]})") from exc


def _require(obj: dict, key: str, where: str) -> Any:
    if key not in obj:
        raise AuditError(f"{where}: missing key {key!r}")
    return obj[key]


#: Largest total coefficient-modulus bits for 128-bit security, by CKKS ring degree
#: (HomomorphicEncryption.org security standard, 2018, ternary secrets, classical attacks).
_HE_MAX_COEFF_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


def _closing_claims(privacy: dict, run: dict, keys: Any) -> bool:
    """Whether some DP site's claim is signed under the v2 domain: its site closes its runs.

    Today's sites sign v2 only, so whoever holds their signatures cannot make a v1 one: a
    report cannot be passed off as legacy (and so spared the close) under the sites' keys.
    """
    if not isinstance(keys, dict) or not isinstance(privacy.get("clients"), list):
        return False
    for c in privacy["clients"]:
        if not isinstance(c, dict) or c.get("noise_multiplier") is None:
            continue
        key = keys.get(str(c.get("client_id")))
        try:
            claim = claim_from_report(privacy, run, int(c["client_id"]))
        except (KeyError, TypeError, ValueError):
            continue
        if claim_version(claim, c.get("signature"), key) == 2:
            return True
    return False


def _check_ids(privacy: dict, where: str) -> None:
    """Every site id in ``clients`` and ``events`` is a plain integer.

    A claim signs ``int(client_id)``, so ``0.0`` or ``"00"`` would still verify while a
    lookup by ``str(client_id)`` missed the site's key: one site, two names.

    Raises:
        AuditError: An id of another type (a float, a string, a bool).

    """
    for key in ("clients", "events"):
        items = privacy.get(key) or []
        if not isinstance(items, list):
            continue  # named by the check that reads it
        for item in items:
            if not isinstance(item, dict) or type(item.get("client_id")) is not int:
                raise AuditError(f"{where}: every {key} entry needs an integer client_id")


def _check_close(
    result: AuditResult,
    privacy: dict,
    run: dict,
    run_dir: Path,
    *,
    keys: dict[str, str],
    rounds: int,
) -> None:
    """Where the run ended: every DP site signed that it closed after the report's last round.

    A site's claim says "my events so far"; a server holding the claims a site signed after
    an earlier round could present that point as the whole run, with a smaller epsilon. Sites
    of schema 3.8 code sign, once, a closing claim over their claim, the run's last round,
    the model files' SHA-256 and their pinned roster, and take no step of the run after it.
    Checked when any DP site's claim is signed under the v2 domain (which a v1 report cannot
    fake under the sites' keys); otherwise the line says that the report's end is not signed.
    """
    clients = [c for c in privacy["clients"] if c.get("noise_multiplier") is not None]
    if not _closing_claims(privacy, run, keys):
        result.add(
            "epsilon covers the rounds metrics.json lists (not signed as the run's end)",
            True,
            f"{rounds} of {run['rounds']} planned rounds; no site's claim verifies as one of "
            "code that closes its runs (v2), so no site signed where the run ended; each site's "
            "sigma is checked against every planned round, so its epsilon over the whole plan "
            "is at most the target",
        )
        return
    name = "every DP site signed where the run ended (closing claims)"
    close = privacy.get("close")
    if not isinstance(close, dict):
        result.add(name, False, "no close block, though the sites' claims are of closing code")
        return
    problems = []
    if close.get("last_round") != rounds:
        problems.append(
            f"the sites closed after round {close.get('last_round')!r:.40}; metrics.json lists "
            f"{rounds} rounds"
        )
    models = close.get("models")
    if not isinstance(models, dict) or "model.safetensors" not in models or len(models) > 1000:
        problems.append("the close names no digest of model.safetensors")
    else:
        for fname, digest in sorted(models.items()):
            path = run_dir / str(fname)
            if not MODEL_FILE.fullmatch(str(fname)):
                problems.append(f"the close names {str(fname)[:40]!r}, not a model file")
            elif not path.is_file() or path.is_symlink():
                problems.append(f"{fname}: missing")
            elif file_sha256(path) != digest:
                problems.append(f"{fname}: not the file the sites closed on (SHA-256 differs)")
    params = privacy.get("secure_aggregation_params")
    stated = params.get("roster_sha256") if isinstance(params, dict) else None
    masking = privacy.get("secure_aggregation") == "mask"
    if (stated is not None or (masking and close.get("roster_sha256") is not None)) and close.get(
        "roster_sha256"
    ) != stated:
        # The sites sign the roster they pinned: a report cannot name another one, nor drop
        # it from the masking parameters (whose pins and tolerance follow from it).
        problems.append("the report's roster_sha256 is not the roster the sites signed")
    for c in clients:
        cid = int(c["client_id"])
        sig = c.get("close_signature")
        key = keys.get(str(cid))
        if not sig or not key:
            reasons = close.get("not_closed")
            why = reasons.get(str(cid)) if isinstance(reasons, dict) else None
            problems.append(
                f"site {cid}: no closing signature" + (f" ({str(why)[:80]})" if why else "")
            )
        elif not verify_close(claim_from_report(privacy, run, cid), close, sig, key):
            problems.append(f"site {cid}: its closing signature does not verify")
    result.add(
        name,
        not problems,
        f"{len(clients)} sites closed after round {rounds} of {run['rounds']}, on "
        f"{', '.join(sorted(models))}"
        + (
            f", roster {str(close.get('roster_sha256'))[:12]}…"
            if close.get("roster_sha256")
            else ""
        )
        if not problems
        else "; ".join(problems[:4])
        + (f" and {len(problems) - 4} more" if len(problems) > 4 else ""),
    )


#: Fields a newer release added that change nothing a site releases (a run without them,
#: read by :meth:`RunConfig.from_recorded`, lists the same disclosures).
_NO_RELEASE_FIELDS = frozenset({"sigma_search", "calibration_clip", "ring_auto_rule"})


def _check_disclosures(result: AuditResult, privacy: dict, run: dict) -> None:
    """``disclosures`` against what the recorded configuration makes a site release.

    Compared when config.json's ``run`` has exactly this release's configuration fields,
    whatever ``schema_version`` says: the run is what the DP sites' signatures bind
    (``run_sha256``), the version label is not. Every (message, field) the configuration
    implies must be listed, and every entry listed for it must carry the implied protection;
    extra fields (declaring more) are allowed, and the wording (``detail``) is not compared
    (it has been reworded within a schema). Not compared, said in the line: a run with
    another release's fields, or naming a plug-in (strategy, secure aggregation, server
    optimizer) this auditor lacks.
    """
    import dataclasses

    from securefed import plugins
    from securefed.config import RunConfig
    from securefed.dp.disclosures import disclosures_json
    from securefed.errors import SecureFedError

    name = "disclosures list every release the configuration implies"
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    # A 3.9 run lacks `sigma_search`, `calibration_clip` and `ring_auto_rule`, which change no
    # listed release (message, field, protection): it is compared still.
    if not set(run) <= fields or fields - set(run) - _NO_RELEASE_FIELDS:
        result.add(name, True, "not compared: config.json's run has another release's fields")
        return
    for key, registry in (
        ("strategy", plugins.STRATEGIES),
        ("secure_agg", plugins.SECURE_AGG),
        ("server_opt", plugins.SERVER_OPTIMIZERS),
    ):
        if isinstance(run.get(key), str) and run[key] not in registry.names():
            result.add(name, True, f"not compared: {key} {run[key]!r} is a plug-in not here")
            return
    try:
        config = RunConfig.from_recorded(dict(run))
    except (SecureFedError, TypeError, ValueError) as exc:
        result.add(name, False, f"config.json's run is not a valid configuration ({exc})")
        return
    expected = disclosures_json(config, runtime="in-process")
    if config.dp_enabled and not _closing_claims(privacy, run, privacy.get("site_keys")):
        # Sites of code before closing claims sent no close (schema 3.8).
        expected = [e for e in expected if e["message"] != "close"]
    listed = privacy.get("disclosures")
    if not isinstance(listed, list) or not all(isinstance(d, dict) for d in listed):
        result.add(name, False, "privacy.json has no list of disclosure objects")
        return
    bad = []
    for e in expected:
        same = [
            d for d in listed if (d.get("message"), d.get("field")) == (e["message"], e["field"])
        ]
        if not same or any(d.get("protection") != e["protection"] for d in same):
            bad.append(f"{e['message']} {e['field']}")
    unbound = "" if config.dp_enabled else " (no DP: no signature binds the configuration)"
    outside = [
        f"{e['message']} {e['field']}" for e in expected if e["protection"] == "outside-epsilon"
    ]
    if outside:
        unbound += f"; outside epsilon (not DP): {', '.join(outside)}"
    result.add(
        name,
        not bad,
        f"{len(expected)} releases, each listed{unbound}"
        if not bad
        else f"missing or with another protection: {', '.join(bad[:4])}"
        + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""),
    )


def _check_secure_aggregation(
    result: AuditResult, privacy: dict, config: Any, where: str, roster: Any | None = None
) -> None:
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
            from securefed.crypto.prg import RING_BITS_MAX, RING_BITS_MIN

            ring, frac = int(params["ring_bits"]), int(params["frac_bits"])
            clip, summands = float(params["clip_range"]), int(params["max_summands"])
            # The sum of every site's encoding must fit the signed ring: no wrap-around. (Only
            # ring and fraction sizes a run can have are computed with: 2**(10**10) is not.)
            fits = (
                RING_BITS_MIN <= ring <= RING_BITS_MAX
                and 0 <= frac < ring
                and math.isfinite(clip)
                and summands * math.ceil(clip * 2**frac) <= 2 ** (ring - 1) - 1
            )
            result.add(
                "masking: fixed-point sum cannot wrap",
                fits and math.isclose(float(params["quantum"]), 2.0**-frac),
                f"{summands} x ceil({clip:g} x 2^{frac}) vs 2^{ring - 1}",
            )
            _check_masking_params(
                result, params, run, str(privacy.get("schema_version")), roster, privacy
            )
        elif mode == "he":
            degree = int(params["poly_modulus_degree"])
            bits = [int(b) for b in params["coeff_mod_bit_sizes"]]
            scale = int(params["global_scale_bits"])
            limit = _HE_MAX_COEFF_BITS.get(degree, 0)
            # Only additions: the scale is bounded by the data modulus (leaving 20 bits for
            # the sum's magnitude), not by a prime; see securefed.crypto.ckks.params.
            result.add(
                "CKKS: 128-bit parameters and a public-only server context",
                sum(bits) <= limit
                and len(bits) >= 2
                and scale + 20 <= sum(bits[:-1])
                and "no secret key" in str(params.get("server_keys", ""))
                and params.get("server_holds_secret_key") is False,
                f"N={degree}, moduli {bits} ({sum(bits)} <= {limit} bits), scale 2^{scale}",
            )
            # A raw CKKS decryption gives away the key (Li-Micciancio 2021): the key holder
            # must flood it (Li-Micciancio-Schultz-Sorrell 2022) with >= 40-bit security.
            security = int(params.get("flooding_security_bits", 0))
            result.add(
                "CKKS: decryption flooded against key recovery",
                security >= 40,
                f"{security}-bit statistical security",
            )
    except (KeyError, TypeError, ValueError, OverflowError, MemoryError) as exc:
        raise AuditError(f"{where}: malformed secure_aggregation_params ({exc!r:.200})") from exc


#: The most DP-SGD steps one site's plan may have for the audit to recalibrate it.
_MAX_PLANNED_STEPS = 10**7
#: The largest federation whose roster pins the audit rebuilds (a roster key per site).
_MAX_ROSTER_SITES = 10_000


def _in_process_roster(privacy: dict, config: Any) -> Any | None:
    """The roster an in-process run builds (``fl/simulation.py``), from its report and run.

    Its sites' keys are the report's ``site_keys``, its minimum is min(2, n) and its threshold
    the run's ``--secagg-threshold``; None when the report's keys cannot make one.
    """
    from securefed.crypto.roster import Roster

    keys = privacy.get("site_keys")
    if not isinstance(keys, dict) or not 0 < len(keys) <= _MAX_ROSTER_SITES:
        return None
    try:
        return Roster(
            federation="in-process",
            sites={int(k): bytes.fromhex(str(v)) for k, v in keys.items()},
            min_contributors=min(2, len(keys)),
            threshold=config.secagg_threshold,
        )
    except (SecureFedError, ValueError, TypeError):
        return None


def _check_masking_params(
    result: AuditResult,
    params: dict,
    run: dict,
    version: str,
    roster: Any | None,
    privacy: dict,
) -> None:
    """Every masking parameter privacy.json states, rebuilt from config.json's run.

    The ring, the rounding bounds and the primitives follow from the configuration; the
    threshold and the collusion tolerance from the roster's pins. With ``roster`` (``securefed
    audit --roster``, the federation's roster file) the report's ``roster_sha256`` must be its
    digest and the pins are the file's. Without it, an in-process run's roster is rebuilt
    from its site keys and run, and its digest must match; otherwise (a deployed run) the pins
    are the report's own statement (``roster_sites``, ``pinned_threshold``,
    ``min_contributors``), and the detail says so.
    Every key of either side is compared, so a key the rebuild lacks must be absent too.
    """
    from securefed.config import RunConfig
    from securefed.crypto.roster import Roster
    from securefed.protocol.modes.masking import (
        ACTIVE_THREAT_MODEL,
        ACTIVE_THREAT_MODEL_3_6,
        MaskingMode,
    )

    name = "masking: stated parameters follow from the run and the roster's pins"
    try:
        config = RunConfig.from_recorded(run)
        n = int(config.clients)
        stated = params.get("roster_sha256")
        if roster is not None:
            if stated != roster.digest().hex():
                result.add(name, False, "roster_sha256 is not the --roster file's digest")
                return
            source = "pins from the --roster file"
        elif (inproc := _in_process_roster(privacy, config)) is not None and (
            stated == inproc.digest().hex()
        ):
            # An in-process run's roster is a function of its site keys and its run: the
            # digest proves the pins (a rewriter's other pins would need another digest).
            roster = inproc
            source = "the in-process roster, rebuilt from the site keys and the run"
        elif stated is not None:
            sites = int(params["roster_sites"])
            # A run may use fewer sites than its federation's roster lists (docs/ckks.md).
            if not n <= sites <= _MAX_ROSTER_SITES:
                result.add(name, False, f"roster of {sites} sites, {n} configured")
                return
            pinned = params.get("pinned_threshold")
            roster, _ = Roster.generate(
                sites,
                min_contributors=int(params["min_contributors"]),
                threshold=None if pinned is None else int(pinned),
            )
            source = "pins as the report states them (pass --roster to check them)"
        else:
            source = "no roster"
        expected = MaskingMode().server(config, n_sites=n, roster=roster).describe()
    except SecureFedError as exc:
        result.add(name, False, f"cannot rebuild them ({str(exc)[:160]})")
        return
    keys = sorted((set(expected) | set(params)) - {"roster_sha256", "threat_model"})
    differ = [k for k in keys if params.get(k) != expected.get(k)]
    # The active variant's sentence gained the m - 1 bound in 3.7; a 3.6 report keeps its own.
    accepted = {expected.get("threat_model")}
    if expected.get("threat_model") == ACTIVE_THREAT_MODEL:
        accepted.add(ACTIVE_THREAT_MODEL_3_6)
    if params.get("threat_model") not in accepted:
        differ.append("threat_model")
    old = tuple(int(x) for x in version.split(".")[:2]) < COLLUSION_BOUND_FROM
    why = (
        " (a report before 3.7 stated tolerated_colluders with max(0, 2t - m - 1), one too many "
        "when t = m: its claim overstated the tolerance)"
        if old and set(differ) <= {"tolerated_colluders", "tolerated_colluders_full_round"}
        else ""
    )
    result.add(
        name,
        not differ,
        f"{len(keys) + 1} parameters, tolerated colluders {expected.get('tolerated_colluders')}; "
        f"{source}"
        if not differ
        else "differ: "
        + ", ".join(f"{k} {params.get(k)!r:.30} vs {expected.get(k)!r:.30}" for k in differ[:4])
        + why,
    )


def _check_texts(result: AuditResult, privacy: dict, run: dict, version: str) -> None:
    """The report's fixed texts are the ones its run implies.

    ``guarantee``, ``sampling``, ``clipping``, ``dp_applies_to`` and ``threat_model`` are not
    in any site's signed claim: without this a report could say "patient-level" in its
    ``guarantee`` while its ``privacy_unit`` stays "record". They are compared for every report
    written by code of schema 3.6 or later, known by its label or by config.json's run having
    ``twin_privacy`` (3.6): the label is not signed, and a run dict is, so relabelling a report
    "3.5" does not skip this. ``threat_model`` may be the 3.6 wording (before the m - 1 bound).
    """
    parts = tuple(int(x) for x in version.split(".")[:2])
    if parts < (3, 6) and "twin_privacy" not in run:
        result.add(
            "fixed texts follow from the run",
            True,
            f"not compared: written before schema 3.6 (label {version}, no twin_privacy in "
            "config.json's run)",
        )
        return
    from securefed.config import RunConfig

    dp = run.get("dp_epsilon") is not None
    try:
        # From the run the sites sign, not from privacy.json's unsigned `transfer` block.
        frozen = RunConfig.from_recorded(run).effective_freeze != "none"
    except SecureFedError as exc:
        result.add("fixed texts follow from the run", False, f"cannot read the run ({exc})")
        return
    expected = report_texts(
        dp=dp,
        unit=str(run.get("privacy_unit", "record")),
        frozen=frozen,
        teacher_student=run.get("strategy") == "teacher-student",
        local_twins=dp and run.get("twin_privacy") == "local" and bool(run.get("personalize")),
    )
    differ = [
        k
        for k, v in expected.items()
        if privacy.get(k) != v and not (k == "threat_model" and privacy.get(k) == THREAT_MODEL_3_6)
    ]
    result.add(
        "fixed texts follow from the run",
        not differ,
        f"{', '.join(expected)} as written for this run"
        if not differ
        else f"differ from the run's: {', '.join(differ)}",
    )


def _close(a: float, b: float, rtol: float = 1e-12) -> bool:
    return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=0.0)


def _personalize_rounds(run: dict, executed: list[int]) -> list[int]:
    """Rounds with DP twin fine-tuning events (mirrors fl.planning.personalizes_in).

    Twins trained without DP (``twin_privacy`` "local", schema 3.6) leave no event.
    """
    if not run.get("personalize") or run.get("twin_privacy") == "local":
        return []
    if run.get("personalize_when") == "every":
        return list(executed)
    return [r for r in executed if r == run["rounds"]]


def _check_binding(result: AuditResult, privacy: dict, run: dict) -> None:
    """The report's headline fields must be the configuration's."""
    pairs = [
        ("target epsilon", privacy.get("target_epsilon"), run.get("dp_epsilon")),
        ("rounds", privacy.get("rounds"), run.get("rounds")),
        ("local epochs", privacy.get("local_epochs"), run.get("local_epochs")),
        # An unset batch is DP-SGD's default B (securefed.config.DP_BATCH); the audit reads
        # only DP runs.
        (
            "batch size",
            privacy.get("batch_size"),
            DP_BATCH if run.get("batch_size") is None else run.get("batch_size"),
        ),
        ("accountant", privacy.get("accountant"), run.get("accountant")),
        # Runs from before --privacy-unit were record-level; the unit is in the run the
        # sites signed, so a report cannot relabel a record-level epsilon as per patient.
        ("privacy unit", privacy.get("privacy_unit"), run.get("privacy_unit", "record")),
    ]
    for name, got, want in pairs:
        result.add(
            f"{name} matches the configuration", got == want, f"report {got!r}, config {want!r}"
        )
    if run.get("personalize") and "twin_privacy" in run:
        # Schema 3.6: the report may not call twins trained without DP DP twins (the
        # disclosures check compares the release's protection too), nor drop the sentence
        # that says epsilon does not cover them.
        got = (privacy.get("strategy") or {}).get("twin_privacy")
        local = run["twin_privacy"] == "local"
        said = "not the digital twins" in str(privacy.get("dp_applies_to", ""))
        result.add(
            "twin privacy matches the configuration"
            + (
                ": twins trained WITHOUT DP, their held-out metric outside epsilon" if local else ""
            ),
            got == run["twin_privacy"] and said == local,
            f"report {got!r}, config {run['twin_privacy']!r}"
            + ("" if said == local else "; dp_applies_to does not say so"),
        )


def _check_noise(result: AuditResult, privacy: dict, allow_reproducible: bool) -> None:
    noise = privacy.get("noise")
    if noise == "secret":
        ok, detail = True, f"secret ({privacy.get('noise_source', 'source not stated')})"
    elif noise == "reproducible":
        ok = allow_reproducible
        detail = "reproducible: anyone with the seed can subtract the noise" + (
            " (allowed by --allow-reproducible-noise)" if ok else ""
        )
    else:
        ok, detail = False, f"{noise!r}: the report must say 'secret'"
    result.add("DP noise is secret", ok, detail)
    adjacency = privacy.get("adjacency")
    result.add(
        "adjacency is replace-one",
        adjacency == "replace-one",
        f"{adjacency!r} (the audit recomputes epsilon for replace-one)",
    )


def _check_keys(
    result: AuditResult, privacy: dict, trusted: dict[str, str] | None, source: str | None
) -> dict[str, str]:
    keys = privacy.get("site_keys")
    if not isinstance(keys, dict):
        result.add("site keys present", False, "no 'site_keys' in the report")
        return {}
    keys = {str(k): str(v).lower() for k, v in keys.items()}
    # One key signing for several sites means one party answers for all of them.
    result.add(
        "each site has its own key",
        len(set(keys.values())) == len(keys),
        f"{len(set(keys.values()))} distinct keys for {len(keys)} sites",
    )
    if trusted is None:
        result.keys = "self-asserted"
        result.add(
            "site keys",
            True,
            "self-asserted by the report (not pinned; pass --site-keys to pin them)",
        )
    else:
        result.keys = "pinned"
        differ = sorted(k for k in set(keys) | set(trusted) if keys.get(k) != trusted.get(k))
        result.add(
            "site keys equal the pinned keys",
            keys == trusted,
            f"pinned by {source}" if keys == trusted else f"sites {differ} differ from {source}",
        )
    return keys


#: The releases a site may plan besides DP-SGD (securefed.dp.releases), as checks name them.
_RELEASES = ((calibration, "calibration"), (fair_loss, "q-FFL loss"), (class_prior, "class-prior"))


def _release_plans(
    run: dict[str, Any], result: AuditResult, name: str
) -> dict[str, tuple[tuple[tuple[float, float, int], ...], frozenset[tuple]]]:
    """Each release's accountant entries and allowed ``(sigma, q, steps, C)``, by phase.

    A noise multiplier no run can have fails a check and plans nothing, so no accountant is
    asked to compose it.
    """
    plans = {}
    for module, what in _RELEASES:
        try:
            entries = module.planned_entries(run)
        except ValueError as exc:
            entries = ()
            result.add(f"{name}: the run's {what} noise is valid", False, str(exc))
        try:
            allowed = module.planned_releases(run) if entries else frozenset()
        except ValueError as exc:  # the calibration's clip R: no release can be as planned
            allowed = frozenset()
            result.add(f"{name}: the run's {what} clipping bound is valid", False, str(exc))
        plans[module.PHASE] = (entries, allowed)
    return plans


def _as_planned(events: list[dict[str, Any]], want: frozenset[tuple]) -> bool:
    """Whether every release event's ``(sigma, q, steps, C)`` is one the run plans."""
    return all(
        (
            float(e["noise_multiplier"]),
            float(e["sample_rate"]),
            int(e["steps"]),
            float(e["max_grad_norm"]),
        )
        in want
        for e in events
    )


def _check_site(
    result: AuditResult,
    *,
    c: dict,
    privacy: dict,
    run: dict,
    keys: dict[str, str],
    executed: list[int],
    participants: dict[int, set[int]],
    calibrated: dict[tuple, float | None],
    released: set[int],
    reported: list[float | None],
    budget: dict[str, Any],
) -> float:
    """Every check of one DP site; returns its claimed epsilon.

    ``reported`` is the site's epsilon in each round of metrics.json (None where absent).
    """
    from securefed.dp import accounting

    cid = int(c["client_id"])
    name = f"site {cid}"
    start = len(result.checks)
    sigma, q, clip = (
        float(c["noise_multiplier"]),
        float(c["sample_rate"]),
        float(c["max_grad_norm"]),
    )
    delta = float(c["delta"]) if "delta" in c else float(privacy["delta"])
    claim_eps = float(c["epsilon"])
    events = [e for e in privacy.get("events") or [] if int(e["client_id"]) == cid]

    # Signature: the claim is rebuilt from the report and config.json, so an edit to either
    # (or a claim made for another run configuration) breaks it.
    sig = c.get("signature")
    key = keys.get(str(cid))
    version = claim_version(claim_from_report(privacy, run, cid), sig, key) if key else None
    ok = bool(sig) and version is not None
    result.add(
        f"{name}: signed claim verifies",
        ok,
        f"Ed25519 over run_sha256 {run_digest(run)[:12]}…, key {result.keys}"
        + ("" if version == 2 else " (a claim of code before closing claims, v1)")
        if ok
        else ("no signature" if not sig else "no key" if not key else "signature does not verify"),
    )

    inv = 1.0 / q if q > 0 else math.inf
    spe = round(inv) if math.isfinite(inv) else 0
    result.add(
        f"{name}: 1/q is a whole number of steps per epoch",
        spe >= 1 and math.isclose(inv, spe, rel_tol=1e-9),
        f"q={q:.6g}, 1/q={inv:.6g}",
    )
    spe = max(spe, 1)

    fed = [e for e in events if e.get("phase", "federated") == "federated"]
    twin = [e for e in events if e.get("phase") == "personalize"]
    cal = [e for e in events if e.get("phase") == calibration.PHASE]
    losses = [e for e in events if e.get("phase") == fair_loss.PHASE]
    priors = [e for e in events if e.get("phase") == class_prior.PHASE]
    other = [
        e
        for e in events
        if e.get("phase", "federated") not in ("federated", "personalize", *PHASES)
    ]
    want_rounds = sorted(r for r in executed if cid in participants.get(r, set()))
    got_rounds = sorted(int(e["round"]) for e in fed)
    result.add(
        f"{name}: one federated event per round it took part in (metrics.json)",
        Counter(got_rounds) == Counter(want_rounds) and not other,
        f"ledger rounds {got_rounds}, participated {want_rounds}"
        + (f", unknown phases {[e.get('phase') for e in other]}" if other else ""),
    )
    want_twin = _personalize_rounds(run, executed)
    result.add(
        f"{name}: twin fine-tuning events as configured",
        sorted(int(e["round"]) for e in twin) == want_twin,
        f"ledger rounds {sorted(int(e['round']) for e in twin)}, expected {want_twin}",
    )
    fed_steps = int(run["local_epochs"]) * spe
    twin_steps = int(run.get("personalize") or 0) * spe
    result.add(
        f"{name}: steps per event = epochs x 1/q",
        all(int(e["steps"]) == fed_steps for e in fed)
        and all(int(e["steps"]) == twin_steps for e in twin),
        f"federated {sorted({int(e['steps']) for e in fed})} vs {fed_steps}, "
        f"twin {sorted({int(e['steps']) for e in twin})} vs {twin_steps}",
    )
    result.add(
        f"{name}: events use the site's sigma, q and C",
        all(
            _close(e["noise_multiplier"], sigma)
            and _close(e["sample_rate"], q)
            and _close(e["max_grad_norm"], clip)
            for e in fed + twin
        ),
        f"sigma={sigma:.6g}, q={q:.6g}, C={clip:g}",
    )
    plans = _release_plans(run, result, name)
    entries, want_cal = plans[calibration.PHASE]
    loss_entries, want_loss = plans[fair_loss.PHASE]
    prior_entries, want_prior = plans[class_prior.PHASE]
    loss_rounds = sorted(int(e["round"]) for e in losses)
    result.add(
        f"{name}: q-FFL loss releases: one per federated round iff the run weighs by loss, "
        "as planned",
        loss_rounds == (got_rounds if loss_entries else []) and _as_planned(losses, want_loss),
        f"{len(losses)} loss release(s) in rounds {loss_rounds}, federated rounds "
        f"{got_rounds}; planned {list(want_loss) or 'none'}",
    )
    prior_rounds = sorted(int(e["round"]) for e in priors)
    # Released with the site's first training (a fit that failed after it leaves the release
    # in an earlier round than the first federated event, never a later one).
    first = got_rounds[:1]
    result.add(
        f"{name}: class-prior release: one, by its first training, iff the run adjusts logits "
        "and the site trained, as planned",
        (
            len(priors) == 1 and prior_rounds[0] <= first[0]
            if prior_entries and first
            else not priors
        )
        and _as_planned(priors, want_prior),
        f"{len(priors)} prior release(s) in rounds {prior_rounds}, first federated round "
        f"{first or 'none'}; planned {list(want_prior) or 'none'}",
    )
    want_n = 1 if entries and cid in released else 0
    entries = entries + loss_entries + prior_entries
    result.add(
        f"{name}: decision calibration: one release iff metrics.json accounts one, after the "
        "last round, as planned",
        len(cal) == want_n
        and all(int(e["round"]) == int(run["rounds"]) for e in cal)
        and _as_planned(cal, want_cal),
        f"{len(cal)} calibration event(s), {want_n} accounted in metrics.json; planned "
        f"{list(want_cal) or 'none'}",
    )
    # An unset bound is DP-SGD's default C (securefed.config.DP_CLIP).
    want_clip = DP_CLIP if run.get("max_grad_norm") is None else run["max_grad_norm"]
    result.add(
        f"{name}: clipping bound C = configured max_grad_norm",
        _close(clip, want_clip),
        f"{clip:g} vs {want_clip:g}",
    )
    result.add(
        f"{name}: event rounds within 1..{run['rounds']}",
        all(1 <= int(e["round"]) <= int(run["rounds"]) for e in events),
        f"rounds {sorted({int(e['round']) for e in events})}",
    )
    total = sum(int(e["steps"]) for e in fed + twin + other)
    twin_total = sum(int(e["steps"]) for e in twin)
    ledger_rounds = sorted({int(e["round"]) for e in fed + twin + other})
    result.add(
        f"{name}: reported steps and rounds = ledger",
        int(c["steps"]) == total
        and int(c.get("personalization_steps", twin_total)) == twin_total
        and int(c.get("calibration_releases", len(cal))) == len(cal)
        # A run that plans a release reports its count (schema 3.4): a deleted key is a
        # rewrite, not an older report.
        and ("fair_loss_releases" in c or not loss_entries)
        and ("class_prior_releases" in c or not prior_entries)
        and int(c.get("fair_loss_releases", len(losses))) == len(losses)
        and int(c.get("class_prior_releases", len(priors))) == len(priors)
        and [int(r) for r in c.get("rounds_participated", ledger_rounds)] == ledger_rounds,
        f"steps {c['steps']} vs {total}, twin {c.get('personalization_steps')} vs {twin_total}, "
        f"rounds {c.get('rounds_participated')} vs {ledger_rounds}",
    )
    planned = (
        planned_epochs(
            rounds=int(run["rounds"]),
            local_epochs=int(run["local_epochs"]),
            personalize=int(run.get("personalize") or 0),
            personalize_when=str(run.get("personalize_when")),
            twin_privacy=str(run.get("twin_privacy", "dp")),
        )
        * spe
    )
    result.add(
        f"{name}: planned steps = (rounds x epochs + DP twin runs x twin epochs) x 1/q",
        int(c["planned_steps"]) == planned,
        f"{c['planned_steps']} vs {planned}",
    )
    bound = accounting.run_delta_bound(run.get("dp_delta"))
    result.add(
        f"{name}: delta within the run's bound",
        0 < delta <= bound,
        f"delta {delta:.3g}, bound {bound:.3g} (--dp-delta, or 1e-5)",
    )
    target = float(run["dp_epsilon"])
    # The search sigma was calibrated with (schema 3.10); a run recorded before it bisected.
    search = run.get("sigma_search", 1)
    if type(search) is not int or search not in SIGMA_SEARCHES:
        search = repr(search)  # hashable; no search by that name: the check below fails
    cache_key = (target, delta, q, planned, str(privacy.get("accountant")), entries, search)
    if not (
        0 < delta <= bound
        and 0 < q <= 1
        and 1 <= planned <= _MAX_PLANNED_STEPS
        and isinstance(search, int)
    ):
        # No accountant is run on numbers no run writes (a hostile report could ask for
        # terabytes of grid); the checks above already fail.
        calibrated[cache_key] = None
    if cache_key not in calibrated:
        try:
            with _quiet():
                calibrated[cache_key] = accounting.calibrate_noise(
                    target_epsilon=target,
                    delta=delta,
                    sample_rate=q,
                    steps=planned,
                    accountant=str(privacy.get("accountant")),
                    extra=entries,
                    search=search,
                )
        except (PrivacyBudgetError, ArithmeticError, ValueError, KeyError, TypeError) as exc:
            calibrated[cache_key] = None
            result.add(f"{name}: calibration", False, f"cannot recalibrate ({exc})")
    want_sigma = calibrated[cache_key]
    result.add(
        f"{name}: sigma = calibrate_noise(target, delta, q, planned steps)",
        want_sigma is not None and math.isclose(sigma, want_sigma, rel_tol=SIGMA_RTOL),
        f"{sigma:.12g} vs {want_sigma if want_sigma is None else f'{want_sigma:.12g}'} "
        f"(search {search})",
    )

    # The ledger is replayed only when every check of the site above holds: its events are
    # then the site's plan (events, twins and releases as configured, sigma just recalibrated),
    # which the accountant could calibrate. A hostile ledger never reaches it.
    accountable = all(ch.ok for ch in result.checks[start:])
    eps_pld = (
        independent_epsilon(
            events=[
                (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                for e in events
            ],
            delta=delta,
        )
        if accountable
        else math.nan
    )
    tol = TOLERANCE["absolute"] + TOLERANCE["relative"] * eps_pld
    skipped = "not recomputed: the ledger or the plan fails a check above"
    result.add(
        f"{name}: claimed epsilon >= independent PLD epsilon - tolerance",
        accountable and claim_eps >= eps_pld - tol,
        f"claimed {claim_eps:.4f}, PLD {eps_pld:.4f}, tolerance {tol:.4f}"
        if accountable
        else skipped,
    )
    result.add(
        f"{name}: epsilon <= target",
        accountable and claim_eps <= target + 1e-9 and eps_pld <= target + tol,
        f"claimed {claim_eps:.4f}, PLD {eps_pld:.4f}, target {target}" if accountable else skipped,
    )
    n = c.get("num_samples")
    if n is None:
        # The site keeps n private; 1/n cannot be checked, only that delta is a probability.
        result.add(
            f"{name}: delta < 1/num_samples",
            0 < delta < 1,
            f"delta {delta:.3g}; n not disclosed, so 1/n cannot be checked",
        )
    else:
        result.add(
            f"{name}: delta < 1/num_samples",
            0 < delta < 1.0 / int(n),
            f"delta {delta:.3g}, 1/n {1.0 / int(n):.3g}",
        )
    # null: the site had no claim yet when the round was evaluated (unknown, written first).
    per_round = [_epsilon_or_unknown(x) for x in c.get("epsilon_per_round", [])]
    known = list(dropwhile(lambda x: x is None, per_round))
    result.add(
        f"{name}: epsilon non-decreasing over rounds",
        (not per_round or (bool(known) and math.isclose(known[-1], claim_eps)))
        and None not in known
        and all(b >= a - 1e-12 for a, b in zip(known, known[1:])),
        f"{len(per_round)} rounds",
    )
    _check_progress(
        result,
        name=name,
        events=events,
        delta=delta,
        per_round=per_round,
        reported=reported,
        rounds=len(executed),
        accountable=accountable,
        budget=budget,
    )
    result.rows.append(
        {
            "client_id": cid,
            "num_samples": None if n is None else int(n),
            "delta": delta,
            "sample_rate": q,
            "noise_multiplier": sigma,
            "steps": int(c["steps"]),
            "claimed": claim_eps,
            "pld": eps_pld if accountable else None,
        }
    )
    return claim_eps


def _epsilon_or_unknown(x: Any) -> float | None:
    """A stated epsilon: a JSON number, or null for "no claim yet"; anything else is malformed."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise ValueError(f"an epsilon must be a number or null, not {x!r}")
    return float(x)


def _stated_epsilons(record: dict) -> dict[int, float | None]:
    """One metrics.json round's epsilon per site; a repeated or non-integer site id is malformed.

    A reader (or a plotting script) that takes the first of two entries for one site would
    see another curve than one that takes the last, so a round lists each site once.
    """
    out: dict[int, float | None] = {}
    for e in record.get("clients", []):
        cid = e["client_id"]
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise ValueError(f"a metrics.json client_id must be an integer, not {cid!r}")
        if cid in out:
            raise ValueError(f"round {record.get('round')} lists site {cid} twice")
        out[cid] = _epsilon_or_unknown(e.get("epsilon"))
    return out


def _check_progress(
    result: AuditResult,
    *,
    name: str,
    events: list[dict[str, Any]],
    delta: float,
    per_round: list[float | None],
    reported: list[float | None],
    rounds: int,
    accountable: bool,
    budget: dict[str, Any],
) -> None:
    """The epsilon a report states after each round, recomputed from the ledger.

    What a reader plots against accuracy (metrics.json's per-round ``epsilon``, privacy.json's
    ``epsilon_per_round``) is no signed claim, so it is recomputed: after round r, the events of
    rounds 1..r. A stated value may exceed the recomputed one, or be null (unknown) while the
    ledger holds nothing yet, but may not understate it by more than the final claim's
    tolerance, and the two files must state the same values. ``budget`` bounds the events
    recomputed over the whole report (``left``; ``seen``: ledgers already done).
    """
    label = f"{name}: epsilon after each round >= independent PLD epsilon - tolerance"
    if not accountable:
        result.add(label, False, "not recomputed: the ledger or the plan fails a check above")
        return
    if len(per_round) != rounds or len(reported) != rounds:
        result.add(
            label,
            False,
            f"privacy.json states {len(per_round)} rounds and metrics.json "
            f"{len(reported)}, metrics.json has {rounds}",
        )
        return
    differ = [
        i
        for i, (m, p) in enumerate(zip(reported, per_round))
        if (m is None) != (p is None) or (m is not None and not math.isclose(m, p))  # type: ignore[arg-type]
    ]
    if differ:
        i = differ[0]
        result.add(
            label,
            False,
            f"round {i + 1}: metrics.json states {reported[i]}, privacy.json {per_round[i]}",
        )
        return
    beyond = sorted({int(e["round"]) for e in events} - set(range(1, rounds + 1)))
    if beyond:
        result.add(label, False, f"ledger events of rounds {beyond[:5]} beyond metrics.json's")
        return
    if rounds > _MAX_CURVE_ROUNDS:
        result.add(label, False, f"not recomputed: {rounds} rounds, more than {_MAX_CURVE_ROUNDS}")
        return
    by_round: list[list[tuple[float, float, int]]] = [[] for _ in range(rounds)]
    for e in events:
        by_round[int(e["round"]) - 1].append(
            (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
        )
    # Each event costs a PLD composition; identical ledgers (sites of one plan) cost once.
    history = tuple(tuple(sorted(r)) for r in by_round)
    ledger = (float(delta), history)
    if ledger not in budget["seen"]:
        if len(events) > budget["left"]:
            result.add(
                label,
                False,
                f"not recomputed: the report's distinct ledgers exceed the audit's budget of "
                f"{_CURVE_EVENT_BUDGET} events",
            )
            return
        budget["left"] -= len(events)
        budget["seen"].add(ledger)
    recomputed = _epsilons_by_round(history, float(delta))
    # null (unknown) only where nothing was spent yet: today's writer states 0.0 there, and a
    # null over spent rounds would hide them from a reader as surely as a smaller number.
    short = [
        (r + 1, stated, pld)
        for r, (stated, pld) in enumerate(zip(per_round, recomputed))
        if (stated is None and pld > 0)
        or (
            stated is not None
            and stated < pld - (TOLERANCE["absolute"] + TOLERANCE["relative"] * pld)
        )
    ]
    result.add(
        label,
        not short,
        f"{rounds} rounds recomputed"
        if not short
        else "understated: "
        + ", ".join(
            f"round {r} states {'null' if a is None else f'{a:.4f}'}, PLD {b:.4f}"
            for r, a, b in short[:3]
        )
        + (f" and {len(short) - 3} more" if len(short) > 3 else ""),
    )


def audit_run(
    run_dir: str | Path,
    *,
    site_keys: dict[str, str] | None = None,
    site_keys_source: str | None = None,
    allow_reproducible_noise: bool = False,
    roster: Any | None = None,
) -> AuditResult:
    """Audit the run in ``run_dir`` against its configuration and execution record.

    A value no run writes (NaN, a number past the accountant's range, a wrong type anywhere)
    is an :class:`AuditError` (exit 2) naming the folder, never a traceback.

    Args:
        run_dir: Holds privacy.json, config.json and metrics.json.
        site_keys: Trusted public keys ``{"<client_id>": hex}`` the report's keys must equal;
            None leaves them self-asserted by the report.
        site_keys_source: Where the trusted keys came from, for the output.
        allow_reproducible_noise: Accept ``noise: reproducible`` (test runs only).
        roster: The federation's :class:`~securefed.crypto.roster.Roster`
            (:func:`load_roster_file`): the masking pins are then checked against it, not
            taken from the report.

    Returns:
        The result; ``exit_code`` is 0 (all hold), 1 (a claim fails) or 3 (no DP claim).

    Raises:
        AuditError: The directory or one of its files is missing or malformed, or the report
            is of a schema this auditor does not read (exit 2).

    """
    with malformed_as_audit_error(run_dir):
        return _audit_run(
            Path(run_dir),
            site_keys=site_keys,
            site_keys_source=site_keys_source,
            allow_reproducible_noise=allow_reproducible_noise,
            roster=roster,
        )


def _audit_run(
    run_dir: Path,
    *,
    site_keys: dict[str, str] | None,
    site_keys_source: str | None,
    allow_reproducible_noise: bool,
    roster: Any | None,
) -> AuditResult:
    """:func:`audit_run`'s checks (its arguments, the folder a path)."""
    if not run_dir.is_dir():
        raise AuditError(f"{run_dir}: not a run directory")
    privacy = read_json(run_dir / "privacy.json")
    config = read_json(run_dir / "config.json")
    metrics = read_json(run_dir / "metrics.json")
    where = str(run_dir / "privacy.json")
    if not isinstance(privacy, dict):
        raise AuditError(f"{where}: must be a JSON object")
    version = str(_require(privacy, "schema_version", where))
    major = version.split(".")[0]
    if major == "1":
        raise AuditError(
            f"{where}: schema {version} predates secret noise and signed site claims; "
            f"this auditor reads {_READS}"
        )
    if major not in _READS_MAJORS:
        raise AuditError(f"{where}: schema {version}; this auditor reads {_READS}")
    claimed_hash = _require(privacy, "sha256", where)
    if not isinstance(config, dict) or not isinstance(config.get("run"), dict):
        raise AuditError(f"{run_dir / 'config.json'}: no 'run' object")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("rounds"), list):
        raise AuditError(f"{run_dir / 'metrics.json'}: no 'rounds' list")
    run = config["run"]
    result = AuditResult()
    result.add("schema version", True, f"{version} (this auditor reads {_READS})")
    actual_hash = report_hash(privacy=privacy, config=config, metrics=metrics)
    result.add(
        "sha256 of report, config and metrics",
        claimed_hash == actual_hash,
        "matches (unkeyed: proves no edit only together with the signatures)"
        if claimed_hash == actual_hash
        else f"claimed {claimed_hash}, got {actual_hash}",
    )
    _check_ids(privacy, where)
    _check_secure_aggregation(result, privacy, config, where, roster)
    _check_disclosures(result, privacy, run)
    _check_texts(result, privacy, run, version)

    clients = _require(privacy, "clients", where)
    if not isinstance(clients, list) or not clients:
        raise AuditError(f"{where}: 'clients' must be a non-empty list")
    report_dp = bool(privacy.get("dp")) or privacy.get("target_epsilon") is not None
    config_dp = run.get("dp_epsilon") is not None
    result.add(
        "DP on/off matches the configuration",
        report_dp == config_dp,
        f"report {'on' if report_dp else 'off'}, config {'on' if config_dp else 'off'}",
    )
    if not report_dp and not config_dp:
        result.dp_claim = False
        result.add("differential privacy", True, "off in config and report: no DP claim")
        return result
    if not report_dp or not config_dp:
        return result  # one side says no DP: nothing coherent left to recompute

    try:
        _check_binding(result, privacy, run)
        result.unit = str(run.get("privacy_unit", "record"))
        _check_noise(result, privacy, allow_reproducible_noise)
        keys = _check_keys(result, privacy, site_keys, site_keys_source)
        executed = [int(r["round"]) for r in metrics["rounds"]]
        participants = {
            int(r["round"]): {int(p) for p in r["participants"]} for r in metrics["rounds"]
        }
        result.add(
            "metrics.json rounds are 1..k, k <= configured rounds",
            executed == list(range(1, len(executed) + 1)) and len(executed) <= int(run["rounds"]),
            f"{len(executed)} of {run['rounds']} rounds",
        )
        _check_close(result, privacy, run, run_dir, keys=keys, rounds=len(executed))
        ids = [int(c["client_id"]) for c in clients]
        result.add(
            "every configured site has a report entry",
            len(ids) == int(run["clients"]) and sorted(ids) == list(range(len(ids))),
            f"sites {sorted(ids)[:20]}, configured {run['clients']}",
        )
        orphans = sorted({int(e["client_id"]) for e in privacy.get("events") or []} - set(ids))
        result.add(
            "every ledger event belongs to a reported site",
            not orphans,
            f"events of unreported sites {orphans}" if orphans else "yes",
        )
        last = metrics["rounds"][-1] if metrics["rounds"] else {}
        record = last.get("decision_calibration") if isinstance(last, dict) else None
        released = (
            {int(s) for s in record.get("accounted", record.get("sites", []))}
            if isinstance(record, dict)
            else set()
        )
        # Each round's stated epsilon per site, read once (not once per site: a report of many
        # sites would make that quadratic).
        stated = [_stated_epsilons(r) for r in metrics["rounds"]]
        budget: dict[str, Any] = {"left": _CURVE_EVENT_BUDGET, "seen": set()}
        calibrated: dict[tuple, float | None] = {}
        claims: list[float] = []
        deltas: list[float] = []
        for c in clients:
            if c.get("noise_multiplier") is None:
                result.add(f"site {c['client_id']}: has a DP plan", False, "no noise multiplier")
                continue
            claims.append(
                _check_site(
                    result,
                    c=c,
                    privacy=privacy,
                    run=run,
                    keys=keys,
                    executed=executed,
                    participants=participants,
                    calibrated=calibrated,
                    released=released,
                    reported=[r.get(int(c["client_id"])) for r in stated],
                    budget=budget,
                )
            )
            deltas.append(float(c.get("delta", privacy["delta"])))
        top = privacy.get("epsilon")
        result.add(
            "report epsilon = max over sites",
            top is not None and bool(claims) and math.isclose(float(top), max(claims)),
            f"{top} vs {max(claims) if claims else None}",
        )
        result.add(
            "report delta = largest site delta",
            bool(deltas) and math.isclose(float(privacy["delta"]), max(deltas)),
            f"{privacy.get('delta')} vs {max(deltas) if deltas else None}",
        )
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        ZeroDivisionError,
    ) as exc:
        raise AuditError(f"{where}: malformed entry ({exc!r})") from exc
    if "empirical" in privacy:
        _check_empirical(result, run_dir, site_keys)
    return result


def _check_empirical(result: AuditResult, run_dir: Path, site_keys: dict[str, str] | None) -> None:
    """An audit run (``--audit-canaries``): eps_emp, recomputed, must not exceed the claim."""
    from securefed.dp.empirical import check_audit_run  # torch: only audit runs need it

    try:
        e = check_audit_run(run_dir, site_keys=site_keys)
    except AuditError as exc:
        result.add("empirical audit record", False, str(exc))
        return
    result.add(
        "empirical: eps_emp <= analytical epsilon (audit run)",
        e["holds"],
        f"site {e['site']}: eps_emp {e['eps_emp']:.4f} recomputed from {e['K']} canaries "
        f"({e['confidence']:.0%}), epsilon {e['epsilon']:.4f}",
    )
