"""The per-site persistent store: ConfigRecord values only, once-only claims, Flower round trip."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from securefed import persistent
from securefed.errors import ProtocolError


def test_a_claim_is_refused_the_second_time_and_survives_a_round_trip_through_context_state():
    # Without the store in context.state, a fresh site process would forget what it did.
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    store = persistent.load(context)
    store.claim_once("mask.rounds", 3, what="round 3")
    persistent.save(context, store)
    again = persistent.load(context)
    assert again.to_dict() == {"mask.rounds": [3]}
    with pytest.raises(ProtocolError, match="already done once"):
        again.claim_once("mask.rounds", 3, what="round 3")
    again.claim_once("mask.rounds", 4, what="round 4")
    assert again["mask.rounds"] == [3, 4]


@pytest.mark.parametrize("value", [{"a": 1}, [1, "x"], [[1]], None])
def test_values_flower_cannot_hold_are_refused(value):
    with pytest.raises(ProtocolError, match="persistent store"):
        persistent.PersistentStore()["key"] = value
