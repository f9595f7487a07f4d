"""Per-sample clipping in one backward pass ("book-keeping", Bu et al. 2023), for DP-SGD.

Opacus' hook mode (:class:`opacus.GradSampleModule`) lets autograd compute every weight's
batch gradient (which DP-SGD throws away), then materializes each layer's per-sample
gradients from its activations and output gradients (``unfold`` + ``einsum`` for
convolutions), and clips and sums them in the optimizer. Its ghost-clipping mode needs a
second backward pass. Here, instead:

- the trainable parameters of the supported layers are taken out of autograd for the pass
  (``requires_grad=False``), so the backward pass computes only the gradients that flow to
  the layers' inputs, never a weight's batch gradient (the first trained layer's output is
  made a leaf that requires a gradient, so the pass reaches it and stops there);
- a hook on each supported layer's output receives the output gradient during that
  backward pass and does the layer's per-sample work at once, by a fixed rule per layer:

  * a convolution materializes its per-sample weight gradients with one native kernel
    (oneDNN's grouped weight gradient with the batch as groups, no ``unfold``; batched
    products of shifted views of the input for 1x1 kernels and outputs of at most 16
    positions); per-sample gradients above 32 MiB are written into a buffer the layer keeps
    for the clipper's lifetime (one local round), so that a large batch does not map and
    zero-fill fresh memory for them in every pass;
  * GroupNorm's per-sample gradients come from its group statistics (the forward pass' own,
    read from autograd's saved tensors); a linear layer on
    ``(B, d)`` inputs keeps only its input and output gradient (norm ``|a_i| |g_i|``, clipped
    sum one matrix product);

- after the pass, the per-sample norms give the clip factors ``min(1, C / (|g_i| + 1e-6))``
  (Opacus' formula) and each parameter's clipped sum is one weighted sum over the batch.

The result is what :class:`opacus.optimizers.DPOptimizer` computes from a
:class:`~opacus.GradSampleModule` -- the sum over the batch of the clipped per-sample
gradients -- up to float rounding. Supported layers: :class:`~torch.nn.Linear`,
:class:`~torch.nn.Conv1d`/``2d``/``3d`` (zero padding, numeric padding) and
:class:`~torch.nn.GroupNorm`; :func:`supports` says whether a model's trainable
parameters all live in such layers (the trainer falls back to Opacus' hooks otherwise).
A layer used several times in one forward pass is handled: its per-sample gradients are
summed over the uses before the norm is taken. A parameter shared by several modules is not
(the trainer falls back to hooks).

Why every clipped sum is taken from the very tensors whose norms were measured: a norm computed
one way (e.g. a ghost norm from Gram matrices) and a sum computed another (a native weight
gradient of the scaled output gradient) agree in exact arithmetic but not in floats, and a
crafted record can make them disagree by orders of magnitude. An earlier version did that for
convolutions on small maps and for very large ones; one record of inputs ``+-2^16 + d`` had a
ghost norm of 0 and entered the sum unclipped (norm 120 at C = 1). Materialized per-sample
gradients cost memory (as Opacus' hooks do) but bound each record's contribution by C whatever
the rounding. The linear rule is the exception that holds: a per-sample gradient ``g_i a_i^T``
of a ``(B, d)`` input has the exact norm ``|g_i| |a_i|`` (a product, nothing cancels), and its
share of the matrix product is that outer product.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from securefed.allocator import MMAP_THRESHOLD

__all__ = [
    "BookKeepingClipper",
    "UnitPooler",
    "pool_by_unit",
    "supports",
    "unsupported_parameters",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: A convolution's per-sample weight gradients larger than this are written into a buffer the
#: layer keeps from pass to pass, in pieces of samples whose native result stays below
#: ``_PIECE_BYTES`` (or of one sample, if one is larger). Why: glibc maps a block above its
#: mmap threshold afresh on every allocation and the kernel zero-fills it page by page on
#: first touch; the cnn's last block at batch 256 (38 MB of per-sample gradients) lost more
#: time to that than to computing them (``python benchmarks/dp_step.py``, docs/benchmarks.md).
#: Below the threshold securefed's commands set (:data:`securefed.allocator.MMAP_THRESHOLD`)
#: results come from the heap at no such cost, and copying them into a buffer would only add
#: a pass over them. (With glibc's defaults, ``SECUREFED_MALLOC=system``, the threshold moves
#: between 128 KiB and 32 MiB and smaller blocks may be mapped too.) The buffer stays
#: allocated between passes, so a step's peak memory can rise by up to its size.
_REUSE_BYTES = MMAP_THRESHOLD
_PIECE_BYTES = 8 << 20
#: Work a loop keeps in the caches at a time (a typical L2).
_CACHE_BYTES = 1 << 20


def pool_by_unit(samples: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, count: int):
    """Per-unit weighted sums ``(count, ...)`` of per-record tensors ``samples`` ``(B, ...)``."""
    w = weight.to(device=samples.device, dtype=samples.dtype)
    scaled = samples * w.view(-1, *([1] * (samples.dim() - 1)))
    out = torch.zeros((count, *samples.shape[1:]), dtype=samples.dtype, device=samples.device)
    return out.index_add_(0, index.to(samples.device), scaled)


class UnitPooler:
    """Per-patient means of per-record gradients, over the physical chunks of one batch.

    A patient's gradient is the mean of its records' gradients (weights ``1/k`` for a patient
    with ``k`` records in the batch); clipping that mean to C bounds everything the patient
    adds to the step, however many records it has. A batch holds each patient's records next
    to each other (:class:`~securefed.dp.trainer.PoissonBatchSampler`), but a physical chunk
    (``--max-physical-batch-size``) may end inside a patient: that patient's partial sum is
    carried into the next chunk and clipped only once its last record is in, so a chunk never
    holds more than the cap, however large a patient.

    Args:
        units: The batch's unit (patient) of each record, one patient's records contiguous.

    """

    def __init__(self, units: torch.Tensor) -> None:
        units = torch.as_tensor(units).reshape(-1)
        _, inverse, counts = torch.unique_consecutive(
            units, return_inverse=True, return_counts=True
        )
        if counts.numel() != torch.unique(units).numel():
            # A patient whose records are not contiguous would be clipped as two patients.
            raise ValueError("a batch must hold each patient's records next to each other")
        self.units = units
        self.weight = 1.0 / counts.to(torch.float64)[inverse]
        self._carry: dict[object, torch.Tensor] = {}

    def pool(
        self, samples: dict[object, torch.Tensor], lo: int, hi: int, *, scale: float = 1.0
    ) -> tuple[dict[object, torch.Tensor], int]:
        """Pool the chunk ``[lo, hi)``'s per-record tensors into its finished patients' means.

        ``scale`` turns the tensors into per-record gradients (the chunk's size when they are
        gradients of the chunk's mean loss). Returns the pooled tensors (one row per patient
        whose last record is in the chunk, with any part carried from the previous chunk
        added in) and their number.
        """
        u = self.units[lo:hi]
        _, index, counts = torch.unique_consecutive(u, return_inverse=True, return_counts=True)
        count = int(counts.numel())
        weight = self.weight[lo:hi] * scale
        out = {k: pool_by_unit(v, index, weight, count) for k, v in samples.items()}
        if self._carry:  # the previous chunk ended inside this chunk's first patient
            if set(self._carry) != set(out) or any(
                self._carry[k].shape != v.shape[1:] for k, v in out.items()
            ):
                raise RuntimeError("a patient's gradients changed layout between chunks")
            for k, v in out.items():
                v[0] += self._carry[k]
            self._carry = {}
        if hi < len(self.units) and bool(self.units[hi] == self.units[hi - 1]):
            # This chunk ends inside a patient: keep its partial mean for the next chunk.
            self._carry = {k: v[-1].clone() for k, v in out.items()}
            out = {k: v[:-1] for k, v in out.items()}
            count -= 1
        return out, count


def _layer_ok(module: nn.Module) -> bool:
    if isinstance(module, _CONVS):
        return (
            module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
            and type(module) in _CONVS  # not a subclass that may change forward()
        )
    if isinstance(module, nn.Linear):
        return type(module) is nn.Linear
    if isinstance(module, nn.GroupNorm):
        return type(module) is nn.GroupNorm
    return False


def unsupported_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters that the one-pass clipper cannot handle.

    A parameter is supported when it is a direct parameter (``weight`` or ``bias``) of a
    layer :class:`BookKeepingClipper` knows, and of no other module.
    """
    out = []
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for mod_name, module in model.named_modules(remove_duplicate=False):
        ok = _layer_ok(module)
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            # A parameter shared by two modules (tied weights): each module's per-sample
            # gradient would be normed alone; the sum over both is what must be clipped.
            shared = owners[id(p)] > 1
            if p.requires_grad and (shared or not (ok and p_name in ("weight", "bias"))):
                if name not in out:
                    out.append(name)
    return out


def supports(model: nn.Module) -> bool:
    """Whether every trainable parameter of ``model`` sits in a supported layer."""
    return not unsupported_parameters(model)


def _shifted_ok(conv: nn.Module, go: torch.Tensor) -> bool:
    """Whether the shifted products beat the grouped convolution (measured on CPUs).

    A kernel of one tap (1x1, stride 1) is one batched matrix product of the input and the
    output gradient, far cheaper than a grouped convolution; outputs of at most 16 positions
    (4x4, 2x2: resnet-small's last stages) need only a few small products. Otherwise oneDNN's
    grouped weight gradient (the batch as groups) is faster at two threads and as fast or
    faster at one, with the allocator keeping freed memory (:mod:`securefed.allocator`;
    ``python benchmarks/conv_grad_sample.py``, docs/benchmarks.md). A fixed rule, not timed
    at run time, so that a reproducible-noise run rounds the same way every time.
    """
    if conv.groups != 1 or any(s != 1 for s in conv.stride):
        return False
    return all(k == 1 for k in conv.kernel_size) or go[0, 0].numel() <= 16


def _from_shifted(t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor from the ``(*kernel, Cin, Cout)`` layout of shifted products."""
    nd = t.dim() - 2
    return t.permute(nd + 1, nd, *range(nd)).contiguous()


def _shifted_grad_sample(
    conv: nn.Module, x: torch.Tensor, go: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample weight gradients of a stride-1, ungrouped convolution, without ``unfold``.

    In the flattened zero-padded input, kernel offset ``k`` reads the window starting ``s_k``
    elements further; with the output gradient zero-padded to the padded input's row length
    (so its flat index steps like the input's), the gradient of that offset is one batched
    matrix product of the output gradient with a *view* of the input: ``K`` products, no
    copy of the input per offset. ``out``, if given, is the ``(B, *kernel, Cin, Cout)``
    tensor they are written into.
    """
    nd = x.dim() - 2
    b, cin, cout = x.shape[0], x.shape[1], go.shape[1]
    pad: list[int] = []
    for p in reversed(conv.padding):
        pad += [p, p]
    xp = F.pad(x, pad) if any(pad) else x
    padded, out_sizes = xp.shape[2:], go.shape[2:]
    strides = [1] * nd
    for i in reversed(range(nd - 1)):
        strides[i] = strides[i + 1] * padded[i + 1]
    length = 1 + sum((o - 1) * st for o, st in zip(out_sizes, strides))
    gpad: list[int] = []
    for i in reversed(range(1, nd)):
        gpad += [0, padded[i] - out_sizes[i]]
    gp = (F.pad(go, gpad) if any(gpad) else go).reshape(b, cout, -1)[:, :, :length]
    gp = gp.transpose(1, 2)
    xf = xp.reshape(b, cin, -1)
    if out is None:
        out = x.new_empty(b, *conv.kernel_size, cin, cout)
    for off in itertools.product(*[range(k) for k in conv.kernel_size]):
        s = sum(o * d * st for o, d, st in zip(off, conv.dilation, strides))
        torch.bmm(xf[:, :, s : s + length], gp, out=out[(slice(None), *off)])
    # (B, *kernel, Cin, Cout): the layout the products write; callers that keep it (the
    # norms and the clipped sum do not care) avoid a copy of B x P numbers.
    return out


def _grouped_grad_sample(
    conv: nn.Module, x: torch.Tensor, go: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample weight gradients ``(B, *weight.shape)`` of a convolution, by native calls.

    The batch becomes the groups of one grouped convolution (sample ``i``'s input channels
    and output channels form group ``i``), whose weight gradient is the stack of the
    per-sample weight gradients. With ``out`` (``(B, *weight.shape)``), the samples are
    taken in pieces of at most ``_PIECE_BYTES`` of result (one sample, if one is larger),
    each copied into ``out``.
    """
    if out is None:
        return _grouped_piece(conv, x, go)
    b = x.shape[0]
    step = max(1, _PIECE_BYTES // max(1, out[0].numel() * out.element_size()))
    for i in range(0, b, step):
        out[i : i + step] = _grouped_piece(conv, x[i : i + step], go[i : i + step])
    return out


def _grouped_piece(conv: nn.Module, x: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    w = conv.weight
    groups = conv.groups * b
    xs = x.reshape(1, b * x.shape[1], *x.shape[2:])
    gs = go.reshape(1, b * go.shape[1], *go.shape[2:])
    # Only the weight's shape matters: with the input gradient off (``output_mask``) the
    # kernel never reads its values, and B copies of the weight (38 MB for the cnn's last
    # block at batch 256) cost more than the weight gradient of a plain step.
    weight = w.new_empty((b * w.shape[0], *w.shape[1:]))
    nd = x.dim() - 2
    _, gw, _ = torch.ops.aten.convolution_backward(
        gs,
        xs,
        weight,
        None,
        list(conv.stride),
        list(conv.padding),
        list(conv.dilation),
        False,
        [0] * nd,
        groups,
        [False, True, False],
    )
    return gw.view(b, *w.shape)


def _saved_group_norm_stats(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The group statistics ``(mean, rstd)`` autograd saved for a GroupNorm's backward.

    They are the very numbers the forward pass normalized with; reading them spares a second
    pass over the input (6.6 ms of a 260 ms DP step of the cnn at batch 256). ``None`` when the
    output was not made by the native kernel (another backend, no autograd graph).
    """
    fn = output.grad_fn
    if type(fn).__name__ != "NativeGroupNormBackward0":
        return None
    try:
        return fn._saved_result1.detach(), fn._saved_result2.detach()
    except (AttributeError, RuntimeError):
        return None


def _group_norm_weight_samples(
    m: nn.GroupNorm,
    x: torch.Tensor,
    go: torch.Tensor,
    gb: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-sample GroupNorm weight gradients ``sum_s go * xhat``, without forming ``go * xhat``.

    ``xhat = (x - mean_g) * rstd_g``, so the sum is ``rstd_g * (sum_s go*x - mean_g *
    sum_s go)``: the group statistics (``stats``, the forward pass' own, or the native
    group-norm kernel's recomputed) and one dot product per sample and channel, instead of a
    product the size of ``x``.
    """
    b, c = x.shape[:2]
    if stats is not None and all(t.numel() == b * m.num_groups for t in stats):
        mean, rstd = stats
    else:
        _, mean, rstd = torch.ops.aten.native_group_norm(
            x, None, None, b, c, x[0, 0].numel(), m.num_groups, m.eps
        )
    per = c // m.num_groups
    gf, xf = go.reshape(b, c, -1), x.reshape(b, c, -1)
    gx = gf.new_empty(b, c)
    # A few samples at a time: vecdot's elementwise product then stays in the caches
    # (4.4 against 7.7 ms for the cnn's first norm at batch 256, one thread).
    step = max(1, _CACHE_BYTES // max(1, gf[0].numel() * gf.element_size()))
    for i in range(0, b, step):
        torch.linalg.vecdot(gf[i : i + step], xf[i : i + step], out=gx[i : i + step])
    mean_c = mean.view(b, -1).repeat_interleave(per, dim=1)
    rstd_c = rstd.view(b, -1).repeat_interleave(per, dim=1)
    return (gx - mean_c * gb) * rstd_c


def _from_batched(gs: torch.Tensor, layout: object) -> torch.Tensor:
    """Per-sample gradients in the parameter's own layout ``(B, *shape)``."""
    if layout is None:
        return gs
    return torch.stack([layout(g) for g in gs])  # type: ignore[operator]


class _Layer:
    """What one layer contributes during a pass: per-sample gradients or ghost factors."""

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter]) -> None:
        self.module = module
        self.params = params  # "weight"/"bias" -> parameter, trainable ones only
        self.grad_samples: dict[str, torch.Tensor] = {}
        # A per-sample gradient kept in another layout, and how its sum becomes the weight's.
        self.layout: dict[str, object] = {}
        self.ghost: tuple[torch.Tensor, torch.Tensor] | None = None  # (a, g) of a Linear
        # Flat buffers for large per-sample gradients, kept across passes (_REUSE_BYTES).
        self._buffers: dict[str, torch.Tensor] = {}

    def _workspace(
        self, name: str, shape: Sequence[int], like: torch.Tensor
    ) -> torch.Tensor | None:
        """A reused ``shape`` tensor for ``name``'s per-sample gradients, or None if small."""
        if name in self.grad_samples:
            return None  # a second use: the first one's gradients are still in the buffer
        numel = 1
        for d in shape:
            numel *= int(d)
        if numel * like.element_size() <= _REUSE_BYTES:
            return None
        buf = self._buffers.get(name)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = self._buffers[name] = like.new_empty(numel)
        return buf[:numel].view(*shape)

    def reset(self) -> None:
        self.grad_samples = {}
        self.layout = {}
        self.ghost = None

    def _add(self, name: str, gs: torch.Tensor, layout: object = None) -> None:
        if name in self.grad_samples:
            if self.layout.get(name) is not layout:  # a second use, in another layout
                gs = _from_batched(gs, layout)
                self.grad_samples[name] = _from_batched(
                    self.grad_samples[name], self.layout.pop(name, None)
                )
            self.grad_samples[name] = self.grad_samples[name] + gs
        else:
            self.grad_samples[name] = gs
            if layout is not None:
                self.layout[name] = layout

    def _materialize_ghost(self) -> None:
        if self.ghost is not None:
            a, g = self.ghost
            self.ghost = None
            self._linear_samples(a, g)

    def _linear_samples(self, a: torch.Tensor, g: torch.Tensor) -> None:
        if "weight" in self.params:
            self._add("weight", torch.einsum("n...i,n...j->nij", g, a))
        if "bias" in self.params:
            self._add("bias", g.reshape(g.shape[0], -1, g.shape[-1]).sum(1))

    def backward(
        self,
        x: torch.Tensor,
        go: torch.Tensor,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Record the per-sample gradients of one use of the layer (``go`` per sample).

        ``stats``: a GroupNorm's saved group statistics for this use, if autograd kept them.
        """
        m = self.module
        spatial = tuple(range(2, go.dim()))
        if isinstance(m, nn.Linear):
            first = not self.grad_samples and self.ghost is None
            if x.dim() == 2 and first:
                self.ghost = (x, go)
                return
            self._materialize_ghost()
            self._linear_samples(x, go)
        elif isinstance(m, _CONVS):
            if "weight" in self.params:
                w, b = m.weight, x.shape[0]
                if _shifted_ok(m, go):
                    shape = (b, *m.kernel_size, w.shape[1], w.shape[0])
                    out = self._workspace("weight", shape, go)
                    self._add("weight", _shifted_grad_sample(m, x, go, out), _from_shifted)
                else:
                    out = self._workspace("weight", (b, *w.shape), go)
                    self._add("weight", _grouped_grad_sample(m, x, go, out))
            if "bias" in self.params:
                self._add("bias", go.sum(spatial))
        else:  # GroupNorm
            gb = go.sum(spatial)
            if "weight" in self.params:
                self._add("weight", _group_norm_weight_samples(m, x, go, gb, stats))
            if "bias" in self.params:
                self._add("bias", gb)

    def samples(self) -> dict[str, torch.Tensor]:
        """The per-sample gradients, materialized (for pooling them by patient)."""
        # A linear layer's exact norm |a_i||g_i| is a single record's: a patient's mean of
        # several outer products is no outer product, so it is materialized first.
        self._materialize_ghost()
        return self.grad_samples

    def norms_sq(self, n: int, device: torch.device) -> torch.Tensor:
        """Squared per-sample norm of the layer's trainable parameters' gradients."""
        total = torch.zeros(n, device=device, dtype=torch.float32)
        if self.ghost is not None:
            a, g = self.ghost
            g2 = g.float().pow(2).sum(1)
            if "weight" in self.params:
                total += a.float().pow(2).sum(1) * g2
            if "bias" in self.params:
                total += g2
        for gs in self.grad_samples.values():
            total += torch.linalg.vector_norm(gs.reshape(n, -1), dim=1).float().pow(2)
        return total

    def drop(self, bad: torch.Tensor) -> None:
        """Zero the per-sample gradients of the samples ``bad`` marks (a boolean mask)."""
        keep = ~bad

        def kept(t: torch.Tensor) -> torch.Tensor:
            mask = keep.to(t.device).view(-1, *([1] * (t.dim() - 1)))
            return torch.where(mask, t, t.new_zeros(()))

        if self.ghost is not None:
            a, g = self.ghost
            self.ghost = (kept(a), kept(g))
        for name, gs in self.grad_samples.items():
            self.grad_samples[name] = kept(gs)

    def clipped_sums(self, factor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each trainable parameter's ``sum_i factor_i * g_i``."""
        out = {}
        if self.ghost is not None:
            a, g = self.ghost
            gc = g * factor.to(g.dtype)[:, None]
            if "weight" in self.params:
                out["weight"] = gc.t() @ a
            if "bias" in self.params:
                out["bias"] = gc.sum(0)
        for name, gs in self.grad_samples.items():
            f = factor.to(gs.dtype)
            summed = (f @ gs.reshape(gs.shape[0], -1)).view(gs.shape[1:])
            to_param = self.layout.get(name)
            out[name] = to_param(summed) if to_param is not None else summed
        return out


class BookKeepingClipper:
    """Per-sample clipped gradient sums of a model's trainable parameters, one backward pass.

    Usage, per physical batch (chunk)::

        with clipper.pass_(scale=len(batch)):   # scale: the loss is a mean over the chunk
            loss = loss_fn(model(x), y)
            loss.backward()
        sums = clipper.clip_and_sum(max_grad_norm)   # parameter -> clipped sum

    The model's parameters are restored (``requires_grad``) when the pass ends, also on an
    error.

    Args:
        model: The model; :func:`supports` must hold.
        params: The trainable parameters, in the optimizer's order.

    Raises:
        ValueError: A trainable parameter is in a layer the clipper does not support.

    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        bad = unsupported_parameters(model)
        if bad:
            raise ValueError(f"one-pass clipping does not support {', '.join(bad[:3])}")
        wanted = {id(p) for p in params}
        self.params = list(params)
        self.layers: list[_Layer] = []
        self._where: dict[int, tuple[_Layer, str]] = {}
        self._handles = []
        for module in model.modules():
            own = {
                n: p
                for n, p in module.named_parameters(recurse=False)
                if p.requires_grad and id(p) in wanted
            }
            if not own:
                continue
            layer = _Layer(module, own)
            self.layers.append(layer)
            for n, p in own.items():
                self._where[id(p)] = (layer, n)
            self._handles.append(module.register_forward_hook(self._forward_hook(layer)))
        missing = [p for p in self.params if id(p) not in self._where]
        if missing:
            raise ValueError("a trainable parameter belongs to no module of the model")
        self._active = False
        self._scale = 1.0
        self._n = 0

    def _forward_hook(self, layer: _Layer):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self._active or not torch.is_grad_enabled():
                return None
            x = inputs[0].detach()
            stats = _saved_group_norm_stats(output) if isinstance(module, nn.GroupNorm) else None
            replaced = None
            if not output.requires_grad:
                # Nothing before this layer is trained (its input needs no gradient) and its
                # own parameters are out of autograd: the output becomes the leaf the
                # backward pass stops at -- no gradient flows into a frozen backbone.
                replaced = output = output.detach().requires_grad_(True)

            def on_grad(go: torch.Tensor) -> None:
                layer.backward(x, go.detach(), stats)

            output.register_hook(on_grad)
            return replaced

        return hook

    def pass_(self, *, scale: float) -> _Pass:
        """A forward/backward pass whose per-sample gradients are recorded.

        Args:
            scale: Factor from the loss' gradient to the per-sample gradients (the chunk's
                size for a mean loss).

        """
        return _Pass(self, scale)

    def clip_and_sum(
        self,
        max_grad_norm: float,
        n: int,
        *,
        pooler: UnitPooler | None = None,
        span: tuple[int, int] | None = None,
    ) -> list[torch.Tensor]:
        """Clipped sums, one per parameter (optimizer order), of the last pass' ``n`` samples.

        The clip factor of sample ``i`` is ``min(1, C / (|g_i| + 1e-6))``, as in Opacus.
        With a ``pooler`` (patient-level DP; the pass held records ``span`` of its batch),
        the records are pooled into patients' means first and each finished patient's mean
        is clipped.
        """
        if pooler is not None and n:
            lo, hi = span if span is not None else (0, n)
            samples = {
                (i, name): gs for i, layer in enumerate(self.layers)
                for name, gs in layer.samples().items()
            }  # fmt: skip
            # Pooled at the per-sample gradients' scale: a patient carried from a chunk of
            # another size adds parts that were scaled by that chunk's size.
            pooled, n = pooler.pool(samples, lo, hi, scale=self._scale)
            for (i, name), gs in pooled.items():
                self.layers[i].grad_samples[name] = gs
            scale = 1.0
        else:
            scale = self._scale
        if n == 0 or not self.params:
            out = [torch.zeros_like(p) for p in self.params]
        else:
            device = self.params[0].device
            norm_sq = torch.zeros(n, device=device, dtype=torch.float32)
            for layer in self.layers:
                norm_sq += layer.norms_sq(n, device)
            # The hooks saw gradients of the loss, ``scale`` times smaller than the per-sample
            # gradients (a mean over the chunk): scaled here, on B numbers, not on B x P.
            norms = norm_sq.sqrt() * scale
            bad = ~torch.isfinite(norms)
            if bool(bad.any()):
                # A sample whose gradient is not finite (weights crafted to overflow on some
                # records) would make the sum non-finite, telling that such a record was
                # sampled; it adds nothing instead, which is within the clipping bound.
                for layer in self.layers:
                    layer.drop(bad)
                norms = torch.where(bad, torch.zeros_like(norms), norms)
            factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * scale
            sums: dict[tuple[int, str], torch.Tensor] = {}
            for layer in self.layers:
                for name, s in layer.clipped_sums(factor).items():
                    sums[(id(layer), name)] = s
            out = []
            for p in self.params:
                layer, name = self._where[id(p)]
                s = sums.get((id(layer), name))
                out.append(torch.zeros_like(p) if s is None else s.to(p.dtype).view_as(p))
        for layer in self.layers:
            layer.reset()
        return out

    def remove(self) -> None:
        """Detach the hooks from the model and free the layers' buffers."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self.layers:
            layer.reset()
            layer._buffers.clear()


class _Pass:
    def __init__(self, clipper: BookKeepingClipper, scale: float) -> None:
        self.clipper = clipper
        self.scale = scale
        self._saved: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> _Pass:
        c = self.clipper
        for layer in c.layers:
            layer.reset()
        # No batch gradient of a weight is ever needed: autograd skips them.
        self._saved = [(p, p.requires_grad) for p in c.params]
        for p in c.params:
            p.requires_grad_(False)
        c._active, c._scale = True, self.scale
        return self

    def __exit__(self, *exc: object) -> None:
        c = self.clipper
        c._active = False
        for p, rg in self._saved:
            p.requires_grad_(rg)
