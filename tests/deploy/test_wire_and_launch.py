"""Deployment pieces that need no running process: wire records, launch commands, checkpoints."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.cli import main
from securefed.config import RunConfig
from securefed.deploy import launch
from securefed.deploy.coordinator import check_deployable
from securefed.deploy.site import NodeSettings
from securefed.dp.ledger import PrivacyEvent, PrivacyLedger
from securefed.dp.trainer import DPPlan, SiteTrainer
from securefed.errors import (
    ConfigError,
    IntegrityError,
    PrivacyBudgetError,
    ProtocolError,
)
from securefed.fl.checkpoint import load_checkpoint, save_checkpoint
from securefed.fl.strategies import build_server_optimizer
from securefed.protocol import wire

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: Flower's own dependency reads TOML the same way
    import tomli as tomllib

# -- wire --------------------------------------------------------------------------------------

#: A federation public key for site commands (any 32 bytes in hex).
FEDERATION_PUB = "ab" * 32
#: RunOptions that sign (the key file is read only when a run is submitted).
SIGNED = {"federation_key": Path("federation.key"), "insecure_no_roster": True}


def _raw_record(values):
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({wire.RECORD: ConfigRecord(values)})


def test_encode_decode_round_trips_every_kind_of_field():
    fields = {
        "blob": b"\x00\xffmasked",
        "name": "site 3",
        "count": 7,
        "ratio": 0.125,
        "flag": True,
        "info": {"a": [1, 2], "b": None},
        "items": [1, "two", 3.5],
        "nothing": None,
    }

    got = wire.decode(wire.encode(fields), what="test")

    assert got == fields
    assert isinstance(got["blob"], bytes) and isinstance(got["flag"], bool)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@settings(max_examples=30, deadline=None)
@given(value=json_values, blob=st.binary(max_size=64))
def test_json_and_bytes_fields_survive_the_record(value, blob):
    fields = {"value": {"nested": value}, "blob": blob}

    assert wire.decode(wire.encode(fields), what="test") == fields


def test_encode_refuses_an_object_that_has_no_wire_form():
    with pytest.raises(TypeError, match="`model`"):
        wire.encode({"model": object()})


def test_decode_refuses_a_message_without_the_securefed_record():
    from flwr.app import ConfigRecord, RecordDict

    other = RecordDict({"other": ConfigRecord({"protocol": wire.PROTOCOL})})

    with pytest.raises(ProtocolError, match="not a securefed message"):
        wire.decode(other, what="fit reply")


def test_decode_refuses_another_protocol_version():
    with pytest.raises(ProtocolError, match="protocol version 2"):
        wire.decode(_raw_record({"protocol": wire.PROTOCOL + 1}), what="fit reply")
    with pytest.raises(ProtocolError, match="protocol version None"):
        wire.decode(_raw_record({"x": 1}), what="fit reply")


def test_decode_refuses_a_json_field_that_is_not_json():
    record = _raw_record({"protocol": wire.PROTOCOL, "json:metrics": "{not json"})

    with pytest.raises(ProtocolError, match="`metrics` is not JSON"):
        wire.decode(record, what="evaluate reply")


def test_vector_bytes_round_trip_is_exact():
    vec = np.array([0.1, -2.5e300, 0.0, 1e-310])

    out = wire.vector_from_bytes(wire.vector_to_bytes(vec), length=4, what="v")

    np.testing.assert_array_equal(out, vec)


@pytest.mark.parametrize(
    ("data", "length", "match"),
    [
        (wire.vector_to_bytes(np.zeros(3)), 4, "expected 4 values, got 3"),
        (wire.vector_to_bytes(np.array([1.0, np.nan])), None, "NaN or infinity"),
        (wire.vector_to_bytes(np.array([np.inf])), 1, "NaN or infinity"),
        (b"\x00" * 7, None, "not a float64 vector"),
    ],
)
def test_vector_from_bytes_refuses_malformed_vectors(data, length, match):
    with pytest.raises(ProtocolError, match=match):
        wire.vector_from_bytes(data, length=length, what="masked input")


def test_payload_size_counts_the_bytes_carried():
    empty = wire.payload_size(wire.encode({"w": b""}))

    full = wire.payload_size(wire.encode({"w": b"x" * 1000}))
    text = wire.payload_size(wire.encode({"w": "y" * 300}))

    assert full - empty == 1000
    assert text - empty == 300


# -- node configuration ------------------------------------------------------------------------


def test_node_settings_reads_flower_node_config():
    got = NodeSettings.from_node_config({"site-id": 0, "shard": True, "dataset": "x"})

    assert got == NodeSettings(site_id=0, dataset="x", shard=True)


@pytest.mark.parametrize(
    ("node_config", "match"),
    [
        ({}, "`site-id`"),
        ({"site-id": -1}, "`site-id`"),
        ({"site-id": True}, "`site-id`"),
        ({"site-id": "0"}, "`site-id`"),
        ({"site-id": 0, "data_dir": "/x"}, "unknown keys \\['data_dir'\\]"),
    ],
)
def test_node_settings_refuses_bad_node_config(node_config, match):
    with pytest.raises(ConfigError, match=match):
        NodeSettings.from_node_config(node_config)


# -- launch commands ---------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path):
    folder = tmp_path / "certs"
    folder.mkdir()
    (folder / "ca.crt").write_text("test CA")
    return folder


def _after(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def test_superlink_command_uses_the_three_tls_files(certs):
    cmd = launch.superlink_command(certs=certs)

    assert _after(cmd, "--ssl-ca-certfile") == str(certs / "ca.crt")
    assert _after(cmd, "--ssl-certfile") == str(certs / "server.pem")
    assert _after(cmd, "--ssl-keyfile") == str(certs / "server.key")
    assert "--insecure" not in cmd
    # Node authentication is on unless turned off; the SuperLink runs behind securefed's gate.
    assert "--enable-supernode-auth" in cmd
    assert cmd[:3] == [sys.executable, "-m", "securefed.deploy.superlink"]
    assert "--expose-control" not in cmd
    off = launch.superlink_command(certs=certs, node_auth=False, expose_control=("10.0.0.0/8",))
    assert "--enable-supernode-auth" not in off
    assert _after(off, "--expose-control") == "10.0.0.0/8"


def test_superlink_command_insecure_only_when_asked_and_node_auth(tmp_path):
    cmd = launch.superlink_command(certs=None, insecure=True, node_auth=True)

    assert "--insecure" in cmd
    assert not any(a.startswith("--ssl") for a in cmd)
    assert "--enable-supernode-auth" in cmd


def test_superlink_command_refuses_both_or_neither_tls_choice(certs, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        launch.superlink_command(certs=certs, insecure=True)
    with pytest.raises(ConfigError, match="securefed certs"):
        launch.superlink_command(certs=None)
    with pytest.raises(ConfigError, match="no ca.crt"):
        launch.superlink_command(certs=tmp_path)


def test_supernode_command_trusts_the_ca_and_names_its_site(certs):
    cmd = launch.supernode_command(
        superlink="10.0.0.1:8000",
        site_id=1,
        certs=certs,
        shard=True,
        auth_key=certs / "k",
        federation_key=FEDERATION_PUB,
    )

    assert _after(cmd, "--root-certificates") == str(certs / "ca.crt")
    node = _after(cmd, "--node-config")
    assert "site-id=1" in node.split()
    assert "shard=true" in node.split()
    assert _after(cmd, "--auth-supernode-private-key") == str(certs / "k")
    assert "--insecure" not in cmd
    assert f'federation-key="{FEDERATION_PUB}"' in node.split()


def test_a_site_needs_the_federation_key(certs):
    with pytest.raises(ConfigError, match="--federation-key"):
        launch.supernode_command(superlink="10.0.0.1:8000", site_id=1, certs=certs)
    with pytest.raises(ConfigError, match="64 hex"):
        launch.supernode_command(
            superlink="10.0.0.1:8000", site_id=1, certs=certs, federation_key="not-a-key"
        )


def test_node_config_values_are_toml_values():
    text = launch.node_config({"site-id": 2, "shard": True, "device": "cpu", "data": None})

    parsed = {}
    for pair in text.split(" "):
        parsed.update(tomllib.loads(pair.replace("=", " = ", 1)))

    assert parsed == {"site-id": 2, "shard": True, "device": "cpu"}


def test_node_config_quotes_a_path_with_spaces_for_flower():
    from flwr.common.config import parse_config_args

    text = launch.node_config({"site-id": 0, "data": "/srv/my hospital/x=1", "dataset": "a b"})

    assert parse_config_args([text]) == {
        "site-id": 0,
        "data": "/srv/my hospital/x=1",
        "dataset": "a b",
    }


@pytest.mark.parametrize("value", ['a"b', "it's", "C:\\data\\site 1", "both ' and \""])
def test_node_config_value_with_quotes_reaches_flower_intact_or_is_refused(value):
    from flwr.common.config import parse_config_args

    try:
        text = launch.node_config({"site-id": 0, "data": value})
    except ConfigError:
        return  # refused before a SuperNode starts: acceptable
    parsed = parse_config_args([text])  # what flower-supernode does with --node-config

    assert parsed == {"site-id": 0, "data": value}


@pytest.mark.parametrize("field", ["fit_timeout", "stage_timeout", "connect_timeout"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_run_options_refuse_non_positive_timeouts(tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"`{field}` must be positive"):
        launch.RunOptions(
            superlink="127.0.0.1:8000",
            certs=None,
            insecure=True,
            out=tmp_path,
            **SIGNED,
            **{field: value},
        )


def test_run_options_refuse_a_negative_stop_after(tmp_path):
    with pytest.raises(ConfigError, match="`stop_after`"):
        launch.RunOptions(
            superlink="127.0.0.1:8000",
            certs=None,
            insecure=True,
            out=tmp_path,
            stop_after=-1,
            **SIGNED,
        )


def test_run_options_need_the_federation_key_and_a_roster_or_the_insecure_switch(tmp_path):
    base = {"superlink": "127.0.0.1:8000", "certs": None, "insecure": True, "out": tmp_path}
    with pytest.raises(ConfigError, match="--federation-key"):
        launch.RunOptions(**base)
    with pytest.raises(ConfigError, match="--roster"):
        launch.RunOptions(**base, federation_key=tmp_path / "federation.key")
    launch.RunOptions(**base, federation_key=tmp_path / "federation.key", insecure_no_roster=True)


# -- what the Flower runtime runs --------------------------------------------------------------


def test_check_deployable_names_everything_it_refuses_in_one_error():
    config = RunConfig(public_fraction=0.2, dropout_clients=1, dp_epsilon=None)

    with pytest.raises(ConfigError) as info:
        check_deployable(config)

    message = str(info.value)
    assert "\n" not in message
    for part in ("--public-fraction", "--dropout-clients"):
        assert part in message


def test_clustered_fl_twins_and_the_cyclic_schedule_are_deployable():
    # One round engine: what runs in-process runs over Flower (CFL, twins, cyclic).
    check_deployable(RunConfig(strategy="cfl", personalize=2, dp_epsilon=None))
    check_deployable(RunConfig(schedule="cyclic"))


@pytest.mark.parametrize("secure_agg", ["none", "mask", "he"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_check_deployable_accepts_every_aggregation_with_fedavg_and_fedprox(strategy, secure_agg):
    check_deployable(RunConfig(secure_agg=secure_agg, strategy=strategy))


# -- checkpoint --------------------------------------------------------------------------------


def _save(tmp_path, round_index=3):
    model = {"conv.weight": torch.randn(2, 3), "fc.bias": torch.arange(4, dtype=torch.float32)}
    opt = {"m": np.linspace(-1.0, 1.0, 5), "v": np.full(5, 0.25)}
    meta = {"config": {"rounds": 5}, "events": [{"round": 1, "client_id": 0}], "delta": 1e-5}
    save_checkpoint(
        tmp_path, round_index=round_index, model_state=model, optimizer_state=opt, meta=meta
    )
    return model, opt, meta


def test_checkpoint_round_trips_weights_optimizer_state_and_meta(tmp_path):
    model, opt, meta = _save(tmp_path)

    ck = load_checkpoint(tmp_path)

    assert ck.round == 3
    assert ck.model_state.keys() == model.keys()
    for name, tensor in model.items():
        assert torch.equal(ck.model_state[name], tensor)
    assert ck.optimizer_state.keys() == opt.keys()
    for name, array in opt.items():
        np.testing.assert_array_equal(ck.optimizer_state[name], array)
    assert ck.meta == meta


@pytest.mark.parametrize("name", ["avgm", "adam"])
def test_checkpoint_restores_the_server_optimizer_state(tmp_path, name):
    opt = build_server_optimizer(name=name, lr=0.5, momentum=0.9)
    opt.step(current=np.zeros(4), delta=np.array([1.0, -2.0, 0.5, 0.0]))
    save_checkpoint(
        tmp_path,
        round_index=1,
        model_state={"w": torch.zeros(1)},
        optimizer_state=opt.state(),
        meta={},
    )
    restored = build_server_optimizer(name=name, lr=0.5, momentum=0.9)

    restored.load_state(load_checkpoint(tmp_path).optimizer_state)

    delta = np.array([0.25, 0.25, -1.0, 2.0])
    np.testing.assert_array_equal(
        restored.step(current=np.ones(4), delta=delta), opt.step(current=np.ones(4), delta=delta)
    )


def test_checkpoint_refuses_weights_that_are_not_the_ones_recorded(tmp_path):
    _save(tmp_path)
    weights = tmp_path / "checkpoint" / "state.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\x00")

    with pytest.raises(IntegrityError, match="state.safetensors"):
        load_checkpoint(tmp_path)


def test_missing_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path)


# -- a site's accounting carried across site processes -----------------------------------------

PLAN = DPPlan(
    noise_multiplier=1.1,
    sample_rate=0.25,
    max_grad_norm=1.0,
    planned_steps=8,
    delta=1e-5,
    accountant="pld",
)


def _trainer(client_id=0):
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    return SiteTrainer(
        client_id=client_id,
        dataset=data,
        plan=PLAN,
        ledger=PrivacyLedger(),
        batch_size=2,
        lr=0.1,
        momentum=0.0,
        device=torch.device("cpu"),
    )


def _event(round_index=1, client_id=0, noise_multiplier=PLAN.noise_multiplier):
    return PrivacyEvent(
        round=round_index,
        client_id=client_id,
        noise_multiplier=noise_multiplier,
        sample_rate=PLAN.sample_rate,
        steps=4,
        max_grad_norm=PLAN.max_grad_norm,
    )


def test_resume_accounting_carries_earlier_rounds_into_epsilon():
    fresh, resumed = _trainer(), _trainer()

    resumed.resume_accounting([_event(1), _event(2)])

    assert fresh.epsilon() == 0.0
    assert resumed.epsilon() > 0.0
    assert len(resumed.ledger.for_client(0)) == 2


def test_resume_accounting_refuses_another_sites_event():
    trainer = _trainer(client_id=0)

    with pytest.raises(PrivacyBudgetError, match="event of site 1"):
        trainer.resume_accounting([_event(client_id=1)])


def test_resume_accounting_refuses_an_event_with_another_noise_multiplier():
    trainer = _trainer()

    with pytest.raises(PrivacyBudgetError, match="does not match this site's privacy plan"):
        trainer.resume_accounting([_event(noise_multiplier=0.5)])


def test_resume_accounting_refuses_a_trainer_that_already_accounted():
    trainer = _trainer()
    trainer.resume_accounting([_event(1)])

    with pytest.raises(PrivacyBudgetError, match="already started"):
        trainer.resume_accounting([_event(2)])


def test_a_refused_history_leaves_the_ledger_untouched():
    trainer = _trainer()

    with pytest.raises(PrivacyBudgetError):
        trainer.resume_accounting([_event(1), _event(2, noise_multiplier=0.5)])

    assert trainer.ledger.events == ()
    assert trainer.epsilon() == 0.0


# -- the CLI -----------------------------------------------------------------------------------


def securefed(monkeypatch, capsys, *args):
    """The console entry point, in this process (one interpreter start less per test)."""
    monkeypatch.setattr(sys, "argv", ["securefed", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr().err.strip()


def _assert_one_line_error(err, *fragments):
    assert "Traceback" not in err, err
    assert err.count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err


def test_deploy_run_refuses_an_in_process_only_option(tmp_path, monkeypatch, capsys):
    config = tmp_path / "run.json"
    config.write_text('{"public_fraction": 0.2, "dp_epsilon": null}')
    code, err = securefed(
        monkeypatch,
        capsys,
        "deploy",
        "run",
        "--config",
        config,
        "--insecure",
        "--out",
        tmp_path / "r",
    )

    assert code == 2
    _assert_one_line_error(err, "--public-fraction", "in-process")
    assert not (tmp_path / "r").exists()


def test_deploy_site_without_tls_choice_points_at_securefed_certs(monkeypatch, capsys):
    code, err = securefed(monkeypatch, capsys, "deploy", "site", "--site-id", "0")

    assert code == 2
    _assert_one_line_error(err, "securefed certs", "--insecure")


# -- a hospital's own privacy policy -------------------------------------------------------------


def test_a_site_refuses_runs_above_its_max_epsilon_or_without_dp():
    node = NodeSettings.from_node_config({"site-id": 1, "max-epsilon": 4})

    node.check_policy(RunConfig(dp_epsilon=4.0))  # at the limit: allowed
    with pytest.raises(PrivacyBudgetError, match="max-epsilon=4"):
        node.check_policy(RunConfig(dp_epsilon=8.0))
    with pytest.raises(PrivacyBudgetError, match="epsilon=inf"):
        node.check_policy(RunConfig(dp_epsilon=None))
    NodeSettings.from_node_config({"site-id": 1}).check_policy(RunConfig(dp_epsilon=None))


@pytest.mark.parametrize("bad", [0, -1.5, "8", True])
def test_max_epsilon_must_be_a_positive_number(bad):
    with pytest.raises(ConfigError, match="max-epsilon"):
        NodeSettings.from_node_config({"site-id": 0, "max-epsilon": bad})


def test_the_site_command_carries_the_policy_to_flower():
    cmd = launch.supernode_command(
        superlink="127.0.0.1:8000",
        site_id=0,
        certs=None,
        insecure=True,
        max_epsilon=4.0,
        federation_key=FEDERATION_PUB,
    )

    assert "max-epsilon=4.0" in cmd[cmd.index("--node-config") + 1]
