"""An active server's scaled aggregate defeats the flooding of a decryption it composed.

The flooding (:mod:`securefed.crypto.ckks.flooding`) is sized for the error of k fresh
encryptions. A server that sends, as the round's "aggregate", the sum of ciphertexts it
chose doubled 72 times (``v + v``: no scale change, nothing in the frame to detect) gets a
decryption whose error is ``2**72`` times larger than the noise hides; dividing by ``2**72``
gives the raw decryption, and the key falls to the Li-Micciancio attack
(``test_ckks_key_recovery.py``). This is why the CKKS mode's key holder decrypts only a sum
it computed itself from ciphertexts signed by roster sites (``tests/protocol/
test_ckks_active.py`` shows it refusing this aggregate). The demonstration here uses
:meth:`CKKSDecryptor.decrypt` on the server's frame, as the key holder used to.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

from securefed.crypto.ckks import (
    CKKSAggregator,
    CKKSDecryptor,
    CKKSEncryptor,
    CKKSParams,
    generate_keys,
)
from securefed.crypto.ckks import framing as ckks_framing

ts = pytest.importorskip("tenseal")
sealapi = pytest.importorskip("tenseal.sealapi")

from tests.crypto.test_ckks_key_recovery import (  # noqa: E402
    _decode,
    _is_ternary,
    _NegacyclicNTT,
    _Server,
)

#: Doublings: 2**72 times the flooded error is far above the noise, far below the modulus.
K_BITS = 72


def scaled_aggregate(server: _Server, aggregate: bytes, k_bits: int = K_BITS) -> bytes:
    """The aggregate frame with every ciphertext doubled ``k_bits`` times (same scale)."""
    header, blobs = ckks_framing.decode_vector_frame(aggregate, kinds=(4,), what="aggregate")
    scaled = []
    for blob in blobs:
        vec = ts.ckks_vector_from(server.context, bytes(blob))
        for _ in range(k_bits):
            vec = vec + vec
        scaled.append(vec.serialize())
    return ckks_framing.encode_vector_frame(
        kind=ckks_framing.KIND_AGGREGATE,
        key_id=header.key_id,
        round_index=header.round_index,
        sender=ckks_framing.AGGREGATOR_ID,
        n_values=header.n_values,
        layout_id=header.layout_id,
        slots=header.slots,
        weighted=False,
        contributors=header.contributors,
        chunks=scaled,
    )


def crt_decrypt(server: _Server, secret: np.ndarray, frame: bytes, chunk: int = 0) -> np.ndarray:
    """Decrypt one chunk of any frame with a recovered key, over all its primes (CRT)."""
    n = server.params.poly_modulus_degree
    _, blobs = ckks_framing.decode_vector_frame(frame, kinds=(3, 4), what="frame")
    vec = ts.ckks_vector_from(server.context, bytes(blobs[chunk]))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ct")
        vec.ciphertext()[0].save(path)
        ct = sealapi.Ciphertext()
        ct.load(server.seal, path)
    sealapi.Evaluator(server.seal).transform_from_ntt_inplace(ct)
    words, levels = ct.dyn_array(), ct.coeff_modulus_size()
    primes = [m.value() for m in server.seal.first_context_data().parms().coeff_modulus()]
    primes = primes[:levels]
    modulus = 1
    for q in primes:
        modulus *= q
    acc = np.zeros(n, dtype=object)
    for i, q in enumerate(primes):
        ntt = _NegacyclicNTT(n, q)
        c0 = np.array([words[i * n + j] for j in range(n)], dtype=object)
        c1 = np.array([words[levels * n + i * n + j] for j in range(n)], dtype=object)
        s_hat = ntt.forward(np.array([int(x) % q for x in secret], dtype=object))
        pt = ntt.inverse((ntt.forward(c0) + ntt.forward(c1) * s_hat) % q)
        rest = modulus // q
        acc = (acc + pt * rest * pow(rest, -1, q)) % modulus
    centred = np.array([int(a) - modulus if a > modulus // 2 else int(a) for a in acc])
    return _decode(centred.astype(np.float64), n, 2.0**server.params.global_scale_bits)


def test_a_scaled_aggregate_defeats_the_flooding_of_a_decryption_the_server_composed() -> None:
    # Prepare: an honest site's update the server wants; its own Enc(0) booked as 3 sites
    # (so the key holder's contributor checks pass), then doubled 72 times.
    params = CKKSParams()
    keys = generate_keys(params=params)
    n = params.poly_modulus_degree  # two full chunks
    enc = CKKSEncryptor(keys.public_context)
    rng = np.random.default_rng(0)
    victim = np.append(300 * rng.normal(scale=0.01, size=n - 1), 300.0)
    victim_frame = enc.encrypt(victim, site_id=1, round_index=1)
    agg = CKKSAggregator(keys.public_context, round_index=1)
    for site in range(3):
        agg.add(enc.encrypt(np.zeros(n), site_id=site, round_index=1), site_id=site)
    aggregate = agg.aggregate()
    server = _Server(keys.public_context)
    attack = scaled_aggregate(server, aggregate)

    # Execute: the key holder decrypts the server's frame (the former behaviour), flooded.
    decryptor = CKKSDecryptor(keys.secret_context, min_contributors=2, max_contributors=3)
    released = decryptor.decrypt(attack, round_index=1)
    secret = server.recover_key(aggregate, released / 2.0**K_BITS)
    read = crt_decrypt(server, secret, victim_frame, chunk=0)

    # Assert: the flooding was applied, yet the key and the victim's update fall.
    assert decryptor.last_sigma > 0
    assert _is_ternary(secret) and 0.5 < np.mean(secret != 0) < 0.8
    assert np.max(np.abs(read - victim[: params.slots])) < 1e-6
