"""Patient-level DP-SGD: one patient's records move together through sampling and clipping.

The reference is patient-level DP-SGD written out by its definition: per step one coin per
patient (from the same SeededNoise as the trainer), each sampled patient's records averaged
into one gradient (the gradient of the mean loss over its records), that gradient clipped to C
with Opacus' factor, the sum over patients plus the same Gaussian draw, divided by the expected
number of patients P*q. The trainer must end at the reference's weights in every clipping mode
and with physical chunks smaller than a patient.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from securefed.dp.clipping import BookKeepingClipper, UnitPooler
from securefed.dp.ledger import PrivacyLedger
from securefed.dp.noise import SeededNoise
from securefed.dp.trainer import PoissonBatchSampler, SiteTrainer
from securefed.models import ModelSpec, build_model
from tests.dp.test_clipping import LR, SIGMA, C, _assert_same, make_trainer, noisy_sgd_step

# 13 records of 5 patients, of 1 to 4 records each, interleaved (ids need not be contiguous).
PATIENT_OF = np.array([3, 0, 3, 7, 1, 0, 3, 7, 1, 9, 0, 3, 0])


def _units(patient_of: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(patient_of == p) for p in np.unique(patient_of)]


def _data(n: int, *, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.rand(n, 1, 10, 10, generator=g), torch.randint(0, 3, (n,), generator=g)
    )


def _cnn() -> nn.Module:
    torch.manual_seed(5)
    spec = ModelSpec(in_channels=1, num_classes=3, image_shape=(10, 10))
    return build_model(name="cnn", spec=spec).module


def _reference(model, data, units, *, steps, noise, sigma=SIGMA):
    x, y = data.tensors
    q = 1.0 / steps
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = nn.CrossEntropyLoss()
    sampled = []
    for _ in range(steps):
        picked = noise.bernoulli(len(units), q).nonzero().flatten().tolist()
        sampled.append(picked)
        summed = [torch.zeros_like(p) for p in params]
        for u in picked:
            idx = torch.from_numpy(units[u])
            grads = torch.autograd.grad(loss_fn(model(x[idx]), y[idx]), params)  # the mean
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            factor = min(1.0, C / (float(norm) + 1e-6))
            for s, g in zip(summed, grads):
                s += factor * g
        noisy_sgd_step(params, summed, noise=noise, sigma=sigma, denominator=len(units) * q)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, sampled


def _trainer(data, units, *, batch_size, clipping="auto", physical=None, sigma=SIGMA):
    # Under patient-level DP the batch size and q count patients (q = 1/ceil(P/B)).
    return make_trainer(
        data, batch_size=batch_size, clipping=clipping, physical=physical, sigma=sigma, units=units
    )


@pytest.mark.parametrize(
    ("clipping", "physical"),
    [("one-pass", None), ("hooks", None), ("one-pass", 3), ("hooks", 2)],
)
def test_a_round_is_patient_level_dp_sgd_by_its_definition(clipping, physical) -> None:
    data, units = _data(len(PATIENT_OF)), _units(PATIENT_OF)
    model = _cnn()
    start = copy.deepcopy(model.state_dict())
    ref, sampled = _reference(copy.deepcopy(model), data, units, steps=3, noise=SeededNoise(11))
    assert any(len(s) > 1 for s in sampled)  # the comparison covers multi-patient batches
    trainer, ledger = _trainer(data, units, batch_size=2, clipping=clipping, physical=physical)
    assert trainer.privacy_unit == "patient" and trainer.num_units == 5
    got = trainer.train_round(
        model=model,
        round_index=1,
        epochs=1,
        generator=torch.Generator(),
        noise=SeededNoise(11),
        lr=LR,
    ).state
    _assert_same(got, ref, start)
    (event,) = ledger.for_client(0)
    assert event.steps == 3 and event.sample_rate == 1 / 3


def test_the_sampler_takes_all_of_a_patients_records_or_none() -> None:
    units = _units(PATIENT_OF)
    sampler = PoissonBatchSampler(
        num_samples=len(PATIENT_OF), sample_rate=0.5, steps=200, noise=SeededNoise(1), units=units
    )
    sizes = set()
    for batch in sampler:
        ids = PATIENT_OF[batch]
        for p in np.unique(ids):
            assert (ids == p).sum() == (PATIENT_OF == p).sum()  # the whole patient
        # contiguous: a patient's records never interleave with another's
        changes = int((ids[1:] != ids[:-1]).sum()) if len(ids) else -1
        assert changes == len(np.unique(ids)) - 1
        sizes.add(len(np.unique(ids)))
    assert {0, 5} <= sizes or len(sizes) >= 4  # the coins vary


def _big_patient_data() -> tuple[TensorDataset, list[np.ndarray]]:
    # Patient 0: 8 copies of one record whose gradient is far above C; patients 1, 2: one each.
    g = torch.Generator().manual_seed(2)
    x = torch.rand(10, 1, 10, 10, generator=g)
    x[:8] = x[0]
    y = torch.tensor([0] * 8 + [1, 2])
    return TensorDataset(x, y), [np.arange(8), np.array([8]), np.array([9])]


@pytest.mark.parametrize("clipping", ["one-pass", "hooks"])
def test_a_patient_with_many_records_moves_the_model_by_at_most_c(clipping) -> None:
    """The attack patient-level clipping stops: record-level clipping lets a patient's 8
    records add 8*C to a step; per patient, at most C whatever their number."""
    data, units = _big_patient_data()
    moved = {}
    for name, u in (("record", None), ("patient", units)):
        model = _cnn()
        start = [p.detach().clone() for p in model.parameters()]
        trainer, _ = _trainer(data, u, batch_size=len(data), clipping=clipping, sigma=0.0)
        trainer.train_round(
            model=model,
            round_index=1,
            epochs=1,
            generator=torch.Generator(),
            noise=SeededNoise(0),
            lr=LR,
        )
        delta = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)])
        # q = 1 (one step, everyone sampled): the step is -lr * sum / (units * q).
        moved[name] = float(delta.norm()) * trainer.num_units / LR
    assert moved["patient"] <= 3 * C * (1 + 1e-4)
    assert moved["record"] > 5 * C  # the 8 copies, each clipped to C, add up


def test_the_clipper_bounds_each_patients_mean_not_each_record() -> None:
    data, units = _big_patient_data()
    model = _cnn()
    params = [p for p in model.parameters() if p.requires_grad]
    clipper = BookKeepingClipper(model, params)
    x, y = data.tensors
    unit_of = torch.tensor([0] * 8 + [1, 2])
    with clipper.pass_(scale=len(y)):
        nn.CrossEntropyLoss()(model(x), y).backward()
    sums = clipper.clip_and_sum(1e-3, len(y), pooler=UnitPooler(unit_of))
    total = float(torch.sqrt(sum(s.pow(2).sum() for s in sums)))
    assert total <= 3 * 1e-3 * (1 + 1e-4)


def test_units_must_cover_every_record_once() -> None:
    data = _data(4)
    twice = [np.array([0, 1]), np.array([1, 2, 3])]
    missing = [np.array([0, 1])]
    empty = [np.array([0, 1, 2, 3]), np.array([], dtype=np.int64)]
    for bad in (twice, missing, empty):
        with pytest.raises(ValueError, match="units"):
            _trainer(data, bad, batch_size=2)


@pytest.mark.parametrize("clipping", ["one-pass", "hooks"])
def test_a_patient_larger_than_the_chunk_cap_is_carried_across_chunks(clipping) -> None:
    """The memory cap holds for a patient of 8 records at cap 3, and the step is still the
    patient-level step (its mean clipped once, not each chunk's part)."""
    data, units = _big_patient_data()
    ref_model = _cnn()
    start = copy.deepcopy(ref_model.state_dict())
    ref, _ = _reference(copy.deepcopy(ref_model), data, units, steps=1, noise=SeededNoise(5))
    model = _cnn()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    trainer, _ = _trainer(data, units, batch_size=len(units), clipping=clipping, physical=3)
    got = trainer.train_round(
        model=model, round_index=1, epochs=1, generator=torch.Generator(), noise=SeededNoise(5)
    ).state
    assert seen and max(seen) <= 3 and sum(seen) == len(data)
    _assert_same(got, ref, start)


def test_q_steps_lr_and_weight_follow_the_patient_count_not_the_record_count() -> None:
    """Replacing one patient by another with more records changes n, not P: nothing of the
    mechanism's shape (q, steps, lr) nor the FedAvg weight may move with it."""
    few = PATIENT_OF  # 13 records, 5 patients
    many = np.concatenate([PATIENT_OF, np.full(40, 9)])  # patient 9 now has 41 records
    shapes = []
    for patient_of in (few, many):
        units = _units(patient_of)
        data = _data(len(patient_of))
        trainer, _ = _trainer(data, units, batch_size=2)
        result = trainer.train_round(
            model=_cnn(), round_index=1, epochs=1, generator=torch.Generator(), noise=SeededNoise(3)
        )
        shapes.append(
            (trainer.steps_per_epoch, trainer.site_batch, trainer.site_lr, result.num_samples)
        )
    assert shapes[0] == shapes[1] == (3, 2, LR, 5)


def test_units_need_a_dp_plan() -> None:
    with pytest.raises(ValueError, match="DP plan"):
        SiteTrainer(
            client_id=0,
            dataset=_data(4),
            plan=None,
            ledger=PrivacyLedger(),
            batch_size=2,
            lr=LR,
            momentum=0.0,
            device=torch.device("cpu"),
            units=[np.arange(4)],
        )


def test_the_pooler_refuses_a_patient_whose_records_are_not_contiguous() -> None:
    # Records [0, 1, 0] would be clipped as three patients: refused, not miscounted.
    with pytest.raises(ValueError, match="next to each other"):
        UnitPooler(torch.tensor([0, 1, 0]))
