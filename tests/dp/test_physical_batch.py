"""--max-physical-batch-size: a logical batch split into chunks takes the same single step.

Same seeded noise (SeededNoise draws the Poisson coins and the Gaussian noise), same initial
weights: the chunked run must reach the unchunked run's parameters up to float summation
order, and the ledger must count logical steps, not chunks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from securefed.dp.accounting import steps_per_epoch
from securefed.dp.ledger import PrivacyLedger
from securefed.dp.memory import estimate_dp_memory, expected_physical_batch, memory_warning
from securefed.dp.noise import SeededNoise
from securefed.dp.trainer import DPPlan, SiteTrainer

N, BATCH, EPOCHS = 60, 12, 2


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
    return TensorDataset(x, y)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 64, 2),
    )


def _train(model: nn.Module, *, dp: bool, physical: int | None) -> tuple[dict, PrivacyLedger, int]:
    steps = steps_per_epoch(num_samples=N, batch_size=BATCH)
    plan = DPPlan(
        noise_multiplier=0.8,
        sample_rate=1.0 / steps,
        max_grad_norm=0.5,  # small enough that clipping binds: chunks must clip per sample
        planned_steps=steps * EPOCHS,
        delta=1e-4,
        accountant="pld",
    )
    ledger = PrivacyLedger()
    trainer = SiteTrainer(
        client_id=0,
        dataset=_data(),
        plan=plan if dp else None,
        ledger=ledger,
        batch_size=BATCH,
        lr=0.5,
        momentum=0.5,
        device=torch.device("cpu"),
        max_grad_norm=0.5,
        max_physical_batch_size=physical,
    )
    largest = [0]
    handle = model.register_forward_pre_hook(
        lambda _m, args: largest.__setitem__(0, max(largest[0], len(args[0])))
    )
    result = trainer.train_round(
        model=model,
        round_index=1,
        epochs=EPOCHS,
        generator=torch.Generator().manual_seed(5),
        noise=SeededNoise(7, 1) if dp else None,
    )
    handle.remove()
    assert result.steps == steps * EPOCHS  # logical steps, however many chunks
    return result.state, ledger, largest[0]


@pytest.mark.parametrize("dp", [True, False], ids=["dp-sgd", "no-dp"])
@pytest.mark.parametrize("physical", [1, 5])
def test_a_split_batch_takes_the_same_step_as_the_whole_batch(dp, physical):
    start = _model()
    whole, whole_ledger, whole_largest = _train(copy.deepcopy(start), dp=dp, physical=None)
    split, split_ledger, split_largest = _train(copy.deepcopy(start), dp=dp, physical=physical)
    assert split_largest <= physical < whole_largest  # the batches really were split
    for name, value in whole.items():
        # Only the order of float32 sums differs: agreement far below the noise scale.
        torch.testing.assert_close(split[name], value, rtol=1e-4, atol=1e-5, msg=name)
    moved = max(float((whole[n] - start.state_dict()[n]).abs().max()) for n in whole)
    assert moved > 1e-2  # training did move the weights
    if dp:
        [event] = split_ledger.events
        assert event.steps == whole_ledger.events[0].steps == EPOCHS * (N // BATCH)
    else:
        assert not split_ledger.events


def test_the_memory_estimate_scales_with_the_physical_batch():
    model = _model()
    one = estimate_dp_memory(model, sample_shape=(1, 8, 8), physical_batch=1)
    params = sum(p.numel() for p in model.parameters())
    assert one >= params * 4  # at least one float32 gradient per parameter per sample
    assert estimate_dp_memory(model, sample_shape=(1, 8, 8), physical_batch=10) == 10 * one
    assert expected_physical_batch(256, None) > 256  # Poisson batches exceed their mean
    assert expected_physical_batch(256, 32) == 32


def test_a_warning_suggests_a_physical_batch_only_when_memory_is_short():
    model = _model()
    kwargs = dict(sample_shape=(1, 8, 8), batch_size=256, max_physical_batch_size=None)
    assert memory_warning(model, **kwargs, available=2**40) is None
    line = memory_warning(model, **kwargs, available=10_000)
    assert line is not None and "\n" not in line
    assert "--max-physical-batch-size" in line


class _Slow(nn.Module):
    """Sleeps in forward: a round long enough (> 2 s) for the in-round progress bar."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.25)
        return x


@pytest.mark.parametrize("progress", [True, False])
def test_a_long_round_shows_site_and_step_progress_only_when_asked(progress, capsys):
    model = nn.Sequential(_Slow(), nn.Flatten(), nn.Linear(64, 2))
    trainer = SiteTrainer(
        client_id=4,
        dataset=_data(),
        plan=None,
        ledger=PrivacyLedger(),
        batch_size=6,  # 10 steps of >= 0.25 s: past the bar's 2 s delay however fast the CPU
        lr=0.1,
        momentum=0.0,
        device=torch.device("cpu"),
        progress=progress,
    )
    trainer.train_round(
        model=model, round_index=3, epochs=1, generator=torch.Generator().manual_seed(0)
    )
    err = capsys.readouterr().err
    if progress:
        assert "site 4 federated round 3" in err and "/10" in err, err
    else:
        assert err == ""
