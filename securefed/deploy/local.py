"""A whole deployment on one machine: SuperLink + N SuperNodes as real processes on loopback.

For trials, tests and the transport benchmark. Every process is Flower's own, started in its
own process group so a kill takes its children (the ServerApp, ClientApps) with it, and
everything is stopped when the harness closes, even after a failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from securefed.config import RunConfig
from securefed.deploy import launch
from securefed.errors import ConfigError

__all__ = ["LocalDeployment", "free_port"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise ConfigError(f"the SuperLink did not open port {port} within {timeout:g} s")


class LocalDeployment:
    """A SuperLink and ``sites`` SuperNodes on 127.0.0.1, with TLS and node authentication.

    Args:
        folder: Where certificates, logs and the SuperLink's database go.
        sites: Number of site processes.
        tls: Use TLS (a test CA made with :func:`securefed.deploy.certs.create_test_pki`).
        node_auth: Only registered site keys may connect (needs ``tls``).
        shard: Sites take their shard of the run's data set (``--shard``).
        site_options: More :func:`~securefed.deploy.launch.supernode_command` arguments for
            every site.
        roster: Give the sites and the runs the federation's signed roster (``roster.json``,
            from each site's identity key); off, sites start with ``--insecure-no-roster``.
        roster_threshold: The least masking threshold the roster pins (None: a 2/3 majority,
            so 3 sites tolerate no dropout; 2 lets one of 3 drop out).

    As a real federation, it has a federation key (``federation.key``, the admin's) that signs
    the roster and every run it submits; each site pins ``federation.pub``.

    Use as a context manager; :meth:`close` kills every process group.
    """

    def __init__(
        self,
        folder: Path,
        *,
        sites: int,
        tls: bool = True,
        node_auth: bool = True,
        shard: bool = True,
        site_options: dict[str, Any] | None = None,
        roster: bool = True,
        roster_threshold: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n_sites = sites
        self.tls = tls
        self.node_auth = node_auth and tls
        self.shard = shard
        self.site_options = dict(site_options or {})
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        self.certs: Path | None = None
        if tls:
            from securefed.deploy.certs import create_test_pki

            self.certs = create_test_pki(folder=self.folder / "certs", sites=sites).folder
        from securefed.deploy.trust import create_federation_key

        self.federation_key = self.folder / "federation.key"
        if not self.federation_key.exists():
            create_federation_key(self.federation_key)
        self.federation_pub = self.federation_key.with_suffix(".pub")
        self.use_roster = roster
        self.roster_threshold = roster_threshold
        self.roster: Path | None = None
        self.server: subprocess.Popen | None = None
        self.site_procs: dict[int, subprocess.Popen] = {}
        #: Each site's claim-signing public key (hex), for ``securefed audit --site-keys``.
        self.site_keys: dict[int, str] = {}
        self.env = launch.flower_env()
        # All sites share this machine's cores: each site's torch gets its share, as N
        # hospitals would each use their own machine. Without it every site starts one thread
        # per core and N sites oversubscribe the cores N-fold while they train together.
        threads = str(max(1, (os.cpu_count() or 1) // sites))
        self.site_env = {
            **self.env,
            "OMP_NUM_THREADS": self.env.get("OMP_NUM_THREADS", threads),
            "MKL_NUM_THREADS": self.env.get("MKL_NUM_THREADS", threads),
        }

    def _spawn(
        self, cmd: Sequence[str], log: str, *, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        fh = open(self.folder / log, "ab")  # noqa: SIM115  # the child owns it
        try:
            return subprocess.Popen(
                list(cmd),
                env=self.env if env is None else env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            fh.close()

    def start_server(self) -> None:
        """Start (or restart) the SuperLink; its database file keeps site registrations."""
        cmd = launch.superlink_command(
            certs=self.certs,
            insecure=not self.tls,
            port=self.port,
            node_auth=self.node_auth,
            database=self.folder / "superlink.db",
        )
        self.server = self._spawn(cmd, "superlink.log")
        _wait_port(self.port, 60)

    def register_sites(self) -> None:
        """Register each site's public key (node authentication)."""
        if not self.node_auth:
            return
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp)
            launch.flower_home(home, superlink=self.superlink, certs=self.certs, insecure=False)
            for i in range(self.n_sites):
                subprocess.run(
                    launch.register_command(public_key=self.certs / f"site-{i}" / f"site{i}.pub"),  # type: ignore[operator]
                    env=launch.flower_env(self.env, home=home),
                    check=True,
                    capture_output=True,
                    timeout=60,
                )

    def make_roster(self) -> Path:
        """Sign ``roster.json`` with the federation key, from every site's identity key."""
        from securefed.crypto.roster import Roster, sign_roster
        from securefed.deploy.trust import load_federation_key

        keys = {}
        for i in range(self.n_sites):
            hexkey = launch.ensure_signing_key(self.folder / f"site{i}.signing.key")
            self.site_keys[i] = hexkey
            keys[i] = bytes.fromhex(hexkey)
        roster = Roster(
            federation="securefed-local",
            sites=keys,
            min_contributors=min(len(keys), len(keys) // 2 + 1),
            threshold=self.roster_threshold,
        )
        path = self.folder / "roster.json"
        path.write_bytes(sign_roster(roster, load_federation_key(self.federation_key)))
        self.roster = path
        return path

    def site_command(self, site_id: int, **overrides: Any) -> list[str]:
        """The command that starts site ``site_id`` (its keys, the roster, the federation key)."""
        key = self.folder / f"site{site_id}.signing.key"
        self.site_keys[site_id] = launch.ensure_signing_key(key)
        node_key = self.certs / f"site-{site_id}" / f"site{site_id}.key" if self.certs else None
        options: dict[str, Any] = {
            "superlink": self.superlink,
            "site_id": site_id,
            "signing_key": key,
            "certs": self.certs,
            "insecure": not self.tls,
            "shard": self.shard,
            "runtime_port": free_port(),
            "auth_key": node_key if self.node_auth else None,
            "federation_key": self.federation_pub,
            "roster": self.roster,
            "insecure_no_roster": self.roster is None,
            **self.site_options,
            **overrides,
        }
        return launch.supernode_command(**options)

    def start_site(self, site_id: int, **overrides: Any) -> None:
        """Start one SuperNode (``overrides``: other supernode_command arguments, for tests)."""
        cmd = self.site_command(site_id, **overrides)
        self.site_procs[site_id] = self._spawn(cmd, f"site{site_id}.log", env=self.site_env)

    def start(self) -> LocalDeployment:
        """Server, registrations, then every site."""
        if self.use_roster and self.roster is None:
            self.make_roster()
        self.start_server()
        self.register_sites()
        for i in range(self.n_sites):
            self.start_site(i)
        return self

    def kill_site(self, site_id: int) -> None:
        """SIGKILL a site's process group (the SuperNode and its ClientApp executor)."""
        _kill(self.site_procs.pop(site_id))

    def kill_server(self) -> None:
        """SIGKILL the SuperLink's process group (with the ServerApp it runs)."""
        if self.server is not None:
            _kill(self.server)
            self.server = None

    def submit(self, config: RunConfig, *, out: Path, timeout: float = 900, **options: Any) -> Path:
        """``securefed deploy run`` against this deployment."""
        opts = launch.RunOptions(
            superlink=self.superlink,
            certs=self.certs,
            insecure=not self.tls,
            out=Path(out),
            **{
                "federation_key": self.federation_key,
                "roster": self.roster,
                "insecure_no_roster": self.roster is None,
                **options,
            },
        )
        return launch.submit(config, options=opts, stream=False, timeout=timeout, env=self.env)

    def close(self) -> None:
        """Kill every process group still running."""
        for sid in list(self.site_procs):
            self.kill_site(sid)
        self.kill_server()

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    _wait_group_gone(proc.pid, timeout=30)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies awaiting a reaper excluded)."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: any member, zombies included
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its ")".
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_group_gone(pgid: int, *, timeout: float) -> None:
    """Wait until every member of a SIGKILLed group has exited, not only its leader.

    Waiting on the leader returns as soon as it is reaped; the group's other members (the
    Flower processes a site or server starts) die asynchronously, and a loaded machine can
    still show one running right after (seen in CI: a superexec child of a killed group).
    """
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            raise ConfigError(f"process group {pgid} did not exit {timeout:.0f} s after SIGKILL")
        time.sleep(0.05)
