"""What the active-security variant adds: identities, the session, and the pinned parameters.

Bonawitz et al. 2017 (Fig. 4, "active" column) defend against a server that lies: every
site signs its round keys and, after the masked inputs, the survivor list U3 it was shown
(the consistency round), with a long-term identity key that the server cannot replace. Here
the identities come from the federation's signed :class:`~securefed.crypto.roster.Roster`.

Pinned parameters. A site never takes n or t from the server. It counts n itself, as the
sites whose round keys carry a valid signature from the roster (U1 as it was shown to it),
and derives the Shamir threshold for the round from that count and its own roster:

* m = (SecAgg+ degree for n) + 1, the holders of each site's shares (n for the complete graph);
* t = ``default_threshold(m)`` = floor(2m/3) + 1 when the roster pins no threshold; otherwise
  t = max(roster.threshold, floor(m/2) + 1), i.e. never below the roster's pin and always a
  strict majority of the holders;
* a round with t > m (fewer advertised sites than the pinned threshold needs), with fewer than
  ``roster.min_contributors`` advertised sites, or whose survivors are fewer than
  max(t, min_contributors), is refused.

Sampling rule: a round may sample any subset of the roster as long as the subset satisfies
the rule above; the majority threshold counts the round's own holders, so two disjoint groups
of honest holders can never each reach t, whatever the server tells them. Colluding holders
sign in both groups: the rule tolerates fewer than 2t - m of them (:func:`collusion_tolerance`;
a roster pin below floor(2m/3) + 1 trades that tolerance for dropouts). The fixed-point
head-room uses the largest of the server's and the site's own count, so a lied ``n_sites``
costs at most precision, never a wrapped sum.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefed.crypto.graph import effective_degree
from securefed.crypto.messages import SESSION_BYTES, round_keys_payload
from securefed.crypto.roster import Roster, federation_public_key
from securefed.crypto.secagg.config import SecAggConfig, default_threshold
from securefed.errors import ConfigError, DropoutRecoveryError, ProtocolError

__all__ = ["ActiveSecurity", "collusion_tolerance", "pinned_config", "session_id"]

_SESSION_DOMAIN = b"securefed/secagg/v1/session\x00"


def session_id(*parts: bytes) -> bytes:
    """A 32-byte session id: SHA-256 over a domain string and length-prefixed ``parts``."""
    h = hashlib.sha256(_SESSION_DOMAIN)
    for part in parts:
        data = bytes(part)
        h.update(len(data).to_bytes(8, "little") + data)
    return h.digest()


@dataclass(frozen=True)
class ActiveSecurity:
    """A party's view of the active variant: the roster, the session, and its identity.

    Attributes:
        roster: The federation's roster as this party verified it (sites' identity keys,
            pinned ``min_contributors`` and ``threshold``).
        session: 32-byte id of the run, bound into every signature with the roster's digest
            and the round (a signature from another run, federation or round never verifies).
        identity: A site's own Ed25519 identity private key (None for the server).
        site_id: The site's id (None for the server); its roster key must be ``identity``'s.
        min_contributors: The party's own floor on the contributors of any sum it helps
            reveal (a site's node setting), on top of the roster's; None: the roster's only.

    Raises:
        ConfigError: A session id of the wrong length, or an identity key that is not the
            roster's key for ``site_id``.

    """

    roster: Roster
    session: bytes
    identity: Ed25519PrivateKey | None = None
    site_id: int | None = None
    min_contributors: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.roster, Roster):
            raise ConfigError("the active variant needs the federation's Roster")
        if not isinstance(self.session, bytes) or len(self.session) != SESSION_BYTES:
            raise ConfigError(f"the session id must be {SESSION_BYTES} bytes")
        if (self.identity is None) != (self.site_id is None):
            raise ConfigError("a site needs both its id and its identity key")
        if self.identity is not None:
            pinned = self.roster.sites.get(self.site_id)  # type: ignore[arg-type]
            if pinned is None:
                raise ConfigError(f"site {self.site_id} is not in the federation's roster")
            if federation_public_key(self.identity) != pinned:
                raise ConfigError(
                    f"site {self.site_id}'s identity key is not the one the roster lists for it"
                )
        m = self.min_contributors
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"min_contributors must be a positive integer (got {m!r})")
        object.__setattr__(self, "_digest", self.roster.digest())

    @property
    def least_contributors(self) -> int:
        """Fewest contributors of a sum this party helps reveal: roster's, own, and 2."""
        return max(2, self.roster.min_contributors, self.min_contributors or 0)

    @property
    def digest(self) -> bytes:
        """The roster's digest, bound into every signature."""
        return self._digest  # type: ignore[attr-defined]

    def round_keys(
        self, *, round_index: int, site: int, encryption_public: bytes, mask_public: bytes
    ) -> bytes:
        """What ``site`` signs over its round keys, bound to this roster and session."""
        return round_keys_payload(
            roster_digest=self.digest,
            session=self.session,
            round_index=round_index,
            site=site,
            encryption_public=encryption_public,
            mask_public=mask_public,
        )

    def sign(self, payload: bytes) -> bytes:
        """This site's Ed25519 signature over ``payload``."""
        if self.identity is None:
            raise ProtocolError("the server has no identity key to sign with")
        return self.identity.sign(payload)

    def verify(self, site: int, payload: bytes, signature: bytes, *, what: str) -> None:
        """Check ``signature`` by roster site ``site``; ProtocolError naming ``what`` if not."""
        try:
            self.roster.verify(site, payload, signature)
        except ProtocolError as exc:
            raise ProtocolError(f"{what}: {exc}") from exc


def pinned_config(
    base: SecAggConfig, *, roster: Roster, n_round: int, min_contributors: int | None = None
) -> SecAggConfig:
    """The round's masking parameters from the party's own count and roster (module docstring).

    Args:
        base: The run's parameters (ring, clip range, neighbours, and the round size the
            server announced, used only as fixed-point head-room when it is the larger).
        roster: The federation's roster.
        n_round: Sites whose signed round keys this party accepted (U1).
        min_contributors: The party's own floor on top of the roster's (None: none).

    Raises:
        DropoutRecoveryError: The round is too small for the roster's pinned limits.
        ProtocolError: The run's ring cannot carry the sum of ``n_round`` sites' values.

    """
    least = max(2, roster.min_contributors, min_contributors or 0)
    if n_round < least:
        raise DropoutRecoveryError(
            f"only {n_round} sites advertised signed keys; the roster and this party pin at "
            f"least {least} contributors, so the round is refused."
        )
    m = effective_degree(n_sites=n_round, neighbors=base.neighbors) + 1
    if roster.threshold is None:
        t = default_threshold(neighbourhood_size=m)
    else:
        t = max(roster.threshold, m // 2 + 1)
    if t > m:
        raise DropoutRecoveryError(
            f"only {m} holders per site in a round of {n_round} advertised sites; the roster "
            f"pins threshold t={t}, so the round is refused."
        )
    try:
        # The codec checks that n_round encodings at these fractional bits cannot wrap: a
        # wrapped sum would decode to garbage (a correctness failure: the masks are uniform in
        # any ring, so privacy does not depend on it).
        return SecAggConfig(
            n_clients=n_round,
            threshold=t,
            neighbors=base.neighbors,
            ring_bits=base.ring_bits,
            clip_range=base.clip_range,
            frac_bits=base.frac_bits if base.n_clients >= n_round else None,
        )
    except ConfigError as exc:
        raise ProtocolError(
            f"refusing to encode for a round of {n_round} sites: a {base.ring_bits}-bit ring "
            f"cannot hold their sum without wrapping ({exc})"
        ) from exc


def collusion_tolerance(*, threshold: int, holders: int) -> int:
    """How many colluding share holders the active protocol tolerates.

    ``max(0, min(2t - m - 1, m - 2))``. A server that colludes with ``c`` of a site's ``m``
    share holders can show two disjoint groups of honest holders two survivor lists; each
    group unmasks once it has ``t`` signatures of its members, the colluders signing in both.
    Both groups unmask when ``m - c + 2c >= 2t``: then one gives the site's self-mask seed and
    the other its mask key, and its update is in the clear. Fewer than ``2t - m`` colluders
    cannot (Bonawitz et al. 2017, Theorem 6.5's bound on corrupt parties, ``n_C < 2t - n``).

    That bound alone says ``m - 1`` colluders are tolerated when ``t = m``, but ``m - 1``
    colluders are every other holder: the site is a survivor, so its self-mask seed is
    revealed as the protocol intends, and every pairwise mask it has is with a colluder (the
    round's other sites, or its whole SecAgg+ neighbourhood); with the full graph the sum
    minus the colluders' inputs is the site's update without any split. So at most ``m - 2``.

    Args:
        threshold: The round's Shamir threshold t.
        holders: Share holders per site m (the round's sites, or the SecAgg+ neighbourhood).

    Returns:
        The largest number of colluding sites among the holders that learns nothing more.

    """
    t, m = int(threshold), int(holders)
    return max(0, min(2 * t - m - 1, m - 2))
