"""Where a run ended: each DP site signs a closing claim, and the audit holds the report to it.

The attacks are the server's (it writes the report and holds every signature a site sent):
present an earlier round as the run's end with that round's signed claims, keep training after
a close, pass an in-process report off as another roster's, swap the model. Each rewrite below
passes every other check of the audit, with the sites' keys pinned, so the closing check is
what stops it.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from securefed.cli import cli
from securefed.dp.report import read_json, write_json
from securefed.errors import ProtocolError
from securefed.fl.claims import ClaimBook
from securefed.protocol.wire import Stage
from tests.conftest import tiny_config, write_small_npz
from tests.dp.audit_fixtures import copy_run, pins_of_another_roster, rehash

CLOSE = "every DP site signed where the run ended (closing claims)"


def audit(d, *args):
    """``securefed audit --json``: (exit code, failed check names, output)."""
    res = CliRunner().invoke(cli, ["audit", str(d), "--json", *args])
    if res.exit_code not in (0, 1):
        return res.exit_code, [], res.output
    out = json.loads(res.stdout)
    return res.exit_code, sorted(c["name"] for c in out["checks"] if not c["ok"]), res.output


def _pinned(d, tmp_path):
    """The run's own site keys in a file, as a deployment publishes them."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(read_json(d / "privacy.json")["site_keys"]))
    return ["--site-keys", str(path)]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A real 3-site, 2-round DP run, and every signed claim the server received on the way.

    ``signed[(sid, n)]`` is (signature, epsilon) of site ``sid``'s claim over its first ``n``
    events: what a server keeps if it wants to present an earlier point as the run's end.
    """
    from securefed.fl.simulation import Federation
    from securefed.run import train

    root = tmp_path_factory.mktemp("close")
    config = tiny_config(write_small_npz(root / "tiny.npz"), calibrate=False, secure_agg="mask")
    signed: dict[tuple[int, int], tuple[str, float]] = {}
    original = ClaimBook.check_signature

    def keep(self, sid, signature):
        original(self, sid, signature)
        signed[(sid, len(self.ledger.for_client(sid)))] = (signature, self.epsilon(sid))

    mp = pytest.MonkeyPatch()
    mp.setattr(ClaimBook, "check_signature", keep)
    try:
        run = train(config, out_dir=root / "run", progress=False, federation=Federation(config))
    finally:
        mp.undo()
    return run, signed


def test_an_honest_run_is_closed_by_every_site(recorded, tmp_path):
    run, _ = recorded
    privacy = read_json(run / "privacy.json")
    assert privacy["close"]["last_round"] == 2
    assert set(privacy["close"]["models"]) == {"model.safetensors"}
    assert all(c.get("close_signature") for c in privacy["clients"])
    assert (
        privacy["close"]["roster_sha256"] == (privacy["secure_aggregation_params"]["roster_sha256"])
    )
    code, failed, _ = audit(run, *_pinned(run, tmp_path))
    assert (code, failed) == (0, [])


def test_an_earlier_round_presented_as_the_runs_end_fails(recorded, tmp_path):
    # The server keeps each site's claim signed after round 1 and publishes rounds 1..1 as
    # the whole run: every claim verifies under the pinned keys and the ledger, the epsilons
    # and the hash agree. Before closing claims this passed (README: "What it cannot prove").
    run, signed = recorded
    d = copy_run(run, tmp_path)
    privacy = read_json(d / "privacy.json")
    metrics = read_json(d / "metrics.json")
    metrics["rounds"] = metrics["rounds"][:1]
    privacy["events"] = [e for e in privacy["events"] if e["round"] <= 1]
    for c in privacy["clients"]:
        own = [e for e in privacy["events"] if e["client_id"] == c["client_id"]]
        sig, eps = signed[(c["client_id"], len(own))]
        c.update(
            signature=sig,
            epsilon=eps,
            epsilon_per_round=[eps],
            steps=sum(e["steps"] for e in own),
            rounds_participated=sorted({e["round"] for e in own}),
        )
    privacy["epsilon"] = max(c["epsilon"] for c in privacy["clients"])
    assert privacy["epsilon"] < read_json(run / "privacy.json")["epsilon"]  # what it gains
    privacy["epsilon_per_round"] = privacy.get("epsilon_per_round", [])[:1]
    write_json(d / "metrics.json", metrics)
    write_json(d / "privacy.json", privacy)
    rehash(d)
    code, failed, out = audit(d, *_pinned(d, tmp_path))
    assert code == 1
    assert failed == [CLOSE], out  # only the close tells; the closing claims name round 2
    # Dropping the closing signatures (a server claiming the sites never closed) fails too.
    for c in privacy["clients"]:
        c.pop("close_signature")
    privacy["close"]["last_round"] = 1
    write_json(d / "privacy.json", privacy)
    rehash(d)
    code, failed, out = audit(d, *_pinned(d, tmp_path))
    assert failed == [CLOSE] and "no closing signature" in out


def test_another_model_file_fails(recorded, tmp_path):
    run, _ = recorded
    d = copy_run(run, tmp_path)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one weight's last bit
    (d / "model.safetensors").write_bytes(bytes(data))
    code, failed, out = audit(d, *_pinned(d, tmp_path))
    assert failed == [CLOSE] and "not the file the sites closed on" in out


def test_an_in_process_report_cannot_pass_as_another_rosters(recorded, tmp_path):
    # Pins of the rewriter's choosing under another roster's digest: the masking check can only
    # take them as the report states them (no roster file), so before closing claims this
    # passed (README). The sites signed the roster they pinned.
    run, _ = recorded
    d = copy_run(run, tmp_path)
    privacy, claimed, other = pins_of_another_roster(d)
    params = privacy["secure_aggregation_params"]
    params.update(json.loads(json.dumps(claimed)))
    assert params["roster_sha256"] == other.digest().hex()
    write_json(d / "privacy.json", privacy)
    rehash(d)
    code, failed, out = audit(d, *_pinned(d, tmp_path))
    assert failed == [CLOSE] and "not the roster the sites signed" in out


def test_a_closed_site_refuses_every_later_step_and_repeats_its_close(small_npz):
    # A server that closes early (for a small epsilon in the report) and trains on gets
    # nothing: the closed site refuses the fit, spends nothing, and signs no other close.
    from securefed.fl.simulation import Federation

    fed = Federation(tiny_config(small_npz, calibrate=False))
    fed.run_round(1)
    models = {"model.safetensors": "ab" * 32}
    close = fed.close_sites(models)
    assert close["last_round"] == 1 and sorted(fed.claims.closed) == [0, 1, 2]
    spent = {s.client_id: list(s.own_events()) for s in fed.sites}
    record = fed.run_round(2)
    assert not record.applied
    assert {s.client_id: s.own_events() for s in fed.sites} == spent
    site = fed.sites[0]
    history = [e for e in spent[0]]
    again = site.handle(Stage.CLOSE, {"last_round": 1, "models": models, "history": history})
    assert again["close_signature"] == fed.claims.closed[0]
    with pytest.raises(ProtocolError, match="other fields"):
        site.handle(Stage.CLOSE, {"last_round": 2, "models": models, "history": history})
    with pytest.raises(ProtocolError, match="closed the run"):
        site.handle(Stage.CALIBRATE, {"round": 2})


def test_a_site_refuses_a_close_before_a_round_it_trained(small_npz):
    from securefed.fl.simulation import Federation

    fed = Federation(tiny_config(small_npz, calibrate=False, rounds=3))
    fed.run_round(1)
    fed.run_round(2)
    site = fed.sites[0]
    fields = {"models": {"model.safetensors": "ab" * 32}, "history": list(site.own_events())}
    with pytest.raises(ProtocolError, match="spent privacy in round 2"):
        site.handle(Stage.CLOSE, {**fields, "last_round": 1})
    for bad in ({"../config.json": "ab" * 32}, {"model.safetensors": "AB"}, {}):
        with pytest.raises(ProtocolError, match="no valid model files"):
            site.handle(Stage.CLOSE, {**fields, "last_round": 2, "models": bad})
    assert "query.close.fields" not in site.persistent  # nothing refused was recorded


def test_a_site_that_did_not_close_fails_the_audit(tmp_path, small_npz):
    from securefed.fl.simulation import Federation
    from securefed.run import train

    config = tiny_config(small_npz, calibrate=False)
    fed = Federation(config)
    fed.link.lose(group="close", stage=Stage.CLOSE, sites={1})
    run = train(config, out_dir=tmp_path / "run", progress=False, federation=fed)
    privacy = read_json(run / "privacy.json")
    assert "close_signature" not in privacy["clients"][1]
    assert privacy["close"]["not_closed"] == {"1": "dropped out (simulated)"}
    code, failed, out = audit(run)
    assert failed == [CLOSE] and "site 1: no closing signature (dropped out" in out
    assert "Sites that did not close the run: 1." in (run / "summary.md").read_text()


@pytest.mark.parametrize("as_id", [float, lambda i: f"0{i}", lambda i: f" {i}"])
def test_a_site_id_of_another_type_cannot_pass_a_report_off_as_legacy(recorded, tmp_path, as_id):
    # Review 33: `0.0` or `"00"` still verified (a claim signs int(client_id)) while the key
    # lookup by str(client_id) missed, so the report read as legacy and skipped the close.
    run, _ = recorded
    d = copy_run(run, tmp_path)
    privacy = read_json(d / "privacy.json")
    privacy.pop("close")
    for c in privacy["clients"]:
        c.pop("close_signature")
        c["client_id"] = as_id(c["client_id"])
    privacy["disclosures"] = [x for x in privacy["disclosures"] if x["message"] != "close"]
    write_json(d / "privacy.json", privacy)
    rehash(d)
    code, failed, out = audit(d, *_pinned(d, tmp_path))
    assert code == 2 and "integer client_id" in out


def test_the_same_model_gives_the_same_file_bytes():
    # The sites close on each model file's SHA-256: a run resumed after the close must write
    # the very same bytes, whatever order safetensors gives its metadata (review 33).
    import torch
    from safetensors.torch import load, save

    from securefed.report.artifacts import canonical_safetensors

    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    meta = {"model": "cnn", "task": "classification", "securefed": "0.1.0", "x": "y"}
    # safetensors orders the metadata by a hash map's seed: eight saves, one file.
    files = {canonical_safetensors(save(tensors, metadata=meta)) for _ in range(8)}
    assert len(files) == 1
    data = files.pop()
    assert int.from_bytes(data[:8], "little") % 8 == 0
    back = load(data)
    assert set(back) == {"a", "b"} and torch.equal(back["a"], tensors["a"])
    assert torch.equal(back["b"], tensors["b"])


def test_a_report_cannot_drop_the_roster_the_sites_signed(recorded, tmp_path):
    # Review 33b: with the masking parameters rewritten as a run without a roster (a weaker
    # stated protection), the close's signed roster was compared with nothing.
    from securefed.config import RunConfig
    from securefed.protocol.modes.masking import MaskingMode

    run, _ = recorded
    d = copy_run(run, tmp_path)
    privacy = read_json(d / "privacy.json")
    config = RunConfig.from_recorded(read_json(d / "config.json")["run"])
    privacy["secure_aggregation_params"] = json.loads(
        json.dumps(MaskingMode().server(config, n_sites=3, roster=None).describe())
    )
    assert "roster_sha256" not in privacy["secure_aggregation_params"]
    write_json(d / "privacy.json", privacy)
    rehash(d)
    code, failed, out = audit(d, *_pinned(d, tmp_path))
    assert code == 1 and CLOSE in failed and "not the roster the sites signed" in out


def test_a_site_that_lost_its_record_does_not_close_on_the_servers_copy(small_npz):
    # Review 33b: a deployed site whose state file is gone knows nothing of what it spent; it
    # used to adopt the history the close carried, so the server chose what it closed on.
    from securefed.fl.simulation import Federation

    fed = Federation(tiny_config(small_npz, calibrate=False))
    fed.run_round(1)
    fed.run_round(2)
    site = fed.sites[0]
    round_1 = [e for e in site.own_events() if e["round"] == 1]
    site.history_known = False  # as a fresh process without its state file starts
    with pytest.raises(ProtocolError, match="holds no record"):
        site.handle(
            Stage.CLOSE,
            {"last_round": 1, "models": {"model.safetensors": "ab" * 32}, "history": round_1},
        )
    assert "query.close.fields" not in site.persistent
