"""One-pass per-sample clipping takes the DP-SGD step a per-sample loop takes.

The reference below is DP-SGD written out by hand: for every Poisson batch (coins from the
same SeededNoise the trainer uses), each record's gradient on its own, clipped to C with
Opacus' factor ``min(1, C / (|g| + 1e-6))``, summed, plus the same flat float64 Gaussian
draw scaled by sigma*C, divided by n*q, and an SGD step. The trainer's round must end at the
reference's weights up to float32 summation order, whatever clipping mode it picks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from securefed.dp.clipping import BookKeepingClipper, supports
from securefed.dp.ledger import PrivacyLedger
from securefed.dp.noise import SECURE_DRAWS, SeededNoise
from securefed.dp.trainer import DPPlan, SiteTrainer, clipping_mode
from securefed.models import ModelSpec, build_model

SIGMA, C, LR = 0.7, 0.05, 1.0


def _data(n: int, shape: tuple[int, ...], classes: int, *, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def _reference_round(
    model: nn.Module,
    data: TensorDataset,
    *,
    batch_size: int,
    noise: SeededNoise,
    sigma: float = SIGMA,
    loss_fn=None,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """One local epoch of DP-SGD by the definition; the final weights and the batch sizes."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    x, y = data.tensors
    n = len(y)
    steps = -(-n // batch_size)
    q = 1.0 / steps
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = []
    for _ in range(steps):
        idx = noise.bernoulli(n, q).nonzero().flatten().tolist()
        sizes.append(len(idx))
        summed = [torch.zeros_like(p) for p in params]
        for i in idx:
            grads = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params)
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            factor = min(1.0, C / (float(norm) + 1e-6))
            for s, g in zip(summed, grads):
                s += factor * g
        noisy_sgd_step(params, summed, noise=noise, sigma=sigma, denominator=n * q)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, sizes


def _clipped_sum_by_record(model, params, x, y, clip: float) -> list[torch.Tensor]:
    """Each record's cross-entropy gradient on its own, clipped to ``clip``, summed."""
    want = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        g = torch.autograd.grad(
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params
        )
        f = min(1.0, clip / (float(torch.sqrt(sum(t.pow(2).sum() for t in g))) + 1e-6))
        for w, t in zip(want, g):
            w += f * t
    return want


def noisy_sgd_step(params, summed, *, noise, sigma: float, denominator: float) -> None:
    """The DP-SGD step by definition: clipped sums plus one flat Gaussian draw, averaged."""
    flat = noise.gaussian(sum(p.numel() for p in params), draws=SECURE_DRAWS).mul_(sigma * C)
    offset = 0
    with torch.no_grad():
        for p, s in zip(params, summed):
            k = p.numel()
            z = flat[offset : offset + k].view(p.shape).to(p.dtype)
            p -= LR * (s + z) / denominator
            offset += k


def make_trainer(
    data: TensorDataset,
    *,
    batch_size: int,
    clipping: str = "auto",
    physical: int | None = None,
    sigma: float = SIGMA,
    loss_fn=None,
    units=None,
) -> tuple[SiteTrainer, PrivacyLedger]:
    """A site trainer on ``data`` with the plan q = 1/ceil(n/B), n in records or patients."""
    n = len(data) if units is None else len(units)
    steps = -(-n // batch_size)
    plan = DPPlan(
        noise_multiplier=sigma,
        sample_rate=1.0 / steps,
        max_grad_norm=C,
        planned_steps=steps,
        delta=1e-5,
        accountant="pld",
    )
    ledger = PrivacyLedger()
    trainer = SiteTrainer(
        client_id=0,
        dataset=data,
        plan=plan,
        ledger=ledger,
        batch_size=batch_size,
        lr=LR,
        momentum=0.0,
        device=torch.device("cpu"),
        max_physical_batch_size=physical,
        clipping=clipping,
        loss_fn=loss_fn,
        units=units,
    )
    return trainer, ledger


def _trainer_round(
    model: nn.Module,
    data: TensorDataset,
    *,
    batch_size: int,
    noise: SeededNoise,
    clipping: str = "auto",
    physical: int | None = None,
    sigma: float = SIGMA,
    loss_fn=None,
) -> tuple[dict[str, torch.Tensor], PrivacyLedger]:
    trainer, ledger = make_trainer(
        data,
        batch_size=batch_size,
        clipping=clipping,
        physical=physical,
        sigma=sigma,
        loss_fn=loss_fn,
    )
    result = trainer.train_round(
        model=model,
        round_index=1,
        epochs=1,
        generator=torch.Generator().manual_seed(0),
        noise=noise,
        lr=LR,
    )
    return result.state, ledger


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start) -> None:
    # Compared as updates (weights moved), relative to the update's size: float32 sums in
    # another order differ by ~1e-6 of it, a missed or doubled clip factor by far more.
    for k in a:
        if not a[k].is_floating_point():
            continue
        da, db = a[k] - start[k], b[k] - start[k]
        scale = float(db.abs().max()) + 1e-12
        assert float((da - db).abs().max()) <= 1e-4 * scale + 1e-7, k


def _cnn() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(3)
    model = build_model(
        name="cnn", spec=ModelSpec(in_channels=1, num_classes=4, image_shape=(12, 12))
    ).module
    return model, _data(7, (1, 12, 12), 4)


def _resnet_small() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(3)
    model = build_model(
        name="resnet-small", spec=ModelSpec(in_channels=2, num_classes=3, image_shape=(32, 32))
    ).module
    return model, _data(6, (2, 32, 32), 3)


def _scatter_linear() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(3)
    model = build_model(
        name="scatter-linear", spec=ModelSpec(in_channels=1, num_classes=3, image_shape=(16, 16))
    ).module
    return model, _data(6, (1, 16, 16), 3)


def _layernorm_model() -> tuple[nn.Module, TensorDataset]:
    # LayerNorm: Opacus has a per-sample rule for it, the one-pass clipper has not.
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.LayerNorm(4 * 36),
        nn.Linear(4 * 36, 3),
    )
    return model, _data(6, (1, 6, 6), 3)


def _run_both(make, *, batch_size: int, seed: int, **kw):
    model, data = make()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref_model = copy.deepcopy(model)
    got, ledger = _trainer_round(
        model, data, batch_size=batch_size, noise=SeededNoise(seed, 1), **kw
    )
    kw.pop("clipping", None)
    kw.pop("physical", None)
    want, sizes = _reference_round(
        ref_model, data, batch_size=batch_size, noise=SeededNoise(seed, 1), **kw
    )
    return got, want, start, sizes, ledger, model


@pytest.mark.parametrize(
    "make", [_cnn, _resnet_small, _scatter_linear], ids=["cnn", "resnet-small", "scatter-linear"]
)
@pytest.mark.parametrize("physical", [None, 1])
def test_a_one_pass_round_is_dp_sgd_by_the_definition(make, physical):
    model, _ = make()
    assert clipping_mode(model) == "one-pass"
    got, want, start, sizes, ledger, _ = _run_both(make, batch_size=3, seed=11, physical=physical)
    # The chunked run really splits a batch.
    assert physical is None or max(sizes) > physical
    _assert_same(got, want, start)
    assert ledger.for_client(0)[0].steps == len(sizes)


@pytest.mark.parametrize("make", [_cnn, _resnet_small], ids=["cnn", "resnet-small"])
@pytest.mark.parametrize("physical", [None, 2])
def test_per_sample_gradients_in_kept_buffers_give_the_same_steps(monkeypatch, make, physical):
    # Every convolution's per-sample gradients go through the layer's reused buffer, one
    # sample per native call, and GroupNorm's dot products run one sample at a time:
    # batches of varying size (Poisson) reuse one buffer pass after pass, and a stale or
    # half-written buffer, or a skipped piece, would change the step.
    import securefed.dp.clipping as clipping

    monkeypatch.setattr(clipping, "_REUSE_BYTES", 0)
    monkeypatch.setattr(clipping, "_PIECE_BYTES", 1)
    monkeypatch.setattr(clipping, "_CACHE_BYTES", 1)
    got, want, start, sizes, *_ = _run_both(make, batch_size=4, seed=5, physical=physical)
    assert len(set(sizes)) > 1  # the buffer is sliced to several batch sizes
    _assert_same(got, want, start)


def test_a_kept_buffer_is_reused_and_a_conv_used_twice_does_not_overwrite_it(monkeypatch):
    import securefed.dp.clipping as clipping

    monkeypatch.setattr(clipping, "_REUSE_BYTES", 0)
    conv = nn.Conv2d(2, 2, 3, padding=1)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = conv, nn.Linear(2, 2)

        def forward(self, x):
            h = torch.tanh(self.conv(torch.tanh(self.conv(x))))
            return self.head(h.mean((2, 3)))

    torch.manual_seed(0)
    model = Twice()
    params = list(model.parameters())
    clipper = BookKeepingClipper(model, params)
    layer = next(la for la in clipper.layers if la.module is conv)
    ptrs = []
    for n in (5, 3, 5):
        x, y = torch.randn(n, 2, 6, 6) * 2, torch.randint(0, 2, (n,))
        with clipper.pass_(scale=n):
            nn.functional.cross_entropy(model(x), y).backward()
        ptrs.append(layer._buffers["weight"].data_ptr())
        sums = clipper.clip_and_sum(0.1, n)
        for s, w in zip(sums, _clipped_sum_by_record(model, params, x, y, 0.1)):
            torch.testing.assert_close(s, w, rtol=1e-4, atol=1e-7)
    assert len(set(ptrs)) == 1  # one buffer, sliced to each batch
    clipper.remove()
    assert not layer._buffers


def test_a_round_that_fails_takes_the_clippers_hooks_and_buffers_off_the_model():
    model, data = _cnn()
    calls = []

    def failing_loss(out, y):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure in the second step")
        return nn.functional.cross_entropy(out, y)

    trainer, _ = make_trainer(data, batch_size=3, loss_fn=failing_loss)
    with pytest.raises(RuntimeError, match="simulated failure"):
        trainer.train_round(
            model=model,
            round_index=1,
            epochs=1,
            generator=torch.Generator().manual_seed(0),
            noise=SeededNoise(1, 1),
            lr=LR,
        )
    assert len(calls) == 2
    assert not any(m._forward_hooks for m in model.modules())


def test_a_model_the_one_pass_clipper_cannot_handle_falls_back_to_hooks_and_matches():
    model, _ = _layernorm_model()
    assert not supports(model)
    assert clipping_mode(model) == "hooks"
    got, want, start, *_ = _run_both(_layernorm_model, batch_size=3, seed=11)
    _assert_same(got, want, start)
    with pytest.raises(ValueError, match="does not support"):
        clipping_mode(model, "one-pass")


def test_hooks_mode_asked_for_takes_the_same_steps_as_one_pass():
    got, want, start, *_ = _run_both(_cnn, batch_size=3, seed=11, clipping="hooks")
    _assert_same(got, want, start)


def test_an_empty_poisson_batch_is_a_noise_only_step():
    # Find a seed whose first Poisson batch (n=3, q=1/3) is empty.
    seed = next(s for s in range(200) if not SeededNoise(s, 1).bernoulli(3, 1 / 3).any())
    make = lambda: (_cnn()[0], _data(3, (1, 12, 12), 4))  # noqa: E731
    got, want, start, sizes, ledger, _ = _run_both(make, batch_size=1, seed=seed)
    assert sizes[0] == 0
    _assert_same(got, want, start)
    assert ledger.for_client(0)[0].steps == 3  # the empty batch is a step too


def test_a_record_with_a_huge_gradient_is_clipped():
    # Without noise, a step moves the weights by at most C * (records) / (n q) in L2.
    def make():
        model, data = _cnn()
        x, y = data.tensors
        x = x.clone()
        x[0] *= 1e4  # one record whose gradient dwarfs C
        return model, TensorDataset(x, y)

    model, data = make()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    got, _ = _trainer_round(model, data, batch_size=7, noise=SeededNoise(1, 1), sigma=0.0)
    moved = torch.sqrt(sum((got[k] - start[k]).pow(2).sum() for k, _ in model.named_parameters()))
    assert 0 < float(moved) <= LR * C * 7 / 7 * (1 + 1e-4)
    got2, want, start2, *_ = _run_both(make, batch_size=7, seed=1, sigma=0.0)
    _assert_same(got2, want, start2)


def test_frozen_parameters_stay_frozen_and_the_rest_matches():
    def make():
        model, data = _cnn()
        for name, p in model.named_parameters():
            if name.startswith("features.0") or name.startswith("features.1"):
                p.requires_grad_(False)
        return model, data

    got, want, start, _, _, model = _run_both(make, batch_size=3, seed=5)
    assert clipping_mode(model) == "one-pass"
    for k in ("features.0.weight", "features.0.bias", "features.1.weight"):
        assert torch.equal(got[k], start[k])
    _assert_same(got, want, start)
    assert all(
        p.requires_grad == (not n.startswith("features.0") and not n.startswith("features.1"))
        for n, p in model.named_parameters()
    )


def test_a_segmentation_unet_with_per_sample_dice_runs_one_pass_and_matches():
    from securefed.fl.tasks import _DiceCE

    def make():
        torch.manual_seed(3)
        model = build_model(
            name="unet",
            spec=ModelSpec(in_channels=1, num_classes=2, task="segmentation", image_shape=(16, 16)),
        ).module
        g = torch.Generator().manual_seed(0)
        x = torch.rand(4, 1, 16, 16, generator=g)
        y = torch.randint(0, 2, (4, 16, 16), generator=g)
        return model, TensorDataset(x, y)

    model, _ = make()
    assert clipping_mode(model) == "one-pass"
    got, want, start, *_ = _run_both(make, batch_size=2, seed=3, loss_fn=_DiceCE())
    _assert_same(got, want, start)


def test_a_layer_used_twice_sums_its_per_sample_gradients_before_clipping():
    lin = nn.Linear(5, 5)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.head = lin, nn.Linear(5, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    torch.manual_seed(0)
    model = Twice()
    params = list(model.parameters())
    x, y = torch.randn(4, 5) * 3, torch.tensor([0, 1, 1, 0])
    clipper = BookKeepingClipper(model, params)
    with clipper.pass_(scale=4):
        nn.functional.cross_entropy(model(x), y).backward()
    sums = clipper.clip_and_sum(0.1, 4)
    for s, w in zip(sums, _clipped_sum_by_record(model, params, x, y, 0.1)):
        torch.testing.assert_close(s, w, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None and p.requires_grad for p in params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_one_pass_on_cuda_matches_the_cpu_reference():
    model, data = _cnn()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model)
    n = len(data)
    plan = DPPlan(
        noise_multiplier=SIGMA,
        sample_rate=1 / 3,
        max_grad_norm=C,
        planned_steps=3,
        delta=1e-5,
        accountant="pld",
    )
    trainer = SiteTrainer(
        client_id=0,
        dataset=data,
        plan=plan,
        ledger=PrivacyLedger(),
        batch_size=3,
        lr=LR,
        momentum=0.0,
        device=torch.device("cuda"),
    )
    assert n == 7
    got = trainer.train_round(
        model=model,
        round_index=1,
        epochs=1,
        generator=torch.Generator(),
        noise=SeededNoise(11, 1),
        lr=LR,
    ).state
    want, _ = _reference_round(ref, data, batch_size=3, noise=SeededNoise(11, 1))
    _assert_same(got, want, start)


def _influence_of_one_record(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Norm of the one-pass clipper's clipped sum for a batch of one record (C = 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    clipper = BookKeepingClipper(model, params)
    try:
        with clipper.pass_(scale=1.0):
            nn.CrossEntropyLoss()(model(x), y).backward()
        sums = clipper.clip_and_sum(1.0, len(y))
    finally:
        clipper.remove()
    return float(torch.sqrt(sum(s.double().pow(2).sum() for s in sums)))


def test_a_record_crafted_to_cancel_in_a_gram_matrix_is_still_clipped():
    """The attack a ghost norm from float32 Gram matrices let through (norm 120 at C = 1).

    Input patches of +-2^16 + d round every Gram entry to the same +-2^32: the ghost norm
    of the conv's per-sample gradient came out 0 while its true norm is ~120, so the record
    entered the sum unclipped. Norms and sums taken from the same materialized per-sample
    gradients bound it by C whatever the rounding.
    """
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 256, 1, bias=False)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 2))
    model[3].requires_grad_(False)  # the head frozen: the conv alone carries the record
    assert clipping_mode(model) == "one-pass"
    v, d = 2.0**16, 10.0
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0]).view(1, 1, 2, 2)
    x = (v * signs + d * torch.randn(1, 256, 2, 2).sign()).contiguous()
    assert _influence_of_one_record(model, x, torch.tensor([1])) <= 1.0 + 1e-4


def test_tied_weights_fall_back_to_hooks():
    """Two modules sharing one weight: one-pass would norm each use alone; hooks sums them."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Tied()
    assert not supports(model)
    assert clipping_mode(model) == "hooks"


@pytest.mark.parametrize("clipping", ["one-pass", "hooks"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_record_with_a_non_finite_gradient_adds_nothing(clipping, bad):
    """Weights a server crafted to overflow on some records must not make the step non-finite.

    Before the fix the clip factor of such a record was NaN, so the clipped sum, the update
    and the site's reply (or its refusal to send a non-finite update) told the server that
    such a record was sampled: no DP bound holds then (the third review's attack_fit.py).
    Zeroed, the record adds nothing, which is within the clipping bound C.
    """
    model, data = _cnn()
    x, y = data.tensors
    n = len(y)
    poisoned = x.clone()
    poisoned[0] = bad
    start = copy.deepcopy(model)
    # q = 1 and sigma = 0: one step over every record, so it is a plain function of the data.
    got, _ = _trainer_round(
        model,
        TensorDataset(poisoned, y),
        batch_size=n,
        noise=SeededNoise(1, 1),
        sigma=0.0,
        clipping=clipping,
    )
    assert all(torch.isfinite(v).all() for v in got.values() if v.is_floating_point())
    # The same step without record 0, whose mean divides by n - 1 instead of n.
    rest, _ = _trainer_round(
        copy.deepcopy(start),
        TensorDataset(x[1:], y[1:]),
        batch_size=n - 1,
        noise=SeededNoise(1, 1),
        sigma=0.0,
        clipping=clipping,
    )
    before = start.state_dict()
    for k, v in got.items():
        if v.is_floating_point() and k in dict(start.named_parameters()):
            want = (rest[k] - before[k]) * (n - 1) / n
            torch.testing.assert_close(v - before[k], want, rtol=1e-4, atol=1e-7)
