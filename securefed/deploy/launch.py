"""Start the Flower processes of a deployment and submit runs: the commands behind the CLI.

A deployment is three kinds of process, each on its own machine in real use:

- the **SuperLink** (``flower-superlink``): the server; Flower starts the securefed ServerApp
  next to it for each run;
- one **SuperNode** per hospital (Flower's ``flower-supernode``, run by
  :mod:`securefed.deploy.supernode`), pointing at its own data through its node
  configuration, with one long-lived executor (:mod:`securefed.deploy.executor`) that runs
  the securefed ClientApp for every message;
- ``flwr run``, which submits a run (the securefed Flower App and its configuration).

TLS is on unless ``insecure`` is asked for. These helpers only build argument lists and
environments (and wait for a submitted run); the processes are Flower's own, except the
site's executor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from securefed.config import RunConfig
from securefed.errors import ConfigError, OptionalDependencyError, ProtocolError

__all__ = [
    "DEFAULT_PORT",
    "RunOptions",
    "check_deployable",
    "ensure_signing_key",
    "flower_env",
    "flower_home",
    "node_config",
    "prepare_app",
    "submit",
    "superlink_command",
    "supernode_command",
    "register_command",
]

#: Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTP port.
DEFAULT_PORT = 8000


def _tool(name: str) -> str:
    """A Flower executable from this environment (next to the running Python first)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise OptionalDependencyError(
            f"`{name}` not found: install Flower with  pip install 'securefed[deploy]'"
        )
    return found


def flower_env(
    base: Mapping[str, str] | None = None, *, home: Path | None = None
) -> dict[str, str]:
    """Environment for Flower processes: this Python's tools first on PATH, fast task polling.

    Flower starts the ServerApp (once per run, next to the SuperLink) as a child process found
    on ``PATH``; it must be this environment's, or it would not import securefed. (Sites run
    their ClientApp in securefed's own executor, :mod:`securefed.deploy.executor`.)
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # The SuperLink's SuperExec polls for a new ServerApp task every 1 s by default, so a run
    # could wait up to 1 s to start. Every 0.1 s (until 2026-12-02) cost the SuperLink about a
    # ninth of a core for as long as it ran, runs or none (2.3 against 4.3 CPU-s in 20 idle
    # seconds, measured beside 3 idle sites; docs/deploy.md); 0.5 s left a round's time within
    # noise and delays a run's start by 0.5 s at most.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5")
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def _tls(certs: Path | None, insecure: bool, *, what: str) -> None:
    if insecure and certs is not None:
        raise ConfigError(f"{what}: give either --certs or --insecure, not both")
    if not insecure and certs is None:
        raise ConfigError(
            f"{what}: TLS needs --certs FOLDER (make a test one with `securefed certs`); "
            "--insecure turns encryption off"
        )
    if certs is not None and not (Path(certs) / "ca.crt").exists():
        raise ConfigError(f"{certs}: no ca.crt (create the folder with `securefed certs`)")


def superlink_command(
    *,
    certs: Path | None,
    insecure: bool = False,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    node_auth: bool = True,
    database: Path | None = None,
    expose_control: tuple[str, ...] = (),
) -> list[str]:
    """Flower's ``flower-superlink`` behind securefed's API gate, TLS from ``certs``.

    Run by :mod:`securefed.deploy.superlink`: the sites' Fleet API answers everyone (with
    Flower's node authentication), the Control and Runtime APIs only the server host itself.

    Args:
        certs: Folder written by ``securefed certs`` (or your PKI's files, same names).
        insecure: Plain HTTP (only for a closed test network).
        host: Address to listen on (``0.0.0.0`` for every interface).
        port: The one HTTP port Flower 1.42 serves its APIs on.
        node_auth: Accept only SuperNodes whose public key was registered (default on).
        database: SQLite file for the SuperLink's state (default: in memory).
        expose_control: Networks (CIDR) that may also reach the Control API, which Flower
            1.42 does not authenticate.

    """
    _tls(certs, insecure, what="server")
    _tool("flower-superlink")  # Flower must be installed
    cmd = [sys.executable, "-m", "securefed.deploy.superlink"]
    for net in expose_control:
        cmd += ["--expose-control", net]
    cmd += ["--host", host, "--port", str(port)]
    if insecure:
        cmd.append("--insecure")
    else:
        c = Path(certs)  # type: ignore[arg-type]
        cmd += [
            "--ssl-ca-certfile",
            str(c / "ca.crt"),
            "--ssl-certfile",
            str(c / "server.pem"),
            "--ssl-keyfile",
            str(c / "server.key"),
        ]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    # Nothing is installed at run time: every machine runs the same installed securefed.
    cmd.append("--disable-runtime-dependency-installation")
    return cmd


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if '"' in text:
        # Flower's --node-config parser ends a "..." value at the first quote, escaped or not.
        if "'" in text:
            raise ConfigError(f"{text!r}: a value cannot hold both ' and \" for Flower")
        return f"'{text}'"
    return json.dumps(text)  # a TOML basic string has JSON's escapes


def node_config(settings: Mapping[str, Any]) -> str:
    """Flower's ``--node-config`` string (``key=value`` pairs, TOML values), Nones left out."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in settings.items() if v is not None)


def ensure_signing_key(path: Path) -> str:
    """Load a site's claim-signing key, creating it (mode 0600) on first use.

    Returns:
        The public key as hex: publish it where the run's operator cannot change it, for
        ``securefed audit --site-keys``.

    """
    from securefed.dp.signing import SiteSigner

    path = Path(path)
    if not path.exists():
        SiteSigner.generate().save(path)
    return SiteSigner.load(path).public_key_hex


def supernode_command(
    *,
    superlink: str,
    site_id: int,
    certs: Path | None,
    insecure: bool = False,
    dataset: str | None = None,
    data_dir: str | None = None,
    data: str | None = None,
    shard: bool = False,
    device: str | None = None,
    runtime_port: int | None = None,
    auth_key: Path | None = None,
    he_key: Path | None = None,
    max_epsilon: float | None = None,
    max_delta: float | None = None,
    disclose_size: bool = False,
    signing_key: Path | None = None,
    allow_reproducible_noise: bool = False,
    federation_key: str | Path | None = None,
    roster: Path | None = None,
    min_contributors: int | None = None,
    insecure_no_roster: bool = False,
    privacy_unit: str | None = None,
    group_by: str | None = None,
    allow_labelled_fraction: bool = False,
    allow_local_twins: bool = False,
    keep_twin_metric: bool = False,
    unlabelled: bool = False,
) -> list[str]:
    """The site process for one hospital, its data named in its node configuration.

    Flower's ``flower-supernode`` (its options, TLS and node authentication unchanged) in
    process isolation, with securefed's warm ClientApp executor beside it.

    Args:
        superlink: ``host:port`` of the SuperLink.
        site_id: The site's id, 0..N-1.
        certs: Folder with ``ca.crt`` (the CA that signed the server's certificate).
        insecure: Plain HTTP.
        dataset: Data set name (default: the run's).
        data_dir: Its folder.
        data: A data folder or file of this hospital.
        shard: Take shard ``site_id`` of a data set every site shares (trials).
        device: cpu, cuda or auto.
        runtime_port: Local port of the SuperNode's runtime API (default 9094 + site id, so
            several sites fit on one machine).
        auth_key: This site's private key (``site{i}.key``) when the server authenticates
            SuperNodes.
        he_key: The sites' CKKS secret-context file, for ``--secure-agg he``.
        max_epsilon: The site refuses runs targeting a larger epsilon (or no DP).
        max_delta: The site refuses runs whose delta bound is larger.
        disclose_size: The site allows its training-set size in the run's files.
        signing_key: The site's Ed25519 key file for its signed privacy claims (see
            :func:`ensure_signing_key`).
        allow_reproducible_noise: The site accepts ``--reproducible-noise`` runs (tests and
            research only: their epsilon does not hold against anyone who knows the seed).
        federation_key: The federation's public key (``federation.pub`` or its hex): the
            site runs only runs signed by it. Required.
        roster: The federation's signed roster file (needed for secure aggregation).
        min_contributors: The site's own least number of contributors to a sum (>= 2).
        insecure_no_roster: Accept secure-aggregation runs without a roster (test networks).
        privacy_unit: ``patient``: refuse record-level runs (the site's policy).
        group_by: Where this site's patient ids come from (``--group-by`` syntax).
        allow_labelled_fraction: Accept runs that drop some of the site's label maps.
        allow_local_twins: Accept DP runs whose twins train without DP (``--twin-privacy
            local``), their held-out metric sent outside the site's epsilon.
        keep_twin_metric: Train local twins but send nothing about them (the metric stays in
            the site's log).
        unlabelled: Read the site's NIfTI subjects without a label map as unlabelled.

    """
    _tls(certs, insecure, what=f"site {site_id}")
    if federation_key is None:
        raise ConfigError(
            f"site {site_id}: give --federation-key federation.pub (from the federation's "
            "admin): the site runs only runs signed by that key"
        )
    from securefed.deploy.trust import load_federation_public

    pinned = load_federation_public(federation_key).hex()
    if roster is not None and not Path(roster).is_file():
        raise ConfigError(f"site {site_id}: roster {roster}: no such file")
    _tool("flower-supernode")  # Flower must be installed: the site runs its SuperNode
    cmd = [
        # Flower's flower-supernode entry point, run by securefed's site launcher: one warm
        # ClientApp executor per site and short idle polls (see securefed.deploy.supernode).
        sys.executable,
        "-m",
        "securefed.deploy.supernode",
        "--isolation",
        "process",
        "--superlink",
        superlink,
        "--port",
        str(runtime_port if runtime_port is not None else 9094 + site_id),
        "--node-config",
        node_config(
            {
                "site-id": site_id,
                "dataset": dataset,
                "data-dir": data_dir,
                "data": data,
                "shard": shard or None,
                "device": device,
                "he-key": str(Path(he_key).resolve()) if he_key is not None else None,
                "max-epsilon": float(max_epsilon) if max_epsilon is not None else None,
                "max-delta": float(max_delta) if max_delta is not None else None,
                "disclose-size": True if disclose_size else None,
                "signing-key": str(Path(signing_key).resolve()) if signing_key else None,
                "allow-reproducible-noise": True if allow_reproducible_noise else None,
                "federation-key": pinned,
                "roster": str(Path(roster).resolve()) if roster is not None else None,
                "min-contributors": int(min_contributors) if min_contributors else None,
                "insecure-no-roster": True if insecure_no_roster else None,
                "privacy-unit": privacy_unit,
                "group-by": group_by,
                "allow-labelled-fraction": True if allow_labelled_fraction else None,
                "allow-local-twins": True if allow_local_twins else None,
                "keep-twin-metric": True if keep_twin_metric else None,
                "unlabelled": True if unlabelled else None,
            }
        ),
    ]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(certs) / "ca.crt")]  # type: ignore[arg-type]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def check_deployable(config: RunConfig) -> None:
    """Refuse what the Flower runtime does not run, before anything starts.

    Raises:
        ConfigError: For a public split (its provenance needs the server's copy of the
            sites' data), simulated dropouts (real sites drop out on their own) or an
            empirical audit (an audit run is a separate, declared in-process run).

    """
    problems = []
    if config.public_fraction:
        problems.append("--public-fraction")
    if config.dropout_clients:
        problems.append("--dropout-clients (real sites drop out on their own)")
    if config.audit_canaries:
        problems.append("--audit-canaries (an audit run is a separate in-process run)")
    if problems:
        raise ConfigError(
            "the Flower runtime does not support " + "; ".join(problems) + "; run it in-process"
        )


def prepare_app(folder: Path) -> Path:
    """Copy the securefed Flower App (a manifest; the code is the installed package)."""
    app = Path(folder) / "securefed-app"
    app.mkdir(parents=True, exist_ok=True)
    manifest = resources.files("securefed.deploy").joinpath("app/pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(manifest)
    return app


def flower_home(home: Path, *, superlink: str, certs: Path | None, insecure: bool) -> None:
    """Write a Flower CLI home (``config.toml``) naming this SuperLink as ``securefed``."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "securefed"', "", "[superlink.securefed]"]
    lines.append(f"address = {_toml_value(superlink)}")
    if insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_value(Path(certs).resolve() / 'ca.crt')}")  # type: ignore[arg-type]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def register_command(*, public_key: Path) -> list[str]:
    """``flwr supernode register`` (run with :func:`flower_env` pointing at a Flower home)."""
    return [_tool("flwr"), "supernode", "register", str(public_key), "securefed"]


@dataclass(frozen=True)
class RunOptions:
    """How ``securefed deploy run`` submits a run.

    Attributes:
        superlink: ``host:port`` of the SuperLink.
        certs: Folder with ``ca.crt``; None with ``insecure``.
        insecure: Plain HTTP.
        out: Run folder on the server machine (made absolute).
        resume: Continue from ``out/checkpoint``.
        fit_timeout: Seconds a site may take to train a round.
        stage_timeout: Seconds a site may take for a protocol step.
        connect_timeout: Seconds to wait for every site to connect.
        stop_after: End the run after this many rounds, leaving a checkpoint (drills).
        federation_key: The federation's private key file (``federation.key``): it signs the
            app bundle and the run's configuration; sites run nothing it did not sign.
        roster: The signed roster file (``securefed deploy roster``); the server checks each
            site's identity proof against it. None only with ``insecure_no_roster``.
        insecure_no_roster: Submit without a roster: the server then cannot tell a site that
            claims another's id (closed test networks only).

    """

    superlink: str
    certs: Path | None
    insecure: bool
    out: Path
    resume: bool = False
    fit_timeout: float = 3600.0
    stage_timeout: float = 300.0
    connect_timeout: float = 300.0
    stop_after: int = 0
    federation_key: Path | None = None
    roster: Path | None = None
    insecure_no_roster: bool = False

    def __post_init__(self) -> None:
        _tls(self.certs, self.insecure, what="run")
        if self.federation_key is None:
            raise ConfigError(
                "run: sites only run runs signed by the federation key; give --federation-key "
                "FILE (make one with `securefed deploy federation-key`)"
            )
        if self.roster is None and not self.insecure_no_roster:
            raise ConfigError(
                "run: give --roster FILE (from `securefed deploy roster`) so the server can "
                "check each site's identity; --insecure-no-roster skips that check"
            )
        for name in ("fit_timeout", "stage_timeout", "connect_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"`{name}` must be positive (got {getattr(self, name)})")
        if self.stop_after < 0:
            raise ConfigError(f"`stop_after` must be >= 0 (got {self.stop_after})")


def _manifest_defaults(app: Path) -> dict[str, Any]:
    """The app manifest's ``[tool.flwr.app.config]`` defaults (flat, as Flower fuses them)."""
    from flwr.common.config import flatten_dict

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    manifest = tomllib.loads((Path(app) / "pyproject.toml").read_text())
    return dict(flatten_dict(manifest["tool"]["flwr"]["app"].get("config", {})))


def _signed_roster_text(path: Path, federation: Any) -> str:
    """The signed roster file's text, checked against the federation key that signs the run."""
    from securefed.crypto.roster import federation_public_key, load_signed_roster
    from securefed.errors import IntegrityError

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"roster {path}: {exc.strerror}") from exc
    try:
        load_signed_roster(data, federation_key=federation_public_key(federation))
    except IntegrityError as exc:
        raise ConfigError(f"roster {path}: {exc}") from exc
    return data.decode()


def submit(
    config: RunConfig,
    *,
    options: RunOptions,
    stream: bool = True,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Submit ``config`` to the SuperLink with ``flwr run`` and wait for it to finish.

    Returns:
        The run folder (with config.json, metrics.json, privacy.json, model.safetensors),
        or, with ``stop_after``, the folder holding the checkpoint.

    Raises:
        ConfigError: For a configuration the Flower runtime cannot run.
        ProtocolError: If the run failed; the server's one-line reason is in the message.

    """
    from flwr.cli.build import build_fab_from_disk

    from securefed.deploy.trust import (
        SIGNATURE_KEY,
        SIGNED_AT_KEY,
        load_federation_key,
        sign_run,
    )

    check_deployable(config)
    out = Path(options.out).resolve()
    federation = load_federation_key(options.federation_key)  # type: ignore[arg-type]
    roster = _signed_roster_text(options.roster, federation) if options.roster else ""
    with tempfile.TemporaryDirectory(prefix="securefed-run-") as tmp:
        home = Path(tmp) / "flwr-home"
        flower_home(
            home, superlink=options.superlink, certs=options.certs, insecure=options.insecure
        )
        app = prepare_app(Path(tmp))
        run_config = Path(tmp) / "run-config.toml"
        values = {
            "config": json.dumps(config.to_dict()),
            "out": str(out),
            "resume": options.resume,
            "fit-timeout": float(options.fit_timeout),
            "stage-timeout": float(options.stage_timeout),
            "connect-timeout": float(options.connect_timeout),
            "stop-after": int(options.stop_after),
            "roster": roster,
            # Inside the signature: a site refuses a run first seen long after it was signed.
            SIGNED_AT_KEY: int(time.time()),
        }
        # The signature covers the bundle `flwr run` builds from this folder (the same Flower
        # function, deterministic) and every value of the run configuration the sites will
        # see: the manifest's defaults with these values over them, as Flower fuses them.
        fab = build_fab_from_disk(app)
        seen = {**_manifest_defaults(app), **values}
        values[SIGNATURE_KEY] = sign_run(fab, seen, federation)
        import tomli_w

        run_config.write_text(tomli_w.dumps(values))
        # `--stream` also makes `flwr run` wait for the run to end.
        cmd = [_tool("flwr"), "run", str(app), "securefed", "--run-config", str(run_config)]
        cmd.append("--stream")
        proc = subprocess.run(
            cmd,
            env=flower_env(env, home=home),
            timeout=timeout,
            stdout=None if stream else subprocess.PIPE,
            stderr=subprocess.STDOUT if not stream else None,
            text=True,
            check=False,
        )
    error = out / "deploy-error.txt"
    if error.exists():
        raise ProtocolError(f"the deployed run failed: {error.read_text().strip()}")
    finished = (out / "privacy.json").exists() or (
        options.stop_after and (out / "checkpoint" / "checkpoint.json").exists()
    )
    if proc.returncode != 0 or not finished:
        tail = (proc.stdout or "").strip().splitlines()[-3:] if not stream else []
        raise ProtocolError(
            f"the deployed run did not finish (flwr run exited {proc.returncode}); "
            + (" | ".join(tail) if tail else "see the server's log")
        )
    return out
