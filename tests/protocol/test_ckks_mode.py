"""CKKSMode over a LocalLink: the sum, a dropout at each stage, refused replies, the report."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.config import RunConfig
from securefed.errors import ConfigError, ProtocolError
from securefed.plugins import SECURE_AGG
from securefed.protocol.harness import ProtocolSite, run_sum
from securefed.protocol.modes.ckks import CKKSMode, ckks_params
from securefed.protocol.wire import Stage

pytest.importorskip("tenseal")

DIM = 5
ATOL = 1e-6


@pytest.fixture(scope="module")
def keys():
    from securefed.crypto.ckks import generate_keys

    return generate_keys(params=ckks_params(RunConfig(secure_agg="he", clients=4)))


def _vectors(n: int) -> dict[int, np.ndarray]:
    return {s: np.arange(DIM, dtype=float) + 10.0 * s for s in range(n)}


class _Counting:
    """Records which stages reached a site."""

    def __init__(self, site):
        self.site, self.stages = site, []

    def handle(self, stage, fields):
        self.stages.append(stage)
        return self.site.handle(stage, fields)


def _round(keys, vectors, *, lost=None, wrap=None, clients=4, **drops):
    config = RunConfig(secure_agg="he", clients=clients)
    mode = CKKSMode()
    sites = {
        s: _Counting(ProtocolSite(mode.site(config, site_id=s, he_secret=keys.secret_context), v))
        for s, v in sorted(vectors.items())
    }
    endpoints = dict(sites)
    for sid, wrapper in (wrap or {}).items():
        endpoints[sid] = wrapper(sites[sid])
    collector = mode.server(config, n_sites=len(vectors), he_public=keys.public_context)
    outcome, _ = run_sum(
        collector, endpoints, round_index=7, n_sites=len(vectors), dim=DIM, lost=lost, **drops
    )
    return outcome, sites


def test_the_registered_mode_sums_and_the_lowest_contributor_decrypts(keys):
    # Prepare
    vectors = _vectors(4)

    # Execute
    outcome, sites = _round(keys, vectors)

    # Assert
    assert SECURE_AGG.get("he") is CKKSMode
    assert outcome.error is None and outcome.survivors == [0, 1, 2, 3]
    np.testing.assert_allclose(outcome.total, sum(vectors.values()), atol=ATOL, rtol=0)
    assert sites[0].stages == [Stage.FIT, Stage.DECRYPT]
    assert all(sites[s].stages == [Stage.FIT] for s in (1, 2, 3))


@pytest.mark.parametrize(
    ("how", "included", "decrypter"),
    [
        ({"lost": {Stage.FIT: {0}}}, [1, 2, 3], 1),
        ({"drop_before_upload": {0}}, [1, 2, 3], 1),
        ({"lost": {Stage.DECRYPT: {0}}}, [0, 1, 2, 3], 1),
        ({"drop_after_upload": {0}}, [0, 1, 2, 3], 1),
    ],
)
def test_a_dropout_at_each_stage_leaves_the_sum_of_the_uploaders(keys, how, included, decrypter):
    # Prepare
    vectors = _vectors(4)

    # Execute
    outcome, sites = _round(keys, vectors, **how)

    # Assert
    assert outcome.error is None and outcome.survivors == included
    np.testing.assert_allclose(outcome.total, sum(vectors[s] for s in included), atol=ATOL, rtol=0)
    assert Stage.DECRYPT in sites[decrypter].stages


def test_fewer_contributors_than_the_minimum_give_no_sum(keys):
    # Execute
    outcome, sites = _round(keys, _vectors(3), lost={Stage.FIT: {0, 1}})

    # Assert: one ciphertext is never sent for decryption (it would be one site's update).
    assert outcome.total is None and "only 1 ciphertexts; 2 are needed" in outcome.error
    assert Stage.DECRYPT not in sites[2].stages


def test_the_decrypting_site_refuses_a_sum_of_fewer_than_min_contributors(keys):
    # Prepare: a server that asks to decrypt a single site's ciphertext.
    from securefed.crypto.ckks import CKKSAggregator

    config = RunConfig(secure_agg="he", clients=4)
    site = CKKSMode().site(config, site_id=0, he_secret=keys.secret_context)
    fit = site.protect(np.ones(DIM), round_index=1, n_sites=4, state={})
    agg = CKKSAggregator(keys.public_context, round_index=1)
    agg.add(fit["ciphertext"], site_id=0)

    # Execute / Assert
    with pytest.raises(ProtocolError, match="at least 2 are required"):
        site.step(Stage.DECRYPT, {"round": 1, "aggregate": agg.aggregate()}, state={})
    with pytest.raises(ProtocolError, match="needs `aggregate` bytes"):
        site.step(Stage.DECRYPT, {"round": 1}, state={})


class _Tamper:
    def __init__(self, site, stage, field, change):
        self.site, self.stage, self.field, self.change = site, stage, field, change

    def handle(self, stage, fields):
        reply = self.site.handle(stage, fields)
        if stage == self.stage:
            reply[self.field] = self.change(reply[self.field])
        return reply


def _flip(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0x01
    return bytes(out)


def test_a_tampered_ciphertext_is_refused_and_the_others_are_summed(keys):
    # Prepare
    vectors = _vectors(4)

    # Execute
    outcome, _ = _round(
        keys, vectors, wrap={2: lambda s: _Tamper(s, Stage.FIT, "ciphertext", _flip)}
    )

    # Assert
    assert outcome.survivors == [0, 1, 3] and "ciphertext" in outcome.site_errors[2]
    np.testing.assert_allclose(
        outcome.total, vectors[0] + vectors[1] + vectors[3], atol=ATOL, rtol=0
    )


def test_a_malformed_decryption_is_refused_and_the_next_contributor_asked(keys):
    # Prepare: site 0 answers the decryption with a vector of the wrong length.
    vectors = _vectors(3)

    # Execute
    outcome, sites = _round(
        keys, vectors, wrap={0: lambda s: _Tamper(s, Stage.DECRYPT, "vector", lambda v: v[:8])}
    )

    # Assert
    assert "decrypt" in outcome.site_errors[0]
    assert Stage.DECRYPT in sites[1].stages
    np.testing.assert_allclose(outcome.total, sum(vectors.values()), atol=ATOL, rtol=0)


def test_the_server_side_gets_only_a_public_context_for_the_runs_parameters(keys):
    # Prepare
    config = RunConfig(secure_agg="he", clients=4)
    other = RunConfig(secure_agg="he", clients=4, he_scale_bits=30)

    # Execute / Assert
    with pytest.raises(ProtocolError, match="must not hold the CKKS secret key"):
        CKKSMode().server(config, n_sites=4, he_public=keys.secret_context)
    with pytest.raises(ConfigError, match="other parameters"):
        CKKSMode().server(other, n_sites=4, he_public=keys.public_context)
    with pytest.raises(ConfigError, match="no site sent"):
        CKKSMode().server(config, n_sites=4)
    with pytest.raises(ConfigError, match="secret key"):
        CKKSMode().site(config, site_id=0)


def test_describe_is_the_deployed_privacy_report_entry(keys):
    # Prepare
    config = RunConfig(secure_agg="he", clients=4)

    # Execute
    entry = CKKSMode().server(config, n_sites=4, he_public=keys.public_context).describe()

    # Assert: today's privacy.json entry of a deployed CKKS run.
    assert entry == {
        "protocol": "ckks",
        "library": "tenseal",
        "server_holds_secret_key": False,
        "key_holder": "the sites (one key set, distributed out of band); the lowest-id "
        "contributing site decrypts each round's sum",
        "min_contributors": 2,
        **ckks_params(config).describe(),
    }
