"""Local training at one site: DP-SGD with Opacus, or plain SGD for the non-private baseline."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from securefed.dp.accounting import compute_epsilon
from securefed.dp.ledger import PrivacyEvent, PrivacyLedger
from securefed.errors import PrivacyBudgetError

__all__ = ["DPPlan", "LocalResult", "SiteTrainer"]


@dataclass(frozen=True)
class DPPlan:
    """A site's DP-SGD parameters, fixed before the first round.

    Attributes:
        noise_multiplier: sigma, calibrated so the whole run's epsilon <= target.
        sample_rate: Poisson sampling rate q.
        max_grad_norm: Clipping bound C.
        planned_steps: Steps the calibration assumed (every round, every local epoch).
        delta: Target delta.
        accountant: Opacus accountant name.

    """

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    planned_steps: int
    delta: float
    accountant: str


@dataclass(frozen=True)
class LocalResult:
    """What local training hands back to the federation layer (never leaves the site raw)."""

    state: dict[str, torch.Tensor]
    num_samples: int
    steps: int
    mean_loss: float
    seconds: float


class SiteTrainer:
    """Trains a site's copy of the global model, round after round.

    With DP on, one :class:`opacus.PrivacyEngine` lives as long as the site: each round
    builds a fresh model and optimizer through ``make_private``, but the engine's
    accountant (and its hook on every optimizer step) persists, so the privacy spent in
    earlier rounds is never forgotten. Each round's steps are also written to the ledger.

    Args:
        client_id: The site's id.
        dataset: The site's private training data (the same object every round, which is
            how Opacus ties an accountant to a data set).
        plan: DP parameters, or ``None`` for non-private training.
        ledger: Shared append-only event ledger.
        batch_size: Expected batch size.
        lr: SGD learning rate.
        momentum: SGD momentum.
        device: Torch device.
        max_grad_norm: Without DP, clip the batch gradient to this norm (DP's step regime).
        loss_fn: ``f(logits, target) -> mean loss``; cross-entropy by default. It must be a
            mean of per-sample terms (no coupling across the batch) for per-sample clipping
            to bound each record's influence.

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
    ) -> None:
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
        self._engine = None
        if plan is not None:
            from opacus import PrivacyEngine

            with warnings.catch_warnings():
                # "Secure RNG turned off": the report states the noise source instead.
                warnings.simplefilter("ignore", UserWarning)
                self._engine = PrivacyEngine(accountant="rdp")  # step hook only; epsilon: ledger

    @property
    def num_samples(self) -> int:
        """Training samples at this site."""
        return len(self.dataset)  # type: ignore[arg-type]

    def _accountant_steps(self) -> int:
        if self._engine is None:
            return 0
        return sum(int(h[2]) for h in self._engine.accountant.history)

    def epsilon(self) -> float:
        """Epsilon spent so far over all rounds (0 before the first step, inf without DP)."""
        if self.plan is None:
            return float("inf")
        return compute_epsilon(
            history=self.ledger.history(self.client_id),
            delta=self.plan.delta,
            accountant=self.plan.accountant,
        )

    def resume_accounting(self, events: Sequence[PrivacyEvent]) -> None:
        """Carry earlier rounds' DP events into a fresh trainer (a new site process).

        A deployed site runs each round in a new process; without this, its accountant would
        start from zero and under-report epsilon.

        Raises:
            PrivacyBudgetError: If the trainer already trained, or an event is another site's
                or was run with other (sigma, q) than this site's plan.

        """
        if self._accountant_steps() or self.ledger.for_client(self.client_id):
            raise PrivacyBudgetError(f"site {self.client_id}: accounting already started")
        # Check every event before recording any, so a refusal leaves the ledger untouched.
        for e in events:
            if e.client_id != self.client_id:
                raise PrivacyBudgetError(
                    f"site {self.client_id}: handed an event of site {e.client_id}"
                )
            if self.plan is None or (e.noise_multiplier, e.sample_rate) != (
                self.plan.noise_multiplier,
                self.plan.sample_rate,
            ):
                raise PrivacyBudgetError(
                    f"site {self.client_id}: an earlier event (round {e.round}) does not match "
                    "this site's privacy plan"
                )
        for e in events:
            self.ledger.record(e)
        if self._engine is not None:
            self._engine.accountant.history = [
                (e.noise_multiplier, e.sample_rate, e.steps) for e in events if e.steps > 0
            ]

    def _noise_generator(self, generator: torch.Generator) -> torch.Generator:
        """The generator DP noise is drawn from: on the training device.

        Poisson sampling needs a CPU generator and ``torch.normal`` one on the device of the
        gradients, so off CPU a device generator is seeded from the CPU one (one draw); on CPU
        the same generator serves both, as it always has, so CPU runs keep their numbers.
        """
        if self.device.type == "cpu":
            return generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return torch.Generator(device=self.device).manual_seed(seed)

    def train_round(
        self,
        *,
        model: nn.Module,
        round_index: int,
        epochs: int,
        generator: torch.Generator,
        prox_mu: float = 0.0,
        anchor: Mapping[str, torch.Tensor] | None = None,
        phase: str = "federated",
        lr: float | None = None,
    ) -> LocalResult:
        """Run ``epochs`` local epochs on ``model`` (modified in place) and return its weights.

        Args:
            model: A fresh copy of the global model (not shared with anyone).
            round_index: 1-based round, for the ledger.
            epochs: Local epochs.
            generator: Seeds Poisson sampling / shuffling and the DP noise, so a seed
                reproduces a run exactly.
            prox_mu: FedProx weight mu; > 0 pulls the weights toward ``anchor``.
            anchor: The round's global weights (parameter name -> tensor) for FedProx.
            phase: Ledger phase (``federated`` or ``personalize``).
            lr: Learning rate for this call (default: the trainer's).

        """
        start = time.perf_counter()
        model = model.to(self.device)
        model.train()
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(round_index)  # fresh, reproducible augmentation per round
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        lr = self.lr if lr is None else lr
        optimizer = torch.optim.SGD([p for _, p in trainable], lr=lr, momentum=self.momentum)
        prox = []
        if prox_mu > 0:
            if anchor is None:
                raise ValueError("FedProx needs the round's global weights as `anchor`")
            prox = [(p, anchor[n].to(self.device)) for n, p in trainable]
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=self.plan is None, generator=generator
        )
        criterion = self.loss_fn
        before = self._accountant_steps()
        if self.plan is not None:
            with warnings.catch_warnings():
                # Opacus warns that secure_mode is off; the report states the noise source.
                warnings.simplefilter("ignore", UserWarning)
                model, optimizer, loader = self._engine.make_private(
                    module=model,
                    optimizer=optimizer,
                    data_loader=loader,
                    noise_multiplier=self.plan.noise_multiplier,
                    max_grad_norm=self.plan.max_grad_norm,
                    poisson_sampling=True,
                    noise_generator=self._noise_generator(generator),
                )
        total_loss, total_n, steps = 0.0, 0, 0
        with warnings.catch_warnings():
            # Opacus' hooks fire on inputs that need no grad; torch warns, nothing is wrong.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(epochs):
                for x, y in loader:
                    x, y = x.to(self.device), y.to(self.device)
                    optimizer.zero_grad(set_to_none=True)
                    out = model(x)
                    # An empty Poisson batch still is a DP step (noise only).
                    loss = criterion(out, y) if len(y) else out.sum() * 0.0
                    loss.backward()
                    if self.plan is None and self.max_grad_norm is not None:
                        # The non-private baseline keeps DP-SGD's step-size regime (the
                        # defaults' lr assumes gradients of norm <= C), minus noise and
                        # per-sample clipping, so the two compare.
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
                    total_loss += float(loss.detach()) * len(y)
                    total_n += len(y)
        if self.plan is not None:
            recorded = {(float(h[0]), float(h[1])) for h in self._engine.accountant.history}
            if recorded != {(self.plan.noise_multiplier, self.plan.sample_rate)}:
                # Calibration assumed (sigma, q); Opacus must have accounted exactly that.
                raise PrivacyBudgetError(
                    f"site {self.client_id}: the accountant recorded (sigma, q) = {recorded}, "
                    f"but the plan was calibrated for "
                    f"({self.plan.noise_multiplier}, {self.plan.sample_rate})"
                )
            taken = self._accountant_steps() - before
            self.ledger.record(
                PrivacyEvent(
                    round=round_index,
                    client_id=self.client_id,
                    noise_multiplier=self.plan.noise_multiplier,
                    sample_rate=self.plan.sample_rate,
                    steps=taken,
                    max_grad_norm=self.plan.max_grad_norm,
                    phase=phase,
                )
            )
            inner = model._module  # GradSampleModule wraps the real model
        else:
            inner = model
        state = {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}
        return LocalResult(
            state=state,
            num_samples=self.num_samples,
            steps=steps,
            mean_loss=total_loss / max(total_n, 1),
            seconds=time.perf_counter() - start,
        )
