"""The run options are generated from RunConfig's field metadata: one field, one option.

Every RunConfig field either has an option that sets it (checked by parsing a value through
`securefed train` and reading it back from the RunConfig) or says why it has none; each
option's --help shows the field's default. In-process through click's runner: no training.
"""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from securefed import plugins
from securefed.cli import cli, deploy_run, train
from securefed.cli.options import config_from_flags, param_name, shown
from securefed.config import Flag, NotAFlag, RunConfig, cli_metadata, flag_for
from securefed.errors import ConfigError

DEFAULTS = RunConfig()
FIELDS = [f.name for f in dataclasses.fields(RunConfig)]
FLAG_FIELDS = [f for f in FIELDS if isinstance(cli_metadata(f), Flag)]


def _help(*command: str) -> str:
    result = CliRunner().invoke(cli, [*command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def _option_entries(text: str) -> dict[str, str]:
    """{"--clients": "--clients INTEGER Number of sites. [default: 3]"} from --help output.

    Keyed by the option's own names only (the first word, ``--a/--b`` split), not by flags
    its help text mentions; whitespace collapsed so a wrapped "[default:\\n 3]" reads as one,
    and a line broken at a hyphen rejoined without one.
    """
    entries: list[str] = []
    for line in text.split("Options:", 1)[1].splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif entries and line.startswith("    "):
            # The help wrapper breaks words at hyphens ("--no-" / "logit-adjust"): such a
            # break rejoins without a space, so a flag name never reads as two words.
            glue = "" if entries[-1].endswith("-") and not entries[-1].endswith(" -") else " "
            entries[-1] = entries[-1].rstrip() + glue + line.strip()
    out = {}
    for entry in entries:
        entry = " ".join(entry.split())
        for name in entry.split(" ")[0].rstrip(",").split("/"):
            out[name] = entry
    return out


def _parse(command, args: list[str]) -> RunConfig:
    """What `command` makes of ``args``: the RunConfig it would run."""
    base = ["--out", "x"] if command is deploy_run else []
    params = dict(command.make_context(command.name, [*base, *args]).params)
    flags = {k: v for k, v in params.items() if k in {param_name(f) for f in FLAG_FIELDS}}
    flags.pop(param_name("data_options"))
    return config_from_flags(
        params["config_file"], params["no_dp"], params[param_name("data_options")], flags
    )


def _names(choices) -> tuple:
    return choices.names() if isinstance(choices, plugins.Registry) else tuple(choices)


def _sample(field: str) -> tuple[list[str], object]:
    """Arguments that set ``field`` to a value other than its default, and that value.

    Derived from the annotation and the metadata alone, so a new field is covered without
    editing this test.
    """
    meta = cli_metadata(field)
    default = getattr(DEFAULTS, field)
    kinds = [k.strip() for k in str(RunConfig.__dataclass_fields__[field].type).split("|")]
    base = next(k for k in kinds if k != "None")
    flag = flag_for(field)
    if base == "bool":
        assert default is False or meta.off, f"{field}: a bare flag cannot switch a True off"
        return ([meta.off] if default else [flag]), not default
    if meta.choices is not None:
        pick = next(c for c in _names(meta.choices) if str(c) != str(default))
        return [flag, str(pick)], pick
    if meta.kind == "epsilon":
        return [flag, "3"], 3.0
    if meta.kind == "ring-bits":
        return [flag, "30"], 30
    if meta.kind == "int-list":
        return [flag, "1,2,3"], (1, 2, 3)
    if meta.kind == "key-value":
        return [flag, "k=1", flag, "s=text"], {"k": 1, "s": "text"}
    if base == "int":
        value = 2 if default is None else default + 1
        return [flag, str(value)], value
    if base == "float":
        value = 0.5 if not default else default / 2
        return [flag, repr(value)], value
    return [flag, "something-else"], "something-else"


def test_every_field_is_an_option_or_says_why_not():
    for field in FIELDS:
        meta = cli_metadata(field)
        assert isinstance(meta, (Flag, NotAFlag)), field
        if isinstance(meta, NotAFlag):
            assert meta.reason.strip(), f"{field}: say why it has no option"
    flags = [flag_for(f) for f in FLAG_FIELDS]
    assert len(set(flags)) == len(flags)  # no two fields share an option


@pytest.mark.parametrize("command", [train, deploy_run], ids=["train", "deploy run"])
@pytest.mark.parametrize("field", FLAG_FIELDS)
def test_each_generated_option_sets_its_field(command, field):
    args, value = _sample(field)
    assert value != getattr(DEFAULTS, field), field
    try:
        config = _parse(command, args)
    except ConfigError as exc:
        # Choices the CLI parses only so that RunConfig refuses them with the reason
        # (--accountant rdp): reaching that check is reaching the field.
        assert flag_for(field) in str(exc), exc
        return
    assert getattr(config, field) == value, (args, getattr(config, field))
    changed = {k for k, v in config.to_dict().items() if v != DEFAULTS.to_dict()[k]}
    assert changed == {field}, changed  # that field and no other


def _expected_default(field: str) -> str | None:
    meta = cli_metadata(field)
    default = getattr(DEFAULTS, field)
    if meta.shown is not None:
        return meta.shown
    if isinstance(default, bool):
        return None if not meta.off else (flag_for(field) if default else meta.off)
    return shown(default)


def test_train_help_shows_each_fields_default():
    entries = _option_entries(_help("train"))
    for field in FLAG_FIELDS:
        entry = entries[flag_for(field)]
        expected = _expected_default(field)
        if expected is None:
            assert "[default:" not in entry, entry  # a bare flag
        else:
            # click adds a range after the default: "[default: whole batch; x>=1]"
            assert f"[default: {expected}]" in entry or f"[default: {expected};" in entry, entry


def test_help_shows_the_run_config_default_itself_unless_told_otherwise():
    """Without ``shown``, the default printed is RunConfig's own value, as a user types it."""
    entries = _option_entries(_help("train"))
    plain = [f for f in FLAG_FIELDS if cli_metadata(f).shown is None and f != "reproducible_noise"]
    assert {"clients", "rounds", "dp_epsilon", "he_coeff_mod_bit_sizes", "strategy"} <= set(plain)
    for field in plain:
        value = getattr(DEFAULTS, field)
        if isinstance(value, bool):
            continue  # shown as the switch that is on (--no-augment)
        assert f"[default: {shown(value)}]" in entries[flag_for(field)], field
    assert "[default: 8.0]" in entries["--dp-epsilon"]
    assert "[default: 60,60,60,38]" in entries["--he-coeff-bits"]


def test_deploy_run_offers_exactly_the_deployable_fields():
    entries = _option_entries(_help("deploy", "run"))
    for field in FLAG_FIELDS:
        meta = cli_metadata(field)
        assert (flag_for(field) in entries) == meta.deploy, field
        if meta.deploy and meta.deploy_choices:
            assert "[" + "|".join(meta.deploy_choices) + "]" in entries[flag_for(field)]


def test_registry_choices_follow_the_plugin_registries(monkeypatch):
    """--strategy lists what plugins.STRATEGIES holds, including one registered later."""
    for flag, registry in (
        ("--strategy", plugins.STRATEGIES),
        ("--server-opt", plugins.SERVER_OPTIMIZERS),
        ("--secure-agg", plugins.SECURE_AGG),
    ):
        assert "[" + "|".join(registry.names()) + "]" in _option_entries(_help("train"))[flag]
    # Registered after the CLI was built (cleaned up by monkeypatch): offered and accepted.
    monkeypatch.setitem(plugins.STRATEGIES._entries, "mystrategy", "somewhere:Mine")
    assert "mystrategy" in _option_entries(_help("train"))["--strategy"]
    assert _parse(train, ["--strategy", "mystrategy"]).strategy == "mystrategy"
    result = CliRunner().invoke(cli, ["train", "--strategy", "nosuch"])
    assert result.exit_code == 2 and "'nosuch' is not one of" in result.output


def test_flags_override_a_config_file_and_leave_its_other_settings(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"clients": 5, "rounds": 3, "he_coeff_mod_bit_sizes": [60, 40, 60]}')
    config = _parse(train, ["--config", str(path), "--rounds", "4", "--dp-epsilon", "inf"])
    assert (config.clients, config.rounds, config.dp_epsilon) == (5, 4, None)
    assert config.he_coeff_mod_bit_sizes == (60, 40, 60)
