"""The securefed Flower ServerApp: runs a :class:`~securefed.deploy.coordinator.Coordinator`.

Flower starts it on the server machine (next to the SuperLink) for each ``flwr run``. Its
run configuration (``[tool.flwr.app.config]``) carries the securefed configuration as JSON and
the run folder; ``securefed deploy run`` fills them in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from securefed.config import RunConfig
from securefed.crypto.roster import Roster, load_signed_roster
from securefed.deploy.polls import shorten_grid_pulls
from securefed.errors import SecureFedError

__all__ = ["app"]

app = ServerApp()


def _roster(text: str) -> Roster | None:
    """The run's signed roster (checked against the key that signed it), or None if absent.

    ``securefed deploy run`` checked that key is the federation key that signed the run; the
    sites check the run's signature themselves.
    """
    if not text:
        return None
    try:
        signer = bytes.fromhex(str(json.loads(text)["signer"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise SecureFedError(f"the run's roster is not a signed roster file ({exc})") from exc
    return load_signed_roster(text.encode(), federation_key=signer)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation; on a securefed error, leave the one-line reason in the run folder."""
    from securefed.deploy.coordinator import Coordinator, FlowerLink

    logging.getLogger("securefed.deploy").setLevel(logging.INFO)
    # Sites' replies are fetched without Flower's 1 s first back-off (securefed.deploy.polls).
    shorten_grid_pulls()
    rc = context.run_config
    out = Path(str(rc["out"]))
    if not out.is_absolute():
        raise SecureFedError(f"the run folder must be an absolute path (got {out})")
    out.mkdir(parents=True, exist_ok=True)
    error_file = out / "deploy-error.txt"
    error_file.unlink(missing_ok=True)
    try:
        config = RunConfig.from_peer(json.loads(str(rc["config"])))
        stop_after = int(rc.get("stop-after", 0)) or None
        Coordinator(
            config,
            roster=_roster(str(rc.get("roster", ""))),
            link=FlowerLink(grid),
            out=out,
            fit_timeout=float(rc["fit-timeout"]),
            stage_timeout=float(rc["stage-timeout"]),
            connect_timeout=float(rc["connect-timeout"]),
            resume=bool(rc["resume"]),
            stop_after=stop_after,
        ).run()
    except SecureFedError as exc:
        error_file.write_text(f"{type(exc).__name__}: {exc}\n")
        raise
