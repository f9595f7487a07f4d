import json

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
        ({"clients": 0}, "`clients`"),
        ({"dp_epsilon": -1.0}, "`dp_epsilon`"),
        ({"dp_delta": 1.5}, "`dp_delta`"),
        ({"accountant": "moments"}, "`accountant`"),
        ({"secure_agg": "tls"}, "`secure_agg`"),
        ({"secagg_ring_bits": 16}, "`secagg_ring_bits`"),
        ({"dropout_clients": 1.5}, "`dropout_clients`"),
        ({"client_fraction": 0.0}, "`client_fraction`"),
    ],
)
def test_invalid_settings_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        RunConfig(**changes)


def test_unknown_keys_are_rejected(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rounds": 3, "epsilonn": 8}))
    with pytest.raises(ConfigError, match="epsilonn"):
        RunConfig.from_json(path)
