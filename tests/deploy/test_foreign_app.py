"""A foreign app submitted to a real deployment runs nothing at any site (issue 14, break 3).

Real Flower processes on loopback: a SuperLink and two SuperNodes, with TLS and node
authentication, started the way ``securefed deploy server`` / ``deploy site`` start them. The
attacker is a submitter with only the public ``ca.crt`` and Flower's own ``flwr run``: no
federation key, no registered key. Its app names securefed's own ClientApp (the only one a
site's executor runs) and brings its own ServerApp, which asks every site for its set-up reply
(its data set's fingerprint, held-out size, model shape) under a run configuration of the
attacker's choosing, and writes ``executed-<node>.json`` for every site that answered.

How this was checked against the base commit 60ad9a0: this file (it uses only APIs that
existed there: ``LocalDeployment``, ``launch.flower_home``/``flower_env``) was run in a
worktree of 60ad9a0; ``flwr run`` succeeded, the foreign ServerApp ran, and both sites
answered (two ``executed-*.json`` files with the sites' data fingerprints), so the test
failed there. With the federation key, each site's executor refuses the unsigned run before
the ClientApp is called.

The attacker here is on the server host (the Control API answers only there); from any other
host the API gate refuses ``flwr run`` itself (tests/deploy/test_trust.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from securefed.deploy import launch  # noqa: E402
from securefed.deploy.local import LocalDeployment  # noqa: E402
from tests.conftest import write_small_npz  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FOREIGN_MANIFEST = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "innocent-app"
version = "1.0.0"
description = "not securefed"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "foreign_server:app"
clientapp = "securefed.deploy.site_app:app"

[tool.flwr.app.config]
out = ""
data = ""
"""

FOREIGN_SERVER = '''
"""The attacker's ServerApp: ask every site for its set-up reply, record who answered."""

import json
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from securefed.config import RunConfig
from securefed.protocol.wire import RUN_CONFIG, decode, encode

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["out"]))
    (out / "serverapp-ran").write_text("the foreign ServerApp ran at the server\\n")
    config = RunConfig(
        data=str(context.run_config["data"]), clients=2, dp_epsilon=None,
        secure_agg="none", device="cpu", rounds=1,
    )
    deadline = time.monotonic() + 60
    nodes = []
    while len(nodes) < 2 and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [
        Message(encode({RUN_CONFIG: config.to_dict()}), dst_node_id=n,
                message_type="query.setup", group_id="steal")
        for n in nodes
    ]
    for reply in grid.send_and_receive(messages, timeout=90):
        node = reply.metadata.src_node_id
        if reply.has_error():
            (out / f"refused-{node}.txt").write_text(reply.error.reason)
        else:
            fields = decode(reply.content, what="reply")
            (out / f"executed-{node}.json").write_text(json.dumps(fields, default=str))
'''


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    dep = LocalDeployment(root / "deployment", sites=2)
    try:
        dep.start()
        yield dep, root
    finally:
        dep.close()


def _foreign_run(dep: LocalDeployment, root: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """``flwr run`` of the foreign app by a submitter holding only ca.crt."""
    attacker = root / "attacker"
    (attacker / "tls").mkdir(parents=True)
    shutil.copy(dep.certs / "ca.crt", attacker / "tls" / "ca.crt")  # type: ignore[operator]
    app = attacker / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(FOREIGN_MANIFEST)
    (app / "foreign_server.py").write_text(textwrap.dedent(FOREIGN_SERVER))
    out = attacker / "out"
    out.mkdir()
    npz = write_small_npz(attacker / "data.npz")
    home = attacker / "flwr-home"
    launch.flower_home(home, superlink=dep.superlink, certs=attacker / "tls", insecure=False)
    config = attacker / "run-config.toml"
    config.write_text(f'out = "{out}"\ndata = "{npz}"\n')
    proc = subprocess.run(
        [launch._tool("flwr"), "run", str(app), "securefed", "--run-config", str(config)]
        + ["--stream"],
        env=launch.flower_env(home=home),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    return out, proc


def test_a_foreign_app_runs_nothing_at_any_site(deployment) -> None:
    dep, root = deployment
    out, proc = _foreign_run(dep, root)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    # The attack did reach the sites: its ServerApp ran on the server and sent its messages.
    assert (out / "serverapp-ran").exists(), log
    executed = sorted(p.name for p in out.glob("executed-*"))
    assert executed == [], f"sites answered a foreign run: {executed}"
    refused = sorted(out.glob("refused-*.txt"))
    assert len(refused) == 2, log
    for path in refused:
        assert "not signed by the federation key" in path.read_text(), path.read_text()
    # Each site's own log says why (its executor refused the run before the ClientApp).
    for sid in range(2):
        assert "not signed by the federation key" in (dep.folder / f"site{sid}.log").read_text()


def test_the_federation_s_own_run_still_runs(deployment, tmp_path) -> None:
    """The same deployment runs a run signed with the federation key (one plain round)."""
    from securefed.config import RunConfig

    dep, root = deployment
    npz = write_small_npz(tmp_path / "tiny.npz")
    config = RunConfig(
        data=str(npz), clients=2, rounds=1, dp_epsilon=None, secure_agg="none", device="cpu"
    )
    out = dep.submit(
        config, out=root / "own-run", fit_timeout=240.0, stage_timeout=60.0, connect_timeout=120.0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"][0]["applied"]
