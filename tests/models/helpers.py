"""Shared test helpers: one real Opacus DP-SGD step, and an exact per-sample gradient check."""

from __future__ import annotations

import copy

import torch
from opacus import GradSampleModule, PrivacyEngine
from torch import nn


def labels_for(logits_shape: tuple[int, ...], num_classes: int, n: int) -> torch.Tensor:
    """Random labels: one per image (classification) or one per voxel (segmentation)."""
    spatial = tuple(logits_shape[2:])
    return torch.randint(0, num_classes, (n, *spatial))


def dp_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One DP-SGD step (rdp accountant) on (x, y); return the parameters before the step.

    Asserts that every trainable parameter received a per-sample gradient with one row per
    example (an unused or unsupported layer would have none).
    """
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    data = torch.utils.data.TensorDataset(x, y)
    # Fixed batches: the assertions below need every example in the one batch.
    loader = torch.utils.data.DataLoader(data, batch_size=len(x))
    private, opt, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    xb, yb = next(iter(loader))
    torch.nn.functional.cross_entropy(private(xb), yb).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad_sample is not None, name
            assert p.grad_sample.shape == (len(x), *p.shape), name
    opt.step()
    return before


def max_per_sample_error(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn
) -> tuple[float, float, list[str]]:
    """Compare Opacus' grad_sample for batch ``x`` with autograd on each example alone.

    ``loss_fn(logits, y)`` must sum over examples (``loss_reduction="sum"``).

    Returns the largest absolute difference, the largest reference magnitude, and the
    names of trainable parameters that got no per-sample gradient.
    """
    reference = copy.deepcopy(model)
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    per_example = []
    for i in range(len(x)):
        params = [dict(reference.named_parameters())[n] for n in names]
        grads = torch.autograd.grad(loss_fn(reference(x[i : i + 1]), y[i : i + 1]), params)
        per_example.append(grads)
    gsm = GradSampleModule(model, loss_reduction="sum")
    loss_fn(gsm(x), y).backward()
    missing, err, scale = [], 0.0, 0.0
    for j, (name, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad):
        assert name == names[j]
        if getattr(p, "grad_sample", None) is None:
            missing.append(name)
            continue
        expected = torch.stack([g[j] for g in per_example])
        err = max(err, (p.grad_sample - expected).abs().max().item())
        scale = max(scale, expected.abs().max().item())
    gsm.remove_hooks()
    return err, scale, missing
