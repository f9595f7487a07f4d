"""`--help` is a reference: every option shows its default; `deploy run` offers only what it runs.

Read through click's test runner (in-process, a fraction of a second) at a fixed width.
"""

from __future__ import annotations

import re
import sys

import click
import pytest
from click.testing import CliRunner

from securefed.cli import cli, main
from securefed.config import RunConfig

# Options `deploy run` refuses (securefed.deploy.coordinator.check_deployable), with the ones
# that only qualify them.
REFUSED_BY_DEPLOY_RUN = (
    "--public-fraction",
    "--public-seed",
    "--dropout-clients",
    "--dropout-phase",
)
#: Options that run in-process only until #13; the one round engine deploys them too.
DEPLOYED_SINCE_13 = (
    "--schedule",
    "--personalize",
    "--personalize-when",
    "--personalize-lr",
    "--clusters",
)


def _help(*command: str) -> str:
    result = CliRunner().invoke(cli, [*command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def _option_entries(text: str) -> dict[str, str]:
    """{"--clients": "--clients INTEGER  Number of sites.  [default: 3]"} from --help output.

    An entry starts on a line indented by two spaces and a dash; its wrapped lines follow,
    indented further. Whitespace is collapsed, so a wrapped "[default:\\n 3]" reads as one.
    """
    body = text.split("Options:", 1)[1]
    entries: list[str] = []
    for line in body.splitlines():
        if re.match(r"^  -", line):
            entries.append(line)
        elif entries and line.startswith("    "):
            entries[-1] += " " + line
    out = {}
    for entry in entries:
        entry = " ".join(entry.split())
        for name in re.findall(r"(?:^|[ /,] ?)(--?[a-z][a-z0-9-]*)", entry.split("  ")[0]):
            out.setdefault(name, entry)
    return out


def _commands(group: click.Group = cli, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def _needs_no_default(option: click.Option) -> bool:
    """Flags (present or absent), required options and --help itself show no default."""
    return (option.is_flag and not option.secondary_opts) or option.required


@pytest.mark.parametrize(
    "path, command", list(_commands()), ids=[" ".join(p) for p, _ in _commands()]
)
def test_every_option_of_every_command_shows_its_default(path, command):
    entries = _option_entries(_help(*path))
    for option in command.params:
        if not isinstance(option, click.Option) or option.hidden:
            continue
        entry = entries[option.opts[0]]  # every visible option is listed
        if _needs_no_default(option):
            continue
        assert "[default: " in entry, entry


def test_train_shows_the_run_config_defaults():
    entries = _option_entries(_help("train"))
    d = RunConfig()
    for flag, value in {
        "--clients": d.clients,
        "--rounds": d.rounds,
        "--local-epochs": d.local_epochs,
        "--batch-size": "256 with DP; 64 without",
        "--min-steps": d.min_steps,
        "--lr": "2.0 with DP; 0.1 x B/256 without",
        "--dp-epsilon": d.dp_epsilon,
        "--seed": d.seed,
        "--max-grad-norm": "1.0 with DP; no clipping without",
        "--secagg-ring-bits": d.secagg_ring_bits,
        "--he-coeff-bits": "60,60,60,38",
    }.items():
        assert f"[default: {value}]" in entries[flag], entries[flag]
    # click would print a string default as "(auto)"; ours reads as the value to type.
    assert "[default: auto]" in entries["--model"]


def test_deploy_run_help_lists_only_what_a_deployment_runs():
    deploy_help = _help("deploy", "run")
    entries = _option_entries(deploy_help)
    for flag in REFUSED_BY_DEPLOY_RUN:
        assert flag not in entries, flag
        assert flag in _option_entries(_help("train"))  # train still offers it
    for flag in DEPLOYED_SINCE_13:
        assert flag in entries, flag
    assert "cfl" in entries["--strategy"]
    assert "--secure-agg" in entries and "--dp-epsilon" in entries  # train's others stay


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--public-fraction", "0.2"], "--public-fraction"),
        (["--dropout-clients", "1"], "--dropout-clients"),
    ],
)
def test_deploy_run_still_refuses_hidden_options_with_one_line(
    tmp_path, monkeypatch, capsys, args, fragment
):
    # The console entry point in-process (a subprocess per case costs seconds of imports).
    # Refused before anything connects: no SuperLink is needed to see the error.
    argv = ["securefed", "deploy", "run", "--insecure", "--out", str(tmp_path / "run"), *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert "does not support" in err and fragment in err, err
    assert not (tmp_path / "run").exists()


def test_data_option_help_names_the_image_folder_options():
    entry = _option_entries(_help("train"))["--data-option"]
    assert "val_fraction=0.2 (image folder)" in entry, entry
    assert "image_size=64 or [H,W]" in entry, entry
