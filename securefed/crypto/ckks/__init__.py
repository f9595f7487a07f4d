"""CKKS homomorphic aggregation of flat update vectors with TenSEAL (``--secure-agg he``).

Roles and keys (Cheon, Kim, Kim, Song 2017, "Homomorphic Encryption for Arithmetic of
Approximate Numbers"; TenSEAL, Benaissa et al. 2021):

* **Key set-up** (:func:`generate_keys`): whoever holds the secret key (the sites, or one key
  holder they trust) creates a key set. The secret context goes to key files written ``0600``
  with ``O_EXCL``; the *public* context (no secret key, ``is_private()`` is False) goes to the
  server and to sites that only encrypt.
* **Site** (:class:`CKKSEncryptor`): encrypts its flat float64 vector, chunked into ciphertexts
  of ``N/2`` slots, and sends one framed byte message. The FL layer passes
  ``[n_i * u_i, n_i]``, so the server needs no plaintext weights.
* **Server** (:class:`CKKSAggregator`): holds only the public context and ciphertext bytes; adds
  the ciphertexts (optionally times plaintext scalar weights, which key holders then refuse to
  decrypt) and returns an aggregate frame. It cannot decrypt.
* **Key holder** (:class:`CKKSDecryptor`): decrypts the aggregate only, never a single update,
  and floods every decryption (:mod:`.flooding`): a raw CKKS decryption hands the secret key to
  whoever holds the ciphertext (Li and Micciancio 2021; ``tests/crypto/test_ckks_key_recovery.py``).

Threat model notes for a reviewer. The server is honest-but-curious. One CKKS key is shared by
the key holders, so the server colluding with any holder of the secret key learns every site's
update; with ``encryption="asymmetric"`` sites may encrypt with the public context alone and only
the key holder can collude. An *active* server can frame one site's ciphertext (alone, or plus
encryptions of zero it books under other site ids) as an aggregate: the contributor list is its
claim, and no key holder can check it, so a pinned minimum of contributors does not stop that
(docs/ckks.md). The frame digest is an unkeyed SHA-256: it detects truncation and
corruption, not a forger (authenticity is the transport's job, e.g. TLS). Dropout needs no
recovery: a site that does not upload contributes nothing.

Precision (default parameters, N = 8192, data primes 3 x 60 bits, scale 2^100): the released
sum of ``k`` sites is off by at most :meth:`CKKSParams.precision` ``(k) = 8.5 sigma + t``
(about ``1.6e-10 k``: 4.7e-10 for 3 sites, 1.6e-8 for 100), where ``sigma`` (``1.8e-11 k``) is
the flooding noise and ``t`` the CKKS error bound (``6e-25 k``), plus float64 decoding's
relative error near 1e-15 of the sum's magnitude. Runs whose ``--he-*`` options make the
flooding exceed 1e-6 are refused. Sums must stay below :meth:`CKKSParams.max_abs_sum` (2^79)
or decryption wraps; server-side weights (scale 2^200) do not fit the defaults.

Cost: next to TenSEAL's own encrypt/add/decrypt, the protocol adds TenSEAL ``serialize()``
(SEAL's compressed format) and deserialization on every hop, plus a SHA-256 per frame; see
:func:`raw_tenseal_reference` for the two baselines a benchmark should print.

Modules by job: :mod:`.params` (parameters and their security check), :mod:`.framing` (the
byte layouts), :mod:`.keys` (key set-up and key files), :mod:`.roles` (encryptor, aggregator,
decryptor), :mod:`.contributions` (the sites' signed ciphertexts the key holder sums itself:
it never decrypts a ciphertext the server composed), :mod:`.reference` (plain TenSEAL
timing). The in-process driver :func:`he_sum`
is :func:`securefed.protocol.harness.he_sum` (the CKKS mode over an in-process link).
"""

from __future__ import annotations

from securefed.crypto.ckks import flooding
from securefed.crypto.ckks.framing import FrameHeader, read_frame_header
from securefed.crypto.ckks.keys import CKKSKeySet, generate_keys, read_key_file, write_key_files
from securefed.crypto.ckks.params import MAX_COEFF_MODULUS_BITS, CKKSParams
from securefed.crypto.ckks.reference import raw_tenseal_reference
from securefed.crypto.ckks.roles import (
    CKKSAggregator,
    CKKSDecryptor,
    CKKSEncryptor,
    HEResult,
    as_vector,
    normalize_subset,
    select_coordinates,
)

__all__ = [
    "CKKSParams",
    "CKKSKeySet",
    "CKKSEncryptor",
    "CKKSAggregator",
    "CKKSDecryptor",
    "FrameHeader",
    "HEResult",
    "generate_keys",
    "write_key_files",
    "read_key_file",
    "read_frame_header",
    "raw_tenseal_reference",
    "MAX_COEFF_MODULUS_BITS",
    "flooding",
    "as_vector",
    "normalize_subset",
    "select_coordinates",
]
