"""The IND-CPA^D key recovery of Li and Micciancio (Eurocrypt 2021), run by the CKKS server.

The server holds the public context, every site's ciphertext, the aggregate it computed, and
the key holder's decrypted reply. With a raw decryption (what securefed released before the
flooding) that is enough to solve for the secret key and then read every site's own update.

How, with TenSEAL's real-valued decryption. The key holder computes ``pt = c0 + c1 s mod q`` and
decodes it; TenSEAL keeps only the real parts of the slots, which fix ``u = pt + tau(pt)``
(``tau: X -> X^-1``, complex conjugation of the slots): re-encoding the real parts at twice the
scale gives ``u`` exactly while the float64 decode is precise to well under one coefficient
unit. ``u = c0 + tau(c0) + c1 s + tau(c1) tau(s)`` is linear in ``s``. Modulo one RNS prime
``p``, in the evaluation (NTT) domain, ``tau`` swaps the evaluation points ``psi^(2k+1)`` and
``psi^-(2k+1)``, so each pair of points gives one equation in two unknowns per ciphertext; two
fully used ciphertexts under the same key (any update of ``N`` coordinates or more) give a
2x2 system per pair, hence ``s`` modulo ``p``, hence its ternary coefficients.

Everything runs on the project's own frames and TenSEAL/SEAL objects: the ciphertext words are
read through ``tenseal.sealapi`` (SEAL's own serialization and ``transform_from_ntt``); the
NTT modulo ``p`` and the canonical embedding (SEAL's slot order: powers of 3 modulo 2N) are a
few lines of numpy below.
"""

from __future__ import annotations

import os
import tempfile
import time

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
from securefed.crypto.ckks.keys import load_key

ts = pytest.importorskip("tenseal")
sealapi = pytest.importorskip("tenseal.sealapi")

#: The parameters securefed shipped before the flooding (N = 8192, scale 2^40).
FORMER_DEFAULTS = CKKSParams(8192, (60, 40, 40, 60), 40)


# ------------------------------------------------------------------ the attacker's tools


class _NegacyclicNTT:
    """Evaluation of polynomials mod (X^N + 1, p) at psi^(2k+1), k = 0..N-1 (Python ints)."""

    def __init__(self, n: int, p: int) -> None:
        self.n, self.p = n, p
        g = 2
        while True:  # psi: a primitive 2N-th root of unity mod p
            psi = pow(g, (p - 1) // (2 * n), p)
            if pow(psi, n, p) == p - 1:
                break
            g += 1
        self.psi = psi
        self.twist = np.array([pow(psi, j, p) for j in range(n)], dtype=object)
        inv = pow(psi, -1, p)
        self.untwist = np.array(
            [pow(inv, j, p) * pow(n, -1, p) % p for j in range(n)], dtype=object
        )
        bits = n.bit_length() - 1
        self.rev = np.array([int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)])

    def _cyclic(self, a: np.ndarray, omega: int) -> np.ndarray:
        p, n = self.p, self.n
        a = a[self.rev]
        m = 1
        while m < n:  # radix-2 decimation in time, vectorized over blocks
            w = pow(omega, n // (2 * m), p)
            ws = np.array([pow(w, j, p) for j in range(m)], dtype=object)
            a = a.reshape(-1, 2 * m)
            even, odd = a[:, :m], (a[:, m:] * ws) % p
            a = np.concatenate(((even + odd) % p, (even - odd) % p), axis=1)
            m *= 2
        return a.reshape(n)

    def forward(self, a: np.ndarray) -> np.ndarray:
        return self._cyclic(np.asarray(a, dtype=object) * self.twist % self.p, self.psi**2 % self.p)

    def inverse(self, a: np.ndarray) -> np.ndarray:
        out = self._cyclic(np.asarray(a, dtype=object), pow(self.psi, -2, self.p))
        return out * self.untwist % self.p

    def centred(self, a: np.ndarray) -> np.ndarray:
        return np.array([int(x) - self.p if x > self.p // 2 else int(x) for x in a])


def _slot_exponents(n: int) -> np.ndarray:
    # SEAL's CKKS slot i is the evaluation at zeta^(3^i mod 2N), zeta = exp(i pi / N).
    return np.array([pow(3, i, 2 * n) for i in range(n // 2)])


def _encode_real_parts(real: np.ndarray, n: int, scale: float) -> np.ndarray:
    """The integer polynomial ``u = pt + tau(pt)`` whose slots are ``2 * scale * real``."""
    k = _slot_exponents(n)
    spectrum = np.zeros(2 * n)
    spectrum[k] = real
    spectrum[2 * n - k] = real
    return (2.0 * scale / n) * np.fft.fft(spectrum).real[:n]


def _decode(pt: np.ndarray, n: int, scale: float) -> np.ndarray:
    padded = np.zeros(2 * n)
    padded[:n] = pt
    return (np.fft.ifft(padded) * (2 * n))[_slot_exponents(n)].real / scale


class _Server:
    """What the server holds: the public context (and, through it, SEAL's view of ciphertexts)."""

    def __init__(self, public_context: bytes) -> None:
        key = load_key(public_context, kinds=(ckks_framing.KIND_PUBLIC_CONTEXT,))
        self.params, self.context = key.params, key.context
        n = self.params.poly_modulus_degree
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(n)
        parms.set_coeff_modulus(
            sealapi.CoeffModulus.Create(n, list(self.params.coeff_mod_bit_sizes))
        )
        self.seal = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
        p = self.seal.first_context_data().parms().coeff_modulus()[0].value()
        self.ntt = _NegacyclicNTT(n, p)

    def chunks(self, frame: bytes) -> list[tuple[np.ndarray, np.ndarray]]:
        """(c0, c1) of every ciphertext in a frame, coefficient form, modulo the first prime."""
        _, blobs = ckks_framing.decode_vector_frame(frame, kinds=(3, 4), what="frame")
        n = self.params.poly_modulus_degree
        out = []
        for blob in blobs:
            vec = ts.ckks_vector_from(self.context, bytes(blob))
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "ct")
                vec.ciphertext()[0].save(path)
                ct = sealapi.Ciphertext()
                ct.load(self.seal, path)
            sealapi.Evaluator(self.seal).transform_from_ntt_inplace(ct)
            words, levels = ct.dyn_array(), ct.coeff_modulus_size()
            c0 = np.array([words[j] for j in range(n)], dtype=object)
            c1 = np.array([words[levels * n + j] for j in range(n)], dtype=object)
            out.append((c0, c1))
        return out

    def recover_key(self, aggregate: bytes, released: np.ndarray) -> np.ndarray:
        """Solve for the secret key from the aggregate and its decryption (two full chunks)."""
        ntt, p, n = self.ntt, self.ntt.p, self.params.poly_modulus_degree
        slots, scale = n // 2, 2.0**self.params.global_scale_bits
        rows = []
        for i, (c0, c1) in enumerate(self.chunks(aggregate)[:2]):
            u = np.round(_encode_real_parts(released[i * slots : (i + 1) * slots], n, scale))
            u_hat = ntt.forward(np.array([int(x) % p for x in u], dtype=object))
            c0_hat, c1_hat = ntt.forward(c0), ntt.forward(c1)
            k = np.arange(slots)
            pair = n - 1 - k  # psi^(2k+1) and psi^-(2k+1)
            rows.append((c1_hat[k], c1_hat[pair], (u_hat[k] - c0_hat[k] - c0_hat[pair]) % p))
        (a1, b1, r1), (a2, b2, r2) = rows
        det = (a1 * b2 - a2 * b1) % p
        inv = np.array([pow(int(d), -1, p) for d in det], dtype=object)
        s_hat = np.empty(n, dtype=object)
        s_hat[:slots] = (r1 * b2 - r2 * b1) % p * inv % p
        s_hat[n - 1 - np.arange(slots)] = (a1 * r2 - a2 * r1) % p * inv % p
        return ntt.centred(ntt.inverse(s_hat))

    def decrypt_with(self, secret: np.ndarray, frame: bytes, chunk: int = 0) -> np.ndarray:
        """Decrypt one chunk of any frame (a single site's update) with a recovered key."""
        ntt, n = self.ntt, self.params.poly_modulus_degree
        c0, c1 = self.chunks(frame)[chunk]
        s_hat = ntt.forward(np.array([int(x) % ntt.p for x in secret], dtype=object))
        pt = ntt.inverse((ntt.forward(c0) + ntt.forward(c1) * s_hat) % ntt.p)
        return _decode(ntt.centred(pt).astype(np.float64), n, 2.0**self.params.global_scale_bits)


# ------------------------------------------------------------------ the federation's round


def _round(params: CKKSParams) -> tuple[object, dict[int, np.ndarray], dict[int, bytes], bytes]:
    """Three sites send [n_i u_i, n_i] for an 8191-parameter model; the server adds them."""
    keys = generate_keys(params=params)
    rng = np.random.default_rng(14)
    enc = CKKSEncryptor(keys.public_context)
    server = CKKSAggregator(keys.public_context, round_index=1)
    vectors, frames = {}, {}
    for site in range(3):
        n_i = float(rng.integers(50, 500))
        vectors[site] = np.append(
            n_i * rng.normal(scale=0.01, size=params.poly_modulus_degree - 1), n_i
        )
        frames[site] = enc.encrypt(vectors[site], site_id=site, round_index=1)
        server.add(frames[site], site_id=site)
    return keys, vectors, frames, server.aggregate()


def _raw_decryption(secret_context: bytes, aggregate: bytes) -> np.ndarray:
    """The former CKKSDecryptor.decrypt: TenSEAL's float64 decryption of each chunk, as is."""
    key = load_key(secret_context, kinds=(ckks_framing.KIND_SECRET_CONTEXT,))
    _, blobs = ckks_framing.decode_vector_frame(aggregate, kinds=(4,), what="aggregate")
    return np.concatenate([ts.ckks_vector_from(key.context, bytes(b)).decrypt() for b in blobs])


def _is_ternary(secret: np.ndarray) -> bool:
    return bool(np.all(np.abs(secret) <= 1))


# ------------------------------------------------------------------ the tests


def test_raw_decryption_gives_the_server_the_secret_key_and_every_sites_update() -> None:
    # Prepare: one honest round at the former defaults; the key holder replies as it used to.
    keys, vectors, frames, aggregate = _round(FORMER_DEFAULTS)
    released = _raw_decryption(keys.secret_context, aggregate)
    server = _Server(keys.public_context)

    # Execute: the honest-but-curious server's computation, timed.
    start = time.perf_counter()
    secret = server.recover_key(aggregate, released)
    seconds = time.perf_counter() - start
    site_1 = server.decrypt_with(secret, frames[1], chunk=0)

    # Assert: a ternary key (SEAL's secret distribution) that reads site 1's own update.
    assert _is_ternary(secret) and 0.5 < np.mean(secret != 0) < 0.8
    slots = FORMER_DEFAULTS.slots
    assert np.max(np.abs(site_1 - vectors[1][:slots])) < 1e-6
    print(
        f"key recovered in {seconds:.2f} s; site 1 read with error "
        f"{np.max(np.abs(site_1 - vectors[1][:slots])):.1e}"
    )
    assert seconds < 30.0


@pytest.mark.parametrize("params", [CKKSParams(), FORMER_DEFAULTS], ids=["defaults", "former"])
def test_flooded_decryption_defeats_the_key_recovery(params: CKKSParams) -> None:
    # Prepare: the same round, decrypted by today's key holder (flooding noise, rounding).
    keys, vectors, frames, aggregate = _round(params)
    released = CKKSDecryptor(keys.secret_context, min_contributors=2).decrypt(
        aggregate, round_index=1
    )
    server = _Server(keys.public_context)

    # Execute
    secret = server.recover_key(aggregate, released)
    site_1 = server.decrypt_with(secret, frames[1], chunk=0)

    # Assert: the solution is no key (coefficients spread over Z_p), and it reads garbage.
    assert not _is_ternary(secret)
    assert np.mean(np.abs(secret) <= 1) < 0.01
    slots = params.slots
    assert not np.max(np.abs(site_1 - vectors[1][:slots])) < 1.0
    # while the sum itself is released within the documented precision
    expected = sum(vectors.values())
    if params == CKKSParams():
        err = np.max(np.abs(released - expected))
        assert err <= params.precision(3) + 1e-13 * np.max(np.abs(expected))
