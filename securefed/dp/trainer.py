"""Local training at one site: DP-SGD, or plain SGD for the non-private baseline.

DP-SGD is assembled by hand from Opacus' parts rather than through ``PrivacyEngine``: module
validation, a per-sample clipper and a :class:`opacus.optimizers.DPOptimizer` (clipping,
mean over the expected batch size). What Opacus would take from a ``torch.Generator`` -- the
Gaussian noise and the Poisson sampling -- comes from a :class:`~securefed.dp.noise.NoiseSource`,
by default a key only the site holds. Steps are counted here and written to the ledger;
epsilon is computed from the ledger.

Which per-sample clipping runs (``SiteTrainer(clipping="auto")``, :func:`clipping_mode`):

- ``one-pass`` (:class:`~securefed.dp.clipping.BookKeepingClipper`) when every trainable
  parameter sits in a ``Linear``, ``Conv1d/2d/3d`` (zero padding) or ``GroupNorm`` layer:
  every built-in model except ``vit-unet`` (cnn, resnet-small, scatter-linear, resnet18,
  densenet121, unet, frozen or not). One backward pass that computes no weight's batch
  gradient; per-sample gradients from native kernels; clipped sums handed to
  :class:`ClippedSumDPOptimizer`.
  Why: it is the fastest exact mode measured on CPUs (``benchmarks/dp_step.py``; Opacus'
  ghost clipping needs two backward passes and has no ghost rule for convolutions, its
  functorch mode is slower than its hooks). Every clipped sum is taken from the per-sample
  gradients whose norms were measured (see :mod:`securefed.dp.clipping` for the attack a
  separately computed norm let through).
- ``hooks`` (:class:`opacus.GradSampleModule` + :class:`NoiseDPOptimizer`) otherwise: a
  layer the one-pass clipper has no rule for (LayerNorm, attention, embeddings, a user's
  custom layer), or when asked for. Both modes compute the same clipped sums (up to float
  summation order; ``tests/dp/test_clipping.py`` checks both against DP-SGD written out per
  sample) and both need the loss to be a mean of per-sample terms (cross-entropy, and the
  per-sample Dice-CE of segmentation).

With ``max_physical_batch_size`` set, a Poisson-sampled (logical) batch is processed in chunks
of at most that many records: each chunk's per-sample gradients are clipped and summed into
the optimizer's ``summed_grad`` (Opacus' ``signal_skip_step``, as its ``BatchMemoryManager``
does), and one noisy step is taken per logical batch. Clipping is per sample and the sum is
over the same records, so the step is the unsplit step; the ledger counts logical steps.

Patient-level DP (``units``): the sampler flips one coin per patient and yields all of a
sampled patient's records together; :class:`~securefed.dp.clipping.UnitPooler` averages each
patient's per-record gradients (carrying a patient across chunks) and the patient's mean is
what is clipped; q, the steps and the mean's denominator count patients.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from securefed.dp.accounting import compute_epsilon, site_batch, site_lr, steps_per_epoch
from securefed.dp.clipping import BookKeepingClipper, UnitPooler, unsupported_parameters
from securefed.dp.ledger import PrivacyEvent, PrivacyLedger
from securefed.dp.noise import SECURE_DRAWS, NoiseSource
from securefed.errors import PrivacyBudgetError

__all__ = [
    "CLIPPING_MODES",
    "ClippedSumDPOptimizer",
    "DPPlan",
    "LocalResult",
    "NoiseDPOptimizer",
    "PoissonBatchSampler",
    "SiteTrainer",
    "UnitTagged",
    "clipping_mode",
]

#: ``SiteTrainer(clipping=...)``: ``auto`` picks ``one-pass`` when the model allows it.
CLIPPING_MODES = ("auto", "one-pass", "hooks")


@dataclass(frozen=True)
class DPPlan:
    """A site's DP-SGD parameters, fixed before the first round.

    Attributes:
        noise_multiplier: sigma, calibrated so the whole run's epsilon <= target.
        sample_rate: Poisson sampling rate q.
        max_grad_norm: Clipping bound C.
        planned_steps: Steps the calibration assumed (every round, every local epoch).
        delta: Target delta.
        accountant: Accountant name, handed to :func:`~securefed.dp.accounting.compute_epsilon`.

    """

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    planned_steps: int
    delta: float
    accountant: str


@dataclass(frozen=True)
class LocalResult:
    """What local training hands back to the federation layer (never leaves the site raw).

    ``num_samples`` is the site's FedAvg weight: its records, or its patients under
    patient-level DP (the record count is no fixed quantity under patient adjacency).
    """

    state: dict[str, torch.Tensor]
    num_samples: int
    steps: int
    mean_loss: float
    seconds: float


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson sampling: each batch takes each record independently with probability ``q``.

    Yields exactly ``steps`` batches (``len()`` is ``steps``), the number the accountant is
    told, whatever float rounding ``1/q`` would do. The coins come from a
    :class:`~securefed.dp.noise.NoiseSource`: who sampled which record is part of the
    mechanism, so it must be as unpredictable as the noise.

    With ``units`` (patient-level DP), each coin is a patient's: a batch holds every record of
    each sampled patient and none of the others', one patient's records next to each other.

    Args:
        num_samples: Records in the data set.
        sample_rate: q.
        steps: Batches per pass (``ceil(n/B)`` for DP-SGD's epoch).
        noise: Where the coins come from.
        units: The record indices of each privacy unit (``None``: each record is one).

    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        steps: int,
        noise: NoiseSource,
        units: Sequence[np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError("`steps` must be at least 1")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.noise = noise
        self.units = None if units is None else [np.asarray(u, dtype=np.int64) for u in units]

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        units = self.units
        for _ in range(self.steps):
            if units is None:
                mask = self.noise.bernoulli(self.num_samples, self.sample_rate)
                yield mask.nonzero().flatten().tolist()
                continue
            # One coin per privacy unit (patient): all of its records, or none of them, next
            # to each other (UnitPooler pools them, across physical chunks if need be).
            mask = self.noise.bernoulli(len(units), self.sample_rate)
            picked = [units[i] for i in mask.nonzero().flatten().tolist()]
            yield np.concatenate(picked).tolist() if picked else []


class UnitTagged(Dataset):
    """``dataset``'s items with the index of their privacy unit (patient) appended.

    Patient-level DP-SGD needs, for each record of a batch, whose it is: the records of one
    patient are averaged before they are clipped.
    """

    def __init__(self, dataset: Dataset, unit_of: torch.Tensor) -> None:
        self.dataset = dataset
        self.unit_of = unit_of

    def __len__(self) -> int:
        return len(self.unit_of)

    def __getitem__(self, index: int) -> tuple:
        return (*self.dataset[index], self.unit_of[index])


def poisson_loader(dataset: Dataset, *, sampler: PoissonBatchSampler) -> DataLoader:
    """A loader over ``dataset`` driven by ``sampler``, whose empty batches keep their shape.

    An empty Poisson batch is still a DP step (noise only); Opacus' empty-safe collate makes
    zero-length tensors of the right structure, as its ``DPDataLoader`` does.
    """
    first = dataset[0]
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=wrap_collate_with_empty(
            collate_fn=default_collate,
            sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
            dtypes=[dtype_safe(x) for x in first],
        ),
    )


class NoiseDPOptimizer(DPOptimizer):
    """Opacus' DP optimizer (flat clipping, mean reduction) with noise from a NoiseSource.

    One Gaussian draw per step covers every parameter: a flat float64 vector of standard
    normals, scaled by ``sigma * C``, split by parameter, cast to the gradient's dtype and
    moved to its device (drawn on CPU; CUDA works, the copy costs a little).

    Args:
        optimizer: The wrapped optimizer.
        noise: Source of the Gaussian noise.
        noise_multiplier: sigma.
        max_grad_norm: Per-sample clipping bound C.
        expected_batch_size: Denominator of the mean (``n * q``).
        draws: Normals summed per coordinate (see :meth:`NoiseSource.gaussian`).

    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise: NoiseSource,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        draws: int = SECURE_DRAWS,
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,  # type: ignore[arg-type]
            loss_reduction="mean",
            generator=None,
            secure_mode=False,  # Opacus' own secure RNG is not used: the noise is ours
        )
        self.noise = noise
        self.draws = draws

    def clip_and_accumulate(self) -> None:
        """Opacus' per-sample clipping, with a non-finite per-sample gradient zeroed first.

        Weights a server crafted to overflow on some records make those records' gradients
        inf or NaN. Opacus' clip factor is then NaN, the clipped sum non-finite, and the
        site's update (or its refusal to send one) would tell that such a record was
        sampled. Zeroed, the record adds nothing, which is within the clipping bound C.
        """
        samples = [p.grad_sample for p in self.params]
        if samples and all(isinstance(g, torch.Tensor) for g in samples) and len(samples[0]):
            bad = torch.zeros(len(samples[0]), dtype=torch.bool, device=samples[0].device)
            for g in samples:
                bad |= ~torch.isfinite(g.reshape(len(g), -1)).all(dim=1).to(bad.device)
            if bool(bad.any()):
                for p in self.params:
                    mask = bad.to(p.grad_sample.device).view(-1, *([1] * (p.grad_sample.dim() - 1)))
                    p.grad_sample = torch.where(mask, p.grad_sample.new_zeros(()), p.grad_sample)
        super().clip_and_accumulate()

    def add_noise(self) -> None:
        """Add N(0, (sigma*C)^2) noise to the clipped sums; store the result in ``p.grad``."""
        params = self.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        std = self.noise_multiplier * self.max_grad_norm
        sizes = [p.summed_grad.numel() for p in params]
        flat = self.noise.gaussian(sum(sizes), draws=self.draws).mul_(std) if std > 0 else None
        offset = 0
        for p, size in zip(params, sizes):
            summed = p.summed_grad
            if flat is None:
                p.grad = summed.clone().view_as(p)
            else:
                # Scaled in float64, rounded once to the gradient's dtype.
                noise = flat[offset : offset + size].view(summed.shape)
                noise = noise.to(device=summed.device, dtype=summed.dtype)
                p.grad = (summed + noise).view_as(p)
            offset += size
            _mark_as_processed(p.summed_grad)


class ClippedSumDPOptimizer(NoiseDPOptimizer):
    """:class:`NoiseDPOptimizer` fed clipped sums by a one-pass clipper, not per-sample grads.

    :class:`~securefed.dp.clipping.BookKeepingClipper` computes each chunk's sum of clipped
    per-sample gradients; :meth:`accumulate` adds it to ``p.summed_grad``, where Opacus'
    ``clip_and_accumulate`` would have put it. The rest is the parent's: skipped steps
    across chunks (``signal_skip_step``), the same noise draw (:meth:`NoiseDPOptimizer.add_noise`),
    the mean over the expected batch size, the step hook.
    """

    def accumulate(self, sums: Sequence[torch.Tensor]) -> None:
        """Add one chunk's clipped sums (one per parameter, in ``self.params`` order)."""
        for p, s in zip(self.params, sums, strict=True):
            if p.summed_grad is None:
                p.summed_grad = s
            else:
                p.summed_grad += s

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        """Noise and scale the accumulated sums, unless the step is to be skipped."""
        if not self.params:
            return True
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        for p in self.params:
            # accumulate() makes one clipped sum per logical batch: no accumulated iterations.
            p.grad /= self.expected_batch_size
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True


def clipping_mode(model: nn.Module, requested: str = "auto") -> str:
    """The per-sample clipping ``model`` trains with: ``one-pass`` or ``hooks``.

    ``auto`` is ``one-pass`` when every trainable parameter sits in a layer the one-pass
    clipper supports (:func:`securefed.dp.clipping.unsupported_parameters`), else ``hooks``.

    Raises:
        ValueError: ``requested`` is unknown, or ``one-pass`` for a model it cannot handle.

    """
    if requested not in CLIPPING_MODES:
        raise ValueError(f"`clipping` must be one of {', '.join(CLIPPING_MODES)}")
    if requested == "hooks":
        return "hooks"
    bad = unsupported_parameters(model)
    if not bad:
        return "one-pass"
    if requested == "one-pass":
        raise ValueError(f"one-pass clipping does not support parameter {bad[0]!r}")
    return "hooks"


class SiteTrainer:
    """Trains a site's copy of the global model, round after round.

    With DP on, each round wraps a fresh model in a :class:`~opacus.GradSampleModule` and a
    :class:`NoiseDPOptimizer`, samples batches with :class:`PoissonBatchSampler`, counts the
    noisy steps itself and writes them to the ledger as a :class:`PrivacyEvent`. The ledger
    never forgets, so epsilon (computed from it) covers every round.

    Args:
        client_id: The site's id.
        dataset: The site's private training data.
        plan: DP parameters, or ``None`` for non-private training.
        ledger: Shared append-only event ledger.
        batch_size: Largest expected batch size B.
        lr: SGD learning rate for a full batch of B; a site whose batch is smaller (see
            ``min_steps``) scales it linearly (:func:`securefed.dp.accounting.site_lr`).
        momentum: SGD momentum.
        device: Torch device.
        max_grad_norm: Without DP, clip the batch gradient to this norm (``None``: plain SGD).
        loss_fn: ``f(logits, target) -> mean loss``; cross-entropy by default. It must be a
            mean of per-sample terms (no coupling across the batch) for per-sample clipping
            to bound each record's influence.
        max_physical_batch_size: Largest number of records run through the model at once
            (``None``: a whole batch). A larger batch is split into chunks whose gradients
            are accumulated; the optimizer still takes one step per batch, the same step.
        progress: Show a progress bar (site, step/total) on stderr for rounds that last
            more than a couple of seconds.
        min_steps: Fewest steps per local epoch; a site with fewer than ``min_steps * B``
            records uses batches of about ``n / min_steps``.
        clipping: Per-sample clipping of DP-SGD (see :func:`clipping_mode`): ``auto``
            (default), ``one-pass`` or ``hooks``. Both compute the same clipped sums.
        units: Patient-level DP: the record indices of each patient (every record in exactly
            one). Poisson sampling is then over patients (all of a patient's records or
            none), each sampled patient's records are averaged and that mean is clipped to
            C, and the mean step divides by the expected number of patients: the plan's
            epsilon is per patient. ``batch_size`` and ``min_steps`` then count patients,
            and q, the steps, the lr scaling and the FedAvg weight follow from the number
            of patients, not of records. ``None``: record-level (each record its own unit).

    """

    def __init__(
        self,
        *,
        client_id: int,
        dataset: Dataset,
        plan: DPPlan | None,
        ledger: PrivacyLedger,
        batch_size: int,
        lr: float,
        momentum: float,
        device: torch.device,
        max_grad_norm: float | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        max_physical_batch_size: int | None = None,
        progress: bool = False,
        min_steps: int = 1,
        clipping: str = "auto",
        units: Sequence[np.ndarray] | None = None,
    ) -> None:
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise ValueError("`max_physical_batch_size` must be at least 1")
        if clipping not in CLIPPING_MODES:
            raise ValueError(f"`clipping` must be one of {', '.join(CLIPPING_MODES)}")
        self.clipping = clipping
        self.client_id = client_id
        self.dataset = dataset
        self.plan = plan
        self.ledger = ledger
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.device = device
        self.max_grad_norm = max_grad_norm
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.max_physical_batch_size = max_physical_batch_size
        self.progress = progress
        self.min_steps = min_steps
        if units is not None and plan is None:
            raise ValueError("`units` (patient-level DP) needs a DP plan")
        self.units = None if units is None else _check_units(units, self.num_samples)
        self.unit_of: torch.Tensor | None = None
        if self.units is not None:
            unit_of = torch.empty(self.num_samples, dtype=torch.int64)
            for i, records in enumerate(self.units):
                unit_of[torch.from_numpy(records)] = i
            self.unit_of = unit_of

    @property
    def privacy_unit(self) -> str:
        """``patient`` when the trainer was given units, else ``record``."""
        return "record" if self.units is None else "patient"

    @property
    def num_units(self) -> int:
        """Privacy units at this site: patients, or records for record-level DP."""
        return self.num_samples if self.units is None else len(self.units)

    @property
    def num_samples(self) -> int:
        """Training samples at this site."""
        return len(self.dataset)  # type: ignore[arg-type]

    # Under patient-level DP, n below is the number of patients P, and B counts patients:
    # replacing one patient by another changes the record count but not P, so everything the
    # mechanism's shape depends on (q, steps, lr, the FedAvg weight) must come from P alone.

    @property
    def steps_per_epoch(self) -> int:
        """Steps per local epoch: ``max(ceil(n/B), min_steps)``, the number calibration assumed."""
        return steps_per_epoch(
            num_samples=self.num_units, batch_size=self.batch_size, min_steps=self.min_steps
        )

    @property
    def site_batch(self) -> int:
        """This site's (expected) batch in units: about ``n / steps_per_epoch``, at most B."""
        return site_batch(
            num_samples=self.num_units, batch_size=self.batch_size, min_steps=self.min_steps
        )

    @property
    def site_lr(self) -> float:
        """This site's learning rate: ``lr`` scaled by its batch over B (at most ``lr``)."""
        return site_lr(
            lr=self.lr,
            num_samples=self.num_units,
            batch_size=self.batch_size,
            min_steps=self.min_steps,
        )

    def epsilon(self) -> float:
        """Epsilon spent so far over all rounds (0 before the first step, inf without DP)."""
        if self.plan is None:
            return float("inf")
        return compute_epsilon(
            history=self.ledger.history(self.client_id),
            delta=self.plan.delta,
            accountant=self.plan.accountant,
        )

    def resume_accounting(
        self,
        events: Sequence[PrivacyEvent],
        *,
        releases: Mapping[str, Collection[tuple[float, float, int, float]]] | None = None,
    ) -> None:
        """Carry earlier rounds' DP events into a fresh trainer (a new site process).

        A deployed site runs each round in a new process; without this, its epsilon would
        start from zero. The events are checked and recorded in the ledger, nothing else:
        epsilon is always computed from the ledger.

        Args:
            events: The site's earlier events.
            releases: Other mechanisms of the site's plan, by phase: the (sigma, q, steps, C)
                each may have (e.g. the decision calibration,
                :mod:`securefed.dp.calibration`); their events are checked against these
                instead of the DP-SGD plan.

        Raises:
            PrivacyBudgetError: If the trainer already trained, or an event is another site's
                or was run with other (sigma, q) than this site's plan.

        """
        if self.ledger.for_client(self.client_id):
            raise PrivacyBudgetError(f"site {self.client_id}: accounting already started")
        # Check every event before recording any, so a refusal leaves the ledger untouched.
        for e in events:
            if e.client_id != self.client_id:
                raise PrivacyBudgetError(
                    f"site {self.client_id}: handed an event of site {e.client_id}"
                )
            other = (releases or {}).get(e.phase)
            if other is not None:
                if (e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm) not in other:
                    raise PrivacyBudgetError(
                        f"site {self.client_id}: an earlier {e.phase} event (round {e.round}) "
                        "does not match this site's privacy plan"
                    )
            elif self.plan is None or (e.noise_multiplier, e.sample_rate) != (
                self.plan.noise_multiplier,
                self.plan.sample_rate,
            ):
                raise PrivacyBudgetError(
                    f"site {self.client_id}: an earlier event (round {e.round}) does not match "
                    "this site's privacy plan"
                )
        for e in events:
            self.ledger.record(e)

    def _make_private(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, noise: NoiseSource
    ) -> tuple[nn.Module, NoiseDPOptimizer, DataLoader, list[int], BookKeepingClipper | None]:
        """What ``PrivacyEngine.make_private`` did, minus its generator and its accountant.

        Returns the model to run (a :class:`~opacus.GradSampleModule` in hooks mode, the
        model itself in one-pass mode), the DP optimizer, the Poisson loader, the step
        counter and the one-pass clipper (``None`` in hooks mode).
        """
        plan = self.plan
        assert plan is not None
        steps = self.steps_per_epoch
        if 1.0 / steps != plan.sample_rate:
            # Calibration assumed q; the sampler must run exactly that q, ceil(n/B) times.
            raise PrivacyBudgetError(
                f"site {self.client_id}: the plan's sampling rate {plan.sample_rate} is not "
                f"1/ceil(n/B) = 1/{steps} for n={self.num_samples}, B={self.batch_size}"
            )
        ModuleValidator.validate(model, strict=True)
        clipper = None
        private: nn.Module
        kwargs = dict(
            noise=noise,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            # The mean batch size of Poisson sampling in units, n * q (records or patients).
            expected_batch_size=self.num_units * plan.sample_rate,
        )
        dp_optimizer: NoiseDPOptimizer
        if clipping_mode(model, self.clipping) == "one-pass":
            dp_optimizer = ClippedSumDPOptimizer(optimizer, **kwargs)  # type: ignore[arg-type]
            clipper = BookKeepingClipper(model, dp_optimizer.params)
            private = model
        else:
            private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
            # Poisson batches must not be merged into one step (accounting counts each).
            private.forbid_grad_accumulation()
            dp_optimizer = NoiseDPOptimizer(optimizer, **kwargs)  # type: ignore[arg-type]
        counter = [0]

        def count(_: DPOptimizer) -> None:  # runs once per noisy step, after add_noise
            counter[0] += 1

        dp_optimizer.attach_step_hook(count)
        sampler = PoissonBatchSampler(
            num_samples=self.num_samples,
            sample_rate=plan.sample_rate,
            steps=steps,
            noise=noise,
            units=self.units,
        )
        dataset = self.dataset if self.unit_of is None else UnitTagged(self.dataset, self.unit_of)
        loader = poisson_loader(dataset, sampler=sampler)
        return private, dp_optimizer, loader, counter, clipper

    def _plain_loader(self, generator: torch.Generator) -> DataLoader:
        """Shuffled batches without DP, as many as the schedule promises.

        ``ceil(n/B)`` batches of B, as before ``min_steps`` existed; or, when ``min_steps``
        asks for more, exactly that many near-equal batches (at most ``n``).
        """
        n, steps = self.num_samples, self.steps_per_epoch
        if steps == math.ceil(n / self.batch_size):
            return DataLoader(
                self.dataset, batch_size=self.batch_size, shuffle=True, generator=generator
            )
        return DataLoader(self.dataset, batch_sampler=_SplitSampler(n, min(steps, n), generator))

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        """Index ranges of the physical chunks of a batch of ``n`` (one, possibly empty).

        Under patient-level DP a chunk may end inside a patient: :class:`UnitPooler`
        carries that patient's partial mean into the next chunk, so the cap always holds.
        """
        size = self.max_physical_batch_size
        if size is None or n <= size:
            return [(0, n)]
        return [(lo, min(lo + size, n)) for lo in range(0, n, size)]

    def train_round(
        self,
        *,
        model: nn.Module,
        round_index: int,
        epochs: int,
        generator: torch.Generator,
        noise: NoiseSource | None = None,
        prox_mu: float = 0.0,
        anchor: Mapping[str, torch.Tensor] | None = None,
        phase: str = "federated",
        lr: float | None = None,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> LocalResult:
        """Run ``epochs`` local epochs on ``model`` (modified in place) and return its weights.

        Args:
            model: A fresh copy of the global model (not shared with anyone).
            round_index: 1-based round, for the ledger.
            epochs: Local epochs.
            generator: Randomness that is no privacy mechanism: shuffling of the non-DP
                baseline (DP-SGD's sampling and noise come from ``noise``).
            noise: The DP mechanism's randomness (required with DP): Poisson sampling and
                Gaussian noise. :class:`~securefed.dp.noise.SecretNoise` unless the run
                asked for reproducible noise.
            prox_mu: FedProx weight mu; > 0 pulls the weights toward ``anchor``.
            anchor: The round's global weights (parameter name -> tensor) for FedProx.
            phase: Ledger phase (``federated`` or ``personalize``).
            lr: Learning rate for this call (default: the trainer's).
            criterion: Loss of (logits, labels) for this call (default: the trainer's). It
                must be a mean of per-record terms that depend on nothing but the record
                (and fixed values), or per-sample clipping would not bound a record's
                influence.

        Raises:
            ValueError: If DP is on and no ``noise`` is given, or FedProx has no anchor.

        """
        if self.plan is not None and noise is None:
            raise ValueError("DP-SGD needs a NoiseSource (`noise`)")
        start = time.perf_counter()
        model = model.to(self.device)
        model.train()
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(round_index)  # fresh, reproducible augmentation per round
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        lr = self.site_lr if lr is None else lr
        optimizer = torch.optim.SGD([p for _, p in trainable], lr=lr, momentum=self.momentum)
        prox = []
        if prox_mu > 0:
            if anchor is None:
                raise ValueError("FedProx needs the round's global weights as `anchor`")
            prox = [(p, anchor[n].to(self.device)) for n, p in trainable]
        counter = None
        clipper: BookKeepingClipper | None = None
        inner = model
        if self.plan is not None:
            assert noise is not None
            model, optimizer, loader, counter, clipper = self._make_private(model, optimizer, noise)
        else:
            loader = self._plain_loader(generator)
        criterion = self.loss_fn if criterion is None else criterion
        total_loss, total_n, steps = 0.0, 0, 0
        dp = self.plan is not None
        bar = _round_bar(
            enabled=self.progress,
            total=epochs * len(loader),
            desc=f"site {self.client_id} {phase} round {round_index}",
        )
        with warnings.catch_warnings(), bar, _removed_on_error(clipper):
            # Opacus' hooks fire on inputs that need no grad; torch warns, nothing is wrong.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(epochs):
                for batch in loader:
                    x, y = batch[0].to(self.device), batch[1].to(self.device)
                    # Each record's patient under patient-level DP (UnitTagged's last item).
                    pooler = UnitPooler(batch[2]) if dp and self.units is not None else None
                    optimizer.zero_grad(set_to_none=True)
                    chunks = self._chunks(len(y))
                    batch_loss = 0.0
                    for i, (lo, hi) in enumerate(chunks):
                        last = i == len(chunks) - 1
                        if i and dp:
                            # After a skipped step the DP optimizer keeps the clipped sum
                            # (summed_grad) and drops the chunk's per-sample gradients.
                            # (Without DP, p.grad accumulates across chunks: no zeroing.)
                            optimizer.zero_grad(set_to_none=True)
                        xc, yc = x[lo:hi], y[lo:hi]
                        if clipper is not None:
                            # One-pass clipping: one backward, the clipped sum at once.
                            loss = self._one_pass(model, clipper, criterion, xc, yc)
                            assert isinstance(optimizer, ClippedSumDPOptimizer)
                            optimizer.accumulate(
                                clipper.clip_and_sum(
                                    self.plan.max_grad_norm, len(yc), pooler=pooler, span=(lo, hi)
                                )
                            )
                            optimizer.signal_skip_step(do_skip=not last)
                            optimizer.step()
                            batch_loss += float(loss) * len(yc)
                            continue
                        out = model(xc)
                        # An empty Poisson batch still is a DP step (noise only).
                        loss = criterion(out, yc) if len(yc) else out.sum() * 0.0
                        if dp:
                            # Per-sample gradients of a mean loss are rescaled by the chunk's
                            # size (GradSampleModule, loss_reduction="mean"): chunking does
                            # not change them.
                            loss.backward()
                            if pooler is not None and len(yc):
                                _pool_grad_samples(optimizer.params, pooler, lo, hi)
                            optimizer.signal_skip_step(do_skip=not last)
                            optimizer.step()
                        else:
                            # Plain gradients accumulate across chunks in p.grad: weight each
                            # chunk's mean by its share of the batch.
                            (loss * (len(yc) / max(len(y), 1))).backward()
                        batch_loss += float(loss.detach()) * len(yc)
                    if not dp:
                        if self.max_grad_norm is not None:
                            # Asked for: the DP step-size regime (gradients of norm <= C)
                            # without noise or per-sample clipping.
                            torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
                        optimizer.step()
                    if prox:
                        # FedProx as a decoupled proximal step, w <- w - lr*mu*(w - w_global):
                        # it depends on no data, so it stays outside per-sample clipping
                        # (added to the loss, Opacus would clip it with each sample's
                        # gradient) and costs no privacy.
                        with torch.no_grad():
                            for p, a in prox:
                                p.sub_(lr * prox_mu * (p - a))
                    steps += 1
                    total_loss += batch_loss
                    total_n += len(y)
                    bar.update(1)
        if self.plan is not None:
            assert counter is not None
            self.ledger.record(
                PrivacyEvent(
                    round=round_index,
                    client_id=self.client_id,
                    noise_multiplier=self.plan.noise_multiplier,
                    sample_rate=self.plan.sample_rate,
                    steps=counter[0],  # noisy steps the optimizer's hook counted
                    max_grad_norm=self.plan.max_grad_norm,
                    phase=phase,
                )
            )
            if clipper is not None:
                clipper.remove()
            else:
                inner = model._module  # GradSampleModule wraps the real model
        state = {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}
        return LocalResult(
            state=state,
            num_samples=self.num_units,
            steps=steps,
            mean_loss=total_loss / max(total_n, 1),
            seconds=time.perf_counter() - start,
        )

    @staticmethod
    def _one_pass(
        model: nn.Module,
        clipper: BookKeepingClipper,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> float:
        """Forward and backward of one chunk, its per-sample gradients recorded; its loss.

        An empty chunk records nothing (its clipped sum is zero: noise only). The loss is a
        mean over the chunk, so the per-sample gradients are ``len(y)`` times the loss'.
        """
        if not len(y):
            return 0.0
        with clipper.pass_(scale=len(y)):
            loss = criterion(model(x), y)
            loss.backward()
        return float(loss.detach())


def _pool_grad_samples(
    params: Sequence[nn.Parameter], pooler: UnitPooler, lo: int, hi: int
) -> None:
    """Replace Opacus' per-record ``grad_sample`` by finished patients' means, before it clips."""
    pooled, _ = pooler.pool({i: p.grad_sample for i, p in enumerate(params)}, lo, hi)
    for i, p in enumerate(params):
        p.grad_sample = pooled[i]


def _check_units(units: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """The units as int64 arrays, each record in exactly one of them, none empty.

    Raises:
        ValueError: A record in no unit or in two, an index outside ``[0, n)``, an empty unit.

    """
    out = [np.asarray(u, dtype=np.int64).reshape(-1) for u in units]
    if any(len(u) == 0 for u in out):
        raise ValueError("`units`: a privacy unit without records")
    flat = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    if len(flat) != n or not np.array_equal(np.sort(flat), np.arange(n)):
        raise ValueError(f"`units` must place each of the {n} records in exactly one unit")
    return out


class _SplitSampler:
    """A fresh shuffle of ``n`` indices, cut into ``parts`` near-equal batches, per pass."""

    def __init__(self, n: int, parts: int, generator: torch.Generator) -> None:
        self.n, self.parts, self.generator = n, max(1, parts), generator

    def __len__(self) -> int:
        return self.parts

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        size, extra = divmod(self.n, self.parts)
        start = 0
        for i in range(self.parts):
            stop = start + size + (1 if i < extra else 0)
            yield order[start:stop]
            start = stop


@contextlib.contextmanager
def _removed_on_error(clipper: BookKeepingClipper | None) -> Iterator[None]:
    """Take the clipper's hooks (and the buffers they hold) off the model if the round fails."""
    try:
        yield
    except BaseException:
        if clipper is not None:
            clipper.remove()
        raise


def _round_bar(*, enabled: bool, total: int, desc: str):
    """A tqdm bar for one round's local steps, shown only if the round lasts over 2 s.

    Short rounds (tests, small models) print nothing; a long round (a large model, a large
    site) shows ``site K ... step/total`` on stderr. ``leave=False``: the rounds bar stays.
    """
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="step",
        disable=not enabled,
        leave=False,
        delay=2.0,
        file=sys.stderr,
    )
