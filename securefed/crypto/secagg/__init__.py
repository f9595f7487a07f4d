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
  both secrets of one site; a majority threshold also means two disjoint groups of holders can
  never each reach t.
* SecAgg+: masks cancel only inside connected survivor components, so the server would learn
  the sum of each component. Sites therefore refuse to unmask unless the survivors induce a
  connected subgraph; the server learns only the total. Bell et al. show that random graphs of
  degree O(log n) stay connected, and keep any fixed site's neighbourhood from being mostly
  corrupt, with high probability; here connectivity is checked every round, not assumed. Unlike
  the complete graph, t colluding *neighbours* of u (out of k) suffice to recover u's secrets, so
  choose ``neighbors`` with a margin over your collusion assumption.

Out of scope (as in the design's threat model): a server that lies about dropouts to different
sites (needs the consistency round and signatures of the active-security variant) and sites that
send malformed inputs.

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
