"""ScatterNet features and a linear classifier: the DP-SGD model of Tramer & Boneh (2021).

Tramer & Boneh, "Differentially Private Learning Needs Better Features (or Much More Data)",
ICLR 2021: under DP-SGD, a linear model on fixed, hand-crafted ScatterNet features (Oyallon &
Mallat's wavelet scattering transform) beats end-to-end CNNs unless the data set is much
larger, because only a few thousand weights carry the noise and the features cost no
privacy: they are a fixed function of each image, learned from nothing. The paper measures
it on MNIST, Fashion-MNIST and CIFAR-10 (50-60 k images, epsilon <= 3); a hospital site
holds far fewer images, which the paper's argument says favours fixed features more. That
it carries over to medical images at epsilon = 8 is our measurement, not the paper's
(docs/benchmarks.md, "ScatterNet under DP").

The model follows the paper's ScatterNet+linear setting: a 2D scattering transform with
``J = 2`` scales and ``L = 8`` orientations (kymatio; 81 channels per image channel),
average-pooled to a grid of at most 8 x 8 (the paper's CIFAR-10 grid; larger images would
otherwise give ~10^5 weights per class), a GroupNorm with 27 groups (one of the 9 / 27 / 81
the paper's code searched; ours keeps GroupNorm's trained scale and shift, 2 weights per
channel), and one linear layer.

The scattering has no trainable weights and is the same function of an image every time, so
on a CPU the features of an image are computed once per process and reused, epoch after
epoch and round after round (:class:`_FeatureCache`; an in-process run clears it when it
ends, a deployed site when its next run starts); a GPU
recomputes them every batch. Its filters are non-persistent buffers, so they are neither
saved in a model file nor sent between the server and the sites.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict

import torch
from torch import nn

__all__ = [
    "SCATTER_J",
    "SCATTER_L",
    "ScatterLinear",
    "clear_feature_cache",
    "scatter_channels",
]

#: Scales and orientations of the scattering (Tramer & Boneh 2021, all their data sets).
SCATTER_J = 2
SCATTER_L = 8
#: Largest side of the pooled feature grid (the paper's 8 x 8 for 32 px CIFAR-10 images).
MAX_GRID = 8
#: GroupNorm groups over the scattering channels (one of the paper's searched values).
GROUPS = 27
#: Smallest image side: the scattering at J = 2 averages over 4 px and pads by 2^J.
MIN_SIDE = 8
#: Bytes of intermediate maps one chunk of small images may take while it is scattered
#: with every orientation at once (300-460 times an image's own size, measured; about 1.1
#: times :func:`_chunk`'s estimate), freed before the next chunk. Small chunks keep the maps
#: in a CPU's caches: at 28 px, 12 images a chunk. At least 2 images fit up to 83 px grey
#: and 47 px RGB in float32 (59 and 31 px in float64); larger ones take kymatio's loop.
CHUNK_BYTES = 16 * 2**20
#: The same on a GPU, which needs large batches to be busy.
GPU_CHUNK_BYTES = 512 * 2**20
#: Images a chunk when fewer than 2 fit in the budget above: kymatio's own loop, one filter
#: at a time, whose maps take 15-21 times an image's size (some 12 MiB for a 224 px RGB
#: image, measured) and whose operations are large enough for torch's threads to share.
CHUNK = 32


def scatter_channels(in_channels: int) -> int:
    """Scattering channels for ``in_channels`` image channels (J = 2, L = 8: 1 + JL + L^2)."""
    per_channel = 1 + SCATTER_J * SCATTER_L + SCATTER_L**2 * SCATTER_J * (SCATTER_J - 1) // 2
    return in_channels * per_channel


class _FeatureCache:
    """Features of images already seen, keyed by the image's bytes (LRU, bounded in bytes).

    Why: the scattering costs far more than the linear model (about 10 ms for a 96 px image
    on one CPU core), and a site passes the same images through it every epoch. Keys are
    a 128-bit BLAKE2b of the image's dtype, shape and bytes plus the transform's settings,
    so two different images share an entry only on a hash collision. The cache lives in
    the process: a site's features never leave it.
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.element_size() * value.nelement()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.element_size() * old.nelement()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


_CACHE = _FeatureCache()


def clear_feature_cache() -> None:
    """Forget every cached feature (a run calls it when it ends: no image outlives its run)."""
    _CACHE.clear()


_FILTERS_LOCK = threading.Lock()
_FILTERS: OrderedDict[tuple[int, int], nn.Module] = OrderedDict()
_FILTERS_KEPT = 4  # image shapes; a 224 px filter bank is a few MB


def _scattering(image_shape: tuple[int, int]) -> nn.Module:
    """A fresh scattering module for ``image_shape``: a copy of the one built for that shape.

    Its Morlet filters are a fixed function of the shape, and kymatio computes them in NumPy
    in about a second (28 px) each time: a run builds one model per site and the global one,
    and the sites' twins and a resume build more. A deep copy is bit for bit the same module
    in milliseconds, and owns its buffers (a later ``.to()`` or ``.double()`` changes only it).
    """
    with _FILTERS_LOCK:
        built = _FILTERS.get(image_shape)
        if built is None:
            # kymatio.torch would also import the 3D frontend, which needs
            # scipy.special.sph_harm (removed in SciPy 1.17); the 2D frontend alone does not.
            from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

            built = ScatteringTorch2D(J=SCATTER_J, shape=image_shape, L=SCATTER_L, max_order=2)
            _FILTERS[image_shape] = built
            while len(_FILTERS) > _FILTERS_KEPT:
                _FILTERS.popitem(last=False)
        _FILTERS.move_to_end(image_shape)
        return copy.deepcopy(built)


class ScatterLinear(nn.Module):
    """Scattering features (fixed), pooled, group-normalised, and a linear classifier.

    Args:
        in_channels: Image channels.
        num_classes: Output classes.
        image_shape: (H, W) of the images; the scattering's filters depend on it.

    Raises:
        ValueError: ``image_shape`` is not 2D or a side is below :data:`MIN_SIDE`.

    """

    def __init__(self, *, in_channels: int, num_classes: int, image_shape: tuple[int, int]) -> None:
        super().__init__()
        if len(image_shape) != 2 or min(image_shape) < MIN_SIDE:
            raise ValueError(
                f"the scattering needs 2D images of at least {MIN_SIDE} px a side "
                f"(got {tuple(image_shape)})"
            )
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.scattering = _scattering(self.image_shape)
        # The filters are a fixed function of the image shape: keep them out of state_dict,
        # so model files and the weights sent each round carry only what is trained.
        for name, buf in list(self.scattering.named_buffers(recurse=False)):
            self.scattering.register_buffer(name, buf, persistent=False)
        channels = scatter_channels(in_channels)
        out = (self.image_shape[0] // 2**SCATTER_J, self.image_shape[1] // 2**SCATTER_J)
        self.grid = (min(MAX_GRID, out[0]), min(MAX_GRID, out[1]))
        self.pool = nn.AdaptiveAvgPool2d(self.grid)
        self.norm = nn.GroupNorm(GROUPS, channels)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels * self.grid[0] * self.grid[1], num_classes)
        self._settings = repr((SCATTER_J, SCATTER_L, self.image_shape, self.grid)).encode()

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, 81, H/4, W/4) -> (B, 81 C, H/4, W/4) -> pooled grid.
        size = _chunk(x, self.scattering._M_padded * self.scattering._N_padded)
        if size < 2:  # larger images (above 83 px grey, 47 px RGB in float32, on a CPU)
            return torch.cat(
                [
                    self.pool(self.scattering(x[i : i + CHUNK].contiguous()).flatten(1, 2))
                    for i in range(0, len(x), CHUNK)
                ]
            )
        # torch's threads share each chunk's larger operations. A pool of two Python threads,
        # a chunk each, made no difference to the quick start's wall time (alternated runs,
        # 2026-12-02) and gives each pool thread its own OpenMP team.
        return torch.cat(
            [
                self.pool(_scatter(self.scattering, x[i : i + size]).flatten(1, 2))
                for i in range(0, len(x), size)
            ]
        )

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled scattering features of a batch (no gradient: nothing here is trained).

        In the model's floating-point type (``model.double()`` scatters in float64). On a
        CPU each image's features are cached; a GPU recomputes them, faster than a lookup.
        """
        dtype = self.head.weight.dtype
        x = x.detach().to(dtype)
        if len(x) == 0:  # an empty Poisson batch: a noise-only DP step still runs forward
            return x.new_zeros((0, self.norm.num_channels, *self.grid))
        if x.device.type != "cpu":
            return self._compute(x)
        prefix = hashlib.blake2b(self._settings, digest_size=16)
        prefix.update(f"{x.dtype}{tuple(x.shape[1:])}".encode())
        keys = []
        for image in x:
            h = prefix.copy()
            h.update(image.contiguous().numpy().tobytes())
            keys.append(h.digest())
        found = [_CACHE.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            fresh = self._compute(x[missing])
            for j, i in enumerate(missing):
                found[i] = fresh[j].clone()
                _CACHE.put(keys[i], found[i])
        return torch.stack(found)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.flatten(self.norm(self.features(x))))


def _chunk(x: torch.Tensor, padded_pixels: int) -> int:
    # The largest maps: L^2 second-order products per image channel at the padded size,
    # complex (twice the element size), and about as much again in the transforms' scratch.
    per_image = 2 * SCATTER_L**2 * padded_pixels * x.shape[1] * 2 * x.element_size()
    budget = CHUNK_BYTES if x.device.type == "cpu" else GPU_CHUNK_BYTES
    return max(1, budget // per_image)


def _times(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # u (complex) times kymatio filters w (..., M, N, 1 real or 2 complex), broadcast over
    # u's leading dimensions. A real filter multiplies the real and imaginary parts as
    # reals: torch would otherwise first make a complex copy of it.
    if w.shape[-1] == 1:
        return torch.view_as_complex(torch.view_as_real(u) * w)
    return u * torch.view_as_complex(w.contiguous())


def _periodize(x: torch.Tensor, k: int) -> torch.Tensor:
    # Subsampling by k in space is periodization (the mean of k x k aliases) in frequency.
    # Slices added in turn: a mean over strided complex dimensions is several times slower.
    if k == 1:
        return x
    m, n = x.shape[-2] // k, x.shape[-1] // k
    rows = x[..., :m, :]
    for i in range(1, k):
        rows = rows + x[..., i * m : (i + 1) * m, :]
    out = rows[..., :n]
    for i in range(1, k):
        out = out + rows[..., i * n : (i + 1) * n]
    return out / (k * k)


def _scatter(scattering: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The 2D scattering (kymatio's) of ``x`` (B, C, H, W) -> (B, C, K, H / 2^J, W / 2^J).

    The same transform, filters, padding and coefficient order as
    ``ScatteringTorch2D.scattering`` (``kymatio.scattering2d.core.scattering2d``), with every
    orientation of a scale computed at once instead of one filter at a time (kymatio makes
    242 FFT calls per batch at J = 2, L = 8). ``tests/models/test_scatter.py`` checks it against
    kymatio.
    """
    J = scattering.J
    phi, psi = scattering.load_filters()
    batch, channels = x.shape[:2]
    padded = scattering.pad(x.reshape(-1, *x.shape[-2:]).contiguous())[..., 0]
    complex_dtype = torch.complex128 if padded.dtype == torch.float64 else torch.complex64
    u0 = torch.fft.fft2(padded.to(complex_dtype))

    def low_pass(u: torch.Tensor, j: int) -> torch.Tensor:
        # Low-pass at level j, down to 2^J, back to space; drop the one-pixel border.
        s = torch.fft.ifft2(_periodize(_times(u, phi["levels"][j]), 2 ** (J - j))).real
        return s[..., 1:-1, 1:-1]

    order0 = [low_pass(u0, 0)[:, None]]
    order1, order2 = [], []
    for j1 in range(J):
        w1 = torch.stack([p["levels"][0] for p in psi if p["j"] == j1])
        u1 = torch.fft.ifft2(_periodize(_times(u0[:, None], w1), 2**j1)).abs()
        u1 = torch.fft.fft2(u1.to(complex_dtype))
        order1.append(low_pass(u1, j1))
        per_scale = []
        for j2 in range(j1 + 1, J):
            w2 = torch.stack([p["levels"][j1] for p in psi if p["j"] == j2])
            u2 = torch.fft.ifft2(_periodize(_times(u1[:, :, None], w2), 2 ** (j2 - j1))).abs()
            per_scale.append(low_pass(torch.fft.fft2(u2.to(complex_dtype)), j2))
        if per_scale:
            # kymatio's order: theta1, then j2, then theta2.
            order2.append(torch.stack(per_scale, dim=2).flatten(1, 3))
    out = torch.cat(order0 + order1 + order2, dim=1)
    return out.reshape(batch, channels, *out.shape[1:]).to(x.dtype)
