"""The replay attack on seeded DP noise, as a test.

An adversary who knows the run's configuration (config.json, seed included) and every record
of a site but one replays that site's local DP-SGD under both hypotheses about the unknown
record and compares with the released update. If the noise and the Poisson sampling came
from the seed, the right hypothesis reproduces the update exactly (distance 0) and the wrong
one does not: membership is decided with certainty. With the default secret noise, even the
right hypothesis lands at the noise scale.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from securefed.dp.ledger import PrivacyLedger
from securefed.dp.trainer import SiteTrainer
from securefed.fl.simulation import Federation
from securefed.fl.site_runtime import local_update

SITE = 0


class _ReplaceOne(Dataset):
    """``dataset`` with record ``index`` replaced by record ``other`` (replace-one adjacency)."""

    def __init__(self, dataset: Dataset, *, index: int, other: int) -> None:
        self.dataset, self.index, self.other = dataset, index, other

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return self.dataset[self.other if i == self.index else i]


@pytest.fixture
def attack_config(small_config):
    # One round, two sites of 120 records, batch 16: 8 DP steps, a few seconds on one core.
    return small_config.replace(clients=2, rounds=1, batch_size=16)


def _released_update(config) -> tuple[np.ndarray, Federation]:
    """What the victim site sends for round 1 (the vector the server sums)."""
    fed = Federation(config)
    vec, *_ = local_update(
        config,
        trainer=fed.sites[SITE].trainer,
        layout=fed.layout,
        model=fed.global_model,
        round_index=1,
    )
    return vec, fed


def _replay(config, fed: Federation, dataset: Dataset) -> np.ndarray:
    """The adversary's replay of the site's round from the config and a guess of its data."""
    site = fed.sites[SITE].trainer
    trainer = SiteTrainer(
        client_id=SITE,
        dataset=dataset,
        plan=site.plan,
        ledger=PrivacyLedger(),
        batch_size=config.batch_size,
        min_steps=config.min_steps,
        lr=config.effective_lr,
        momentum=config.effective_momentum,
        device=torch.device("cpu"),
        max_grad_norm=config.effective_max_grad_norm,
        loss_fn=site.loss_fn,
    )
    vec, *_ = local_update(
        config,
        trainer=trainer,
        layout=fed.layout,
        model=copy.deepcopy(fed.global_model),
        round_index=1,
    )
    return vec


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    """RMS per coordinate of the difference of two updates (the count entry dropped)."""
    n = a[-1]
    return float(np.sqrt(np.mean(((a[:-1] - b[:-1]) / n) ** 2)))


def _noise_scale(config, fed: Federation) -> float:
    """Rough per-coordinate RMS by which two noise draws move a round's update.

    Each step adds N(0, (sigma*C)^2) to the clipped sum and divides by the site's expected
    batch size, then steps by the site's lr; momentum m amplifies a step by up to 1/(1-m);
    two independent draws differ by sqrt(2) of one, and T steps add up as sqrt(T).
    """
    plan = fed.plans[SITE]
    steps = plan.planned_steps
    site = fed.sites[SITE].trainer
    per_step = site.site_lr * plan.noise_multiplier * plan.max_grad_norm / site.site_batch
    return per_step * math.sqrt(2 * steps) / (1 - config.effective_momentum)


@pytest.mark.slow
def test_seeded_noise_lets_a_replay_decide_membership(attack_config):
    config = attack_config.replace(reproducible_noise=True)
    released, fed = _released_update(config)
    data = fed.sites[SITE].trainer.dataset
    # Hypothesis "in": the adversary's data is the site's data.
    assert _rms(released, _replay(config, fed, data)) == 0.0
    # Hypothesis "out": record i is some other record. A record the (replayed) Poisson
    # sampling never picked changes nothing, so try a few until one was picked: its
    # replay no longer matches.
    assert any(
        _rms(released, _replay(config, fed, _ReplaceOne(data, index=i, other=i + 1))) > 0.0
        for i in range(10)
    )


@pytest.mark.slow
def test_secret_noise_defeats_the_replay(attack_config):
    config = attack_config
    assert config.reproducible_noise is False
    released, fed = _released_update(config)
    data = fed.sites[SITE].trainer.dataset
    distance = _rms(released, _replay(config, fed, data))
    scale = _noise_scale(config, fed)
    # Even with the true data and the seed the replay is off by about the noise: it can no
    # longer tell "in" from "out" by an exact match. Loose bounds: the order of magnitude
    # (sampling differences add to the noise; momentum's amplification is an upper bound).
    assert scale / 4 < distance < scale * 4, (distance, scale)
