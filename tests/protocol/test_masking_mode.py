"""MaskingMode over a LocalLink: the sum, a dropout at each stage, refused replies, the report."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.config import RunConfig
from securefed.crypto.roster import Roster
from securefed.errors import ProtocolError
from securefed.plugins import SECURE_AGG
from securefed.protocol.harness import ProtocolSite, run_sum
from securefed.protocol.modes.masking import MaskingMode, secagg_config
from securefed.protocol.wire import Stage

DIM = 6


def _config(**overrides):
    return RunConfig(secure_agg="mask", clients=5, secagg_clip=100.0, **overrides)


#: A five-site federation's roster and identity keys, for tests that build sites themselves.
_ROSTER, _KEYS = Roster.generate(5)


def _site(config, s):
    return MaskingMode().site(config, site_id=s, identity=_KEYS[s], roster=_ROSTER)


def _vectors(n: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(3)
    return {s: rng.uniform(-10, 10, size=DIM) for s in range(n)}


def _round(config, vectors, *, lost=None, wrap=None, **drops):
    mode = MaskingMode()
    # The federation's roster: one identity key per site (the mode refuses to run without).
    roster, keys = Roster.generate(max(vectors) + 1, threshold=config.secagg_threshold)
    sites = {
        s: ProtocolSite(mode.site(config, site_id=s, identity=keys[s], roster=roster), v)
        for s, v in sorted(vectors.items())
    }
    for sid, wrapper in (wrap or {}).items():
        sites[sid] = wrapper(sites[sid])
    collector = mode.server(config, n_sites=len(vectors), roster=roster)
    outcome, link = run_sum(
        collector, sites, round_index=4, n_sites=len(vectors), dim=DIM, lost=lost, **drops
    )
    return outcome, sites, link


def _quantum(config, n):
    return n * secagg_config(config, n_sites=n).codec.quantum


def test_the_registered_mode_sums_every_sites_vector():
    # Prepare
    config = _config()
    vectors = _vectors(5)

    # Execute
    outcome, sites, _ = _round(config, vectors)

    # Assert
    assert SECURE_AGG.get("mask") is MaskingMode
    assert outcome.error is None and outcome.survivors == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(
        outcome.total, sum(vectors.values()), atol=_quantum(config, 5), rtol=0
    )
    assert outcome.server_seconds > 0 and set(outcome.protect_seconds) == set(range(5))
    # The unmask step cleared each site's round state.
    assert all(not site.state for site in sites.values())


@pytest.mark.parametrize(
    ("how", "included"),
    [
        ({"lost": {Stage.FIT: {1}}}, [0, 2, 3, 4]),
        ({"lost": {Stage.SHARE: {1}}}, [0, 2, 3, 4]),
        ({"lost": {Stage.MASKED: {1}}}, [0, 2, 3, 4]),
        ({"drop_before_upload": {1}}, [0, 2, 3, 4]),
        ({"lost": {Stage.UNMASK: {1}}}, [0, 1, 2, 3, 4]),
        ({"drop_after_upload": {1}}, [0, 1, 2, 3, 4]),
    ],
)
def test_a_dropout_at_each_stage_leaves_the_sum_of_the_uploaders(how, included):
    # Prepare: 5 sites, threshold 4, so one dropout is recoverable at any stage.
    config = _config()
    vectors = _vectors(5)

    # Execute
    outcome, _, _ = _round(config, vectors, **how)

    # Assert
    assert outcome.error is None
    assert outcome.survivors == included
    expected = sum(vectors[s] for s in included)
    np.testing.assert_allclose(outcome.total, expected, atol=_quantum(config, 5), rtol=0)


def test_too_many_dropouts_give_no_sum_and_say_why():
    # Execute
    outcome, _, _ = _round(_config(), _vectors(5), lost={Stage.MASKED: {0, 1}})

    # Assert
    assert outcome.total is None and outcome.survivors == []
    assert "uploaded masked inputs" in outcome.error
    assert set(outcome.site_errors) == {0, 1}


class _Tamper:
    """A site whose reply to one stage has a byte flipped (or a field removed)."""

    def __init__(self, site, stage, field, *, drop=False):
        self.site, self.stage, self.field, self.drop = site, stage, field, drop

    def handle(self, stage, fields):
        reply = self.site.handle(stage, fields)
        if stage == self.stage:
            if self.drop:
                del reply[self.field]
            else:
                data = bytearray(reply[self.field])
                data[len(data) // 2] ^= 0x01
                reply[self.field] = bytes(data)
        return reply


@pytest.mark.parametrize(
    ("stage", "field", "drop", "included"),
    [
        (Stage.FIT, "advertise", False, [0, 2, 3, 4]),
        (Stage.SHARE, "message", False, [0, 2, 3, 4]),
        (Stage.MASKED, "message", False, [0, 2, 3, 4]),
        (Stage.MASKED, "message", True, [0, 2, 3, 4]),
        (Stage.UNMASK, "message", False, [0, 1, 2, 3, 4]),
    ],
)
def test_a_tampered_or_malformed_reply_is_refused_without_touching_the_sum(
    stage, field, drop, included
):
    # Prepare: site 1's reply to one stage is corrupted in transit.
    config = _config()
    vectors = _vectors(5)

    # Execute
    outcome, _, _ = _round(
        config, vectors, wrap={1: lambda site: _Tamper(site, stage, field, drop=drop)}
    )

    # Assert: it is refused (as a dropout at that stage) and the others' sum is exact.
    assert outcome.error is None
    assert stage in outcome.site_errors[1]
    assert outcome.survivors == included
    expected = sum(vectors[s] for s in included)
    np.testing.assert_allclose(outcome.total, expected, atol=_quantum(config, 5), rtol=0)


def test_site_state_holds_only_flower_storable_values_and_no_plaintext_after_upload():
    # Prepare
    config = _config()
    mode = MaskingMode()
    protections = {s: _site(config, s) for s in range(5)}
    vectors = _vectors(5)

    class Spy:
        def __init__(self, site):
            self.site, self.seen = site, []

        def handle(self, stage, fields):
            reply = self.site.handle(stage, fields)
            self.seen.append((stage, dict(self.site.state)))
            return reply

    sites = {s: Spy(ProtocolSite(protections[s], vectors[s])) for s in range(5)}

    # Execute
    outcome, _ = run_sum(
        mode.server(config, n_sites=5, roster=_ROSTER), sites, round_index=2, n_sites=5, dim=DIM
    )

    # Assert
    assert outcome.error is None
    for spy in sites.values():
        for _, state in spy.seen:
            assert all(isinstance(v, (bytes, str, int, float)) for v in state.values())
        after_masked = dict(spy.seen)[Stage.MASKED]
        assert after_masked["mask.vector"] == b""


def test_a_site_refuses_a_stage_of_a_round_it_holds_no_state_for():
    # Prepare
    config = _config()
    site = _site(config, 0)
    state: dict = {}
    site.protect(np.ones(DIM), round_index=3, n_sites=5, state=state)

    # Execute / Assert
    with pytest.raises(ProtocolError, match="no state for round 4"):
        site.step(Stage.SHARE, {"round": 4, "message": b"x"}, state=state)
    with pytest.raises(ProtocolError, match="no stage"):
        site.step(Stage.DECRYPT, {"round": 3}, state=state)


def test_describe_is_the_privacy_report_entry_of_the_run():
    # Prepare
    config = _config(secagg_neighbors=2)

    # Execute
    entry = MaskingMode().server(config, n_sites=5).describe()

    # Assert: the same parameters as the in-process aggregator's report, and how the ring
    # was chosen (auto: 20 bits, the fewest whose quantum meets the tolerance for 5 sites at
    # clip range 100: 5 x 100 x 2^10 < 2^19).
    chosen = {"ring_setting", "ring_rule", "ring_tolerance"}
    assert {k: v for k, v in entry.items() if k not in chosen} == secagg_config(
        config, n_sites=5
    ).describe()
    assert entry["protocol"] == "SecAgg+" and entry["n_clients"] == 5
    assert entry["neighbors"] == 2 and entry["clip_range"] == 100.0
    assert entry["ring_setting"] == "auto" and entry["ring_bits"] == 20
    assert entry["word_bytes"] == 20 / 8
    assert entry["mean_error_max"] == entry["quantum"] <= entry["ring_tolerance"]
    assert entry["sum_error_max"] == 5 * entry["quantum"]


def test_a_site_that_speaks_for_another_is_refused():
    # Prepare: site 0's endpoint advertises keys drawn in site 1's name (as if to mask for it).
    config = _config()
    vectors = _vectors(5)
    impostor = _site(config, 1)

    class Impostor:
        def __init__(self, site):
            self.site = site

        def handle(self, stage, fields):
            if stage == Stage.FIT:
                return impostor.protect(vectors[0], round_index=4, n_sites=5, state={})
            return self.site.handle(stage, fields)

    # Execute
    outcome, _, _ = _round(config, vectors, wrap={0: Impostor})

    # Assert: the transport says who answered; site 1's own keys are the ones taken.
    assert "claims to be from 1" in outcome.site_errors[0]
    assert 1 not in outcome.site_errors
    assert outcome.survivors == [1, 2, 3, 4]
    expected = sum(vectors[s] for s in (1, 2, 3, 4))
    np.testing.assert_allclose(outcome.total, expected, atol=_quantum(config, 5), rtol=0)
