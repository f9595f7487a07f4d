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
  the ciphertexts (optionally times plaintext scalar weights) and returns an aggregate frame. It
  cannot decrypt.
* **Key holder** (:class:`CKKSDecryptor`): decrypts the aggregate only, never a single update.

Threat model notes for a reviewer. The server is honest-but-curious. One CKKS key is shared by
the key holders, so the server colluding with any holder of the secret key learns every site's
update; with ``encryption="asymmetric"`` sites may encrypt with the public context alone and only
the key holder can collude. The frame digest is an unkeyed SHA-256: it detects truncation and
corruption, not a forger (authenticity is the transport's job, e.g. TLS). Dropout needs no
recovery: a site that does not upload contributes nothing.

Precision (default parameters, N = 8192, scale 2^40): a fresh ciphertext decrypts with an
absolute error of at most about 2e-8 per coordinate (measured over 1e6 coordinates), whatever
the magnitude (CKKS noise is additive, not relative). Errors add over sites, so the sum of ``k``
vectors is off by at most ``k * 5e-8`` (``5e-8 * sum|w_i|`` with server weights; the budget the
tests enforce): 5e-6 for 100 sites, a relative error below 1e-9 for sums of magnitude 1e4-1e5
and far inside the 1e-4 FedAvg needs after dividing by the summed weight. Sums must stay below
:meth:`CKKSParams.max_abs_sum` (2^99 plain, 2^59 weighted, at the defaults) or decryption wraps.

Cost: next to TenSEAL's own encrypt/add/decrypt, the protocol adds TenSEAL ``serialize()``
(SEAL's compressed format) and deserialization on every hop, plus a SHA-256 per frame; see
:func:`raw_tenseal_reference` for the two baselines a benchmark should print.

Modules by job: :mod:`.params` (parameters and their security check), :mod:`.framing` (the
byte layouts), :mod:`.keys` (key set-up and key files), :mod:`.roles` (encryptor, aggregator,
decryptor), :mod:`.reference` (plain TenSEAL timing). The in-process driver :func:`he_sum`
is :func:`securefed.protocol.harness.he_sum` (the CKKS mode over an in-process link).
"""

from __future__ import annotations

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
    "as_vector",
    "normalize_subset",
    "select_coordinates",
]
