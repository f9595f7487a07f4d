"""In-process harnesses: one secure sum over a :class:`~securefed.protocol.link.LocalLink`.

:func:`secure_sum` (masking) and :func:`he_sum` (CKKS) run the *same* mode drivers as a
federated round (:mod:`securefed.protocol.modes`), with protocol-only site endpoints that hold
a ready vector instead of training. Every message is encoded as over Flower. The results keep
their types (:class:`~securefed.crypto.secagg.SecAggResult`,
:class:`~securefed.crypto.ckks.HEResult`); the per-site costs are read off the harness's own
site objects and the link's byte counters.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Collection, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.crypto.secagg import SecAggConfig, SecAggResult
from securefed.errors import ConfigError, DataError, DropoutRecoveryError, SecureFedError
from securefed.protocol.link import LocalLink
from securefed.protocol.modes.base import SiteProtection, SiteState, SumCollector, SumOutcome
from securefed.protocol.wire import Stage

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from securefed.crypto.roster import Roster

__all__ = ["ProtocolSite", "he_sum", "run_sum", "secure_sum"]

#: In-process sites answer at once; the timeout only matters over a network.
_TIMEOUT = 60.0


class ProtocolSite:
    """A site endpoint that protects a given vector: the protocol without the training.

    Args:
        protection: The mode's site side.
        vector: What this site contributes (``[n_i u_i..., n_i]`` in a federated round).

    Attributes:
        state: The site's protocol state between stages (bytes/str/int/float values).

    """

    def __init__(self, protection: SiteProtection, vector: np.ndarray) -> None:
        self.protection = protection
        self.vector = vector
        self.state: SiteState = {}

    def handle(self, stage: str, fields: dict[str, Any]) -> dict[str, Any]:
        """``fit`` protects the vector; every later stage goes to the mode's site side."""
        if stage == Stage.FIT:
            return self.protection.protect(
                self.vector,
                round_index=int(fields["round"]),
                n_sites=int(fields["n_sites"]),
                state=self.state,
            )
        return self.protection.step(stage, fields, state=self.state)


def run_sum(
    collector: SumCollector,
    sites: Mapping[int, ProtocolSite],
    *,
    round_index: int,
    n_sites: int,
    dim: int,
    lost: Mapping[str, Collection[int]] | None = None,
    drop_before_upload: Collection[int] = (),
    drop_after_upload: Collection[int] = (),
) -> tuple[SumOutcome, LocalLink]:
    """One secure sum: ``fit`` to every site, then the collector's own stages.

    Args:
        collector: The mode's server side.
        sites: Site id -> endpoint; all of them are sampled.
        round_index: The round.
        n_sites: What the ``fit`` message tells each site the round's size is.
        dim: Length of the vector the sum has.
        lost: Stage -> sites that vanish before answering it (simulated dropouts).
        drop_before_upload: Passed to :meth:`SumCollector.collect`.
        drop_after_upload: Passed to :meth:`SumCollector.collect`.

    Returns:
        The outcome (fit failures are in its ``site_errors``) and the link (byte counts).

    """
    link = LocalLink(sites)
    group = str(round_index)
    for stage, who in (lost or {}).items():
        link.lose(group=group, stage=stage, sites=set(who))
    fits, errors = link.exchange(
        {sid: (Stage.FIT, {"round": round_index, "n_sites": n_sites}) for sid in sites},
        timeout=_TIMEOUT,
        group=group,
    )
    outcome = collector.collect(
        link,
        fits,
        round_index=round_index,
        chosen=sorted(sites),
        dim=dim,
        timeout=_TIMEOUT,
        drop_before_upload=drop_before_upload,
        drop_after_upload=drop_after_upload,
    )
    for sid, why in errors.items():
        outcome.site_errors.setdefault(sid, f"{Stage.FIT}: {why}")
    return outcome, link


def _raise_failure(collector: Any, outcome: SumOutcome) -> None:
    """A harness raises what stopped the sum (the round engine reads ``outcome.error``)."""
    if outcome.total is None:
        error = getattr(collector, "last_error", None)
        if isinstance(error, SecureFedError):
            raise error
        raise DropoutRecoveryError(outcome.error or "the secure sum failed")


# -- masking ---------------------------------------------------------------------------------


def _masking_inputs(
    inputs: Mapping[int, np.ndarray], config: SecAggConfig
) -> tuple[dict[int, np.ndarray], int]:
    if not isinstance(inputs, Mapping):
        raise DataError("`inputs` must be a mapping from site id to vector.")
    if not 1 <= len(inputs) <= config.n_clients:
        raise DataError(
            f"`inputs` has {len(inputs)} sites; between 1 and `n_clients`={config.n_clients} "
            "are allowed."
        )
    vectors: dict[int, np.ndarray] = {}
    dim = None
    for site, values in inputs.items():
        if isinstance(site, bool) or not isinstance(site, (int, np.integer)) or site < 0:
            raise ConfigError(f"site id must be a non-negative integer (got {site!r}).")
        x = np.asarray(values)
        if x.ndim != 1 or x.dtype.kind not in "fiu":
            raise DataError(
                f"input of site {site} must be a 1-D real vector (got shape {x.shape}, "
                f"dtype {x.dtype})."
            )
        if dim is None:
            dim = x.shape[0]
        if x.shape[0] != dim:
            raise DataError(f"input of site {site} has length {x.shape[0]}, others have {dim}.")
        # A site refuses to encode it; over a link that would read as a dropout, so a harness
        # with every input at hand says what is wrong instead.
        if not np.all(np.isfinite(x)):
            raise DataError(f"input of site {site} holds a non-finite value (NaN or inf).")
        vectors[int(site)] = x
    if not dim:
        raise DataError("`inputs` vectors must have at least one coordinate.")
    return vectors, dim


def _masking_roster(
    vectors: Mapping[int, np.ndarray],
    config: SecAggConfig,
    roster: Roster | None,
    identities: Mapping[int, Ed25519PrivateKey] | None,
) -> tuple[Roster, Mapping[int, Ed25519PrivateKey]]:
    """The given roster and keys, or a fresh in-process roster pinning ``config.threshold``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from securefed.crypto.roster import Roster, federation_public_key

    if roster is not None:
        if identities is None or set(vectors) - set(identities):
            raise ConfigError("`identities` must hold the identity key of every site with input.")
        return roster, identities
    if len(vectors) < config.threshold:
        raise DropoutRecoveryError(
            f"only {len(vectors)} of {len(vectors)} sites advertised keys; "
            f"threshold={config.threshold} are needed, so the round is abandoned."
        )
    keys = {s: Ed25519PrivateKey.generate() for s in vectors}
    roster = Roster(
        federation="in-process",
        sites={s: federation_public_key(k) for s, k in keys.items()},
        min_contributors=min(2, len(keys)),
        threshold=config.threshold if len(keys) >= 2 else None,
    )
    return roster, keys


def secure_sum(
    inputs: Mapping[int, np.ndarray],
    *,
    config: SecAggConfig,
    round_index: int,
    drop_before_upload: Collection[int] = (),
    drop_after_upload: Collection[int] = (),
    drop_before_shares: Collection[int] = (),
    graph_seed: bytes | None = None,
    roster: Roster | None = None,
    identities: Mapping[int, Ed25519PrivateKey] | None = None,
    session: bytes | None = None,
) -> SecAggResult:
    """Run one masking round in process through the masking mode, parties exchanging bytes.

    The round runs the active-security variant: every site signs with an identity key listed
    in ``roster``. Without ``roster`` a fresh in-process one is made, one key per site from
    the OS CSPRNG, pinning ``config.threshold`` (so a round with fewer than t inputs fails).

    Args:
        inputs: site id -> float vector; all of equal length, at most ``config.n_clients``
            sites (fewer than ``config.threshold`` raises DropoutRecoveryError).
            The FL layer passes ``[n_i * update_i..., n_i]`` so the server learns only sums.
        config: Protocol parameters.
        round_index: Training round (binds keys and messages).
        drop_before_upload: Sites that share keys, then vanish before uploading: excluded from
            the sum; their pairwise masks are removed via their reconstructed mask keys.
        drop_after_upload: Sites that upload, then vanish before unmasking: included in the
            sum; their self masks are reconstructed from the other sites' shares.
        drop_before_shares: Sites that advertise keys, then vanish before sharing them:
            excluded; nobody masks with them.
        graph_seed: Public SecAgg+ graph seed; None draws a fresh one (``secrets``).
        roster: The federation's roster (with ``identities``); None makes one.
        identities: Site id -> Ed25519 identity key (the roster's); needed with ``roster``.
        session: 32-byte session id; None draws a fresh one (``secrets``).

    Returns:
        The sum over survivors with participation, traffic (payload bytes as the link counts
        them) and timing.

    Raises:
        DropoutRecoveryError: If fewer than t sites remain at any step, or some site's
            secrets lack t answering holders, or (SecAgg+) the survivors are disconnected.
            The caller must then leave the global model unchanged.
        DataError: On malformed inputs.
        ConfigError: On inconsistent drop lists.

    """
    from securefed.protocol.modes.masking import MaskingCollector, MaskingSite

    vectors, dim = _masking_inputs(inputs, config)
    drops = {
        "drop_before_shares": set(drop_before_shares),
        "drop_before_upload": set(drop_before_upload),
        "drop_after_upload": set(drop_after_upload),
    }
    for name, sites in drops.items():
        unknown = sites - set(vectors)
        if unknown:
            raise ConfigError(f"`{name}` names sites {sorted(unknown)} that have no input.")
    names = list(drops)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = drops[a] & drops[b]
            if both:
                raise ConfigError(f"sites {sorted(both)} are in both `{a}` and `{b}`.")

    # Every party uses the given parameters, whatever the round's size.
    def config_for(_n: int) -> SecAggConfig:
        return config

    roster, identities = _masking_roster(vectors, config, roster, identities)
    session = secrets.token_bytes(32) if session is None else session
    protections = {
        s: MaskingSite(
            site_id=s,
            config_for=config_for,
            roster=roster,
            identity=identities[s],
            session=session,
        )
        for s in vectors
    }
    sites = {s: ProtocolSite(protections[s], vectors[s]) for s in sorted(vectors)}
    collector = MaskingCollector(
        config_for=config_for,
        describe_config=config,
        graph_seed=graph_seed,
        roster=roster,
        session=session,
    )
    outcome, link = run_sum(
        collector,
        sites,
        round_index=round_index,
        n_sites=config.n_clients,
        dim=dim,
        lost={Stage.SHARE: drops["drop_before_shares"]},
        drop_before_upload=drops["drop_before_upload"],
        drop_after_upload=drops["drop_after_upload"],
    )
    _raise_failure(collector, outcome)
    server = collector.last_server
    assert server is not None and outcome.total is not None
    order = sorted(vectors)
    survivors = server.survivors
    return SecAggResult(
        total=outcome.total,
        survivors=survivors,
        dropped=server.dropped,
        dropped_after_upload=tuple(sorted(set(survivors) - set(server.answered))),
        clipped=outcome.clipped,
        bytes_sent=MappingProxyType({s: link.received.get(s, 0) for s in order}),
        bytes_received=MappingProxyType({s: link.sent.get(s, 0) for s in order}),
        client_seconds=MappingProxyType({s: protections[s].wall_seconds for s in order}),
        client_cpu_seconds=MappingProxyType({s: protections[s].cpu_seconds for s in order}),
        client_step_seconds=MappingProxyType(
            {s: MappingProxyType(dict(protections[s].step_seconds)) for s in order}
        ),
        server_seconds=server.timer.wall,
        server_cpu_seconds=server.timer.cpu,
        codec=config.codec,
        config=config,
    )


# -- CKKS ------------------------------------------------------------------------------------


def he_sum(
    inputs: Mapping[int, np.ndarray],
    *,
    params: Any = None,
    drop_before_upload: Collection[int] = (),
    weights: Mapping[int, float] | None = None,
    subset: np.ndarray | Sequence[int] | Sequence[bool] | None = None,
    min_survivors: int = 1,
    keys: Any = None,
    round_index: int = 0,
) -> Any:
    """Run CKKS aggregation in process through the CKKS mode.

    Sites encrypt and sign (each with a fresh identity key, listed in an in-process roster),
    the server checks and forwards the signed ciphertexts, and the round's decrypting site
    (:func:`~securefed.protocol.modes.ckks.decrypting_site`) checks them, adds them and
    decrypts the sum.

    Each role sees only what it would over a network: the sites hold the key set, the server
    the public context and the signed update bytes, the decrypting site those bytes.

    Args:
        inputs: Site id -> flat vector (all the same length), e.g. ``[n_i * u_i, n_i]``.
        params: :class:`~securefed.crypto.ckks.CKKSParams`; defaults if None (or taken from
            ``keys``).
        drop_before_upload: Sites whose update never arrives; they contribute nothing.
        weights: Plaintext scalar weight per surviving site: validated, then refused (the key
            holder sums the signed ciphertexts itself; sites send ``n_i * u_i`` instead).
        subset: Boolean mask or index array of the coordinates to encrypt (e.g. the trainable
            parameters); the others are not sent and are 0 in ``total``.
        min_survivors: Fewest surviving sites for which the sum is released (the decrypting
            site refuses fewer).
        keys: An existing :class:`~securefed.crypto.ckks.CKKSKeySet`; a fresh one is
            generated (and timed) if None.
        round_index: Round number bound into every frame.

    Returns:
        A :class:`~securefed.crypto.ckks.HEResult`: the sum and its costs.

    Raises:
        ConfigError: Inconsistent arguments (unknown sites, missing weights, bad subset).
        DataError: Vectors of different lengths, non-finite values, or a sum too large for the
            parameters.
        DropoutRecoveryError: Fewer than ``min_survivors`` sites survived.

    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from securefed.crypto.ckks import (
        HEResult,
        as_vector,
        generate_keys,
        normalize_subset,
        select_coordinates,
    )
    from securefed.crypto.roster import Roster, federation_public_key
    from securefed.protocol.modes.ckks import CKKSCollector, CKKSSite

    if not inputs:
        raise ConfigError("`inputs` is empty; at least one site must take part.")
    if isinstance(min_survivors, bool) or min_survivors < 1:
        raise ConfigError(f"`min_survivors` must be at least 1 (got {min_survivors}).")
    if keys is not None and params is not None and keys.params != params:
        raise ConfigError("`params` differ from the parameters of the given `keys`.")
    unknown = set(drop_before_upload) - set(inputs)
    if unknown:
        raise ConfigError(f"`drop_before_upload` names unknown sites {sorted(unknown)}.")
    vectors = {c: as_vector(v, f"input of site {c}") for c, v in inputs.items()}
    lengths = {v.shape[0] for v in vectors.values()}
    if len(lengths) != 1:
        raise DataError(f"site inputs must all have the same length (got {sorted(lengths)}).")
    (n_total,) = lengths
    survivors = tuple(sorted(set(inputs) - set(drop_before_upload)))
    dropped = tuple(sorted(set(drop_before_upload)))
    if len(survivors) < min_survivors:
        raise DropoutRecoveryError(
            f"round {round_index}: {len(survivors)} site(s) survived, fewer than the "
            f"{min_survivors} required; the round is not applied."
        )
    if weights is not None:
        missing = [c for c in survivors if c not in weights]
        if missing:
            raise ConfigError(f"`weights` has no entry for surviving sites {missing}.")
        extra = set(weights) - set(inputs)
        if extra:
            raise ConfigError(f"`weights` names unknown sites {sorted(extra)}.")
        for c in survivors:
            w = float(weights[c])
            if not math.isfinite(w) or w == 0.0:
                raise ConfigError(
                    f"`weights[{c}]` must be finite and non-zero (got {weights[c]}); "
                    "leave the site out instead."
                )
    idx = normalize_subset(subset, n_total)

    keygen_seconds = 0.0
    if keys is None:
        t0 = time.perf_counter()
        keys = generate_keys(params=params)
        keygen_seconds = time.perf_counter() - t0
    params = keys.params

    # Checked here, where all plaintexts are at hand: a wrapped sum would decrypt to garbage.
    bound = 0.0
    for c in survivors:
        selected = select_coordinates(vectors[c], idx)
        if not np.all(np.isfinite(selected)):
            raise DataError(f"input of site {c} has non-finite values (NaN or inf).")
        scale = abs(float(weights[c])) if weights is not None else 1.0
        bound += scale * float(np.max(np.abs(selected)))
    limit = params.max_abs_sum(weighted=weights is not None)
    if not bound < limit:
        raise DataError(
            f"the sum may reach |value| {bound:.3g}, not below the CKKS bound {limit:.3g} for "
            "these parameters; use more data-prime bits or smaller inputs."
        )

    if weights is not None:
        # The key holder sums the sites' signed ciphertexts itself and decrypts unweighted
        # sums only (server-side weights would multiply errors the flooding cannot size).
        raise ConfigError(
            "server-side weights are not supported: the key holder sums the signed ciphertexts "
            "itself; sites send n_i * u_i instead"
        )
    # An in-process federation: a roster of the inputs' sites, each with a fresh identity key.
    identities = {c: Ed25519PrivateKey.generate() for c in sorted(vectors)}
    n_sites = len(identities)
    roster = Roster(
        federation="in-process",
        sites={c: federation_public_key(k) for c, k in identities.items()},
        min_contributors=min(n_sites, max(2, min_survivors)) if n_sites >= 2 else 1,
    )
    session = secrets.token_bytes(32)
    protections = {
        c: CKKSSite(
            site_id=c,
            context=keys.secret_context,
            min_contributors=max(min_survivors, roster.min_contributors),
            subset=idx,
            roster=roster,
            identity=identities[c],
            session=session,
        )
        for c in vectors
    }
    sites = {c: ProtocolSite(protections[c], vectors[c]) for c in sorted(vectors)}
    collector = CKKSCollector(
        public=keys.public_context,
        params=params,
        min_contributors=min_survivors,
        roster=roster,
        session=session,
    )
    outcome, _ = run_sum(
        collector,
        sites,
        round_index=round_index,
        n_sites=len(survivors),
        dim=n_total if idx is None else int(idx.shape[0]),
        lost={Stage.FIT: dropped},
    )
    _raise_failure(collector, outcome)
    assert outcome.total is not None
    if idx is None:
        total = outcome.total
    else:
        total = np.zeros(n_total, dtype=np.float64)
        total[idx] = outcome.total
    decrypted_by = min(outcome.survivors)
    return HEResult(
        total=total,
        survivors=tuple(outcome.survivors),
        dropped=dropped,
        bytes_per_client={c: protections[c].update_bytes for c in survivors},
        client_seconds={c: protections[c].encrypt_seconds for c in survivors},
        server_seconds=outcome.server_seconds,
        decrypt_seconds=protections[decrypted_by].decrypt_seconds,
        aggregate_bytes=collector.aggregate_bytes,
        keygen_seconds=keygen_seconds,
        params=params,
        encrypted_indices=idx,
    )
