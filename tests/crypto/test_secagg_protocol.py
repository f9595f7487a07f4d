"""End-to-end tests of SecAgg/SecAgg+: correctness under dropouts, privacy, integrity, isolation."""

from __future__ import annotations

import collections.abc
import inspect
import math
import os
import subprocess
import sys
import tracemalloc
import typing

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefed.crypto import (
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    default_threshold,
    masking_keystream_bytes,
)
from securefed.crypto.graph import build_graph
from securefed.crypto.messages import (
    MaskedInput,
    RelayedShares,
    UnmaskRequest,
    UnmaskShares,
)
from securefed.crypto.packing import pack_words
from securefed.errors import (
    ConfigError,
    DataError,
    DropoutRecoveryError,
    IntegrityError,
    ProtocolError,
)
from securefed.protocol.harness import secure_sum

# -- a hand-driven round, so tests can intercept and alter the bytes ---------------------------


class Round:
    """One round driven step by step; every message passes through the test as bytes."""

    def __init__(self, n, *, dim=16, config=None, round_index=0, seed=None):
        self.config = config or SecAggConfig(n_clients=n, clip_range=100.0)
        self.dim = dim
        self.server = SecAggServer(
            config=self.config, round_index=round_index, site_ids=range(n), dim=dim, graph_seed=seed
        )
        self.clients = {
            s: SecAggClient(site_id=s, config=self.config, round_index=round_index, dim=dim)
            for s in range(n)
        }
        rng = np.random.default_rng(n)
        self.inputs = {s: rng.uniform(-50, 50, size=dim) for s in range(n)}

    def advertise(self):
        for client in self.clients.values():
            self.server.receive_advertise_keys(client.advertise_keys())
        self.public_keys = self.server.public_keys()
        return self.public_keys

    def share(self, skip=()):
        self.advertise()
        for s, client in self.clients.items():
            if s not in skip:
                self.server.receive_encrypted_shares(client.share_keys(self.public_keys))
        self.relays = dict(self.server.relay_shares())
        return self.relays

    def upload(self, skip=()):
        self.share()
        self.uploads = {
            s: self.clients[s].masked_input(relay, values=self.inputs[s])
            for s, relay in self.relays.items()
            if s not in skip
        }
        for message in self.uploads.values():
            self.server.receive_masked_input(message)
        self.request = self.server.unmask_request()
        return self.uploads

    def finish(self, upload_skip=(), answer_skip=()):
        self.upload(skip=upload_skip)
        for s in self.server.survivors:
            if s not in answer_skip:
                self.server.receive_unmask_shares(self.clients[s].unmask(self.request))
        return self.server.aggregate()


def _opposite_on_cycle(graph, start):
    """Site four hops from ``start`` on a degree-2 graph of 8 sites (a single cycle)."""
    previous, current = None, start
    for _ in range(4):
        previous, current = current, min(graph.neighbours(current) - {previous})
    return current


def _exact_sum(inputs, sites):
    return np.array([math.fsum(col) for col in zip(*(inputs[s] for s in sites), strict=True)])


# -- correctness -----------------------------------------------------------------------------


@st.composite
def _scenarios(draw):
    n = draw(st.integers(min_value=2, max_value=7))
    neighbors = draw(st.one_of(st.none(), st.integers(min_value=2, max_value=n)))
    probe = SecAggConfig(n_clients=n, neighbors=neighbors)
    m = probe.neighbourhood_size
    threshold = draw(st.integers(min_value=m // 2 + 1, max_value=m))
    # Packed rings (16, 21, 30, 33, 47 bits) as well as the word-sized ones: the residues
    # mod 2^k must cancel the masks exactly, in uint32 words and in uint64 ones.
    ring_bits = draw(st.sampled_from([16, 21, 30, 32, 33, 47, 64]))
    fate = draw(st.lists(st.sampled_from("kkkkbua"), min_size=n, max_size=n))
    dim = draw(st.integers(min_value=1, max_value=12))
    return n, neighbors, threshold, ring_bits, fate, dim


def _should_succeed(config, graph, fate):
    """Oracle: the round survives iff every reconstruction has t answering holders."""
    t = config.threshold
    everyone = set(graph.sites)
    shared = {s for s in everyone if fate[s] != "b"}
    uploaded = {s for s in shared if fate[s] != "u"}
    answered = {s for s in uploaded if fate[s] != "a"}
    dropped = shared - uploaded
    if min(len(shared), len(uploaded), len(answered)) < t:
        return False
    if any(len(graph.neighbourhood(s) & shared) < t for s in shared):
        return False
    if any(len(graph.neighbourhood(s) & uploaded) < t for s in uploaded | dropped):
        return False
    if not graph.is_complete and not graph.is_connected(uploaded):
        return False
    return all(len(graph.neighbourhood(s) & answered) >= t for s in uploaded | dropped)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=_scenarios(), data=st.data())
def test_masked_sum_equals_plaintext_sum_under_random_dropouts(scenario, data):
    # Prepare
    n, neighbors, threshold, ring_bits, fate, dim = scenario
    config = SecAggConfig(
        n_clients=n, threshold=threshold, neighbors=neighbors, ring_bits=ring_bits, clip_range=1e3
    )
    value = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)
    inputs = {s: np.array(data.draw(st.lists(value, min_size=dim, max_size=dim))) for s in range(n)}
    seed = os.urandom(32)
    graph = build_graph(sites=range(n), neighbors=neighbors, seed=seed, round_index=5)
    drops = {
        "drop_before_shares": [s for s in range(n) if fate[s] == "b"],
        "drop_before_upload": [s for s in range(n) if fate[s] == "u"],
        "drop_after_upload": [s for s in range(n) if fate[s] == "a"],
    }

    # Execute / Assert
    if not _should_succeed(config, graph, fate):
        with pytest.raises(DropoutRecoveryError):
            secure_sum(inputs, config=config, round_index=5, graph_seed=seed, **drops)
        return
    result = secure_sum(inputs, config=config, round_index=5, graph_seed=seed, **drops)
    included = [s for s in range(n) if fate[s] in "ka"]
    assert result.survivors == tuple(included)
    assert result.dropped == tuple(s for s in range(n) if fate[s] in "bu")
    assert result.dropped_after_upload == tuple(s for s in range(n) if fate[s] == "a")
    error = np.abs(result.total - _exact_sum(inputs, included))
    assert np.all(error <= len(included) * config.codec.quantum)


def test_secagg_plus_with_many_sites_sums_correctly_and_shares_only_with_neighbours():
    # Prepare: degree 6 (m = 7, t = 5); one site vanishes before upload and one after, so no
    # neighbourhood loses more than 2 of its 7 members.
    n, dim = 24, 40
    config = SecAggConfig(n_clients=n, neighbors=6, clip_range=10.0)
    rng = np.random.default_rng(7)
    inputs = {s: rng.uniform(-10, 10, size=dim) for s in range(n)}

    # Execute
    result = secure_sum(
        inputs, config=config, round_index=11, drop_before_upload=[5], drop_after_upload=[17]
    )
    complete = secure_sum(
        {s: inputs[s] for s in range(7)}, config=SecAggConfig(n_clients=7), round_index=11
    )

    # Assert
    survivors = [s for s in range(n) if s != 5]
    assert result.survivors == tuple(survivors)
    error = np.abs(result.total - _exact_sum(inputs, survivors))
    assert np.all(error <= len(survivors) * config.codec.quantum)
    assert config.threshold == 5 and config.protocol == "SecAgg+"
    # Same degree as a complete graph of 7 sites, so the same traffic per site despite n = 24.
    assert result.bytes_sent[0] == complete.bytes_sent[0]


def test_secure_sum_reports_traffic_timing_codec_and_clipping():
    # Prepare
    config = SecAggConfig(n_clients=4, clip_range=10.0)
    inputs = {s: np.full(50, 1.0 + s) for s in range(4)}
    inputs[2] = np.concatenate([np.full(47, 3.0), [11.0, -12.0, 10.5]])

    # Execute
    result = secure_sum(inputs, config=config, round_index=1, drop_before_upload=[3])

    # Assert
    assert result.clipped == 3
    expected = inputs[0] + inputs[1] + np.clip(inputs[2], -10, 10)
    np.testing.assert_allclose(result.total, expected, atol=3 * config.codec.quantum, rtol=0)
    assert result.codec is config.codec
    assert set(result.bytes_sent) == set(range(4))
    assert result.bytes_sent[0] - result.bytes_sent[3] > 50 * 8  # the masked vector
    assert all(v > 0 for v in result.bytes_received.values())
    assert all(result.client_seconds[s] >= result.client_step_seconds[s]["mask"] for s in range(3))
    assert "mask" not in result.client_step_seconds[3]
    assert result.server_seconds > 0
    assert result.describe()["survivors"] == [0, 1, 2]


def test_masking_keystream_bytes_counts_masks_and_rounding_coins():
    # Prepare
    complete = SecAggConfig(n_clients=10)
    sparse = SecAggConfig(n_clients=10, neighbors=4, ring_bits=32, clip_range=100.0)

    # Execute / Assert
    assert masking_keystream_bytes(config=complete, dim=1000) == 10 * 8000 + 8000
    assert masking_keystream_bytes(config=sparse, dim=1000) == 5 * 4000 + 8000


# -- configuration ---------------------------------------------------------------------------


def test_default_threshold_is_a_two_thirds_majority_of_the_neighbourhood():
    # Execute / Assert
    assert [default_threshold(neighbourhood_size=m) for m in (2, 3, 4, 5, 10, 100)] == [
        2,
        3,
        3,
        4,
        7,
        67,
    ]
    assert SecAggConfig(n_clients=10).threshold == 7
    assert SecAggConfig(n_clients=20, neighbors=6).threshold == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_clients": 1}, "at least 2"),
        ({"n_clients": 5, "threshold": 7}, r"at most the number of sites \(got 7 > 5\)"),
        ({"n_clients": 5, "threshold": 2}, "strict majority"),
        ({"n_clients": 20, "neighbors": 4, "threshold": 6}, "neighbourhood"),
        ({"n_clients": 5, "neighbors": 1}, "`neighbors`"),
        ({"n_clients": 5, "ring_bits": 7}, "`ring_bits` must be from 8 to 64"),
        ({"n_clients": 5, "ring_bits": 65}, "`ring_bits` must be from 8 to 64"),
        ({"n_clients": 10, "ring_bits": 32, "clip_range": 1e9}, "32-bit ring"),
    ],
)
def test_invalid_configs_raise_config_error(kwargs, match):
    # Execute / Assert
    with pytest.raises(ConfigError, match=match):
        SecAggConfig(**kwargs)


def test_describe_names_protocol_and_parameters():
    # Execute
    classic = SecAggConfig(n_clients=5).describe()
    plus = SecAggConfig(n_clients=30, neighbors=8, ring_bits=32, clip_range=50.0).describe()

    # Assert
    assert classic["protocol"] == "SecAgg" and plus["protocol"] == "SecAgg+"
    for key in ("threshold", "neighbors", "ring_bits", "frac_bits", "quantum", "clip_range"):
        assert key in plus
    assert plus["headroom_bits"] >= math.floor(math.log2(30))
    assert plus["neighbourhood_size"] == 9


# -- dropouts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "match"),
    [
        ({"drop_before_shares": [0, 1]}, "shared their keys"),
        ({"drop_before_upload": [0, 1]}, "uploaded masked inputs"),
        ({"drop_after_upload": [0, 1]}, "answered the unmasking round"),
    ],
)
def test_fewer_than_threshold_survivors_raise_dropout_recovery_error(drop, match):
    # Prepare
    config = SecAggConfig(n_clients=5)  # t = 4
    inputs = {s: np.ones(3) for s in range(5)}

    # Execute / Assert
    with pytest.raises(DropoutRecoveryError, match=match):
        secure_sum(inputs, config=config, round_index=0, **drop)


def test_a_round_may_run_with_fewer_invited_sites_down_to_the_threshold():
    # Prepare: configured for up to 6 sites (t = 5).
    config = SecAggConfig(n_clients=6, clip_range=10.0)
    inputs = {s: np.full(4, float(s)) for s in (1, 3, 4, 8, 9)}

    # Execute
    result = secure_sum(inputs, config=config, round_index=2)

    # Assert
    np.testing.assert_allclose(result.total, np.full(4, 25.0), atol=5 * config.codec.quantum)
    assert result.survivors == (1, 3, 4, 8, 9)
    with pytest.raises(DropoutRecoveryError, match="only 4 of 4 sites advertised keys"):
        secure_sum({s: inputs[s] for s in (1, 3, 4, 8)}, config=config, round_index=2)


def test_disconnected_secagg_plus_survivors_abort_instead_of_leaking_partial_sums():
    # Prepare: a cycle (degree 2) with threshold 2 of 3; two far-apart sites vanish.
    config = SecAggConfig(n_clients=8, neighbors=2, threshold=2)
    seed = os.urandom(32)
    graph = build_graph(sites=range(8), neighbors=2, seed=seed, round_index=0)
    far = _opposite_on_cycle(graph, 0)
    inputs = {s: np.ones(3) for s in range(8)}

    # Execute / Assert
    with pytest.raises(DropoutRecoveryError, match="disconnected"):
        secure_sum(
            inputs, config=config, round_index=0, graph_seed=seed, drop_before_upload=[0, far]
        )


def test_sites_refuse_to_unmask_a_disconnected_or_too_small_survivor_set():
    # Prepare: a server that would lie in its unmask request is out of scope, but the sites'
    # own checks still hold.
    seed = os.urandom(32)
    config = SecAggConfig(n_clients=8, neighbors=2, threshold=2)
    run = Round(8, config=config, seed=seed)
    run.upload()
    graph = build_graph(sites=range(8), neighbors=2, seed=seed, round_index=0)
    far = _opposite_on_cycle(graph, 1)
    split = UnmaskRequest(
        round_index=0, survivors=tuple(s for s in range(8) if s not in (1, far)), dropped=()
    ).to_bytes()
    tiny = UnmaskRequest(round_index=0, survivors=(2,), dropped=()).to_bytes()
    helper = next(s for s in range(8) if s not in (1, far))

    # Execute / Assert
    with pytest.raises(DropoutRecoveryError, match="disconnected"):
        run.clients[helper].unmask(split)
    with pytest.raises(DropoutRecoveryError, match="refusing to unmask"):
        run.clients[helper].unmask(tiny)


# -- privacy ---------------------------------------------------------------------------------


def _chi_square_bound(dof: int, z: float = 4.75) -> float:
    # Wilson-Hilferty upper quantile of chi^2(dof) at ~1e-6 tail probability.
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _byte_chi_square(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    expected = len(data) / 256
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("ring_bits", [20, 30, 32, 64])
def test_a_single_masked_vector_looks_uniform_and_uncorrelated(ring_bits):
    # Packed rings too: what goes on the wire is the low k bits of word-sized masks, and
    # those must be uniform in Z_(2^k) (a mask narrower than k bits would leave the top bits
    # of the encoding in the clear).
    # Prepare: a structured input (small values, many repeats) that is far from uniform.
    dim = 8192
    config = SecAggConfig(n_clients=3, ring_bits=ring_bits, clip_range=100.0)
    run = Round(3, dim=dim, config=config)
    run.inputs = {s: np.sin(np.arange(dim) / 50.0) * (s + 1) for s in range(3)}

    # Execute
    run.upload()
    masked = MaskedInput.from_bytes(run.uploads[0]).words
    plain, _ = config.codec.encode(run.inputs[0])

    # Assert
    bound = _chi_square_bound(255)
    assert _byte_chi_square(bytes(pack_words(masked, ring_bits))) < bound
    # The test can tell structure apart: the same packing of the unmasked encoding fails it.
    assert _byte_chi_square(bytes(pack_words(plain, ring_bits))) > bound
    top_bits = (masked >> np.array(ring_bits - 4, dtype=masked.dtype)).astype(np.int64)
    buckets = np.bincount(top_bits, minlength=16)
    assert float(((buckets - dim / 16) ** 2 / (dim / 16)).sum()) < _chi_square_bound(15)
    as_float = masked.astype(np.float64)
    correlation = np.corrcoef(as_float, run.inputs[0])[0, 1]
    assert abs(correlation) < 5 / math.sqrt(dim)


def _walk(value, seen=None):
    """Yield every object reachable from a server's attributes (containers and objects)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    yield value
    if isinstance(value, dict) or hasattr(value, "items") and not isinstance(value, type):
        try:
            items = list(value.items())
        except TypeError:
            items = []
        for k, v in items:
            yield from _walk(k, seen)
            yield from _walk(v, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _walk(v, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        for v in vars(value).values():
            yield from _walk(v, seen)


def test_server_never_holds_an_individual_plaintext_or_a_dropped_sites_secret():
    # Prepare
    run = Round(5, dim=64)
    dropped_key = run.clients[4]._mask_key.private_bytes_raw()
    dropped_seed = run.clients[4]._seed

    # Execute: site 4 shares keys then drops, so its mask key is reconstructed.
    total = run.finish(upload_skip=[4])

    # Assert
    np.testing.assert_allclose(total, _exact_sum(run.inputs, range(4)), atol=4e-6)
    reachable = list(_walk(run.server))
    arrays = [v for v in reachable if isinstance(v, np.ndarray)]
    assert len(arrays) == 2  # the ring sum (now unmasked) and the decoded total
    quantum = run.config.codec.quantum
    for array in arrays:
        values = run.config.codec.decode(array) if array.dtype.kind == "u" else array
        for s in range(5):
            assert not np.allclose(values, run.inputs[s], atol=quantum, rtol=0)
    blobs = [bytes(v) for v in reachable if isinstance(v, (bytes, bytearray))]
    assert dropped_key not in blobs and dropped_seed not in blobs


def test_server_interface_takes_and_returns_only_bytes():
    # Prepare
    hints = {
        name: typing.get_type_hints(getattr(SecAggServer, name))
        for name, member in inspect.getmembers(SecAggServer, inspect.isfunction)
        if not name.startswith("_")
    }

    # Execute / Assert: every public step takes only bytes; the only array out is the sum.
    assert hints, "SecAggServer exposes no steps"
    for name, hint in hints.items():
        params = {k: v for k, v in hint.items() if k != "return"}
        assert all(v is bytes for v in params.values()), name
    assert hints["aggregate"]["return"] is np.ndarray
    assert hints["relay_shares"]["return"] == collections.abc.Mapping[int, bytes]


def test_masked_upload_is_fresh_randomness_not_numpy_or_simulation_seeds():
    # Prepare
    uploads = []
    for _ in range(2):
        np.random.seed(0)
        run = Round(3, dim=32)
        uploads.append(run.upload()[0])

    # Execute / Assert: same numpy seed, same inputs, different masks.
    first = MaskedInput.from_bytes(uploads[0]).words
    second = MaskedInput.from_bytes(uploads[1]).words
    assert not np.array_equal(first, second)


def test_secure_sum_leaves_numpy_global_rng_untouched():
    # Prepare
    np.random.seed(2024)
    before = np.random.get_state()
    inputs = {s: np.linspace(-1, 1, 20) for s in range(4)}

    # Execute
    secure_sum(
        inputs,
        config=SecAggConfig(n_clients=4, clip_range=2.0),
        round_index=0,
        drop_before_upload=[1],
    )
    after = np.random.get_state()

    # Assert
    assert before[0] == after[0] and before[2:] == after[2:]
    np.testing.assert_array_equal(before[1], after[1])


def test_crypto_package_imports_and_runs_without_torch_or_tenseal():
    # Prepare
    code = (
        "import sys, numpy as np\n"
        "import securefed.crypto, securefed.crypto.secagg\n"
        "from securefed.crypto import SecAggConfig\n"
        "from securefed.protocol.harness import secure_sum\n"
        "r = secure_sum({0: np.ones(4), 1: np.ones(4)}, config=SecAggConfig(n_clients=2), "
        "round_index=0)\n"
        "assert abs(r.total.sum() - 8) < 1e-6\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tenseal'))\n"
        "assert not bad, bad\n"
    )

    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )

    # Assert
    assert proc.returncode == 0, proc.stderr


# -- integrity and protocol order ------------------------------------------------------------


def test_tampered_sealed_share_fails_its_tag_at_the_recipient():
    # Prepare
    run = Round(4)
    run.share()
    relay = RelayedShares.from_bytes(run.relays[2])
    sender, sealed = relay.sealed[0]
    flipped = bytearray(sealed)
    flipped[-1] ^= 0x01
    forged = RelayedShares(
        round_index=0, recipient=2, sealed=((sender, bytes(flipped)), *relay.sealed[1:])
    ).to_bytes()

    # Execute / Assert
    with pytest.raises(IntegrityError, match="AES-GCM tag check failed"):
        run.clients[2].masked_input(forged, values=run.inputs[2])


def test_share_relabelled_to_another_sender_fails_its_tag():
    # Prepare
    run = Round(4)
    run.share()
    relay = RelayedShares.from_bytes(run.relays[0])
    (a, sealed_a), (b, sealed_b) = relay.sealed[:2]
    swapped = RelayedShares(
        round_index=0, recipient=0, sealed=((a, sealed_b), (b, sealed_a), *relay.sealed[2:])
    ).to_bytes()

    # Execute / Assert
    with pytest.raises(IntegrityError, match="AES-GCM"):
        run.clients[0].masked_input(swapped, values=run.inputs[0])


def test_relay_for_another_site_is_rejected():
    # Prepare
    run = Round(4)
    run.share()

    # Execute / Assert
    with pytest.raises(ProtocolError, match="addressed to site 1"):
        run.clients[0].masked_input(run.relays[1], values=run.inputs[0])


@pytest.mark.parametrize(
    ("words", "ring_bits", "match"),
    [
        (np.zeros(15, dtype=np.uint64), 64, "has 15 words, expected 16"),
        (np.zeros(17, dtype=np.uint64), 64, "has 17 words, expected 16"),
        (np.zeros(16, dtype=np.uint32), 32, "32-bit ring, expected 64"),
        (np.zeros(16, dtype=np.uint32), 30, "30-bit ring, expected 64"),
    ],
)
def test_server_rejects_masked_vectors_of_the_wrong_shape(words, ring_bits, match):
    # Prepare
    run = Round(3)
    run.share()
    message = MaskedInput(round_index=0, sender=1, ring_bits=ring_bits, words=words).to_bytes()

    # Execute / Assert
    with pytest.raises(IntegrityError, match=match):
        run.server.receive_masked_input(message)


def test_a_narrower_ring_than_the_runs_is_refused_before_it_is_unpacked():
    # Review 39: a site declaring an 8-bit ring (the run's is 64) with a long vector made the
    # server unpack it into words of 8 bytes first: 4x-8x its message in memory.
    run = Round(3)
    run.share()
    words = np.zeros(2_000_000, dtype=np.uint32)
    message = MaskedInput(round_index=0, sender=1, ring_bits=8, words=words).to_bytes()

    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="8-bit ring, expected 64"):
            run.server.receive_masked_input(message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(message) / 4


@pytest.mark.parametrize(
    ("byte", "bit", "match"),
    [
        # Site 2's Lagrange weight among holders {0, 1, 2} is 1, so flipping bit 8 moves the
        # reconstructed key by 256: still 32 bytes, but not the advertised key pair.
        (1, 0x01, "does not match its advertised public key"),
        # A high bit pushes the interpolated value far outside the 32-byte secret range.
        (50, 0x10, "not a 32-byte secret"),
    ],
)
def test_corrupted_key_share_is_detected_when_reconstructing_a_dropped_key(byte, bit, match):
    # Prepare: 4 sites, t = 3, site 3 drops before upload; all three survivors must answer.
    run = Round(4)
    run.upload(skip=[3])
    honest = [run.clients[s].unmask(run.request) for s in (0, 1)]
    answer = UnmaskShares.from_bytes(run.clients[2].unmask(run.request))
    owner, share = answer.key_shares[0]
    damaged = bytearray(share)
    damaged[byte] ^= bit
    corrupted = UnmaskShares(
        round_index=0,
        sender=2,
        seed_shares=answer.seed_shares,
        key_shares=((owner, bytes(damaged)),),
    ).to_bytes()
    for message in [*honest, corrupted]:
        run.server.receive_unmask_shares(message)

    # Execute / Assert
    with pytest.raises(IntegrityError, match=match):
        run.server.aggregate()


def test_messages_from_another_round_are_rejected():
    # Prepare
    old = Round(3, round_index=1)
    stale = old.clients[0].advertise_keys()
    run = Round(3, round_index=2)

    # Execute / Assert
    with pytest.raises(ProtocolError, match="round 1, this is round 2"):
        run.server.receive_advertise_keys(stale)


def test_duplicate_and_out_of_order_messages_are_rejected():
    # Prepare
    run = Round(3)
    run.upload()

    # Execute / Assert
    with pytest.raises(ProtocolError, match="called in phase UNMASK"):
        run.server.receive_masked_input(run.uploads[0])
    fresh = Round(3)
    fresh.share()
    message = fresh.clients[0].masked_input(fresh.relays[0], values=fresh.inputs[0])
    fresh.server.receive_masked_input(message)
    with pytest.raises(ProtocolError, match="already received"):
        fresh.server.receive_masked_input(message)
    with pytest.raises(ProtocolError, match="called in phase MASK"):
        fresh.server.aggregate()
    with pytest.raises(ProtocolError, match="called in phase UNMASK"):
        fresh.clients[0].share_keys(fresh.public_keys)


def test_invalid_inputs_to_secure_sum_are_rejected():
    # Prepare
    config = SecAggConfig(n_clients=3)

    # Execute / Assert
    with pytest.raises(DataError, match="has 4 sites"):
        secure_sum({s: np.ones(2) for s in range(4)}, config=config, round_index=0)
    with pytest.raises(DataError, match="length 3"):
        secure_sum({0: np.ones(2), 1: np.ones(2), 2: np.ones(3)}, config=config, round_index=0)
    with pytest.raises(DataError, match="non-finite"):
        secure_sum(
            {0: np.ones(2), 1: np.ones(2), 2: np.array([1.0, np.nan])},
            config=config,
            round_index=0,
        )
    with pytest.raises(ConfigError, match="both"):
        secure_sum(
            {s: np.ones(2) for s in range(3)},
            config=config,
            round_index=0,
            drop_before_upload=[1],
            drop_after_upload=[1],
        )
