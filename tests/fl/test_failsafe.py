"""Aggregation that fails safe: one bad site ends its own part of a round, never the run.

Each test runs the real round engine over a LocalLink to real SiteRuntimes, one of which is
an adversary: it runs the honest site code, then rewrites what it sends (its reply fields,
its wire record, its masked words), as a site that controls its own machine can. Each
docstring says what happened on the base commit 60ad9a0, without the protection.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.config import RunConfig
from securefed.errors import ProtocolError
from securefed.fl.bounds import aggregate_violation, update_clip_for
from securefed.fl.replies import FIELDS, ReplySchema
from securefed.fl.simulation import Federation
from securefed.protocol.link import LocalLink
from securefed.protocol.wire import PROTOCOL, Stage, from_record, vector_from_bytes, vector_to_bytes
from securefed.report.artifacts import write_outputs
from tests.conftest import tiny_config

Edit = Callable[[str, dict[str, Any], dict[str, Any]], dict[str, Any]]


class Hostile:
    """Site ``site``'s honest code, then ``edit(stage, reply, fields)`` on what it sends."""

    def __init__(self, site: Any, edit: Edit) -> None:
        self.site = site
        self.edit = edit

    def handle(self, stage: str, fields: dict[str, Any]) -> dict[str, Any]:
        return self.edit(stage, self.site.handle(stage, fields), fields)


def _federation(npz, **changes) -> Federation:
    return Federation(tiny_config(npz, dp_epsilon=None, **changes))


def _weights(fed: Federation) -> np.ndarray:
    return fed.layout.flatten(fed.models[0].state_dict())


def _corrupt(fed: Federation, sid: int, edit: Edit) -> None:
    fed.link.sites[sid] = Hostile(fed.sites[sid], edit)


def _in_round(fields: dict[str, Any], r: int) -> bool:
    return fields.get("round") == r


# -- malformed, missing, out-of-range fields ------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "stage", "change", "reason"),
    [
        # base: the plain mode already left the site out (it caught the KeyError).
        ("none", Stage.FIT, lambda r: r.pop("vector"), "missing field `vector`"),
        # base: ValueError out of run_round (float("fast") summing protect_seconds).
        ("mask", Stage.FIT, lambda r: r.update(protect_seconds="fast"), "protect_seconds"),
        # base: ValueError out of run_round (int(nan) summing the clipped counts).
        ("mask", Stage.MASKED, lambda r: r.update(clipped=float("nan")), "clipped"),
        # base: a negative count silently lowered the round's clipped_values.
        ("mask", Stage.MASKED, lambda r: r.update(clipped=-5), "clipped"),
        # base: an unknown field was ignored.
        ("none", Stage.FIT, lambda r: r.update(train_loss=0.1), "unknown field"),
        # base: ValueError out of run_round (float(["x"]) for protect_seconds).
        ("he", Stage.FIT, lambda r: r.update(protect_seconds=["x"]), "protect_seconds"),
    ],
)
def test_a_malformed_reply_drops_its_site_and_the_run_goes_on(
    small_npz, mode, stage, change, reason
):
    """A malformed, missing or out-of-range field makes its site a dropout for that round.

    On 60ad9a0 the string/NaN/list cases raised ValueError or TypeError out of ``run_round``
    (the whole run died); the negative count and the unknown field were taken as sent.
    """
    # Four sites: masking's default threshold (3 of 4) survives one dropout.
    fed = _federation(small_npz, secure_agg=mode, clients=4)

    def edit(s: str, reply: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        if s == stage and _in_round(fields, 1):
            change(reply)
        return reply

    # Under CKKS one site, fixed by the run's session and the round, decrypts the round's sum,
    # and a site whose fit reply is refused is a dropout of the round, not asked to decrypt:
    # were it that site, the round would (rightly) not be decrypted. The session hashes the
    # configuration, data path (tmp_path) included, so the misbehaving site is picked to be
    # one that is not round 1's decrypting site (site 2 unless it is).
    bad = 2
    if mode == "he":
        from securefed.protocol.modes.base import run_session
        from securefed.protocol.modes.ckks import decrypting_site

        holder = decrypting_site(fed.roster, run_session(fed.config), 1)
        bad = 2 if holder != 2 else 1
    _corrupt(fed, bad, edit)
    first = fed.run_round(1)
    assert first.applied, first.data["error"]
    assert first.data["survivors"] == [s for s in range(4) if s != bad]
    assert reason in first.data["dropped_reasons"][str(bad)]
    assert reason in first.data["transport"]["site_errors"][str(bad)]
    second = fed.run_round(2)
    assert second.applied and second.data["survivors"] == [0, 1, 2, 3]


def test_a_twin_without_its_primary_metric_is_refused_not_a_crash(small_npz):
    """A held-out reply whose twin lacks ``accuracy`` fails that site's evaluation only.

    On 60ad9a0: KeyError('accuracy') out of ``run_round`` (the site mean of the twins).
    """
    fed = _federation(small_npz, personalize=1, personalize_when="every")

    def edit(s: str, reply: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        if s == Stage.EVALUATE and "twin" in reply:
            reply["twin"].pop("accuracy")
        return reply

    _corrupt(fed, 1, edit)
    rec = fed.run_round(1)
    assert rec.applied
    assert "lacks the primary metric" in rec.data["transport"]["site_errors"]["1"]
    row = rec.data["clients"][1]
    assert "twin" not in row and "accuracy" not in row
    assert fed.run_round(2).applied
    assert fed.metrics()["personalization"]  # the report still builds


# -- JSON caps ---------------------------------------------------------------------------------


def _nested(megabytes: float = 1.0) -> str:
    half = int(megabytes * 1_000_000) // 2
    return "[" * half + "]" * half


def test_a_1mb_nested_json_field_is_refused_before_parsing(monkeypatch):
    """On 60ad9a0: RecursionError out of ``from_record`` (so out of ``decode`` and the round)."""
    record = {"protocol": PROTOCOL, "json:events": _nested()}
    # The parser never sees it: the refusal comes from the linear pre-scan. (This replaced a
    # "< 1 s" timing assertion, which a loaded machine could fail.)
    real_loads, parsed = json.loads, []

    def loads(text, **kwargs):
        parsed.append(text)
        return real_loads(text, **kwargs)

    monkeypatch.setattr(json, "loads", loads)
    with pytest.raises(ProtocolError, match="nests 500000 levels deep"):
        from_record(record, what="reply")
    assert parsed == []
    monkeypatch.undo()
    with pytest.raises(ProtocolError, match="characters of JSON"):
        from_record({"protocol": PROTOCOL, "json:x": "[" + "0," * 3_000_000 + "0]"}, what="r")
    with pytest.raises(ProtocolError, match="not JSON"):  # base: ValueError (int digits)
        from_record({"protocol": PROTOCOL, "json:x": "9" * 5000}, what="reply")
    # Brackets inside strings do not count; escaped quotes do not end a string.
    deep = '["' + "[" * 100 + '\\"' + "{" * 100 + '", [[1]]]'
    assert from_record({"protocol": PROTOCOL, "json:x": deep}, what="r")["x"][1] == [[1]]


class _WireLink(LocalLink):
    """A LocalLink on which site ``hostile`` writes its own record in round 1's fit reply."""

    hostile = 2

    def encode_reply(self, sid: int, reply: dict[str, Any]) -> dict[str, Any]:
        record = super().encode_reply(sid, reply)
        if sid == self.hostile and "vector" in reply and self.rounds_seen == 0:
            self.rounds_seen += 1
            record["json:events"] = _nested()
        return record

    rounds_seen = 0


def test_a_site_sending_a_1mb_nested_json_is_dropped_and_the_run_goes_on(small_npz):
    """The site's fit reply carries 1 MB of nested brackets: it is dropped from the round.

    On 60ad9a0 (over Flower; in-process the same ``from_record``): RecursionError out of the
    reply's decoding, which ended the run.
    """
    fed = _federation(small_npz)
    link = _WireLink(fed.link.sites)
    fed.link = link
    fed.logged.link = link
    first = fed.run_round(1)
    assert first.applied and first.data["survivors"] == [0, 1]
    assert "nests 500000 levels deep" in first.data["dropped_reasons"]["2"]
    assert fed.run_round(2).data["survivors"] == [0, 1, 2]


# -- server fields ------------------------------------------------------------------------------


def test_a_site_cannot_overwrite_its_row_or_its_epsilon(small_npz):
    """A site's held-out metrics claim ``epsilon`` 0 and another ``client_id``.

    On 60ad9a0 ``entry.update(metrics)`` wrote both into the site's metrics.json row: the
    report showed epsilon 0.0 for a site that had spent its budget.
    """
    fed = Federation(tiny_config(small_npz, rounds=1))

    def edit(s: str, reply: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        if s == Stage.EVALUATE:
            reply["metrics"].update(epsilon=0.0, client_id=0, participated=False)
        return reply

    _corrupt(fed, 1, edit)
    rec = fed.run_round(1)
    row = rec.data["clients"][1]
    assert row["client_id"] == 1 and row["participated"] is True
    assert row["epsilon"] == fed.claims.epsilon(1) > 0
    assert "a server field" in rec.data["transport"]["site_errors"]["1"]


# -- the poisoning bound ------------------------------------------------------------------------


def test_plaintext_a_1e6_per_coordinate_update_drops_the_site(small_npz):
    """Site 2 sends 1e6 in every coordinate of its (scaled) update, with its honest n_i.

    On 60ad9a0 the sum was applied: every weight moved by about 1e6 / Σ n_i (416.7 in the
    issue's run; 4167 here) with ``clipped_values`` 0.
    """
    fed = _federation(small_npz)
    before = _weights(fed)

    def edit(s: str, reply: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        if s == Stage.FIT and _in_round(fields, 1):
            v = vector_from_bytes(reply["vector"], what="own")
            reply["vector"] = vector_to_bytes(np.concatenate([np.full(v.size - 1, 1e6), v[-1:]]))
        return reply

    _corrupt(fed, 2, edit)
    rec = fed.run_round(1)
    assert rec.applied and rec.data["survivors"] == [0, 1]
    assert "above the bound C_u" in rec.data["dropped_reasons"]["2"]
    assert np.abs(_weights(fed) - before).max() < 1.0
    assert fed.run_round(2).data["survivors"] == [0, 1, 2]


def test_plaintext_an_inflated_weight_drops_the_site(small_npz):
    """Site 2 claims n_i = 1e9 samples so that its update dominates the average.

    On 60ad9a0 the weight was taken as sent (the average became site 2's update).
    """
    fed = _federation(small_npz)

    def edit(s: str, reply: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        if s == Stage.FIT:
            v = vector_from_bytes(reply["vector"], what="own")
            reply["vector"] = vector_to_bytes(np.concatenate([v[:-1] / v[-1] * 1e9, [1e9]]))
        return reply

    _corrupt(fed, 2, edit)
    rec = fed.run_round(1)
    assert rec.applied and rec.data["survivors"] == [0, 1]
    assert "not a count in [1, 100000]" in rec.data["dropped_reasons"]["2"]


def _edit_masked_words(config, message: bytes, change: Callable[[np.ndarray, int], None]) -> bytes:
    """The site's masked input with ``change(words, frac_bits)`` applied to its ring words.

    The frame's SHA-256 is recomputed: it catches corruption, not a sender that lies.
    """
    from securefed.crypto.framing import DIGEST_BYTES, seal_frame
    from securefed.crypto.messages import HEADER_BYTES
    from securefed.crypto.packing import pack_words, packed_size, unpack_words
    from securefed.protocol.modes.masking import secagg_config

    frac = secagg_config(config, n_sites=config.clients).codec.frac_bits
    ring_bits, dim = struct.unpack_from("<BQ", message, HEADER_BYTES)
    assert ring_bits == config.resolved_ring_bits
    start = HEADER_BYTES + 9
    end = start + packed_size(dim, ring_bits)
    words = unpack_words(message[start:end], ring_bits, dim).copy()
    change(words, frac)  # in the word; packing keeps the residue mod 2^k
    return seal_frame([message[:start], pack_words(words, ring_bits), message[end:-DIGEST_BYTES]])


@pytest.mark.parametrize("attack", ["update", "weight", "inflate"])
def test_masking_a_site_editing_its_masked_words_gets_the_round_refused(
    small_npz, tmp_path, attack
):
    """Site 2 adds 1e6 to each masked update word, or edits its weight word so that Σ n_i is
    0.5 (or inflated by 1e9): the server sees only the sum, so it refuses the round.

    On 60ad9a0 every such sum was applied: the update attack moved every weight by about
    1e6 / Σ n_i, the weight attack divided the honest sum by 0.5 (the issue's run: -4.3e11),
    the inflated weight shrank the round's step to nothing.
    """
    # The pre-issue-17 ring (64 bits, clip range 1e6) carries a claimed weight of 1e9 without
    # wrapping (the default 30-bit ring would wrap it into some other, also refused, weight).
    ring = {"secagg_ring_bits": 64, "secagg_clip": 1e6} if attack == "inflate" else {}
    fed = _federation(small_npz, secure_agg="mask", **ring)
    before = _weights(fed)
    n_total = float(sum(len(site.train) for site in fed.sites))

    def change(words: np.ndarray, frac: int) -> None:
        def word(x: float) -> np.unsignedinteger:
            return words.dtype.type(int(x * 2**frac) % 2 ** (8 * words.dtype.itemsize))

        if attack == "update":
            words[:-1] += word(1e6 if words.dtype.itemsize == 8 else 1e3)
        elif attack == "weight":
            words[-1] -= word(n_total - 0.5)
        else:  # claims n_i = 1e9 so that its update weighs as the others' times 1e7
            words[-1] += word(1e9)

    def edit(s: str, reply: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        if s == Stage.MASKED and _in_round(fields, 1):
            reply["message"] = _edit_masked_words(fed.config, reply["message"], change)
        return reply

    _corrupt(fed, 2, edit)
    rec = fed.run_round(1)
    assert not rec.applied
    bound = rec.data["update_bound"]
    assert bound["refused"] and "refused" in rec.data["error"]
    expected = {"update": "L2 norm", "weight": "weights is 0.5", "inflate": "weights is 1e+09"}
    assert expected[attack] in bound["refused"]
    np.testing.assert_array_equal(_weights(fed), before)  # the global model is unchanged
    second = fed.run_round(2)
    assert second.applied and second.data["update_bound"]["refused"] is None
    # The run's files state it: metrics.json (2.2+) and summary.md name the refused round.
    write_outputs(fed, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["schema_version"] == "2.4"
    assert metrics["rounds"][0]["update_bound"]["refused"] == bound["refused"]
    assert "round 1: **refused** (poisoning bound)" in (tmp_path / "summary.md").read_text()


def test_ckks_a_site_encrypting_a_huge_update_gets_the_round_refused(small_npz):
    """Site 2 encrypts 1e3 per coordinate (inside CKKS' range, so its ciphertext is valid).

    On 60ad9a0 the decrypted sum was applied: every weight moved by about 1e3 / Σ n_i (4.2).
    """
    fed = _federation(small_npz, secure_agg="he")
    before = _weights(fed)
    honest = fed.sites[2].protection.protect

    def poisoned(vector: np.ndarray, **kw: Any) -> dict[str, Any]:
        bad = np.full_like(vector, 1e3)
        bad[-1] = vector[-1]
        return honest(bad if kw["round_index"] == 1 else vector, **kw)

    fed.sites[2].protection.protect = poisoned  # the site runs code of its own
    rec = fed.run_round(1)
    assert not rec.applied and "L2 norm" in rec.data["update_bound"]["refused"]
    np.testing.assert_array_equal(_weights(fed), before)
    assert fed.run_round(2).applied


def test_honest_rounds_pass_the_bound_in_every_mode(small_npz):
    """The check refuses no honest round: plaintext, masking and CKKS all apply."""
    for mode in ("none", "mask", "he"):
        fed = _federation(small_npz, secure_agg=mode, rounds=1)
        rec = fed.run_round(1)
        bound = rec.data["update_bound"]
        assert rec.applied and bound["refused"] is None, (mode, rec.data["error"])
        assert 0 < bound["update_norm"] <= bound["update_clip"]


def test_a_site_clips_its_whole_update_to_the_bound(small_npz):
    """With ``--update-clip`` below the honest update norm, every update is scaled down to it:
    the average update is no longer than C_u, and the honest round passes."""
    fed = _federation(small_npz, update_clip=0.05, rounds=1)
    before = _weights(fed)
    rec = fed.run_round(1)
    assert rec.applied
    moved = float(np.linalg.norm(_weights(fed) - before))
    assert moved <= 0.05 * (1 + 1e-6)
    assert moved > 0.02  # honest updates are ~1 here: each was clipped, and they point alike


def test_the_aggregate_check_allows_exactly_what_honest_clipped_updates_reach():
    d, clip = 100, 2.0
    rng = np.random.default_rng(0)
    updates = [clip * u / np.linalg.norm(u) for u in rng.normal(size=(3, d))]
    weights = [5.0, 7.0, 1.0]
    total = np.concatenate([sum(n * u for n, u in zip(weights, updates)), [sum(weights)]])
    kw = {"contributors": 3, "clip": clip, "max_weight": 10.0, "slack": 0.0}
    assert aggregate_violation(total, **kw) is None
    aligned = np.concatenate([np.full(d, clip / math.sqrt(d)) * 13, [13.0]])
    assert aggregate_violation(aligned, **kw) is None  # all at the bound, same direction
    over = aligned.copy()
    over[:-1] *= 1.001
    assert "L2 norm" in aggregate_violation(over, **kw)
    assert "weights" in aggregate_violation(np.concatenate([total[:-1], [2.5]]), **kw)
    assert "weights" in aggregate_violation(np.concatenate([total[:-1], [30.5]]), **kw)


def test_the_default_bound_is_lr_sqrt_d(small_npz):
    cfg = tiny_config(small_npz, dp_epsilon=None)
    assert update_clip_for(cfg, 10_000) == pytest.approx(cfg.lr * 100)
    assert update_clip_for(cfg.replace(update_clip=3.0), 10_000) == 3.0


@pytest.mark.parametrize(
    ("field", "value"), [("sample_rate", 5.0), ("steps", "many"), ("noise_multiplier", None)]
)
def test_a_malformed_dp_event_is_refused_before_it_reaches_the_ledger(small_npz, field, value):
    """A DP site reports an event of its round with a sample rate of 5 (or a wrong type).

    On 60ad9a0 the event was recorded before it was checked, so the ledger kept an event no
    accountant can replay: the site's epsilon (computed for its row) then raised out of
    ``run_round`` (a wrong type: TypeError, also out of it).
    """
    fed = Federation(tiny_config(small_npz, rounds=2))

    def edit(s: str, reply: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        if s == Stage.FIT and _in_round(fields, 1):
            reply["events"][0][field] = value
        return reply

    _corrupt(fed, 2, edit)
    first = fed.run_round(1)
    assert first.applied and first.data["survivors"] == [0, 1]
    assert "malformed DP report" in first.data["dropped_reasons"]["2"]
    assert fed.ledger.for_client(2) == []  # nothing of it was recorded
    assert first.data["clients"][2]["epsilon"] == 0.0  # a report it cannot read is not one
    # Site 2's own ledger now holds round 1, the server's does not: it refuses to train on a
    # history that differs from its own (issue 11), while the others go on.
    second = fed.run_round(2)
    assert second.applied and 2 not in second.data["survivors"]


# -- any record ---------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_FIELD_NAMES = sorted(
    {name for table in FIELDS.values() for name in table}
    | {"metrics", "twin", "cluster", "class_counts"}
)


@settings(max_examples=300, deadline=None)
@given(
    message=st.sampled_from(["setup", "fit", "heldout", "select", "masked", "decrypt", "x"]),
    record=st.dictionaries(
        st.sampled_from(_FIELD_NAMES) | st.text(max_size=6),
        st.integers()
        | st.floats()
        | st.text(max_size=8)
        | st.binary(max_size=8)
        | st.booleans()
        | _JSON.map(lambda v: ("json", v)),
        max_size=6,
    ),
    dp=st.booleans(),
)
def test_any_record_is_read_or_refused_with_a_protocol_error(message, record, dp):
    """Whatever a site puts in its record, decoding and the schema raise ProtocolError or
    accept it; nothing else escapes (on 60ad9a0 RecursionError, ValueError and TypeError did,
    further down the round)."""
    config = RunConfig(dp_epsilon=8.0 if dp else None, secure_agg="mask", clients=3)
    schema = ReplySchema(config, num_models=2, primary_metric="accuracy")
    wire: dict[str, Any] = {"protocol": PROTOCOL}
    for key, value in record.items():
        if isinstance(value, tuple):
            wire["json:" + key] = json.dumps(value[1])
        else:
            wire[key] = value
    try:
        schema.check(message, from_record(wire, what="reply"))
    except ProtocolError:
        pass


def test_the_rounding_slack_is_the_one_the_sites_encoded_and_decrypted_with():
    """A round with dropouts sums fewer sites than it was encoded (or flooded) for.

    Second review: the slack was computed for the survivors alone, a finer quantum than the
    sites used when some dropped out, so an honest masked round could be refused; the CKKS
    slack was a flat 1e-3 per site, far looser than the documented precision.
    """
    from securefed.crypto.fixedpoint import FixedPointCodec
    from securefed.fl.bounds import coordinate_slack
    from securefed.protocol.modes.ckks import ckks_params

    mask = RunConfig(secure_agg="mask", clients=5)
    sites_quantum = FixedPointCodec(
        ring_bits=mask.resolved_ring_bits, clip_range=mask.secagg_clip, n_summands=5
    ).quantum
    assert coordinate_slack(mask, 3) == pytest.approx(3 * sites_quantum)
    he = RunConfig(secure_agg="he", clients=5)
    assert coordinate_slack(he, 3) == pytest.approx(ckks_params(he).precision(5))
    assert coordinate_slack(he, 3) < 1e-8
