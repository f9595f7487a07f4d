"""``securefed audit`` (re-check a run's privacy claims) and ``securefed report``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from securefed.cli.options import option

__all__ = ["audit", "report"]


@click.command()
@click.argument("run_dir", type=click.Path())
@option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@option(
    "--site-keys",
    "site_keys_file",
    type=click.Path(dir_okay=False),
    default=None,
    show_default="none",
    help='Trusted site public keys, JSON {"<client_id>": "<hex>"}; the report\'s keys must '
    "equal them. Without it the report's keys are self-asserted.",
)
@option(
    "--roster",
    "roster_file",
    type=click.Path(dir_okay=False),
    default=None,
    show_default="none",
    help="The federation's roster file (securefed deploy roster): a masking report's "
    "roster_sha256 must be its digest, and its threshold and tolerated colluders follow from "
    "the file's pins. Without it they are the report's own statement.",
)
@option(
    "--allow-reproducible-noise",
    is_flag=True,
    help="Accept a run whose DP noise came from a seed (test runs only: anyone with the seed "
    "can subtract the noise).",
)
@option(
    "--empirical",
    is_flag=True,
    help="Check the run's empirical audit instead (--audit-canaries): recompute eps_emp from "
    "the recorded canary coins and scores and compare it with the analytical ε.",
)
def audit(
    run_dir, as_json, site_keys_file, roster_file, allow_reproducible_noise, empirical
) -> None:
    """Check RUN_DIR's privacy claims against its configuration and execution record.

    \b
    Proves: each DP site's claim (sigma, q, C, delta, planned steps, ledger events,
    epsilon, bound to config.json by run_sha256) carries a valid Ed25519 signature by
    the site's key; the report agrees with config.json (DP on/off, target epsilon,
    rounds, epochs, batch size, secure aggregation, accountant); the ledger has one
    event per round metrics.json lists the site in, of epochs x 1/q steps; sigma is the
    calibrated value; the ledger's epsilon, recomputed with dp_accounting (PLD,
    replace-one), is within the target and not above the claim, and so is the epsilon
    metrics.json and privacy.json state after each round; the noise was secret;
    where the run ended (schema 3.8: every DP site signed a closing claim naming the
    last round, the model files' SHA-256 and its roster, and took no step after it).

    \b
    Cannot prove: that noise was drawn at all (a site that skips it signs the same
    claim; the signature makes the site accountable for its claim, no more; an audit
    run's --empirical check measures it). Without --roster, a masking report's
    threshold and tolerated colluders follow from the roster pins the report states.
    Where a report before 3.8 ended: its sites signed no last round, so a server could
    present an earlier point of the run as the whole run, with a smaller epsilon (sigma
    is still checked against every planned round). Without
    --site-keys the keys are self-asserted by the report: anyone who rewrites the report
    can re-sign it with keys of their own. Pin the keys the sites published.

    \b
    With --empirical (an audit run): recomputes eps_emp, the measured lower bound on
    the audited site's epsilon, from the record the site kept, and checks it is not
    above the analytical epsilon (exit 1 if it is: the claim is refuted at the stated
    confidence). A low eps_emp proves nothing about the claim's tightness.

    \b
    Exit codes:
      0  every claim holds
      1  a claim fails
      2  input unreadable or malformed (or a 1.x report, which predates secret noise)
      3  the run makes no DP claim (config and report agree DP is off): not "verified"
    """  # noqa: D301 (click's \b keeps a paragraph as written)
    if empirical:
        _audit_empirical(run_dir, as_json=as_json, site_keys_file=site_keys_file)
        return
    from securefed.dp.audit import TOLERANCE, audit_run, load_roster_file, load_site_keys
    from securefed.errors import AuditError

    try:
        trusted = load_site_keys(site_keys_file) if site_keys_file else None
        result = audit_run(
            run_dir,
            site_keys=trusted,
            site_keys_source=site_keys_file,
            allow_reproducible_noise=allow_reproducible_noise,
            roster=load_roster_file(roster_file) if roster_file else None,
        )
    except AuditError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        import json

        click.echo(
            json.dumps(
                {
                    "ok": result.ok,
                    "exit_code": result.exit_code,
                    "dp_claim": result.dp_claim,
                    "site_keys": result.keys,
                    "privacy_unit": result.unit,
                    "checks": [c.__dict__ for c in result.checks],
                    "sites": result.rows,
                    "tolerance": TOLERANCE,
                },
                indent=2,
            )
        )
    else:
        if result.rows:
            click.echo(
                f"{'site':>4} {'n':>6} {'delta':>8} {'q':>8} {'sigma':>8} {'steps':>6} "
                f"{'claimed ε':>10} {'PLD ε':>8}"
            )
            for r in result.rows:
                n = "-" if r["num_samples"] is None else r["num_samples"]
                click.echo(
                    f"{r['client_id']:>4} {n:>6} {r['delta']:>8.2g} {r['sample_rate']:>8.4f} "
                    f"{r['noise_multiplier']:>8.4f} {r['steps']:>6} {r['claimed']:>10.4f} "
                    + ("       -" if r["pld"] is None else f"{r['pld']:>8.4f}")
                )
            click.echo(
                f"(ε per {result.unit}; PLD, replace-one, recomputed with Google's "
                "dp_accounting from the report's ledger; no RDP column: dp_accounting's RDP "
                "cannot do replace-one under Poisson sampling; n '-' = not disclosed)"
            )
        for c in result.checks:
            click.echo(f"[{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
        if result.dp_claim and result.rows:
            click.echo(
                "site keys: "
                + (
                    f"pinned by {site_keys_file}"
                    if result.keys == "pinned"
                    else "self-asserted by the report (not pinned; pass --site-keys)"
                )
            )
        if not result.ok:
            click.echo("audit: some claims FAIL")
        elif not result.dp_claim:
            click.echo("audit: no DP claim to verify (DP off in config and report)")
        else:
            click.echo("audit: all claims hold")
    sys.exit(result.exit_code)


def _audit_empirical(run_dir: str, *, as_json: bool, site_keys_file: str | None) -> None:
    """``securefed audit --empirical``: exit 0 (holds), 1 (refuted) or 2 (bad input)."""
    from securefed.dp.audit import load_site_keys
    from securefed.dp.empirical import check_audit_run
    from securefed.errors import AuditError

    try:
        keys = load_site_keys(site_keys_file) if site_keys_file else None
        result = check_audit_run(run_dir, site_keys=keys)
    except AuditError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        import json

        click.echo(json.dumps(result, indent=2))
    else:
        verdict = "PASS" if result["holds"] else "FAIL"
        relation = "<=" if result["holds"] else ">"
        click.echo(
            f"[{verdict}] site {result['site']}: eps_emp {result['eps_emp']:.4f} (recomputed from "
            f"{result['K']} canaries, {result['correct']}/{result['guesses']} guesses right, "
            f"{result['confidence']:.0%} confidence) {relation} analytical epsilon "
            f"{result['epsilon']:.4f}"
        )
        click.echo(
            "eps_emp is a lower bound: above the claim it refutes it; below, it shows the "
            "mechanism leaks at least that much, not that the claim is tight."
        )
    sys.exit(0 if result["holds"] else 1)


@click.command()
@click.argument("folder", type=click.Path())
def report(folder) -> None:
    """Render FOLDER's summary.md and a self-contained report.html (a run or a bench suite)."""
    from securefed.report.html import render_report

    summary, page = render_report(Path(folder))
    click.echo(f"{summary}\n{page}")
