"""CKKS parameters, checked against the 128-bit HE security standard, and TenSEAL's import."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.crypto.ckks import flooding
from securefed.crypto.ckks.flooding import DECRYPTION_BUDGET
from securefed.errors import ConfigError, OptionalDependencyError

if TYPE_CHECKING:  # pragma: no cover - typing only; TenSEAL is imported lazily
    import tenseal

__all__ = [
    "CKKSParams",
    "ENCRYPTION_TYPES",
    "MAX_COEFF_MODULUS_BITS",
    "SECURITY_LEVEL_BITS",
    "load_tenseal",
]

# Largest total coefficient-modulus size for 128-bit classical security with a ternary secret,
# HomomorphicEncryption.org security standard (Albrecht et al. 2018), Table 1; SEAL enforces the
# same table. Smaller degrees leave no room for a useful modulus chain and are refused.
MAX_COEFF_MODULUS_BITS: dict[int, int] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
SECURITY_LEVEL_BITS = 128
# SEAL generates NTT-friendly primes of at most 60 bits; below 20 bits there are too few primes
# congruent to 1 mod 2N and the scale would give no useful precision.
MIN_PRIME_BITS, MAX_PRIME_BITS = 20, 60
# Only additions are done (no rescaling), so the scale may exceed a prime (SEAL encodes scales
# beyond 64 bits with multi-precision arithmetic); it must leave this many bits of the data
# modulus for the magnitude of the sum (sums up to 2^19 at the least).
MIN_HEADROOM_BITS = 20
ENCRYPTION_TYPES = ("asymmetric", "symmetric")


def load_tenseal() -> Any:
    """Import TenSEAL on first use; it is an optional, heavy dependency."""
    try:
        import tenseal as ts
    except ImportError as exc:
        raise OptionalDependencyError(
            "CKKS secure aggregation (`--secure-agg he`) needs TenSEAL, which is not installed; "
            "install it with `pip install 'tenseal==0.3.*'`."
        ) from exc
    return ts


@dataclass(frozen=True)
class CKKSParams:
    """CKKS encryption parameters, validated against the 128-bit HE security standard.

    Attributes:
        poly_modulus_degree: Ring degree ``N`` (one of 4096, 8192, 16384, 32768); a ciphertext
            holds ``N/2`` values.
        coeff_mod_bit_sizes: Bit sizes of the coefficient-modulus primes; the last is SEAL's
            special (key-switching) prime, the others are data primes. Their sum must not exceed
            :data:`MAX_COEFF_MODULUS_BITS` for ``N``.
        global_scale_bits: Values are encoded as ``round(x * 2**global_scale_bits)``. Only
            additions are done, so it is bounded by the data modulus (at least
            ``MIN_HEADROOM_BITS`` must remain for the sum's magnitude), not by a prime. A large
            scale is what keeps the decryption's flooding noise (:mod:`.flooding`) small.
        encryption: ``"asymmetric"`` (public-key encryption: sites may hold only the public
            context) or ``"symmetric"`` (secret-key encryption: about twice as fast, every site
            must hold the secret key; the server's context then holds no key at all).

    """

    poly_modulus_degree: int = 8192
    # Three 60-bit data primes (Q = 2^180) and a 38-bit special prime: 218 bits, the 128-bit
    # bound for N = 8192. Scale 2^100 leaves 2^79 for the sum and makes the flooding noise
    # about 2e-11 per summed site (see `precision`).
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60, 60, 38)
    global_scale_bits: int = 100
    encryption: str = "asymmetric"

    def __post_init__(self) -> None:
        degree = self.poly_modulus_degree
        if isinstance(degree, bool) or not isinstance(degree, int | np.integer):
            raise ConfigError(f"`poly_modulus_degree` must be an integer (got {degree!r}).")
        if int(degree) not in MAX_COEFF_MODULUS_BITS:
            known = ", ".join(str(d) for d in MAX_COEFF_MODULUS_BITS)
            raise ConfigError(f"`poly_modulus_degree` must be one of {known} (got {degree}).")
        object.__setattr__(self, "poly_modulus_degree", int(degree))

        sizes = self.coeff_mod_bit_sizes
        if isinstance(sizes, str | bytes) or not isinstance(sizes, Sequence):
            raise ConfigError(
                f"`coeff_mod_bit_sizes` must be a sequence of prime bit sizes (got {sizes!r})."
            )
        for i, bits in enumerate(sizes):
            if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
                raise ConfigError(f"`coeff_mod_bit_sizes[{i}]` must be an integer (got {bits!r}).")
            if not MIN_PRIME_BITS <= bits <= MAX_PRIME_BITS:
                raise ConfigError(
                    f"`coeff_mod_bit_sizes[{i}]` must be between {MIN_PRIME_BITS} and "
                    f"{MAX_PRIME_BITS} bits (got {bits})."
                )
        sizes = tuple(int(b) for b in sizes)
        object.__setattr__(self, "coeff_mod_bit_sizes", sizes)
        if len(sizes) < 2:
            raise ConfigError(
                "`coeff_mod_bit_sizes` needs at least 2 primes (data primes, then the special "
                f"prime) (got {len(sizes)})."
            )
        bound = MAX_COEFF_MODULUS_BITS[self.poly_modulus_degree]
        if sum(sizes) > bound:
            raise ConfigError(
                f"`coeff_mod_bit_sizes` total {sum(sizes)} bits exceeds {bound} bits, the "
                f"{SECURITY_LEVEL_BITS}-bit security bound for poly_modulus_degree "
                f"{self.poly_modulus_degree} (HomomorphicEncryption.org standard)."
            )

        scale = self.global_scale_bits
        if isinstance(scale, bool) or not isinstance(scale, int | np.integer):
            raise ConfigError(f"`global_scale_bits` must be an integer (got {scale!r}).")
        scale = int(scale)
        object.__setattr__(self, "global_scale_bits", scale)
        if scale < MIN_PRIME_BITS:
            raise ConfigError(
                f"`global_scale_bits` must be at least {MIN_PRIME_BITS} for useful precision "
                f"(got {scale})."
            )
        data_bits = sum(sizes[:-1])
        if scale > data_bits - MIN_HEADROOM_BITS:
            raise ConfigError(
                f"`global_scale_bits` must leave at least {MIN_HEADROOM_BITS} of the "
                f"{data_bits} data-modulus bits for the sum's magnitude (got {scale})."
            )
        if self.encryption not in ENCRYPTION_TYPES:
            raise ConfigError(
                f"`encryption` must be one of {', '.join(ENCRYPTION_TYPES)} "
                f"(got {self.encryption!r})."
            )

    @property
    def slots(self) -> int:
        """Values per ciphertext (``N/2``)."""
        return self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives under (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    def max_abs_sum(self, *, weighted: bool = False) -> float:
        """Largest magnitude a decrypted coordinate may have before decryption wraps around.

        The aggregate is never rescaled, so it is decrypted modulo ``Q`` (all data primes, about
        ``2**data_modulus_bits``); a value ``x`` at scale ``D`` decodes only if ``|x| D < Q/2``.
        Server weights multiply the scale by ``2**global_scale_bits`` once more.

        Args:
            weighted: Whether the server multiplies by plaintext weights.

        Returns:
            The bound (0.0 if these parameters cannot hold a weighted sum at all).

        """
        scale_bits = self.global_scale_bits * (2 if weighted else 1)
        headroom = self.data_modulus_bits - scale_bits - 1
        return math.ldexp(1.0, headroom) if headroom > 0 else 0.0

    def flooding_sigma(self, contributors: int, *, queries: int = DECRYPTION_BUDGET) -> float:
        """Standard deviation of the decryption's flooding noise for a sum of ``contributors``.

        See :func:`securefed.crypto.ckks.flooding.flooding_sigma` (LMSS 2022).
        """
        return flooding.flooding_sigma(
            poly_modulus_degree=self.poly_modulus_degree,
            scale_bits=self.global_scale_bits,
            contributors=contributors,
            queries=queries,
        )

    def error_bound(self, contributors: int) -> float:
        """High-probability CKKS error of a sum of ``contributors`` fresh encryptions (values)."""
        return flooding.error_bound(
            poly_modulus_degree=self.poly_modulus_degree,
            scale_bits=self.global_scale_bits,
            contributors=contributors,
        )

    def precision(self, contributors: int) -> float:
        """Worst absolute error per coordinate of a flooded sum of ``contributors`` sites.

        ``8.5 sigma + t`` (:func:`securefed.crypto.ckks.flooding.precision`); exceeded with
        probability below 2^-49 per coordinate.
        """
        return flooding.precision(
            poly_modulus_degree=self.poly_modulus_degree,
            scale_bits=self.global_scale_bits,
            contributors=contributors,
        )

    def check_precision(self, n_sites: int) -> None:
        """Refuse parameters whose flooding noise would spoil a sum of ``n_sites`` sites.

        Raises:
            ConfigError: :meth:`precision` exceeds
                :data:`~securefed.crypto.ckks.flooding.PRECISION_BOUND`.

        """
        worst = self.precision(max(1, int(n_sites)))
        if worst > flooding.PRECISION_BOUND:
            raise ConfigError(
                f"CKKS scale 2^{self.global_scale_bits} with poly_modulus_degree "
                f"{self.poly_modulus_degree}: the decryption's flooding noise (sigma "
                f"{self.flooding_sigma(max(1, int(n_sites))):.3g} for {n_sites} sites, "
                f"{flooding.SECURITY_BITS}-bit security over {flooding.DECRYPTION_BUDGET} "
                f"decryptions) makes the sum's error up to {worst:.3g}, above the documented "
                f"bound {flooding.PRECISION_BOUND:g}; raise --he-scale-bits (each bit halves "
                "it) and the data primes with it."
            )

    def describe(
        self,
        *,
        n_coordinates: int | None = None,
        n_encrypted: int | None = None,
        n_sites: int | None = None,
    ) -> dict[str, Any]:
        """Parameters for the privacy report.

        Args:
            n_coordinates: Length of the full update vector, if known.
            n_encrypted: How many of its coordinates are encrypted and sent (a trainable subset);
                the rest are not sent at all.
            n_sites: The most sites a sum may hold (sizes the flooding noise), if known.

        Returns:
            A JSON-serializable dictionary.

        """
        out: dict[str, Any] = {
            "scheme": "CKKS",
            "library": "TenSEAL (Microsoft SEAL)",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "coeff_modulus_bits": sum(self.coeff_mod_bit_sizes),
            "max_coeff_modulus_bits": MAX_COEFF_MODULUS_BITS[self.poly_modulus_degree],
            "global_scale_bits": self.global_scale_bits,
            "slots_per_ciphertext": self.slots,
            "security_level_bits": SECURITY_LEVEL_BITS,
            "security_standard": "HomomorphicEncryption.org 2018, ternary secret, classical",
            "encryption": self.encryption,
            "server_keys": "public context only (no secret key); the server cannot decrypt",
            "max_abs_sum": self.max_abs_sum(),
            "decryption": (
                "the key holder adds Gaussian flooding noise (OS CSPRNG) to the plaintext "
                "polynomial before decoding and rounds to a power-of-two grid below sigma "
                "(Li, Micciancio, Schultz, Sorrell, CRYPTO 2022): sigma = sqrt(24 N alpha) "
                "2^(s/2) t"
            ),
            "flooding_security_bits": flooding.SECURITY_BITS,
            "decryption_budget": flooding.DECRYPTION_BUDGET,
            "fresh_error_bound": flooding.fresh_error_bound(self.poly_modulus_degree),
        }
        if n_sites is not None:
            k = max(1, int(n_sites))
            out["flooding_sites"] = k
            out["flooding_sigma"] = self.flooding_sigma(k)
            out["error_bound"] = self.error_bound(k)
            out["precision"] = self.precision(k)
        if n_coordinates is not None:
            encrypted = n_coordinates if n_encrypted is None else n_encrypted
            out["coordinates"] = n_coordinates
            out["encrypted_coordinates"] = encrypted
            out["coordinates_not_sent"] = n_coordinates - encrypted
            if encrypted < n_coordinates:
                out["subset_note"] = (
                    "only the trainable subset is encrypted and sent; the other coordinates "
                    "never leave the site"
                )
        return out

    def _tenseal_context(self) -> tenseal.Context:
        ts = load_tenseal()
        enc = (
            ts.ENCRYPTION_TYPE.ASYMMETRIC
            if self.encryption == "asymmetric"
            else ts.ENCRYPTION_TYPE.SYMMETRIC
        )
        try:
            ctx = ts.context(
                ts.SCHEME_TYPE.CKKS,
                poly_modulus_degree=self.poly_modulus_degree,
                coeff_mod_bit_sizes=list(self.coeff_mod_bit_sizes),
                encryption_type=enc,
                n_threads=1,
            )
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"TenSEAL refused the CKKS parameters {self}: {exc}") from exc
        ctx.global_scale = 2.0**self.global_scale_bits
        return ctx
