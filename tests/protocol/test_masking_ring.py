"""The automatic masking ring: the fewest bits whose rounding meets the tolerance, FedAvg within it.

The FedAvg checks use real model updates: the SmallCNN (56k parameters) trained a few SGD
steps at each site on its own synthetic images, so the update vectors have the magnitudes,
signs and sparsity of real training, not of uniform noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from securefed.config import RunConfig
from securefed.crypto.fixedpoint import AUTO_RING_TOLERANCE, FixedPointCodec, choose_ring_bits
from securefed.crypto.roster import Roster
from securefed.crypto.secagg import SecAggConfig
from securefed.crypto.secagg.active import pinned_config
from securefed.errors import ConfigError, ProtocolError
from securefed.models import ModelSpec, build_model
from securefed.protocol.harness import secure_sum
from securefed.protocol.modes.masking import secagg_config


def _site_updates(sizes: list[int], *, seed: int = 0) -> tuple[dict[int, np.ndarray], int]:
    """``[n_i u_i..., n_i]`` per site: u_i a real SmallCNN update after 3 SGD steps."""
    torch.manual_seed(seed)
    model = build_model(name="cnn", spec=ModelSpec(in_channels=1, num_classes=4)).module
    start = [p.detach().clone() for p in model.parameters()]
    inputs = {}
    for site, n in enumerate(sizes):
        local = build_model(name="cnn", spec=ModelSpec(in_channels=1, num_classes=4)).module
        with torch.no_grad():
            for p, p0 in zip(local.parameters(), start, strict=True):
                p.copy_(p0)
        opt = torch.optim.SGD(local.parameters(), lr=0.5, momentum=0.5)
        gen = torch.Generator().manual_seed(seed * 100 + site)
        x = torch.randn(32, 1, 28, 28, generator=gen) + site  # a shifted site distribution
        y = torch.randint(0, 4, (32,), generator=gen)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(local(x), y).backward()
            opt.step()
        update = torch.cat(
            [(p.detach() - p0).flatten() for p, p0 in zip(local.parameters(), start, strict=True)]
        ).double()
        inputs[site] = np.concatenate([n * update.numpy(), [float(n)]])
    return inputs, int(sum(p.numel() for p in model.parameters()))


def _fedavg(total: np.ndarray) -> np.ndarray:
    return total[:-1] / total[-1]


def test_auto_takes_the_fewest_bits_within_the_tolerance_at_the_default_clip_range():
    clip = RunConfig().secagg_clip
    assert RunConfig().secagg_ring_bits == "auto"
    # 3 sites: 3 x 1e5 x 2^10 < 2^29, so 30 bits hold the sum at q = 2^-10 <= 1e-3; 29 do not.
    assert choose_ring_bits(clip_range=clip, n_summands=3) == 30
    assert FixedPointCodec(ring_bits=29, clip_range=clip, n_summands=3).quantum > 1e-3
    assert choose_ring_bits(clip_range=clip, n_summands=20) == 32
    # 21 sites: a 32-bit quantum would be 2^-9 > 1e-3, so the ring grows to 33 bits.
    assert choose_ring_bits(clip_range=clip, n_summands=21) == 33
    assert RunConfig(secure_agg="mask", clients=21).resolved_ring_bits == 33
    assert FixedPointCodec(ring_bits=32, clip_range=clip, n_summands=21).quantum > 1e-3
    # Rule 1 (runs recorded before schema 3.12) chose between 32 and 64 bits only.
    assert choose_ring_bits(clip_range=clip, n_summands=3, rule=1) == 32
    assert choose_ring_bits(clip_range=clip, n_summands=21, rule=1) == 64
    # A smaller clip range takes fewer bits: 23 at 1e3 (0.72x float32 on the wire).
    assert choose_ring_bits(clip_range=1e3, n_summands=3) == 23
    # An explicit ring is kept; a record of an older run (no setting) is its 64-bit ring.
    assert RunConfig(secagg_ring_bits=32, clients=50).resolved_ring_bits == 32
    old = {k: v for k, v in RunConfig().to_dict().items() if k != "secagg_ring_bits"}
    assert RunConfig.from_recorded(old).resolved_ring_bits == 64
    with pytest.raises(ConfigError, match="no fixed-point ring keeps"):
        choose_ring_bits(clip_range=1e15, n_summands=10)


@pytest.mark.parametrize("dropped", [(), (1,)], ids=["all-upload", "one-drops"])
def test_masked_fedavg_with_the_auto_ring_is_within_1e_3_of_plaintext(dropped):
    # Prepare: 5 sites of different sizes, the run's own masking parameters (auto ring).
    sizes = [40, 75, 120, 33, 90]
    config = RunConfig(secure_agg="mask", clients=len(sizes))
    params = secagg_config(config, n_sites=len(sizes))
    assert params.ring_bits == 30  # 5 x 1e5 x 2^10 < 2^29
    inputs, _ = _site_updates(sizes)

    # Execute
    result = secure_sum(
        inputs, config=params, round_index=1, drop_before_upload=dropped, graph_seed=b"\0" * 32
    )

    # Assert: the average over the survivors, against float64 plaintext FedAvg.
    survivors = [s for s in inputs if s not in dropped]
    assert list(result.survivors) == survivors
    plain = _fedavg(np.sum([inputs[s] for s in survivors], axis=0))
    masked = _fedavg(result.total)
    assert result.total[-1] == sum(sizes[s] for s in survivors)  # the weights are exact
    error = np.abs(masked - plain).max()
    bound = len(survivors) * params.codec.quantum / result.total[-1]
    assert error <= bound <= 1e-3
    assert error > 0  # it was rounded (a 30-bit ring, not a float copy)


def test_a_default_masked_round_sends_at_most_the_bytes_of_a_float32_update():
    # Issue 17: with the 30-bit ring every message of a site's round (keys, sealed shares,
    # the packed masked input, unmasking shares) takes fewer bytes than 4 a value of
    # [n_i u_i, n_i]; the 32-bit ring took 1.008x at this size, the 64-bit one 2.0x.
    values = 56_324 + 1  # the SmallCNN's parameters and the weight
    rng = np.random.default_rng(0)
    inputs = {s: rng.normal(0, 0.01, values) for s in range(3)}
    params = secagg_config(RunConfig(secure_agg="mask", clients=3), n_sites=3)

    result = secure_sum(inputs, config=params, round_index=1)

    assert params.ring_bits == 30
    assert max(result.bytes_sent.values()) <= 4 * values
    assert params.describe()["word_bytes"] == 3.75  # bytes a value, as privacy.json states


def test_the_stated_bound_holds_when_every_weight_is_one():
    """Worst case for the average: n_i = 1, so it is off by up to q, SD q / (2 sqrt(k))."""
    sizes = [1, 1, 1, 1]
    inputs, _ = _site_updates(sizes, seed=1)
    params = secagg_config(RunConfig(secure_agg="mask", clients=4), n_sites=4)
    bound = params.codec.error_bound(len(sizes))
    result = secure_sum(inputs, config=params, round_index=1, graph_seed=b"\1" * 32)
    error = _fedavg(result.total) - _fedavg(np.sum(list(inputs.values()), axis=0))
    assert np.abs(error).max() <= bound["mean_max"] <= AUTO_RING_TOLERANCE
    # 56k coordinates: the spread is at most the stated SD (a value on a grid point has none).
    assert error.std() <= 1.1 * bound["mean_sd"]


def test_the_sum_error_bound_and_its_sd_hold_at_the_worst_case_inputs():
    # Prepare: every value half-way between two grid points (the largest rounding variance).
    k, dim = 5, 200_000
    codec = FixedPointCodec(ring_bits=32, clip_range=1e5, n_summands=k)
    x = np.full(dim, 0.5 * codec.quantum) + codec.quantum * np.arange(dim) % 7
    bound = codec.error_bound()

    # Execute
    total = np.zeros(dim, dtype=np.uint32)
    for _ in range(k):
        total += codec.encode(x)[0]
    error = codec.decode(total) - k * x

    # Assert: never above k q; spread at the stated SD (within sampling error of 200k draws).
    assert np.abs(error).max() <= bound["sum_max"]
    assert 0.95 * bound["sum_sd"] <= error.std() <= 1.05 * bound["sum_sd"]
    assert abs(error.mean()) < 0.05 * bound["sum_sd"]  # unbiased


def test_a_site_refuses_a_round_whose_sum_its_ring_cannot_hold():
    """The ring and clip range are the signed configuration's; the round size is the site's
    own count. Too many sites for a 32-bit ring at this clip range: no encoding, one line."""
    roster, _ = Roster.generate(40)
    base = SecAggConfig(n_clients=2, ring_bits=32, clip_range=1e8)
    assert pinned_config(base, roster=roster, n_round=20).codec.frac_bits == 0
    with pytest.raises(ProtocolError, match="cannot hold their sum without wrapping") as err:
        pinned_config(base, roster=roster, n_round=30)
    assert "\n" not in str(err.value)


def test_the_32_bit_ring_sends_half_the_words_of_the_64_bit_one():
    inputs, dim = _site_updates([10, 20, 30])
    sent = {}
    for bits in (32, 64):
        params = SecAggConfig(n_clients=3, ring_bits=bits, clip_range=1e5)
        sent[bits] = secure_sum(inputs, config=params, round_index=1).bytes_sent[0]
    # Per value: 4 vs 8 bytes; the keys, shares and signatures are the same few kB.
    assert math.isclose(sent[64] - sent[32], 4 * (dim + 1), rel_tol=0.01)
    assert sent[32] <= 4 * (dim + 1) * 1.1


def test_a_server_cannot_make_sites_encode_at_different_scales():
    """The server's announced round size no longer sets a site's fixed-point scale.

    The attack it stops: announce a huge round to every site but one, so that the others
    encode ~10 bits coarser; the decoded "sum" is then the one site's update plus rounding
    (a reviewer read a site's n_i u_i to within 183 on a +-1e5 range this way).
    """
    for ring in ("auto", 64):
        config = RunConfig(clients=6, secure_agg="mask", secagg_ring_bits=ring)
        told = {n: secagg_config(config, n_sites=n, site=True) for n in (2, 6, 10_000)}
        fracs = {c.frac_bits for c in told.values()}
        server = secagg_config(config, n_sites=6)
        assert fracs == {server.frac_bits}, (ring, fracs, server.frac_bits)
        roster, _ = Roster.generate(6)
        for n_round in (3, 6):
            pinned = pinned_config(told[10_000], roster=roster, n_round=n_round)
            assert pinned.frac_bits == server.frac_bits
