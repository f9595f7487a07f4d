"""``securefed deploy`` (a server, one site process per hospital) and ``securefed certs``.

``deploy run`` takes ``train``'s generated RunConfig options, shaped by each field's
``Flag.deploy``: what the Flower runtime refuses still parses (so the refusal is one line
naming the option) but is not offered in its ``--help``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from securefed.cli.options import config_from_flags, field_option, option, run_config_options
from securefed.cli.train import CONFIG_OPTION, NO_DP_OPTION, run_line

__all__ = ["certs", "deploy", "deploy_run"]


@click.command()
@option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@option(
    "--hosts",
    default="127.0.0.1,localhost",
    show_default=True,
    help="Comma-separated names/IPs the sites dial the server by (certificate SANs).",
)
@option("--sites", type=int, default=3, show_default=True, help="Site key pairs to make.")
@option("--days", type=int, default=30, show_default=True, help="Validity in days.")
@option("--overwrite", is_flag=True, help="Replace existing files.")
def certs(out, hosts, sites, days, overwrite) -> None:
    """Create a TEST certificate authority, server certificate and site keys (for trials).

    Writes ca.crt, server.pem/server.key (the server's), ca/ca.key (the CA's, kept apart) and
    site-<i>/ (site i's own: site<i>.key, site<i>.pub, ca.crt). A hospital deployment uses
    certificates from its own PKI, with the same file names.
    """
    from securefed.deploy.certs import create_test_pki

    made = create_test_pki(
        folder=Path(out),
        hosts=tuple(h.strip() for h in hosts.split(",") if h.strip()),
        sites=sites,
        days=days,
        overwrite=overwrite,
    )
    click.echo(
        f"test PKI in {made.folder}: ca.crt, server.pem/.key, ca/ca.key, "
        f"site-0..site-{sites - 1}/ (give site i only its folder)"
        if sites
        else f"test PKI in {made.folder}: ca.crt, server.pem/.key, ca/ca.key"
    )


@click.group()
def deploy() -> None:
    """Run securefed across machines on Flower: a server, one site process per hospital."""


def _tls_options(f):
    f = option("--insecure", is_flag=True, help="No TLS (closed test networks only).")(f)
    return option(
        "--certs",
        type=click.Path(file_okay=False, exists=True),
        default=None,
        show_default="none",
        help="Folder with ca.crt (and, for the server, server.pem/server.key).",
    )(f)


def _exec(cmd: list[str]) -> None:
    """Run a Flower process in the foreground with securefed's environment."""
    import subprocess

    from securefed.deploy.launch import flower_env

    click.echo("$ " + " ".join(cmd), err=True)
    try:
        code = subprocess.call(cmd, env=flower_env())
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


@deploy.command("server")
@_tls_options
@option("--host", default="127.0.0.1", show_default=True, help="Listen address.")
@option("--port", type=int, default=8000, show_default=True, help="The one HTTP port.")
@option(
    "--node-auth/--no-node-auth",
    default=True,
    show_default=True,
    help="Accept only registered site keys. --no-node-auth lets any holder of ca.crt join as "
    "a site (closed test networks only).",
)
@option(
    "--expose-control",
    multiple=True,
    metavar="CIDR",
    help="Also answer the Control API (flwr run, register) to this network; Flower 1.42 does "
    "not authenticate it [default: the server host only]. Repeatable.",
)
@option(
    "--database",
    type=click.Path(dir_okay=False),
    default=None,
    show_default="in memory",
    help="SQLite file for the server's state (node registrations survive a restart).",
)
def deploy_server(certs, insecure, host, port, node_auth, expose_control, database) -> None:
    """Start the Flower SuperLink (the server) with TLS and node authentication.

    The sites' API answers on HOST:PORT; the Control API (runs, registrations) only to the
    server host itself unless --expose-control names a network.
    """
    from securefed.deploy.launch import superlink_command

    if not node_auth:
        click.echo("warning: --no-node-auth: any holder of ca.crt can connect as a site", err=True)
    if expose_control:
        click.echo(
            "warning: --expose-control: anyone in "
            + ", ".join(expose_control)
            + " can submit runs (Flower 1.42 has no Control API authentication); sites still "
            "run only runs signed by the federation key",
            err=True,
        )
    _exec(
        superlink_command(
            certs=Path(certs) if certs else None,
            insecure=insecure,
            host=host,
            port=port,
            node_auth=node_auth,
            database=Path(database) if database else None,
            expose_control=tuple(expose_control),
        )
    )


@deploy.command("register")
@_tls_options
@option("--superlink", default="127.0.0.1:8000", show_default=True, help="host:port.")
@click.argument("public_key", type=click.Path(dir_okay=False, exists=True))
def deploy_register(certs, insecure, superlink, public_key) -> None:
    """Register a site's node key (site-<i>/site<i>.pub); run it on the server host."""
    import subprocess
    import tempfile

    from securefed.deploy.launch import flower_env, flower_home, register_command

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        flower_home(
            home, superlink=superlink, certs=Path(certs) if certs else None, insecure=insecure
        )
        code = subprocess.call(
            register_command(public_key=Path(public_key)), env=flower_env(home=home)
        )
    sys.exit(code)


@deploy.command("site")
@_tls_options
@option("--superlink", default="127.0.0.1:8000", show_default=True, help="host:port.")
@option("--site-id", type=int, required=True, help="This hospital's id, 0..N-1.")
@option("--dataset", default=None, help="Data set name [default: the run's].")
@option("--data-dir", default=None, show_default="none", help="Folder of the data set.")
@option("--data", default=None, show_default="none", help="This hospital's data folder or file.")
@option(
    "--shard",
    is_flag=True,
    help="Trials: take shard SITE_ID of a data set all sites share, as in-process.",
)
@option("--device", default=None, help="cpu, cuda or auto [default: the run's].")
@option("--runtime-port", type=int, default=None, show_default="9094 + site id", help="Local port.")
@option(
    "--auth-key",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    show_default="none",
    help="This site's node key (site-<i>/site<i>.key), registered with the server.",
)
@option(
    "--he-key",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    show_default="none",
    help="The sites' CKKS secret context (ckks-<id>.secret) for --secure-agg he.",
)
@option(
    "--max-epsilon",
    type=float,
    default=None,
    show_default="no limit",
    help="This hospital's policy: refuse runs targeting a larger epsilon, or no DP.",
)
@option(
    "--max-delta",
    type=float,
    default=None,
    show_default="no limit",
    help="This hospital's policy: refuse runs whose delta bound (--dp-delta) is larger.",
)
@option(
    "--disclose-size",
    is_flag=True,
    help="Allow this site's training-set size and class counts into the run's files (off: they "
    "stay here).",
)
@option(
    "--signing-key",
    type=click.Path(dir_okay=False),
    default=None,
    help="This site's Ed25519 key for its signed privacy claims; created (0600) if missing "
    "[default: site<SITE_ID>.signing.key in the current folder].",
)
@option(
    "--allow-reproducible-noise",
    is_flag=True,
    help="Accept --reproducible-noise runs (research only: their ε does not hold against "
    "anyone who knows the seed).",
)
@option(
    "--federation-key",
    default=None,
    show_default="required",
    help="The federation's public key (federation.pub, or its hex): this site runs only runs "
    "signed by it.",
)
@option(
    "--roster",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    show_default="none",
    help="The federation's signed roster (roster.json); needed for --secure-agg mask|he.",
)
@option(
    "--min-contributors",
    type=click.IntRange(min=2),
    default=None,
    show_default="the roster's",
    help="This site's own least number of sites in any sum it helps reveal.",
)
@option(
    "--insecure-no-roster",
    is_flag=True,
    help="Take part in plaintext runs without a roster (closed test networks only: the "
    "server then takes any site id as claimed). Secure aggregation always needs the roster.",
)
@option(
    "--privacy-unit",
    type=click.Choice(["record", "patient"]),
    default=None,
    show_default="either",
    help="This hospital's policy: 'patient' refuses runs whose ε is per record.",
)
@option(
    "--allow-labelled-fraction",
    is_flag=True,
    help="Accept runs with --labelled-fraction below 1 (they drop some of this site's label "
    "maps, to measure semi-supervised training).",
)
@option(
    "--keep-twin-metric",
    is_flag=True,
    help="Under --twin-privacy local, train this site's twin but send nothing about it (its "
    "metric goes to this site's log): every value the site sends stays within its ε.",
)
@option(
    "--allow-local-twins",
    is_flag=True,
    help="Accept DP runs with --twin-privacy local (this site's twin trains without DP; its "
    "held-out metric reaches the server outside this site's ε).",
)
@option(
    "--group-by",
    default=None,
    show_default="none",
    help="Where this site's patient ids come from, in --group-by syntax (docs/patients.md).",
)
@option(
    "--unlabelled",
    is_flag=True,
    help="Read this site's NIfTI subjects without a label map as unlabelled training "
    "subjects (teacher-student runs only; a run cannot turn this on).",
)
def deploy_site(
    certs,
    insecure,
    superlink,
    site_id,
    dataset,
    data_dir,
    data,
    shard,
    device,
    runtime_port,
    auth_key,
    he_key,
    max_epsilon,
    max_delta,
    disclose_size,
    signing_key,
    allow_reproducible_noise,
    federation_key,
    roster,
    min_contributors,
    insecure_no_roster,
    privacy_unit,
    allow_labelled_fraction,
    allow_local_twins,
    keep_twin_metric,
    group_by,
    unlabelled,
) -> None:
    """Start one hospital's Flower SuperNode, pointing at its own data.

    The site signs its privacy claim every round with its own key; the public key is printed
    here: publish it where the server's operator cannot change it, for
    `securefed audit --site-keys`.
    """
    from securefed.deploy.launch import ensure_signing_key, supernode_command

    key = Path(signing_key or f"site{site_id}.signing.key")
    cmd = supernode_command(
        superlink=superlink,
        site_id=site_id,
        certs=Path(certs) if certs else None,
        insecure=insecure,
        dataset=dataset,
        data_dir=data_dir,
        data=data,
        shard=shard,
        device=device,
        runtime_port=runtime_port,
        auth_key=Path(auth_key) if auth_key else None,
        he_key=Path(he_key) if he_key else None,
        max_epsilon=max_epsilon,
        max_delta=max_delta,
        disclose_size=disclose_size,
        signing_key=key,
        allow_reproducible_noise=allow_reproducible_noise,
        federation_key=federation_key,
        roster=Path(roster) if roster else None,
        min_contributors=min_contributors,
        insecure_no_roster=insecure_no_roster,
        privacy_unit=privacy_unit,
        group_by=group_by,
        allow_labelled_fraction=allow_labelled_fraction,
        allow_local_twins=allow_local_twins,
        keep_twin_metric=keep_twin_metric,
        unlabelled=unlabelled,
    )
    # After the command's own checks (TLS choice), so a refused start writes no key.
    click.echo(f"site {site_id} signing key {key}: {ensure_signing_key(key)}", err=True)
    _exec(cmd)


@deploy.command("he-keys")
@option("--out", type=click.Path(file_okay=True), required=True, help="Existing folder.")
@field_option("he_poly_modulus_degree")
@field_option("he_coeff_mod_bit_sizes")
@field_option("he_scale_bits")
def deploy_he_keys(out, **flags) -> None:
    """Create the sites' shared CKKS key set (run it at one site; copy to the others).

    Writes ckks-<id>.secret (0600, for the sites only) and ckks-<id>.public. Use the same
    --he-* options as the run. The server never needs a file: sites send it the public context.
    """
    from securefed.crypto.ckks import CKKSParams, generate_keys, write_key_files

    # Through RunConfig, so the values are checked as a run's would be.
    config = config_from_flags(None, False, (), flags).replace(secure_agg="he")
    params = CKKSParams(
        poly_modulus_degree=config.he_poly_modulus_degree,
        coeff_mod_bit_sizes=config.he_coeff_mod_bit_sizes,
        global_scale_bits=config.he_scale_bits,
    )
    keys = generate_keys(params=params)
    Path(out).mkdir(parents=True, exist_ok=True)
    secret, public = write_key_files(keys, directory=out)
    click.echo(f"CKKS key set: {secret} (sites only) and {public}")


@deploy.command("federation-key")
@option(
    "--out",
    type=click.Path(dir_okay=False),
    required=True,
    help="Private key file to create (e.g. federation.key); its .pub is written beside it.",
)
def deploy_federation_key(out) -> None:
    """Create the federation key (the admin keeps it; sites get the .pub).

    It signs the roster and every run; sites run nothing it did not sign.
    """
    from securefed.deploy.trust import create_federation_key

    public = create_federation_key(out)
    pub = Path(out).with_suffix(".pub")
    click.echo(f"federation key {out} (keep it); public key {pub} (for the sites): {public}")


@deploy.command("site-key")
@option(
    "--signing-key",
    type=click.Path(dir_okay=False),
    required=True,
    help="This site's Ed25519 identity/signing key; created (0600) if missing.",
)
def deploy_site_key(signing_key) -> None:
    """Print a site's identity public key (hex), creating the key if needed.

    Send the hex to the federation's admin for the roster; the key itself stays at the site.
    """
    from securefed.deploy.launch import ensure_signing_key

    click.echo(ensure_signing_key(Path(signing_key)))


@deploy.command("roster")
@option(
    "--federation-key",
    type=click.Path(dir_okay=False, exists=True),
    required=True,
    help="The federation's private key (federation.key).",
)
@option("--federation", "name", default="securefed", show_default=True, help="Federation name.")
@option(
    "--site",
    "sites",
    multiple=True,
    required=True,
    metavar="ID=KEY",
    help="A site's id and identity public key (hex from `deploy site-key`, or a file with it). "
    "Repeat for every site.",
)
@option(
    "--min-contributors",
    type=click.IntRange(min=2),
    default=None,
    show_default="a majority of the roster, floor(n/2) + 1",
    help="Fewest sites in any sum a site helps reveal. A majority means a server can never "
    "split one round's sites into two groups and learn each group's sum; lower it only for "
    "runs that sample fewer sites per round (--client-fraction).",
)
@option(
    "--threshold",
    type=int,
    default=None,
    show_default="floor(2m/3) + 1 of a site's m share holders",
    help="Masking threshold t every site uses (never below a strict majority of the holders). "
    "It trades collusion for dropout tolerance: a round survives m - t dropouts and a server "
    "colluding with fewer than 2t - m sites; each step down buys one dropout for two colluders.",
)
@option("--out", type=click.Path(dir_okay=False), required=True, help="Signed roster to write.")
def deploy_roster(federation_key, name, sites, min_contributors, threshold, out) -> None:
    """Write the federation's signed roster: site ids and their identity keys.

    Give it to the server (`deploy run --roster`) and to every site (`deploy site --roster`).
    """
    from securefed.crypto.roster import Roster, sign_roster
    from securefed.deploy.trust import load_federation_key, load_federation_public
    from securefed.errors import ConfigError

    keys: dict[int, bytes] = {}
    for item in sites:
        sid, sep, value = item.partition("=")
        if not sep or not sid.strip().isdigit():
            raise ConfigError(f"--site {item!r}: expected ID=KEY (e.g. 0=site0.id.pub)")
        if int(sid) in keys:
            raise ConfigError(f"--site: site {sid} given twice")
        keys[int(sid)] = load_federation_public(value)
    if min_contributors is None:
        min_contributors = min(len(keys), len(keys) // 2 + 1) if len(keys) >= 2 else 1
    roster = Roster(
        federation=name, sites=keys, min_contributors=min_contributors, threshold=threshold
    )
    data = sign_roster(roster, load_federation_key(federation_key))
    Path(out).write_bytes(data)
    click.echo(f"roster {out}: {len(keys)} sites, min_contributors {min_contributors}")


def _with_recorded_settings(config: Any, out: Path) -> Any:
    """``config`` with the checkpoint's values of the settings no option sets.

    Such a setting (e.g. ``auto_rule``, the ``--model auto`` rule) is the one the run
    started with, which a user resuming an older run cannot type; every other difference is
    still refused when the checkpoint is restored. No checkpoint: ``config`` as it is.
    """
    from securefed.config import RunConfig
    from securefed.fl.checkpoint import load_checkpoint

    if not (out / "checkpoint" / "checkpoint.json").exists():
        return config
    return config.with_unflagged_of(
        RunConfig.from_recorded(dict(load_checkpoint(out).meta["config"]))
    )


@deploy.command("run")
@_tls_options
@option("--superlink", default="127.0.0.1:8000", show_default=True, help="host:port.")
@option("--out", type=click.Path(file_okay=False), required=True, help="Run folder.")
@option("--resume", is_flag=True, help="Continue from OUT/checkpoint after a restart.")
@option("--fit-timeout", type=float, default=3600.0, show_default=True, help="Seconds.")
@option("--stage-timeout", type=float, default=300.0, show_default=True, help="Seconds.")
@option("--connect-timeout", type=float, default=300.0, show_default=True, help="Seconds.")
@option(
    "--stop-after",
    type=int,
    default=0,
    show_default="0: run every round",
    help="Stop after N rounds (drills).",
)
@option(
    "--federation-key",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    show_default="required",
    help="The federation's private key (federation.key): signs the app and this run's "
    "configuration; sites run nothing else.",
)
@option(
    "--roster",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    show_default="required, or --insecure-no-roster",
    help="The federation's signed roster: the server checks every site's identity against it.",
)
@option(
    "--insecure-no-roster",
    is_flag=True,
    help="Run without a roster (a site's id is then taken as claimed; test networks only).",
)
# `train`'s options (its --out, --quiet and --resume aside: this command has its own).
@CONFIG_OPTION
@run_config_options(deploy=True, after={"dp_epsilon": [NO_DP_OPTION]})
def deploy_run(
    certs,
    insecure,
    superlink,
    out,
    resume,
    fit_timeout,
    stage_timeout,
    connect_timeout,
    stop_after,
    federation_key,
    roster,
    insecure_no_roster,
    config_file,
    no_dp,
    data_option,
    **flags,
) -> None:
    """Submit a run to a deployment and wait.

    Takes `securefed train`'s options, except what only the in-process runtime runs for now:
    cfl, twins (--personalize), --schedule cyclic, --public-fraction, --dropout-clients.
    """
    from securefed.deploy.launch import RunOptions, check_deployable, submit

    config = config_from_flags(config_file, no_dp, data_option, flags)
    if resume:
        config = _with_recorded_settings(config, Path(out))
    check_deployable(config)  # what the Flower runtime cannot run, before any other check
    options = RunOptions(
        superlink=superlink,
        certs=Path(certs) if certs else None,
        insecure=insecure,
        out=Path(out),
        resume=resume,
        fit_timeout=fit_timeout,
        stage_timeout=stage_timeout,
        connect_timeout=connect_timeout,
        stop_after=stop_after,
        federation_key=Path(federation_key) if federation_key else None,
        roster=Path(roster) if roster else None,
        insecure_no_roster=insecure_no_roster,
    )
    run_dir = submit(config, options=options)
    click.echo(run_line(run_dir) if (run_dir / "privacy.json").exists() else f"stopped: {run_dir}")
