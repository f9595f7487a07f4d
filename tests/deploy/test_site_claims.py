"""The server checks a site's privacy claim without learning the site's size."""

import pytest

from securefed.config import RunConfig
from securefed.deploy.site import NodeSettings
from securefed.dp.accounting import calibrate_noise, compute_epsilon
from securefed.dp.calibration import planned_entries
from securefed.dp.ledger import PrivacyEvent
from securefed.dp.signing import SiteSigner
from securefed.dp.trainer import DPPlan
from securefed.errors import ConfigError, DataError, PrivacyBudgetError, ProtocolError
from securefed.fl.claims import ClaimBook, site_claim_for
from securefed.fl.planning import check_site_plan, plan_site_privacy

CONFIG = RunConfig(dp_epsilon=8.0, rounds=2, local_epochs=1, batch_size=2)


def _plan(**changes):
    # A site of 8 records at B = 2: q = 1/4, 4 steps per epoch, 2 rounds x 1 epoch.
    plan = plan_site_privacy(CONFIG, num_samples=8)
    return DPPlan(**{**plan.__dict__, **changes})


def _event(round_index=1, **changes):
    plan = _plan()
    fields = dict(
        round=round_index,
        client_id=0,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=4,
        max_grad_norm=plan.max_grad_norm,
    )
    return PrivacyEvent(**{**fields, **changes}).to_dict()


SIGNER = SiteSigner.generate()


def _server_view():
    """The server's claim book, with the site's public key from set-up."""
    book = ClaimBook(CONFIG)
    book.keys[0] = SIGNER.public_key_hex
    return book


def _reply(events, plan=None, *, view=None):
    """A site's fit reply, signed as the site signs it (over every event it has spent)."""
    plan = plan or _plan()
    earlier = [e.to_dict() for e in view.ledger.for_client(0)] if view else []
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in earlier + events]
    epsilon = compute_epsilon(history=history, delta=plan.delta)
    claim = site_claim_for(CONFIG, client_id=0, plan=plan, events=earlier + events, epsilon=epsilon)
    return {
        "events": events,
        "plan": plan.__dict__,
        "epsilon": epsilon,
        "signature": SIGNER.sign_claim(claim),
    }


def test_an_honest_plan_passes_and_is_pinned():
    view = _server_view()
    view.account(0, _reply([_event(1)], view=view), round_index=1)
    assert view.plans[0] == _plan() and view.delta == _plan().delta
    view.account(0, _reply([_event(2)], view=view), round_index=2)
    assert len(view.ledger.events) == 2
    assert view.signatures[0]  # the latest signed claim, kept for privacy.json


def test_a_claim_the_site_did_not_sign_is_refused_but_its_spending_is_recorded():
    view = _server_view()
    reply = _reply([_event(1)], view=view)
    reply["signature"] = _reply([_event(1, steps=8)], view=view)["signature"]
    with pytest.raises(ProtocolError, match="signature does not cover"):
        view.account(0, reply, round_index=1)
    assert len(view.ledger.events) == 1
    with pytest.raises(ProtocolError, match="no signed privacy claim"):
        _server_view().account(0, {**_reply([_event(1)]), "signature": None}, round_index=1)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"noise_multiplier": 0.5}, "calibrated"),  # sigma below the calibration
        ({"sample_rate": 0.25 / 4}, "planned steps"),  # q / 4 with the steps left as they were
        ({"sample_rate": 0.3}, "not 1/ceil"),
        ({"delta": 1e-3}, "delta"),  # looser than the run's bound
        ({"planned_steps": 4}, "planned steps"),  # a round left out of the plan
        ({"accountant": "rdp"}, "accountant"),
    ],
)
def test_a_plan_that_breaks_the_runs_rules_is_refused(changes, match):
    with pytest.raises(ProtocolError, match=match):
        check_site_plan(CONFIG, _plan(**changes))


def test_the_server_records_what_a_site_spent_even_when_it_refuses_the_update():
    view = _server_view()

    with pytest.raises(ProtocolError, match="other DP parameters"):
        view.account(0, _reply([_event(1, noise_multiplier=0.5)]), round_index=1)

    assert [e.noise_multiplier for e in view.ledger.events] == [0.5]


def test_a_round_with_fewer_steps_than_an_epoch_is_refused():
    view = _server_view()
    with pytest.raises(ProtocolError, match="other DP parameters"):
        view.account(0, _reply([_event(1, steps=1)]), round_index=1)


def test_a_plan_that_changes_mid_run_is_refused():
    view = _server_view()
    view.account(0, _reply([_event(1)], view=view), round_index=1)
    sigma = calibrate_noise(
        target_epsilon=8.0,
        delta=1e-6,
        sample_rate=0.25,
        steps=8,
        accountant="pld",
        extra=planned_entries(CONFIG.to_dict()),
    )
    other = _plan(delta=1e-6, noise_multiplier=sigma)
    check_site_plan(CONFIG, other)  # a valid plan on its own
    with pytest.raises(ProtocolError, match="changed during the run"):
        view.account(0, _reply([_event(2)], plan=other), round_index=2)


def test_the_server_refuses_and_does_not_record_another_rounds_events():
    view = _server_view()
    with pytest.raises(ProtocolError, match="not its round's"):
        view.account(0, _reply([_event(2)]), round_index=1)
    with pytest.raises(ProtocolError, match="no DP accounting"):
        view.account(0, _reply([]), round_index=1)
    assert view.ledger.events == ()


# -- the site pins its own parameters -------------------------------------------------------------


def test_a_site_picks_its_own_delta_from_its_size():
    small, large = (plan_site_privacy(CONFIG, num_samples=n) for n in (500, 200_000))
    assert small.delta == 1e-5 and large.delta == 1e-7
    assert large.delta < 1 / (10 * 200_000)


def test_a_site_refuses_a_delta_looser_than_its_policy():
    node = NodeSettings.from_node_config({"site-id": 0, "max-delta": 1e-6})
    node.check_policy(CONFIG.replace(dp_delta=1e-6))
    with pytest.raises(PrivacyBudgetError, match="max-delta"):
        node.check_policy(CONFIG)  # the default bound, 1e-5
    with pytest.raises(PrivacyBudgetError, match="max-delta"):
        node.check_policy(CONFIG.replace(dp_delta=1e-4))


def test_a_site_keeps_its_size_unless_its_policy_allows_disclosure():
    asks = CONFIG.replace(disclose_site_sizes=True)
    with pytest.raises(PrivacyBudgetError, match="disclose-size=false"):
        NodeSettings.from_node_config({"site-id": 0}).check_policy(asks)
    NodeSettings.from_node_config({"site-id": 0, "disclose-size": True}).check_policy(asks)


def test_a_patient_level_site_refuses_a_record_level_run():
    node = NodeSettings.from_node_config({"site-id": 0, "privacy-unit": "patient"})
    with pytest.raises(PrivacyBudgetError, match="privacy-unit=patient"):
        node.check_policy(CONFIG)
    node.check_policy(CONFIG.replace(privacy_unit="patient"))
    # A record-level policy accepts either; an unknown unit is a typo, refused.
    NodeSettings.from_node_config({"site-id": 0, "privacy-unit": "record"}).check_policy(CONFIG)
    with pytest.raises(ConfigError, match="privacy-unit"):
        NodeSettings.from_node_config({"site-id": 0, "privacy-unit": "person"})


def test_a_deployed_site_groups_its_data_by_its_own_key_and_keeps_loader_errors_local(
    tmp_path, caplog
):
    """The server's --group-by (a pattern or path it chose) never reads a site's data; a
    loader error, which may quote a file name, reaches the server only as a generic line."""
    import numpy as np

    from securefed.deploy.site import _load_site_data
    from tests.conftest import write_small_npz

    path = write_small_npz(tmp_path / "site.npz", n_train=40, n_val=10, n_test=10)
    arrays = dict(np.load(path, allow_pickle=False))
    arrays["train_mrn"] = np.array([f"MRN{i // 2:05d}" for i in range(40)])
    np.savez(path, **arrays)
    run = CONFIG.replace(privacy_unit="patient", group_by="mrn")
    own = NodeSettings(site_id=0, data=str(path))
    assert _load_site_data(run, own).train.patients is None  # the run's key is not used
    mine = NodeSettings(site_id=0, data=str(path), group_by="mrn")
    assert _load_site_data(run, mine).train.patient_count() == 20
    wrong = NodeSettings(site_id=0, data=str(path), group_by="patient_ids")
    with pytest.raises(DataError) as err:
        _load_site_data(run, wrong)
    assert "train_mrn" not in str(err.value) and "site's log" in str(err.value)
    assert "train_mrn" in caplog.text  # the operator still sees why
    shard = NodeSettings(site_id=0, data=str(path), shard=True)
    assert _load_site_data(run, shard).train.patient_count() == 20  # a shared-data trial
    # A site reading its own data never reads a path (or loader) the run names...
    with pytest.raises(ConfigError, match="never reads a path"):
        _load_site_data(run.replace(data=str(path)), NodeSettings(site_id=0))
    # ... and any failure, even one no loader anticipated, reaches the server as one line.
    folder = tmp_path / "DOE_JANE_1975"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        _load_site_data(run, NodeSettings(site_id=0, data=str(folder)))
    assert "DOE_JANE" not in str(err.value)


def test_a_deployed_site_keeps_its_labels_unless_it_allows_a_labelled_fraction():
    run = RunConfig(labelled_fraction=0.25)
    with pytest.raises(PrivacyBudgetError, match="allow-labelled-fraction"):
        NodeSettings.from_node_config({"site-id": 0}).check_policy(run)
    allowed = {"site-id": 0, "allow-labelled-fraction": True}
    NodeSettings.from_node_config(allowed).check_policy(run)
