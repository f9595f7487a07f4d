"""Real tiny runs for the audit tests, and the rewrites an attacker would make to them."""

from __future__ import annotations

import shutil
from pathlib import Path

from securefed.dp.report import read_json, report_hash, write_json


def tiny_run(d: Path, *, dp: bool = True, noise: str = "secret", **overrides) -> Path:
    """Train a real 2-site, 2-round run into ``d / 'run'`` (a few seconds on CPU)."""
    from securefed.config import RunConfig
    from tests.conftest import write_small_npz

    npz = write_small_npz(d / "tiny.npz")
    kwargs = dict(
        data=str(npz),
        clients=2,
        rounds=2,
        local_epochs=1,
        batch_size=32,
        dp_epsilon=4.0 if dp else None,
        device="cpu",
        accountant="pld",
        reproducible_noise=noise == "reproducible",
    )
    kwargs.update(overrides)
    from securefed.run import train

    return train(RunConfig(**kwargs), out_dir=d / "run", progress=False)


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of a module-scoped run that a test may tamper with."""
    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    return dst


#: ``relabel``'s value for "delete the key", as a run recorded before it existed.
ABSENT = "absent"


def relabel(run_dir: Path, tmp_path: Path, key: str, value: object) -> Path:
    """A copy of a run whose config.json's ``run[key]`` is ``value`` (or deleted for
    :data:`ABSENT`), re-signed and re-hashed as a rewriter holding the site keys would."""
    d = copy_run(run_dir, tmp_path)
    config = read_json(d / "config.json")
    if value == ABSENT:
        del config["run"][key]
    else:
        config["run"][key] = value
    write_json(d / "config.json", config)
    resign(d)
    return d


def as_older_release(d: Path, *, without: str, schema: str) -> tuple[object, dict[int, str]]:
    """Rewrite run ``d`` as a release from before ``without`` existed wrote it: the key gone
    from config.json's run, privacy.json's ``schema`` version, claims signed without it.

    Returns:
        The value the key had, and the new public keys (as :func:`resign`).

    """
    config = read_json(d / "config.json")
    value = config["run"].pop(without)
    write_json(d / "config.json", config)
    privacy = read_json(d / "privacy.json")
    privacy["schema_version"] = schema
    write_json(d / "privacy.json", privacy)
    return value, resign(d)


def audit_json(d: Path, *args: str, checks: dict | None = None) -> tuple[int, list[str]]:
    """``securefed audit d --json ARGS``: its exit code and its failed checks' names.

    ``checks``, when given, receives every check's name and detail.
    """
    import json

    from click.testing import CliRunner

    from securefed.cli import cli

    res = CliRunner().invoke(cli, ["audit", str(d), "--json", *args])
    assert res.exit_code in (0, 1), res.output
    out = json.loads(res.stdout)
    if checks is not None:
        checks.update({c["name"]: c["detail"] for c in out["checks"]})
    return res.exit_code, sorted(c["name"] for c in out["checks"] if not c["ok"])


def resign(d: Path) -> dict[int, str]:
    """Re-sign every DP site's claim with fresh keys and rehash, as a rewriter would.

    Returns:
        The new public keys.

    """
    from securefed.dp.signing import SiteSigner, sign_report

    privacy = read_json(d / "privacy.json")
    config = read_json(d / "config.json")
    signers = {
        int(c["client_id"]): SiteSigner.generate()
        for c in privacy["clients"]
        if c.get("noise_multiplier") is not None
    }
    sign_report(privacy, run=config["run"], signers=signers)
    write_json(d / "privacy.json", privacy)
    rehash(d)
    return {k: s.public_key_hex for k, s in signers.items()}


def rehash(d: Path) -> None:
    """Recompute the unkeyed hash, as an attacker who rewrote the files would."""
    privacy = read_json(d / "privacy.json")
    privacy["sha256"] = report_hash(
        privacy=privacy, config=read_json(d / "config.json"), metrics=read_json(d / "metrics.json")
    )
    write_json(d / "privacy.json", privacy)


def reclaim(privacy: dict) -> None:
    """Make the epsilons and counts agree with the (edited) ledger, as a careful rewriter would.

    Each site's epsilon per round is recomputed with the audit's own accountant, and its step
    and release counts from the edited events, so only the audit's binding checks can tell.
    """
    from securefed.dp.audit import independent_epsilon
    from securefed.dp.releases import PHASES

    counts = {
        "calibrate": "calibration_releases",
        "fair-loss": "fair_loss_releases",
        "class-prior": "class_prior_releases",
    }
    for c in privacy["clients"]:
        ev = [e for e in privacy["events"] if e["client_id"] == c["client_id"]]
        per_round = [
            independent_epsilon(
                events=[
                    (e["noise_multiplier"], e["sample_rate"], e["steps"])
                    for e in ev
                    if e["round"] <= r
                ],
                delta=c["delta"],
            )
            for r in range(1, privacy["rounds"] + 1)
        ]
        c["epsilon"], c["epsilon_per_round"] = per_round[-1], per_round
        dp_sgd = [e for e in ev if e["phase"] not in PHASES]
        c["steps"] = sum(e["steps"] for e in dp_sgd)
        c["personalization_steps"] = sum(e["steps"] for e in ev if e["phase"] == "personalize")
        c["rounds_participated"] = sorted({e["round"] for e in dp_sgd})
        for phase, key in counts.items():
            if phase == "calibrate" or key in c:
                c[key] = sum(e["phase"] == phase for e in ev)
    privacy["epsilon"] = max(c["epsilon"] for c in privacy["clients"])


def book_and_reply(cfg, release_events):
    """A claim book with one site's plan pinned, and a fit reply it signed over its events.

    ``release_events`` (a planned release's events, e.g. a loss or class-prior release) come
    before the round's DP-SGD event, as a site's first fit sends them.
    """
    from securefed.dp.accounting import compute_epsilon
    from securefed.dp.ledger import PrivacyEvent
    from securefed.dp.signing import SiteSigner
    from securefed.fl.claims import ClaimBook, plan_fields, site_claim_for
    from securefed.fl.planning import plan_site_privacy

    signer = SiteSigner.generate()
    plan = plan_site_privacy(cfg, num_samples=200)
    book = ClaimBook(cfg)
    book.keys[0] = signer.public_key_hex
    steps = cfg.local_epochs * round(1 / plan.sample_rate)
    events = [
        *release_events,
        PrivacyEvent(1, 0, plan.noise_multiplier, plan.sample_rate, steps, plan.max_grad_norm),
    ]
    dicts = [e.to_dict() for e in events]
    eps = compute_epsilon(
        history=[(e.noise_multiplier, e.sample_rate, e.steps) for e in events], delta=plan.delta
    )
    claim = site_claim_for(cfg, client_id=0, plan=plan, events=dicts, epsilon=eps)
    reply = {
        "events": dicts,
        "epsilon": eps,
        "plan": plan_fields(plan),
        "signature": signer.sign_claim(claim),
    }
    return book, reply


def checkpoint_restores_and_refuses_a_rewrite(cfg, event, *, phase, sigma, match):
    """A checkpointed claim book holding ``event`` restores as it was, and refuses the same
    checkpoint once that phase's events are rewritten to noise multiplier ``sigma``."""
    import json

    import pytest

    from securefed.errors import ProtocolError
    from securefed.fl.claims import ClaimBook

    book, reply = book_and_reply(cfg, [event])
    book.account(0, reply, round_index=1)
    saved = json.loads(json.dumps(book.to_json()))
    fresh = ClaimBook(cfg)
    fresh.restore(saved)
    assert fresh.ledger.events == book.ledger.events
    for e in saved["events"]:
        if e["phase"] == phase:
            e["noise_multiplier"] = sigma
    with pytest.raises(ProtocolError, match=match):
        ClaimBook(cfg).restore(saved)


def pins_of_another_roster(d: Path) -> tuple[dict, dict, object]:
    """privacy.json of the masking run in ``d``, and the parameters a server would state under
    another roster of its choosing (every site a minimum contributor).

    Returns:
        (privacy, the other roster's masking parameters, the other roster).

    """
    from securefed.config import RunConfig
    from securefed.crypto.roster import Roster
    from securefed.protocol.modes.masking import MaskingMode

    privacy = read_json(d / "privacy.json")
    params = privacy["secure_aggregation_params"]
    config = RunConfig.from_recorded(read_json(d / "config.json")["run"])
    n = int(config.clients)
    other, _ = Roster.generate(n, min_contributors=n, threshold=params["pinned_threshold"])
    return privacy, MaskingMode().server(config, n_sites=n, roster=other).describe(), other
