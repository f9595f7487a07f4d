"""A start-up estimate of DP-SGD's memory, and a warning before a run that cannot fit.

DP-SGD keeps one gradient per sample: Opacus stores, for every trainable parameter, a tensor
of shape (batch, *param.shape), plus each layer's input (its activations) for the backward
hooks. With a large model this dwarfs the model itself (densenet121: 7M parameters x 256
samples x 4 bytes = 7 GB of per-sample gradients alone), and a run that does not fit swaps or
is killed without a word. The estimate is deliberately rough; it exists to say so up front.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "GRAD_SAMPLE_FACTOR",
    "available_memory",
    "estimate_dp_memory",
    "expected_physical_batch",
    "memory_warning",
    "release_freed_heap",
]

#: Copies of the per-sample gradients alive at once: Opacus' grad_sample, the flattened
#: float32 view clipping builds, and the clipped einsum's inputs.
GRAD_SAMPLE_FACTOR = 2.0


def expected_physical_batch(batch_size: float, max_physical_batch_size: int | None) -> int:
    """Records run through the model at once: a Poisson batch, capped by the physical limit.

    A Poisson batch of mean ``B`` exceeds ``B`` about half the time; ``B + 3 sqrt(B)`` is
    rarely exceeded, so the estimate uses it.
    """
    high = math.ceil(batch_size + 3 * math.sqrt(max(batch_size, 0.0)))
    if max_physical_batch_size is not None:
        high = min(high, max_physical_batch_size)
    return max(high, 1)


def _activation_bytes_per_sample(model: nn.Module, sample_shape: tuple[int, ...]) -> int | None:
    """Bytes of the inputs Opacus keeps for its hooks, per sample.

    One forward pass of one zero sample, counting the input of every module that owns
    trainable parameters; None when the model does not run on such an input.
    """
    sizes: list[int] = []

    def hook(_module: nn.Module, inputs: tuple, _output: object) -> None:
        sizes.extend(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    was_training = model.training
    try:
        device = next(model.parameters()).device
        model.eval()  # no statistics change, no dropout: this forward is invisible
        # ... and consumes no random numbers of the seeded run that follows.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(torch.zeros((1, *sample_shape), device=device))
    except Exception:  # noqa: BLE001 - an estimate must never stop a run
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sum(sizes)


def estimate_dp_memory(
    model: nn.Module,
    *,
    sample_shape: tuple[int, ...],
    physical_batch: int,
    activations: bool = True,
) -> int:
    """Bytes DP-SGD needs for one physical batch: per-sample gradients plus kept activations.

    Args:
        model: The model to train (its trainable parameters count).
        sample_shape: One input's shape, ``(C, H, W)`` or ``(C, D, H, W)``.
        physical_batch: Records run through the model at once.
        activations: Also estimate the activations with one forward pass of one sample.

    Returns:
        ``physical_batch * (trainable parameters * 4 * GRAD_SAMPLE_FACTOR + activations)``.

    """
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_sample = params * 4 * GRAD_SAMPLE_FACTOR
    if activations:
        # Opacus keeps a layer's input until backward; autograd keeps roughly as much again.
        act = _activation_bytes_per_sample(model, sample_shape)
        per_sample += 2 * (act or 0)
    return int(physical_batch * per_sample)


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes free for training: free GPU memory on CUDA, else /proc/meminfo's MemAvailable.

    Returns None where neither can be read (e.g. macOS): then no warning is given.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_warning(
    model: nn.Module,
    *,
    sample_shape: tuple[int, ...],
    batch_size: float,
    max_physical_batch_size: int | None,
    device: torch.device | str = "cpu",
    available: int | None = None,
) -> str | None:
    """One line to print when DP-SGD's estimated memory exceeds what is available, else None.

    Args:
        model: The model to train.
        sample_shape: One input's shape.
        batch_size: Expected (logical) batch size.
        max_physical_batch_size: ``--max-physical-batch-size``, or None.
        device: Where training runs (CUDA: free GPU memory counts).
        available: Bytes available (default: :func:`available_memory`).

    """
    free = available_memory(device) if available is None else available
    if free is None:
        return None
    batch = expected_physical_batch(batch_size, max_physical_batch_size)
    need = estimate_dp_memory(model, sample_shape=sample_shape, physical_batch=batch)
    if need <= free:
        return None
    per_sample = need / batch
    fits = max(int(free * 0.5 // per_sample), 1)  # half of what is free: leave headroom
    return (
        f"warning: DP-SGD's per-sample gradients need about {need / 2**30:.1f} GiB for "
        f"batches of up to {batch} records, more than the {free / 2**30:.1f} GiB available; "
        f"use --max-physical-batch-size {fits} (same privacy, same steps, less memory)"
    )


def release_freed_heap() -> None:
    """Hand the heap that freed tensors left behind back to the kernel (glibc only).

    Used between a benchmark's measured rounds, so that memory the allocator kept from an
    earlier round does not count in the next. Not called in training: with one-pass clipping
    the quick start's resident memory no longer grows round after round, and trimming after
    every site's round cost more (13 s of system time in page faults, 45.7 s vs 39.9 s wall)
    than it saved (docs/memory.md). Elsewhere (musl, macOS, Windows) it does nothing.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
