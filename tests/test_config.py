import json
import re

import numpy as np
import pytest

from securefed.config import RunConfig
from securefed.errors import ConfigError


def test_config_json_round_trip(tmp_path):
    cfg = RunConfig(clients=4, partition="dirichlet:0.3", dp_epsilon=2.0, secure_agg="he")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"schema_version": "1.0", "run": cfg.to_dict()}))
    assert RunConfig.from_json(path) == cfg


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"clients": 0}, "`--clients` (clients) must be at least 1 (got 0)"),
        ({"batch_size": 0}, "`--batch-size` (batch_size) must be at least 1 (got 0)"),
        ({"dp_epsilon": -1.0}, "`--dp-epsilon` (dp_epsilon)"),
        ({"dp_delta": 1.5}, "`--dp-delta` (dp_delta)"),
        ({"accountant": "moments"}, "`--accountant` (accountant)"),
        ({"secure_agg": "tls"}, "`--secure-agg` (secure_agg)"),
        ({"secagg_ring_bits": 7}, "`--secagg-ring-bits` (secagg_ring_bits)"),
        ({"dropout_clients": 1.5}, "`--dropout-clients` (dropout_clients)"),
        ({"client_fraction": 0.0}, "`--client-fraction` (client_fraction)"),
        ({"seed": -5}, "`--seed` (seed) must be 0 or more (got -5)"),
        ({"public_seed": -1}, "`--public-seed` (public_seed)"),
        ({"num_classes": 1}, "`--num-classes` (num_classes) must be at least 2"),
        ({"secagg_neighbors": 1}, "`--secagg-neighbors` (secagg_neighbors)"),
        ({"he_coeff_mod_bit_sizes": (60, "x")}, "`--he-coeff-bits` (he_coeff_mod_bit_sizes)"),
        ({"data_options": ["n_train"]}, "`--data-option` (data_options)"),
        ({"model": " "}, "`--model` (model) must not be empty"),
    ],
)
def test_invalid_settings_name_the_flag_and_the_field(changes, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        RunConfig(**changes)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"rounds": "two"}, '`--rounds` (rounds) must be an integer (got "two").'),
        ({"clients": None}, "`--clients` (clients) must be an integer (got null)."),
        ({"partition": 5}, "`--partition` (partition) must be a string (got 5)."),
        ({"seed": 1.5}, "`--seed` (seed) must be an integer (got 1.5)."),
        ({"rounds": 2.0}, "`--rounds` (rounds) must be an integer (got 2.0)."),
        ({"clients": True}, "`--clients` (clients) must be an integer (got true)."),
        ({"lr": "0.1"}, '`--lr` (lr) must be a number or null (got "0.1").'),
        ({"augment": 1}, "`--augment` (augment) must be true or false (got 1)."),
        ({"dp_epsilon": "8"}, '`--dp-epsilon` (dp_epsilon) must be a number or null (got "8").'),
        ({"dataset": None}, "`--dataset` (dataset) must be a string (got null)."),
    ],
)
def test_config_files_with_wrong_types_get_one_line(tmp_path, changes, expected):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(changes))
    with pytest.raises(ConfigError) as info:
        RunConfig.from_json(path)
    assert str(info.value) == expected


def test_numbers_are_normalised_and_none_is_kept_where_allowed():
    cfg = RunConfig(lr=1, dp_epsilon=None, he_coeff_mod_bit_sizes=[60, 40, 60])
    assert isinstance(cfg.lr, float) and cfg.dp_epsilon is None
    assert cfg.he_coeff_mod_bit_sizes == (60, 40, 60)
    assert RunConfig(rounds=np.int64(3)).rounds == 3


@pytest.mark.parametrize(
    "changes, fragments",
    [
        # 3 sites, default t = 3: not one may drop
        (
            {"secure_agg": "mask", "dropout_clients": 1},
            ["`--dropout-clients`", "`--secagg-threshold` t = 3", "--secagg-threshold 2"],
        ),
        # an explicit threshold: 5 sites, t = 4 survives at most 1 dropout
        (
            {"secure_agg": "mask", "clients": 5, "secagg_threshold": 4, "dropout_clients": 2},
            ["leaving 3", "t = 4 (set by `--secagg-threshold`)", "--dropout-clients 1 or fewer"],
        ),
        # a rate: half of 4 sites is 2, t = 3 of 4
        ({"secure_agg": "mask", "clients": 4, "dropout_clients": 0.5}, ["drops 2 of the 4"]),
        # SecAgg+: fewer than t sites left anywhere
        (
            {"secure_agg": "mask", "clients": 10, "secagg_neighbors": 4, "dropout_clients": 7},
            ["neighbourhood of 5", "--dropout-clients 6 or fewer"],
        ),
        # plaintext, everyone gone before uploading
        (
            {"dropout_clients": 3, "dropout_phase": "before"},
            ["no update would reach the server", "--dropout-clients 2 or fewer"],
        ),
        # CKKS: a sum of one upload would decrypt to that site's update
        (
            {"secure_agg": "he", "dropout_clients": 2, "dropout_phase": "before"},
            ["he needs at least 2 uploads", "--dropout-clients 1 or fewer"],
        ),
    ],
)
def test_dropouts_that_can_never_reach_the_threshold_are_refused(changes, fragments):
    with pytest.raises(ConfigError) as info:
        RunConfig(**changes)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"secure_agg": "mask", "clients": 4, "dropout_clients": 1},  # t = 3 of 4
        {"secure_agg": "mask", "secagg_threshold": 2, "dropout_clients": 1},
        {"secure_agg": "mask", "clients": 10, "secagg_neighbors": 4, "dropout_clients": 2},
        {"dropout_clients": 2, "dropout_phase": "before"},  # one upload is enough
        {"dropout_clients": 3},  # uploads that arrived are summed
        {"secure_agg": "he", "dropout_clients": 3},
        {"secure_agg": "he", "dropout_clients": 1, "dropout_phase": "before"},
    ],
)
def test_dropouts_that_can_work_are_accepted(changes):
    RunConfig(**changes)


def test_unknown_keys_are_rejected(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rounds": 3, "epsilonn": 8}))
    with pytest.raises(ConfigError, match="epsilonn"):
        RunConfig.from_json(path)


def test_num_classes_reaches_the_loader_once():
    assert RunConfig(data_options={"num_classes": 2}).loader_options == {"num_classes": 2}
    assert RunConfig(num_classes=3, data_options={"n_train": 9}).loader_options == {
        "n_train": 9,
        "num_classes": 3,
    }
    with pytest.raises(ConfigError, match="`--num-classes` .* 3 disagrees"):
        RunConfig(num_classes=3, data_options={"num_classes": 2})


def test_the_masking_ring_is_auto_by_default_and_an_old_record_keeps_its_64_bit_ring(tmp_path):
    assert RunConfig().secagg_ring_bits == "auto"
    assert RunConfig(clients=3).resolved_ring_bits == 30
    assert RunConfig(clients=21).resolved_ring_bits == 33  # a 32-bit quantum exceeds 1e-3
    assert RunConfig(secagg_ring_bits=64).resolved_ring_bits == 64
    assert RunConfig(secagg_ring_bits=24).resolved_ring_bits == 24
    with pytest.raises(ConfigError, match=r"auto or an integer from 8 to 64 \(got \"sixteen"):
        RunConfig(secagg_ring_bits="sixteen")
    for bad in (7, 65, True):
        with pytest.raises(ConfigError, match="secagg_ring_bits"):
            RunConfig(secagg_ring_bits=bad)
    with pytest.raises(ConfigError, match="must be an integer or a string"):
        RunConfig(secagg_ring_bits=32.0)
    # A run recorded before the setting existed (schema < 3.1) masked in a 64-bit ring with
    # a 1e6 clip range: that is what it replays with.
    recorded = RunConfig().to_dict()
    del recorded["secagg_ring_bits"], recorded["secagg_clip"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"schema_version": "3.0", "run": recorded}))
    old = RunConfig.from_json(path)
    assert (old.secagg_ring_bits, old.secagg_clip, old.resolved_ring_bits) == (64, 1e6, 64)
    # One recorded before schema 3.12 (no ring_auto_rule) chose auto's ring among 32 and 64
    # bits, and keeps that ring: the audit rebuilds it.
    recorded = RunConfig(clients=3).to_dict()
    assert recorded.pop("ring_auto_rule") == 2
    assert RunConfig.from_recorded(recorded).resolved_ring_bits == 32
    assert RunConfig.from_recorded({**recorded, "clients": 21}).resolved_ring_bits == 64
    with pytest.raises(ConfigError, match="ring_auto_rule"):
        RunConfig(ring_auto_rule=3)
    # A hand-written file (no "run" block) gets today's default.
    path.write_text(json.dumps({"clients": 3}))
    assert RunConfig.from_json(path).secagg_ring_bits == "auto"


def test_a_peer_of_another_release_is_refused_by_name():
    # A deployment's server and sites must run one release: a missing field would be filled
    # with each side's own default (e.g. auto_rule), an unknown one cannot be honoured.
    from securefed.config import RunConfig
    from securefed.errors import ConfigError

    data = RunConfig().to_dict()
    assert RunConfig.from_peer(data) == RunConfig()
    del data["auto_rule"]
    with pytest.raises(ConfigError, match=r"another securefed release \(no auto_rule\)"):
        RunConfig.from_peer(data)
    with pytest.raises(ConfigError, match=r"another securefed release \(unknown shiny\)"):
        RunConfig.from_peer({**RunConfig().to_dict(), "shiny": 1})


def test_the_ring_constants_of_config_and_codec_agree():
    # config.py cannot import the codec (it would pull in the cryptography package at start-up),
    # so the ring rules and sizes are stated twice: they must be the same.
    from securefed.config import RING_AUTO_RULE, RING_AUTO_RULES, RING_BITS_RANGE
    from securefed.crypto.fixedpoint import RING_RULE, RING_RULE_CHOICES
    from securefed.crypto.prg import RING_BITS_MAX, RING_BITS_MIN

    assert RING_RULE == RING_AUTO_RULE and tuple(RING_RULE_CHOICES) == RING_AUTO_RULES
    assert RING_BITS_RANGE == (RING_BITS_MIN, RING_BITS_MAX)
    assert RING_RULE_CHOICES[2] == tuple(range(RING_BITS_MIN, RING_BITS_MAX + 1))
