"""Tests for CKKS homomorphic aggregation (securefed.crypto.ckks)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefed.crypto import ckks
from securefed.crypto.ckks import (
    CKKSAggregator,
    CKKSDecryptor,
    CKKSEncryptor,
    CKKSParams,
    generate_keys,
    raw_tenseal_reference,
    read_frame_header,
    read_key_file,
    write_key_files,
)
from securefed.crypto.ckks import framing as ckks_framing
from securefed.errors import (
    ConfigError,
    DataError,
    DropoutRecoveryError,
    IntegrityError,
    OptionalDependencyError,
    ProtocolError,
)
from securefed.protocol.harness import he_sum

ts = pytest.importorskip("tenseal")

# float64 decoding: SEAL's decoder and the flooding's add leave a relative error near 1e-15 of
# the sum's magnitude on top of the documented absolute bound.
FLOAT_RELATIVE = 1e-13


def allowed_error(params: CKKSParams, contributors: int, expected: np.ndarray) -> float:
    """The documented precision of a flooded sum (CKKSParams.precision) plus float64 rounding."""
    return params.precision(contributors) + FLOAT_RELATIVE * max(
        1.0, float(np.max(np.abs(expected)))
    )


@pytest.fixture(scope="module")
def keys() -> ckks.CKKSKeySet:
    return generate_keys()


@pytest.fixture(scope="module")
def other_keys() -> ckks.CKKSKeySet:
    return generate_keys()


@pytest.fixture(scope="module")
def site_frame(keys: ckks.CKKSKeySet) -> bytes:
    vector = np.linspace(-5.0, 5.0, 5000)
    return CKKSEncryptor(keys.public_context).encrypt(vector, site_id=3, round_index=7)


# ------------------------------------------------------------------ parameters


def test_default_params_describe_the_privacy_report_fields() -> None:
    # Execute
    desc = CKKSParams().describe(n_coordinates=10, n_encrypted=4)

    # Assert
    assert desc["poly_modulus_degree"] == 8192
    assert desc["coeff_mod_bit_sizes"] == [60, 60, 60, 38]
    assert desc["global_scale_bits"] == 100
    assert desc["slots_per_ciphertext"] == 4096
    assert desc["security_level_bits"] == 128
    assert desc["coeff_modulus_bits"] == 218 <= desc["max_coeff_modulus_bits"] == 218
    assert desc["max_abs_sum"] == 2.0**79
    assert desc["flooding_security_bits"] == 40 and desc["decryption_budget"] == 2**32
    assert desc["encrypted_coordinates"] == 4
    assert desc["coordinates_not_sent"] == 6
    assert "never leave the site" in desc["subset_note"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"poly_modulus_degree": 1000}, r"`poly_modulus_degree` must be one of .*got 1000"),
        ({"poly_modulus_degree": 2048}, r"`poly_modulus_degree` must be one of"),
        ({"poly_modulus_degree": 8192.0}, r"`poly_modulus_degree` must be an integer"),
        (
            {"coeff_mod_bit_sizes": (60, 60, 60, 60)},
            r"total 240 bits exceeds 218 bits, the 128-bit security bound",
        ),
        (
            {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (40, 30, 40)},
            r"total 110 bits exceeds 109 bits",
        ),
        ({"coeff_mod_bit_sizes": (60,)}, r"needs at least 2 primes"),
        ({"coeff_mod_bit_sizes": (61, 40, 60)}, r"`coeff_mod_bit_sizes\[0\]` must be between"),
        ({"coeff_mod_bit_sizes": "60,40"}, r"`coeff_mod_bit_sizes` must be a sequence"),
        (
            {"global_scale_bits": 161},
            r"leave at least 20 of the 180 data-modulus bits .*\(got 161\)",
        ),
        (
            {"coeff_mod_bit_sizes": (40, 60), "global_scale_bits": 21},
            r"leave at least 20 of the 40 data-modulus bits .*\(got 21\)",
        ),
        ({"global_scale_bits": 10}, r"`global_scale_bits` must be at least 20"),
        ({"encryption": "rsa"}, r"`encryption` must be one of asymmetric, symmetric"),
    ],
)
def test_invalid_params_are_refused_with_a_message_naming_the_field(
    kwargs: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        CKKSParams(**kwargs)


def test_params_can_be_overridden_and_lists_are_frozen_to_tuples() -> None:
    # Execute
    params = CKKSParams(
        poly_modulus_degree=16384, coeff_mod_bit_sizes=[60, 50, 50, 50, 60], global_scale_bits=50
    )

    # Assert
    assert params.coeff_mod_bit_sizes == (60, 50, 50, 50, 60)
    assert params.slots == 8192
    assert params.max_abs_sum() == 2.0 ** (210 - 50 - 1)
    assert params.max_abs_sum(weighted=True) == 2.0 ** (210 - 100 - 1)
    assert hash(params) == hash(CKKSParams(16384, (60, 50, 50, 50, 60), 50))


# ------------------------------------------------------------------ keys and the server's view


def test_server_context_is_public_and_cannot_decrypt(
    keys: ckks.CKKSKeySet, site_frame: bytes
) -> None:
    # Prepare
    server = CKKSAggregator(keys.public_context, round_index=7)
    server.add(site_frame, site_id=3)
    aggregate = server.aggregate()
    first_chunk = bytes(ckks_framing.decode_vector_frame(aggregate, kinds=(4,), what="t")[1][0])

    # Execute / Assert: the context holds no secret key, and TenSEAL refuses to decrypt with it.
    assert server.context.is_private() is False
    assert server.context.has_secret_key() is False
    with pytest.raises(ValueError, match="secret_key"):
        ts.ckks_vector_from(server.context, first_chunk).decrypt()
    with pytest.raises(ProtocolError, match="needs the secret context"):
        CKKSDecryptor(keys.public_context)
    with pytest.raises(ProtocolError, match="must not hold the CKKS secret key"):
        CKKSAggregator(keys.secret_context)
    # The key holder, with the secret context, does decrypt the same aggregate.
    summed = CKKSDecryptor(keys.secret_context).decrypt(aggregate, round_index=7)
    np.testing.assert_allclose(summed, np.linspace(-5.0, 5.0, 5000), atol=1e-6)


def test_public_context_bytes_hold_no_secret_key(keys: ckks.CKKSKeySet) -> None:
    # Prepare: the raw TenSEAL bytes inside our public key frame.
    _, _, reader = ckks_framing.open_frame(keys.public_context, kinds=(2,), what="t")
    degree, n_primes = reader.unpack(ckks_framing.KEY_BODY)
    reader.take(n_primes + ckks_framing.KEY_TAIL.size)
    (length,) = reader.unpack(ckks_framing.U64)

    # Execute
    ctx = ts.context_from(bytes(reader.take(length)))

    # Assert
    assert degree == 8192
    assert ctx.is_private() is False
    assert len(keys.public_context) < len(keys.secret_context)


def test_key_files_are_written_0600_exclusively_and_read_back(
    keys: ckks.CKKSKeySet, tmp_path: os.PathLike
) -> None:
    # Prepare: a permissive umask must not widen the secret file's mode.
    old_umask = os.umask(0)
    try:
        # Execute
        secret_path, public_path = write_key_files(keys, directory=tmp_path)
    finally:
        os.umask(old_umask)

    # Assert
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    assert read_key_file(secret_path) == keys.secret_context
    assert read_key_file(public_path) == keys.public_context
    with pytest.raises(ConfigError, match="already exists; refusing to overwrite"):
        write_key_files(keys, directory=tmp_path)


def test_group_readable_secret_key_file_is_refused(
    keys: ckks.CKKSKeySet, tmp_path: os.PathLike
) -> None:
    # Prepare
    secret_path, _ = write_key_files(keys, directory=tmp_path)
    os.chmod(secret_path, 0o640)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"accessible by group or others \(mode 0640\)"):
        read_key_file(secret_path)


def test_planted_symlink_is_not_followed_when_writing_keys(
    keys: ckks.CKKSKeySet, tmp_path: os.PathLike
) -> None:
    # Prepare: an attacker links the future secret-key path to a file they can read.
    target = tmp_path / "attacker-readable"
    target.write_bytes(b"")
    (tmp_path / f"ckks-{keys.key_id.hex()}.secret").symlink_to(target)

    # Execute / Assert
    with pytest.raises(ConfigError, match="already exists"):
        write_key_files(keys, directory=tmp_path)
    assert target.read_bytes() == b""


def test_tampered_key_file_raises_integrity_error(
    keys: ckks.CKKSKeySet, tmp_path: os.PathLike
) -> None:
    # Prepare
    _, public_path = write_key_files(keys, directory=tmp_path)
    data = bytearray(public_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    public_path.write_bytes(bytes(data))

    # Execute / Assert
    with pytest.raises(IntegrityError, match="SHA-256"):
        read_key_file(public_path)
    with pytest.raises(IntegrityError):
        CKKSAggregator(bytes(data))


# ------------------------------------------------------------------ correctness and precision


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    n_sites=st.integers(1, 4),
    length=st.integers(1, 9000),
    seed=st.integers(0, 2**32 - 1),
)
def test_encrypted_sum_equals_plaintext_sum(
    keys: ckks.CKKSKeySet, n_sites: int, length: int, seed: int
) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    inputs = {c: rng.uniform(-1e3, 1e3, size=length) for c in range(n_sites)}
    expected = sum(inputs.values())

    # Execute
    result = he_sum(inputs, keys=keys)

    # Assert: flooded, yet within the documented precision
    budget = allowed_error(keys.params, n_sites, expected)
    assert result.total.dtype == np.float64
    assert result.total.shape == (length,)
    assert np.max(np.abs(result.total - expected)) <= budget
    assert result.survivors == tuple(range(n_sites))


def test_weighted_aggregates_are_summed_by_the_server_but_refused_by_the_key_holder() -> None:
    # Prepare: server-side weights multiply each site's CKKS error by amounts the key holder
    # never sees, so no flooding can be sized for them (docs/ckks.md). A scale of 2^60 leaves
    # room for the weighted scale 2^120 in the 180-bit data modulus.
    keys = generate_keys(params=CKKSParams(global_scale_bits=60))
    rng = np.random.default_rng(2)
    inputs = {c: rng.uniform(-1e3, 1e3, size=4100) for c in range(3)}
    weights = {0: 1234.5, 1: 0.001, 2: 77.0}
    enc = CKKSEncryptor(keys.public_context)
    server = CKKSAggregator(keys.public_context, round_index=2, weighted=True)

    # Execute
    for c, v in inputs.items():
        server.add(enc.encrypt(v, site_id=c, round_index=2), site_id=c, weight=weights[c])
    aggregate = server.aggregate()

    # Assert
    header = read_frame_header(aggregate)
    assert header.kind == "aggregate" and header.weighted and header.sender is None
    assert header.contributors == (0, 1, 2) and header.n_chunks == 2
    with pytest.raises(ProtocolError, match="server-side weights"):
        CKKSDecryptor(keys.secret_context).decrypt(aggregate, round_index=2)
    with pytest.raises(ConfigError, match=r"`weights\[0\]` is missing"):
        CKKSAggregator(keys.public_context, weighted=True).add(
            enc.encrypt(inputs[0], site_id=0), site_id=0
        )


def test_precision_of_100_prescaled_sites_meets_the_documented_bound(
    keys: ckks.CKKSKeySet,
) -> None:
    # Prepare: the FL layout [n_i * u_i, n_i], entries up to 1e3; coordinate 0 has the same
    # sign everywhere so the sum reaches 1e5.
    rng = np.random.default_rng(0)
    inputs = {}
    for c in range(100):
        n_i = float(rng.integers(10, 1000))
        update = rng.uniform(-1.0, 1.0, size=63) * (1e3 / n_i)
        update[0] = 1e3 / n_i
        inputs[c] = np.append(n_i * update, n_i)
    exact = np.sum(list(inputs.values()), axis=0)
    total_weight = exact[-1]

    # Execute
    result = he_sum(inputs, keys=keys)

    # Assert
    err = np.abs(result.total - exact)
    assert exact[0] == pytest.approx(1e5)
    assert 1e3 <= total_weight <= 1e5
    assert np.max(err) <= allowed_error(keys.params, 100, exact)  # documented precision
    assert np.max(err[:-1] / total_weight) <= 1e-4  # what FedAvg needs
    assert np.max(err / np.max(np.abs(exact))) <= 1e-7  # relative precision of the sum


def test_dropped_sites_contribute_nothing_and_too_few_survivors_raise(
    keys: ckks.CKKSKeySet,
) -> None:
    # Prepare
    inputs = {c: np.full(10, float(c + 1)) for c in range(4)}

    # Execute
    result = he_sum(inputs, keys=keys, drop_before_upload=[1, 3])

    # Assert
    np.testing.assert_allclose(result.total, np.full(10, 1.0 + 3.0), atol=1e-6)
    assert result.survivors == (0, 2)
    assert result.dropped == (1, 3)
    assert set(result.bytes_per_client) == {0, 2}
    with pytest.raises(DropoutRecoveryError, match="1 site\\(s\\) survived, fewer than the 2"):
        he_sum(inputs, keys=keys, drop_before_upload=[0, 1, 2], min_survivors=2)
    with pytest.raises(DropoutRecoveryError, match="0 site"):
        he_sum(inputs, keys=keys, drop_before_upload=[0, 1, 2, 3])


def test_symmetric_encryption_needs_the_secret_context_and_sums_correctly() -> None:
    # Prepare
    keys = generate_keys(params=CKKSParams(encryption="symmetric"))
    inputs = {0: np.arange(5.0), 1: np.ones(5)}

    # Execute
    result = he_sum(inputs, keys=keys)

    # Assert
    np.testing.assert_allclose(result.total, np.arange(5.0) + 1.0, atol=1e-6)
    assert CKKSAggregator(keys.public_context).context.is_private() is False
    with pytest.raises(ProtocolError, match="symmetric CKKS encryption needs the secret"):
        CKKSEncryptor(keys.public_context)


# ------------------------------------------------------------------ coordinate subsets


def test_subset_encryption_only_touches_the_selected_coordinates(keys: ckks.CKKSKeySet) -> None:
    # Prepare: unselected coordinates are NaN, which encryption would refuse if it read them.
    n = 10_000
    mask = np.zeros(n, dtype=bool)
    mask[[5, 17, 4000, 9999]] = True
    rng = np.random.default_rng(1)
    inputs = {}
    for c in range(3):
        v = np.full(n, np.nan)
        v[mask] = rng.normal(size=int(mask.sum()))
        inputs[c] = v
    full = {c: np.nan_to_num(v) for c, v in inputs.items()}

    # Execute
    result = he_sum(inputs, keys=keys, subset=mask)
    by_index = he_sum(inputs, keys=keys, subset=np.flatnonzero(mask))
    dense = he_sum(full, keys=keys)

    # Assert
    expected = sum(full.values())
    np.testing.assert_allclose(result.total[mask], expected[mask], atol=1e-6)
    assert np.all(result.total[~mask] == 0.0)
    np.testing.assert_allclose(by_index.total, result.total, atol=1e-6)
    assert all(b < dense.bytes_per_client[c] / 2 for c, b in result.bytes_per_client.items())
    np.testing.assert_array_equal(result.encrypted_indices, np.flatnonzero(mask))
    assert result.describe()["encrypted_coordinates"] == 4
    assert result.describe()["coordinates_not_sent"] == n - 4


def test_frames_with_different_subsets_are_not_added(keys: ckks.CKKSKeySet) -> None:
    # Prepare
    enc = CKKSEncryptor(keys.public_context)
    v = np.arange(100.0)
    a = enc.encrypt(v, site_id=0, subset=np.arange(10))
    b = enc.encrypt(v, site_id=1, subset=np.arange(10, 20))
    server = CKKSAggregator(keys.public_context)
    server.add(a, site_id=0)

    # Execute / Assert
    assert read_frame_header(a).n_values == 10
    with pytest.raises(ProtocolError, match="different vector length or coordinate subset"):
        server.add(b, site_id=1)


@pytest.mark.parametrize(
    ("subset", "message"),
    [
        (np.zeros(5, dtype=bool), "has length 5"),
        (np.array([1, 1]), "repeated indices"),
        (np.array([0, 10]), r"must lie in \[0, 10\)"),
        (np.zeros(10, dtype=bool), "selects no coordinates"),
        (np.array([0.5]), "boolean mask or integer indices"),
        ([], "selects no coordinates"),
    ],
)
def test_invalid_subsets_are_refused(subset: np.ndarray, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ckks.normalize_subset(subset, 10)


# ------------------------------------------------------------------ frames and integrity


def test_truncated_update_frames_raise_integrity_error(
    keys: ckks.CKKSKeySet, site_frame: bytes
) -> None:
    # Prepare
    server = CKKSAggregator(keys.public_context, round_index=7)
    cuts = [0, 5, 40, 100, len(site_frame) // 2, len(site_frame) - 1]

    # Execute / Assert
    for cut in cuts:
        with pytest.raises(IntegrityError, match="truncated|SHA-256"):
            server.add(site_frame[:cut], site_id=3)
    assert server.contributors == ()


@pytest.mark.parametrize("position", [0, 6, 7, 20, 40, 90, 1000, -40, -1])
def test_tampered_update_frames_raise_integrity_error(
    keys: ckks.CKKSKeySet, site_frame: bytes, position: int
) -> None:
    # Prepare
    tampered = bytearray(site_frame)
    tampered[position] ^= 0x80
    server = CKKSAggregator(keys.public_context, round_index=7)

    # Execute / Assert
    with pytest.raises(IntegrityError):
        server.add(bytes(tampered), site_id=3)
    with pytest.raises(IntegrityError):
        server.add(site_frame + b"\x00", site_id=3)


def test_tenseal_deserialization_errors_become_integrity_errors(keys: ckks.CKKSKeySet) -> None:
    # Prepare: a frame whose digest is right but whose ciphertext bytes are garbage.
    frame = ckks_framing.encode_vector_frame(
        kind=3,
        key_id=keys.key_id,
        round_index=0,
        sender=1,
        n_values=3,
        layout_id=ckks_framing.layout_id(3, None),
        slots=4096,
        weighted=False,
        contributors=(1,),
        chunks=[b"not a ciphertext"],
    )
    server = CKKSAggregator(keys.public_context)

    # Execute / Assert
    with pytest.raises(IntegrityError, match="chunk 0 of site 1's update is not a valid CKKS"):
        server.add(frame, site_id=1)


def test_tampered_aggregate_raises_integrity_error(
    keys: ckks.CKKSKeySet, site_frame: bytes
) -> None:
    # Prepare
    server = CKKSAggregator(keys.public_context, round_index=7)
    server.add(site_frame, site_id=3)
    aggregate = bytearray(server.aggregate())
    aggregate[len(aggregate) // 3] ^= 0x04
    decryptor = CKKSDecryptor(keys.secret_context)

    # Execute / Assert
    with pytest.raises(IntegrityError, match="SHA-256"):
        decryptor.decrypt(bytes(aggregate))


def test_protocol_mismatches_are_refused(
    keys: ckks.CKKSKeySet, other_keys: ckks.CKKSKeySet, site_frame: bytes
) -> None:
    # Prepare
    foreign = CKKSEncryptor(other_keys.public_context).encrypt(
        np.linspace(-5.0, 5.0, 5000), site_id=4, round_index=7
    )
    server = CKKSAggregator(keys.public_context, round_index=7)
    decryptor = CKKSDecryptor(keys.secret_context, min_contributors=2)

    # Execute / Assert
    with pytest.raises(ProtocolError, match="under key set"):
        server.add(foreign, site_id=4)
    with pytest.raises(ProtocolError, match="claims to be from 3"):
        server.add(site_frame, site_id=5)
    with pytest.raises(ProtocolError, match="for round 7, not 8"):
        CKKSAggregator(keys.public_context, round_index=8).add(site_frame, site_id=3)
    with pytest.raises(ConfigError, match="aggregator is unweighted"):
        server.add(site_frame, site_id=3, weight=2.0)
    server.add(site_frame, site_id=3)
    with pytest.raises(ProtocolError, match="already contributed"):
        server.add(site_frame, site_id=3)
    with pytest.raises(ProtocolError, match="site update frame; expected a aggregate"):
        decryptor.decrypt(site_frame)
    with pytest.raises(ProtocolError, match="sums 1 site\\(s\\); at least 2"):
        decryptor.decrypt(server.aggregate())
    with pytest.raises(DropoutRecoveryError, match="no site update was added"):
        CKKSAggregator(keys.public_context).aggregate()


# ------------------------------------------------------------------ input validation


def test_inputs_that_would_break_the_sum_are_refused(keys: ckks.CKKSKeySet) -> None:
    with pytest.raises(DataError, match="same length"):
        he_sum({0: np.ones(3), 1: np.ones(4)}, keys=keys)
    with pytest.raises(DataError, match="site 1 has non-finite"):
        he_sum({0: np.ones(3), 1: np.array([1.0, np.inf, 0.0])}, keys=keys)
    with pytest.raises(ConfigError, match=r"`weights\[0\]` must be finite and non-zero"):
        he_sum({0: np.ones(3)}, keys=keys, weights={0: 0.0})
    with pytest.raises(ConfigError, match="no entry for surviving sites \\[1\\]"):
        he_sum({0: np.ones(3), 1: np.ones(3)}, keys=keys, weights={0: 1.0})
    with pytest.raises(ConfigError, match="unknown sites \\[9\\]"):
        he_sum({0: np.ones(3)}, keys=keys, drop_before_upload=[9])
    with pytest.raises(DataError, match="not below the CKKS bound"):
        he_sum({0: np.full(3, 2.0**60)}, keys=keys, weights={0: 1.0})


def test_weights_need_room_in_the_modulus() -> None:
    # Prepare: one 40-bit data prime cannot hold a value at scale 2**(2 * 20).
    keys = generate_keys(params=CKKSParams(coeff_mod_bit_sizes=(40, 40), global_scale_bits=20))

    # Execute / Assert
    with pytest.raises(ConfigError, match="no room for server-side weights"):
        CKKSAggregator(keys.public_context, weighted=True)


# ------------------------------------------------------------------ dependencies and timing


def test_missing_tenseal_raises_optional_dependency_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: make `import tenseal` fail as it does when the package is absent.
    monkeypatch.setitem(sys.modules, "tenseal", None)

    # Execute / Assert
    with pytest.raises(OptionalDependencyError, match="pip install 'tenseal==0.3.\\*'"):
        generate_keys()


def test_importing_the_module_loads_neither_tenseal_nor_torch() -> None:
    # Execute
    code = (
        "import sys, securefed.crypto.ckks; "
        "print(sorted(m for m in ('tenseal', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    # Assert
    assert out.stdout.strip() == "[]"


def test_raw_tenseal_reference_times_both_variants() -> None:
    # Execute
    plain = raw_tenseal_reference(np.ones(10), n_clients=2)
    with_transport = raw_tenseal_reference(np.ones(10), n_clients=2, include_serialization=True)

    # Assert
    assert 0.0 < plain < 10.0
    assert 0.0 < with_transport < 10.0
    with pytest.raises(ConfigError, match="`n_clients` must be at least 1"):
        raw_tenseal_reference(np.ones(10), n_clients=0)


# ------------------------------------------------------------------ flooding


@pytest.mark.parametrize("encryption", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("scale_bits", [100, 40])
def test_measured_ckks_error_stays_below_the_bound_the_flooding_is_sized_for(
    encryption: str, scale_bits: int
) -> None:
    # Prepare: 10 sites encrypt zeros, so the raw decryption of the sum *is* its CKKS error
    # (SEAL's float64 decoding of small integer coefficients is exact to 1e-16 relative).
    sizes = (60, 60, 60, 38) if scale_bits == 100 else (60, 40, 40, 60)
    params = CKKSParams(
        coeff_mod_bit_sizes=sizes, global_scale_bits=scale_bits, encryption=encryption
    )
    keys = generate_keys(params=params)
    enc = CKKSEncryptor(keys.secret_context)
    server = CKKSAggregator(keys.public_context)
    k = 10
    for site in range(k):
        server.add(enc.encrypt(np.zeros(params.slots), site_id=site), site_id=site)
    _, blobs = ckks_framing.decode_vector_frame(server.aggregate(), kinds=(4,), what="t")
    context = ckks.keys.load_key(keys.secret_context, kinds=(1,)).context

    # Execute: the raw decryption, which only the test (never the key holder) performs.
    raw = np.asarray(ts.ckks_vector_from(context, bytes(blobs[0])).decrypt())

    # Assert: t bounds the observed error with room to spare, at both scales.
    t = params.error_bound(k)
    assert 0.0 < np.max(np.abs(raw)) <= t
    assert np.max(np.abs(raw)) * 2.0**scale_bits < 0.25 * k * ckks.flooding.fresh_error_bound(8192)


def test_flooding_noise_has_the_sigma_it_is_sized_for_and_is_rounded_to_its_grid(
    keys: ckks.CKKSKeySet,
) -> None:
    # Prepare
    from securefed.crypto.ckks.flooding import quantum

    enc = CKKSEncryptor(keys.public_context)
    server = CKKSAggregator(keys.public_context)
    for site in range(3):
        server.add(enc.encrypt(np.full(8192, 1.5), site_id=site), site_id=site)
    decryptor = CKKSDecryptor(keys.secret_context, max_contributors=50)

    # Execute
    first = decryptor.decrypt(server.aggregate())
    second = decryptor.decrypt(server.aggregate())

    # Assert: sized for the pinned 50 sites; fresh CSPRNG noise on every decryption.
    sigma = keys.params.flooding_sigma(50)
    assert decryptor.last_sigma == sigma == pytest.approx(50 * keys.params.flooding_sigma(1))
    residual = first - 4.5
    assert 0.9 * sigma < np.std(residual) < 1.1 * sigma
    assert abs(np.mean(residual)) < 0.1 * sigma
    assert np.max(np.abs(residual)) <= keys.params.precision(50)
    grid = quantum(sigma)
    np.testing.assert_array_equal(np.round(first / grid) * grid, first)
    assert not np.array_equal(first, second)


def test_flooding_sigma_follows_the_published_formula() -> None:
    # Prepare: LMSS 2022: sigma = sqrt(24 N alpha) 2^(s/2) t, t = k * B / scale.
    from securefed.crypto.ckks import flooding

    params = CKKSParams()
    bound = flooding.fresh_error_bound(8192)

    # Execute
    sigma = params.flooding_sigma(7, queries=1000)

    # Assert
    t = 7 * bound / 2.0**100
    assert sigma == pytest.approx(np.sqrt(24 * 8192 * 1000) * 2.0**20 * t)
    assert params.error_bound(7) == pytest.approx(t)
    # the defaults meet the documented bound with room for thousands of sites
    params.check_precision(1000)
    assert params.precision(100) < 2e-8
    with pytest.raises(ConfigError, match="above the documented bound 1e-06"):
        CKKSParams(coeff_mod_bit_sizes=(60, 40, 40, 60), global_scale_bits=40).check_precision(2)


def test_flooding_noise_comes_from_os_urandom_not_from_seeded_generators(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    from securefed.crypto.ckks import flooding

    # Execute: seeding numpy's global generator does not repeat the noise ...
    np.random.seed(0)
    first = flooding.gaussian(1000)
    np.random.seed(0)
    second = flooding.gaussian(1000)
    # ... while fixing the OS CSPRNG's output does (so that is where it comes from).
    monkeypatch.setattr(flooding.os, "urandom", lambda n: bytes(range(n)))
    pinned = flooding.gaussian(1000), flooding.gaussian(1000)

    # Assert
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(*pinned)
    assert abs(np.mean(first)) < 0.2 and 0.9 < np.std(first) < 1.1


def test_an_update_fills_every_slot_of_every_ciphertext_but_the_last(keys) -> None:
    """Packing: one flat vector across ciphertexts of N/2 slots, no per-tensor padding.

    So the bytes a site sends are ceil(values / 4096) ciphertexts, each the same size whatever
    it holds (2 polynomials x 8192 coefficients x 3 data primes x 8 bytes, 24x float32 for a
    full one; docs/benchmarks.md, "Bytes on the wire").
    """
    # Prepare
    slots = keys.params.slots
    enc = CKKSEncryptor(keys.public_context)

    # Execute: two full ciphertexts and one holding a single value.
    full = enc.encrypt(np.ones(2 * slots), site_id=0, round_index=1)
    spill = enc.encrypt(np.ones(2 * slots + 1), site_id=0, round_index=1)

    # Assert
    assert (slots, read_frame_header(full).n_chunks) == (4096, 2)
    assert read_frame_header(spill).n_chunks == 3
    per_ciphertext = len(spill) - len(full)
    assert per_ciphertext > 2 * 8192 * 3 * 7  # 60-bit residues barely compress
    assert len(full) / (4 * 2 * slots) < 24.1  # every slot used: 24x float32, no more
