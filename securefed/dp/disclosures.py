"""Everything a site releases, field by field, with what protects it.

One list serves three purposes: privacy.json's ``disclosures`` (what a reviewer reads), the
deployed site's outgoing messages (a field that is not listed here is refused before it is
sent, see :func:`check_reply`), and the tests that walk every message type of both runtimes.

Protections:
- ``dp-accounted``: a function of the site's DP-SGD output or of its privacy claim, covered by
  the site's (epsilon, delta) under replace-one adjacency (post-processing).
- ``secure-sum``: enters only a secure sum; the server learns the sum over at least ``t``
  sites (masking) or at least 2 (CKKS), never the site's own value.
- ``clear``: the server learns it as is. The detail says whether it depends on private data.
- ``outside-epsilon``: the server learns it as is, and it is a function of the site's
  *training records* without DP noise, so the site's epsilon does not cover it (a local twin's
  held-out metric under ``--twin-privacy local``, docs/twins.md). Schema 3.6.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from securefed.config import RunConfig
from securefed.dp.calibration import calibrates
from securefed.errors import ProtocolError
from securefed.protocol.modes import get_mode

__all__ = [
    "PROTECTIONS",
    "Release",
    "site_releases",
    "message_fields",
    "check_reply",
    "disclosures_json",
]

PROTECTIONS = ("dp-accounted", "secure-sum", "clear", "outside-epsilon")

_CLAIM = (
    "the site's privacy claim (sigma, q, C, delta, steps, epsilon): q = 1/ceil(n/B), the step "
    "counts and delta's order of magnitude reveal the site's size n (its records, or its "
    "patients under --privacy-unit patient) to within B, which is why epsilon is stated for "
    "replace-one adjacency over that unit (n is the same in both neighbouring data sets)"
)


@dataclass(frozen=True)
class Release:
    """One field of one message a site sends.

    Attributes:
        message: The message (Flower message type; the in-process runtime releases the same).
        field: The field's name in the message.
        protection: One of :data:`PROTECTIONS`.
        detail: What the value is and what it reveals.

    """

    message: str
    field: str
    protection: str
    detail: str

    def __post_init__(self) -> None:
        if self.protection not in PROTECTIONS:
            raise ValueError(f"unknown protection {self.protection!r}")


def site_releases(config: RunConfig, *, runtime: str = "in-process") -> list[Release]:
    """What a site releases in a run of ``config``.

    Both runtimes send the same messages (one round engine drives both), so the list does
    not depend on ``runtime``; the argument stays for callers that name it. Without secure
    aggregation the update (with the site's sample count) is sent as is; with masking or
    CKKS it enters only the sum.
    """
    del runtime  # the same messages in-process and over Flower
    dp = config.dp_enabled
    out: list[Release] = []

    def add(message: str, field: str, protection: str, detail: str) -> None:
        out.append(Release(message, field, protection, detail))

    # -- set-up ------------------------------------------------------------------------
    add("setup", "site_id", "clear", "the site's id in the federation (not data)")
    add("setup", "dataset", "clear", "the data set's name (not data)")
    add(
        "setup",
        "fingerprint",
        "clear",
        "deployed: HMAC of the site's data-set fingerprint under a key derived from the "
        "site's signing key (DP runs), so the server can refuse a resumed run on changed data "
        "but cannot test a guess of the data; without DP (no key), and in-process (where the "
        "operator holds every shard), the plain SHA-256",
    )
    add("setup", "task", "clear", "classification or segmentation (not data)")
    add("setup", "spec", "clear", "the model's input/output shape (not data)")
    add(
        "setup",
        "num_heldout",
        "clear",
        "size of the site's held-out split (evaluation data, not the DP-protected records); "
        "with unlabelled NIfTI subjects it is carved from labelled patients only, so next to "
        "the training size it hints at the site's labelled share",
    )
    add(
        "setup",
        "identity",
        "clear",
        "deployed runs with a roster: Ed25519 signature by the site's identity key over "
        "(federation, run id, node id, site id), binding its site id (not data)",
    )
    if dp:
        add("setup", "signing_key", "clear", "the site's Ed25519 public key (not data)")
        add("setup", "plan", "dp-accounted", _CLAIM)
        add("setup", "signature", "clear", "Ed25519 signature over the site's privacy claim")
    if config.secure_agg == "he":
        add("setup", "he_public", "clear", "the CKKS public context (no secret key)")
    if config.disclose_site_sizes:
        unit = " (in patients)" if config.privacy_unit == "patient" else ""
        add(
            "setup",
            "num_samples",
            "clear",
            f"the site's training-set size{unit}, disclosed because the site opted in",
        )
        add(
            "setup",
            "class_counts",
            "clear",
            f"the site's training-set class counts{unit} (of its labelled records: with the "
            "training-set size they give the number of unlabelled records), disclosed because "
            "the site opted in",
        )
    if config.strategy == "cfl":
        for message in ("select", "heldout"):
            add(
                message,
                "cluster",
                "clear",
                "the cluster whose model has the lowest un-noised loss on the site's training "
                "data (cfl runs only without DP)",
            )

    # -- each round --------------------------------------------------------------------
    if dp:
        add("fit", "plan", "dp-accounted", _CLAIM)
        add("fit", "events", "dp-accounted", "this round's DP-SGD events: " + _CLAIM)
        add("fit", "epsilon", "dp-accounted", "the site's spent epsilon, computed from events")
        add("fit", "signature", "clear", "Ed25519 signature over the site's privacy claim")
    if config.fair_q:
        add(
            "fit",
            "(q-FFL loss)",
            "dp-accounted" if dp else "clear",
            "q-FFL (--fair-q): the site's update and last coordinate are scaled by functions of "
            "its training loss under the round's global model, per-record clipped to [0, 4] "
            + (
                "and noised at the site (one event of phase fair-loss a round in its ledger; "
                "docs/fairness.md); "
                if dp
                else "(exact: no DP in this run); "
            )
            + "it travels only inside the update below (under masking or CKKS only in the sum)",
        )
    if config.logit_adjust:
        add(
            "fit",
            "(class prior)",
            "dp-accounted" if dp else "clear",
            "logit adjustment (--logit-adjust): the site trains the model's logits plus its log "
            "class prior, from its class counts "
            + (
                "noised once at the site (one event of phase class-prior in its ledger; "
                "securefed.dp.class_prior); "
                if dp
                else "(exact: no DP in this run); "
            )
            + "the prior is never sent and shapes only the update below",
        )
    add(
        "fit",
        "refused",
        "clear",
        "why a site that trained sends no update (its own check on it failed, e.g. the CKKS "
        "overflow bound): the reason only; its DP accounting still goes with it",
    )
    if config.schedule == "cyclic":
        add(
            "fit",
            "weights",
            "dp-accounted" if dp else "clear",
            "the model the site trained, handed on to the next site (cyclic schedule; "
            "refused with secure aggregation)",
        )
    else:
        # What the secure-sum mode's messages carry is the mode's to declare.
        for release in get_mode(config.secure_agg).releases(config):
            add(*release)
    held = "the global model's metrics on the site's held-out split (not DP: evaluation data)"
    add("heldout", "metrics", "clear", held)
    if config.local_twins:
        add(
            "heldout",
            "twin",
            "outside-epsilon",
            "the digital twin's primary metric on the site's held-out split, to two decimals, "
            "NOT covered by epsilon: under --twin-privacy local the twin is fine-tuned on the "
            "site's records without DP noise, so the metric depends on them without noise; "
            "sent once, after the last round, after which the site refuses every step; the "
            "twin itself stays at the site (docs/twins.md)",
        )
    elif config.personalize:
        add(
            "heldout",
            "twin",
            "clear",
            "the digital twin's metrics on the site's held-out split (the twin stays at the site)",
        )
        if dp:
            add("heldout", "events", "dp-accounted", "the twin fine-tuning's DP-SGD events")
            add("heldout", "epsilon", "dp-accounted", "the site's spent epsilon after it")
            add("heldout", "plan", "dp-accounted", _CLAIM)
            add("heldout", "signature", "clear", "Ed25519 signature over the site's claim")
    if calibrates(config.to_dict()):
        add(
            "calibrate",
            "statistics",
            "dp-accounted",
            "after the last round: per-class counts and sums of the final model's clipped, "
            "centred logits over the site's training records, with Gaussian noise (one event "
            "of phase calibrate in the site's ledger; docs/calibration.md)",
        )
        add("calibrate", "events", "dp-accounted", "the calibration's DP event")
        add("calibrate", "epsilon", "dp-accounted", "the site's spent epsilon after it")
        add("calibrate", "plan", "dp-accounted", _CLAIM)
        add("calibrate", "signature", "clear", "Ed25519 signature over the site's claim")
    if dp:
        add(
            "close",
            "close_signature",
            "clear",
            "after the run's last step: Ed25519 signature over the site's closing claim (its "
            "claim over every event of the run, the run's last round, the model files' SHA-256 "
            "and the pinned roster's digest); the site takes no step of the run after it",
        )
        add(
            "close",
            "roster_sha256",
            "clear",
            "the SHA-256 of the federation roster the site pinned (public), if it has one",
        )
    add(
        "*",
        "(timing)",
        "clear",
        "when each reply arrives: a timing side channel on the site's size and hardware",
    )
    if config.client_fraction < 1 or config.dropout_clients:
        add("*", "(participation)", "clear", "whether the site answered each step of a round")
    return out


def message_fields(config: RunConfig, *, runtime: str = "flower") -> dict[str, set[str]]:
    """Allowed fields of each message type (``message -> {field, ...}``)."""
    out: dict[str, set[str]] = {}
    for r in site_releases(config, runtime=runtime):
        out.setdefault(r.message, set()).add(r.field)
    return out


def check_reply(config: RunConfig, message: str, reply: dict[str, Any]) -> dict[str, Any]:
    """Refuse to send a field the disclosure list does not name; returns ``reply``.

    Raises:
        ProtocolError: If ``reply`` holds a field not declared for ``message``, or a local
            twin's figure is more than its one two-decimal metric.

    """
    allowed = message_fields(config, runtime="flower").get(message, set())
    extra = sorted(set(reply) - allowed)
    if extra:
        raise ProtocolError(
            f"site reply {message!r} holds undeclared fields {extra}: nothing leaves a site "
            "that privacy.json's disclosures do not list"
        )
    if message == "heldout" and config.local_twins and "twin" in reply:
        # The one release outside epsilon is as small as declared: one metric, two decimals.
        twin = reply["twin"]
        value = next(iter(twin.values()), None) if isinstance(twin, dict) else None
        if (
            not isinstance(twin, dict)
            or len(twin) != 1
            or not (value is None or (isinstance(value, float) and round(value, 2) == value))
        ):
            raise ProtocolError(
                "site reply 'heldout': a local twin's figure is one metric to two decimals "
                "(--twin-privacy local), nothing more"
            )
    return reply


def disclosures_json(config: RunConfig, *, runtime: str) -> list[dict[str, str]]:
    """privacy.json ``disclosures``: every released field with its protection."""
    return [asdict(r) for r in site_releases(config, runtime=runtime)]
