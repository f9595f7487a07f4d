"""Secure aggregation by pairwise masking (Bonawitz et al. 2017) with SecAgg+ neighbourhoods.

Protocol (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, Fig. 4, honest-but-curious variant; Bell et al., "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020, for sparse neighbourhoods):

0. AdvertiseKeys: each site u draws two X25519 key pairs, (c_sk, c_pk) to seal shares and
   (s_sk, s_pk) to agree pairwise masks, and a 32-byte self-mask seed b_u; it sends both public
   keys. The server broadcasts all keys (U1) and a fresh public graph seed.
1. ShareKeys: u splits b_u and s_sk_u t-of-m with Shamir among its closed neighbourhood N[u]
   (itself included; m = degree + 1, m = n for classic SecAgg) and seals each neighbour's pair of
   shares with AES-256-GCM under HKDF-SHA256(X25519(c_sk_u, c_pk_v)); the server relays them.
   The sites that sent shares form U2.
2. MaskedInputCollection: u uploads y_u = enc(x_u) + PRG(b_u) + sum_{v in U2 n N(u), v > u}
   PRG(s_uv) - sum_{v < u} PRG(s_uv) mod 2^k, with PRG = AES-256-CTR. The uploaders form U3.
3. Unmasking: the server announces U3 and D = U2 - U3. Each answering site sends, for every
   owner in its neighbourhood, its share of b_owner if the owner is in U3 or of s_sk_owner if it
   is in D, never both. The server reconstructs, recomputes the masks and removes them.

Threshold. ``threshold`` t counts members of one closed neighbourhood N[u] (u and its peers;
all n sites for classic SecAgg) and must be a strict majority of it, m/2 < t <= m. Default:
min(m, floor(2m/3) + 1), which tolerates m - t dropouts per neighbourhood and keeps t above the
2m/3 that Bonawitz et al. need against an active server. What it guarantees:

* Reconstruction: a site's secrets are recovered iff at least t of its N[u] answer the
  unmasking round; otherwise the round raises :class:`DropoutRecoveryError` (no partial sum).
* Secrecy: fewer than t holders (with the server) learn nothing about b_u or s_sk_u (Shamir).
  Honest sites reveal b-shares for U3 and s_sk-shares for D only, so the server never holds
  both secrets of one site; a majority threshold also means two disjoint groups of honest
  holders can never each reach t (colluders sign in both: fewer than 2t - m are tolerated,
  :func:`.active.collusion_tolerance`).
* SecAgg+: masks cancel only inside connected survivor components, so the server would learn
  the sum of each component. Sites therefore refuse to unmask unless the survivors induce a
  connected subgraph; the server learns only the total. Bell et al. show that random graphs of
  degree O(log n) stay connected, and keep any fixed site's neighbourhood from being mostly
  corrupt, with high probability; here connectivity is checked every round, not assumed. Unlike
  the complete graph, t colluding *neighbours* of u (out of k) suffice to recover u's secrets
  (2t - m with split survivor lists, m = k + 1), so
  choose ``neighbors`` with a margin over your collusion assumption.

Active security (Bonawitz et al. 2017, Fig. 4, the "active" column; :mod:`.active`). With an
:class:`~.active.ActiveSecurity` (the federation's signed roster, the run's session id and the
site's Ed25519 identity key) the parties also:

* sign (c_pk, s_pk) in AdvertiseKeys, bound to the roster digest, session and round; a site
  checks every entry of the key list against its own roster before it deals a share, and the
  server refuses a badly signed advertisement naming its sender;
* derive n (the signed entries) and t (:func:`~.active.pinned_config`) themselves, never
  from the server;
* commit to every share they deal (salted SHA-256, signed by the owner): a holder checks the
  pair it opens, the server checks every revealed share and leaves out (naming) a holder
  whose share does not open its commitment;
* run the consistency round after the uploads: each survivor signs the U3 it was shown (with
  the transcript hash of the key list), once; it reveals shares only for the list it signed,
  countersigned by at least t survivors, never when listed as dropped, never when U3 is not
  within the sites it saw alive, and answers the unmask request at most once.

Without it the parties run the honest-but-curious protocol above (kept for the harness that
shows what each check stops: tests/crypto/test_secagg_active.py). The masking mode
(:mod:`securefed.protocol.modes.masking`) always runs the active variant. Still out of scope:
sites that send malformed inputs (a Byzantine site inside the bound; see
docs/secure-aggregation.md).

Modules by job: :mod:`.config` (parameters), :mod:`.client` (a site's side), :mod:`.server`
(the aggregator's side), :mod:`.rounds` (what both share: phases, timers, the result type).
The in-process driver :func:`secure_sum` is :func:`securefed.protocol.harness.secure_sum`
(the masking mode over an in-process link).
"""

from __future__ import annotations

from securefed.crypto.secagg.client import SecAggClient
from securefed.crypto.secagg.config import SecAggConfig, default_threshold, masking_keystream_bytes
from securefed.crypto.secagg.rounds import SecAggResult
from securefed.crypto.secagg.server import SecAggServer

__all__ = [
    "SecAggClient",
    "SecAggConfig",
    "SecAggResult",
    "SecAggServer",
    "default_threshold",
    "masking_keystream_bytes",
]
