"""The ``securefed`` command line: a thin click layer over the library.

One module per job: :mod:`~securefed.cli.train` (train, pretrain), :mod:`~securefed.cli.deploy`
(deploy, certs), :mod:`~securefed.cli.audit` (audit, report), :mod:`~securefed.cli.bench`;
:mod:`~securefed.cli.options` generates the run options from RunConfig's field metadata.
Nothing here imports torch: ``securefed --help`` and a refused flag answer at once.
"""

from __future__ import annotations

import sys

import click

from securefed.allocator import tune_malloc
from securefed.cli.audit import audit, report
from securefed.cli.bench import bench
from securefed.cli.deploy import certs, deploy, deploy_run
from securefed.cli.options import config_from_flags
from securefed.cli.train import pretrain, train
from securefed.errors import SecureFedError

# The commands too: scripts and tests build a command's context from them (cli.train).
__all__ = [
    "main",
    "cli",
    "audit",
    "bench",
    "certs",
    "deploy",
    "deploy_run",
    "pretrain",
    "report",
    "train",
]

# The name tests and scripts have used since cli was one module (train and deploy run share it).
_config_from_flags = config_from_flags


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="securefed")
def cli() -> None:
    """securefed: federated learning for medical imaging with DP-SGD and secure aggregation.

    Every run writes config.json, metrics.json (+ .csv), privacy.json, model.safetensors and
    summary.md with plots; `securefed audit RUN_DIR` re-checks its privacy claims.
    """
    # Before any tensor exists: training steps then reuse freed memory (securefed.allocator).
    state = tune_malloc()
    if state.startswith("unknown"):
        click.echo(f"warning: {state}", err=True)


for _command in (train, pretrain, audit, bench, report, certs, deploy):
    cli.add_command(_command)


def main() -> None:
    """Console entry point: library errors become one line on stderr and a non-zero exit."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except SecureFedError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
