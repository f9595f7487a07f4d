"""A site spends only what its own plan covers, and what it spent is always counted."""

from __future__ import annotations

import pytest

from securefed.errors import DataError
from securefed.fl.simulation import Federation


@pytest.mark.slow
def test_a_site_refuses_a_round_twice_or_past_the_plan(small_config):
    # Without the site's own check, a server could replay round 1 (or run round 3 of a
    # 2-round plan) and the site would spend beyond the epsilon it agreed to.
    cfg = small_config.replace(rounds=2)
    fed = Federation(cfg)
    assert fed.run_round(1).applied
    spent = [len(s.ledger.events) for s in fed.sites]
    again = fed.run_round(1)
    assert not again.applied
    assert all("already trained" in why for why in again.data["transport"]["site_errors"].values())
    beyond = fed.run_round(3)
    assert not beyond.applied
    assert all("outside the run" in why for why in beyond.data["transport"]["site_errors"].values())
    assert [len(s.ledger.events) for s in fed.sites] == spent  # nothing more was spent


@pytest.mark.slow
def test_a_site_that_trains_then_keeps_its_update_back_is_still_accounted(small_config):
    # Without the accounting in the refusal, the report would state epsilon 0 for a site that
    # spent a round's budget (a protection step failing after training, e.g. CKKS overflow).
    cfg = small_config.replace(rounds=1)
    fed = Federation(cfg)

    def overflow(*args, **kwargs):
        raise DataError("a sum of 3 updates like this one may exceed the CKKS bound")

    fed.sites[1].protection.protect = overflow
    rec = fed.run_round(1)
    assert rec.applied and rec.data["survivors"] == [0, 2]
    assert "CKKS bound" in rec.data["transport"]["site_errors"]["1"]
    own = [e.to_dict() for e in fed.sites[1].ledger.events]
    assert own and [e.to_dict() for e in fed.ledger.for_client(1)] == own
    assert fed.claims.epsilon(1) == pytest.approx(fed.sites[1].trainer.epsilon())
    assert fed.claims.epsilon(1) > 0


def test_a_site_fine_tunes_a_twin_only_when_the_run_says_so(small_config):
    # Without it, a server could ask for DP fine-tuning at will, on the site's records.
    from securefed.errors import ProtocolError
    from securefed.protocol.wire import Stage

    fed = Federation(small_config.replace(rounds=2, personalize=1, personalize_when="end"))
    site = fed.sites[0]
    fields = {
        "weights": fed._blobs()[0],
        "layout_keys": list(fed.layout.keys),
        "round": 1,  # "end": only after the last round
        "personalize": True,
        "history": [],
    }
    with pytest.raises(ProtocolError, match="does not fine-tune twins in round 1"):
        site.handle(Stage.EVALUATE, fields)
    assert site.ledger.events == ()


@pytest.mark.slow
def test_a_site_without_dp_trains_a_round_once(small_config):
    # Before the fix the budget check returned early without DP: a replayed round 1 was
    # trained again (the same update: training is deterministic) and masked with fresh keys,
    # so a server summing it with and without one site would get that site's update. The
    # site now remembers the rounds it trained, DP or not.
    cfg = small_config.replace(rounds=2, dp_epsilon=None, secure_agg="mask")
    fed = Federation(cfg)
    assert fed.run_round(1).applied
    again = fed.run_round(1)
    assert not again.applied
    errors = again.data["transport"]["site_errors"]
    assert set(errors) == {"0", "1", "2"}
    assert all("training round 1: already done once" in why for why in errors.values())
    assert fed.run_round(2).applied


def test_a_site_without_dp_refuses_a_round_outside_the_run(small_config):
    # Review r1: the bounds were checked only with DP; a plaintext site trained round 10**6.
    from securefed.errors import ProtocolError
    from securefed.protocol.wire import Stage

    fed = Federation(small_config.replace(rounds=2, dp_epsilon=None))
    site = fed.sites[0]
    fields = {
        "weights": fed._blobs()[0],
        "layout_keys": list(fed.layout.keys),
        "n_sites": 3,
        "history": [],
    }
    for bad in (0, 3, 10**6):
        with pytest.raises(ProtocolError, match="outside the run's 2 rounds"):
            site.handle(Stage.FIT, {**fields, "round": bad})
    with pytest.raises(ProtocolError, match="names no round"):
        site.handle(Stage.FIT, fields)
    assert "fit.rounds" not in site.persistent


@pytest.mark.parametrize("bad", ["x", 2.5, True, 0, -1, None, float("inf")])
def test_a_site_refuses_a_bad_site_count_before_it_claims_or_trains_the_round(small_config, bad):
    # Review 32b: n_sites was read only after DP training, so `"x"` or inf raised a ValueError
    # or OverflowError with the round claimed and its budget spent, and the server never got
    # the events: every later fit was then refused for a history mismatch.
    from securefed.errors import ProtocolError
    from securefed.protocol.wire import Stage

    fed = Federation(small_config.replace(rounds=2, secure_agg="mask"))
    site = fed.sites[0]
    fields = {
        "weights": fed._blobs()[0],
        "layout_keys": list(fed.layout.keys),
        "round": 1,
        "history": [],
    }
    if bad is not None:
        fields["n_sites"] = bad
    with pytest.raises(ProtocolError, match="no valid number of sites"):
        site.handle(Stage.FIT, fields)
    with pytest.raises(ProtocolError, match="trained model in the clear"):
        site.handle(Stage.FIT, {**fields, "n_sites": 3, "return_weights": True})
    assert "fit.rounds" not in site.persistent
    assert site.ledger.events == ()
    assert fed.run_round(1).applied  # the round is still there for a good message


def test_a_cfl_site_chooses_a_cluster_once_per_round_of_the_run(small_config):
    # Review r1: `select` answered without limit, an un-noised loss comparison on the site's
    # records the server could repeat with any models it liked.
    from securefed.errors import ProtocolError
    from securefed.fl.engine import _models_fields
    from securefed.protocol.wire import Stage

    fed = Federation(small_config.replace(rounds=2, dp_epsilon=None, strategy="cfl", clusters=2))
    site = fed.sites[0]
    fields = {**_models_fields(fed._blobs()), "layout_keys": list(fed.layout.keys)}
    with pytest.raises(ProtocolError, match="names no round"):
        site.handle(Stage.SELECT, fields)
    with pytest.raises(ProtocolError, match="outside the run's 2 rounds"):
        site.handle(Stage.SELECT, {**fields, "round": 3})
    assert site.handle(Stage.SELECT, {**fields, "round": 1})["cluster"] in (0, 1)
    with pytest.raises(ProtocolError, match="cluster for round 1: already done once"):
        site.handle(Stage.SELECT, {**fields, "round": 1})
    assert site.handle(Stage.SELECT, {**fields, "round": 2})["cluster"] in (0, 1)


def test_a_cfl_site_picks_a_cluster_to_evaluate_once_per_round(small_config):
    # Second review: the held-out step with CFL's `models` recomputed the un-noised cluster
    # choice for whatever models the server sent, as often as it asked.
    from securefed.errors import ProtocolError
    from securefed.fl.engine import _models_fields
    from securefed.protocol.wire import Stage

    fed = Federation(small_config.replace(rounds=2, dp_epsilon=None, strategy="cfl", clusters=2))
    site = fed.sites[0]
    fields = {**_models_fields(fed._blobs()), "layout_keys": list(fed.layout.keys)}
    with pytest.raises(ProtocolError, match="names no round"):
        site.handle(Stage.EVALUATE, fields)
    assert site.handle(Stage.EVALUATE, {**fields, "round": 1})["cluster"] in (0, 1)
    with pytest.raises(ProtocolError, match="cluster to evaluate, round 1: already done once"):
        site.handle(Stage.EVALUATE, {**fields, "round": 1})
    assert site.handle(Stage.EVALUATE, {**fields, "round": 2})["cluster"] in (0, 1)
