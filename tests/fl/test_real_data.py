"""A short federated DP run on real MedMNIST data from ../shared/data."""

import json

import pytest

from securefed.config import RunConfig
from securefed.dp.audit import audit_run
from securefed.run import train


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.shared_data
def test_two_round_dp_run_on_pneumoniamnist(shared_data_dir, tmp_path):
    cfg = RunConfig(
        dataset="pneumoniamnist",
        data_dir=str(shared_data_dir),
        clients=3,
        partition="dirichlet:0.5",
        rounds=2,
        local_epochs=1,
        dp_epsilon=8.0,
        accountant="pld",
        secure_agg="mask",
        device="cpu",
        disclose_site_sizes=True,  # so the test can count the images the sites trained on
    )
    out = train(cfg, out_dir=tmp_path / "run", progress=False)
    privacy = json.loads((out / "privacy.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(c["num_samples"] for c in privacy["clients"]) == 4708  # every training image
    assert all(c["epsilon"] <= 8.0 for c in privacy["clients"])
    assert metrics["final"]["confusion_matrix"] and len(metrics["final"]["confusion_matrix"]) == 2
    # two noisy rounds already rank pneumonia above normal far better than chance
    assert metrics["final"]["auc"] > 0.7
    assert audit_run(out).ok
