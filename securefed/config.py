"""One validated run configuration, built from CLI flags or a JSON file."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securefed.errors import ConfigError

__all__ = [
    "RunConfig",
    "ACCOUNTANTS",
    "LEGACY_ACCOUNTANTS",
    "SECURE_AGG_MODES",
    "DEVICES",
    "STRATEGIES",
    "SERVER_OPTIMIZERS",
    "SCHEDULES",
    "TASKS",
]

ACCOUNTANTS = ("pld",)
#: Accountants of schema 1.x runs: Opacus' add/remove accountants (gdp also under-reported).
LEGACY_ACCOUNTANTS = ("prv", "rdp", "gdp")
SECURE_AGG_MODES = ("none", "mask", "he")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("fedavg", "fedprox", "ftl", "cfl")
SERVER_OPTIMIZERS = ("none", "avgm", "adam")
SCHEDULES = ("parallel", "cyclic")
TASKS = ("auto", "classification", "segmentation")
PERSONALIZE_WHEN = ("end", "every")
FUSIONS = ("early", "late")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a federated run; ``config.json`` is this, resolved.

    Defaults are the product's recommended settings: a user who passes only a data set
    and ``dp_epsilon`` should get a good model (the README quotes what they reach).

    Attributes:
        dataset: ``synthetic`` or a MedMNIST name (``NAME.npz`` in ``data_dir``).
        data_dir: Folder holding MedMNIST ``.npz`` files (default: ``~/.medmnist``).
        data: Path of an image-folder tree, NIfTI tree or ``.npz`` file; overrides ``dataset``.
        data_options: Loader options, e.g. ``{"n_train": 108, "image_size": 32}`` for
            ``synthetic-seg`` or ``{"image_size": 64}`` for a NIfTI tree.
        model: Registered model name (see ``securefed.models.available_models``).
        clients: Number of sites.
        partition: ``iid``, ``dirichlet:ALPHA``, ``by-label:K`` or ``by-group``.
        rounds: Federated rounds.
        local_epochs: Local epochs per round (each an expected pass over the site's data).
        batch_size: Expected batch size; with DP, Poisson sampling at ``q = 1/ceil(n/B)``.
        max_physical_batch_size: Most records run through the model at once (``None``: a
            whole batch). Larger batches are split and their gradients accumulated into the
            same single step, so privacy and results are unchanged; memory is bounded.
        lr: Local learning rate (SGD with momentum).
        momentum: Local SGD momentum.
        client_fraction: Fraction of sites sampled each round.
        dp_epsilon: Target epsilon per site over the whole run; ``None`` disables DP.
        dp_delta: Largest delta a site may use (``None``: 1e-5). Each site lowers it to at most
            ``1/(10 n)`` for its own size n (:func:`securefed.dp.accounting.site_delta`).
        max_grad_norm: Per-sample gradient clipping bound C.
        accountant: ``pld``: dp_accounting's PLD accountant, replace-one adjacency (the only
            one; Opacus' add/remove accountants are refused, see ``dp/accounting.py``).
        disclose_site_sizes: Every site agrees to put its training-set size and class counts
            in the run's files (off: they stay at the site; only their sum in a round's secure
            sum is released). In a deployment each site decides for itself.
        secure_agg: ``none``, ``mask`` (pairwise masking) or ``he`` (CKKS).
        secagg_threshold: Shamir threshold t (``None``: a 2/3 majority of a neighbourhood).
        secagg_neighbors: SecAgg+ neighbours per site (``None``: all other sites).
        secagg_ring_bits: Fixed-point ring Z_(2^k), k = 32 or 64.
        secagg_clip: Largest |value| the fixed-point encoder accepts per coordinate of the
            pre-scaled update ``n_i * u_i``; larger values are clipped and counted.
        he_poly_modulus_degree: CKKS ring degree N (slots = N/2).
        he_coeff_mod_bit_sizes: CKKS coefficient moduli, in bits.
        he_scale_bits: CKKS scale 2^bits.
        dropout_clients: Simulated dropouts per round: a count K >= 1, or a rate in (0, 1).
        dropout_phase: ``after`` (drop after uploading, recovered by the protocol) or
            ``before`` (drop before uploading; the site's update is left out).
        seed: Seeds data generation, partitioning, model init, augmentation and participant
            sampling. Not DP noise or DP-SGD's Poisson sampling (see ``reproducible_noise``).
        device: ``auto``, ``cpu`` or ``cuda``.
        conv_acc_tol: Convergence: a round is stable when its accuracy changes by strictly less.
        conv_loss_tol: Convergence: ... and its loss changes by strictly less than this.
        conv_patience: Convergence: consecutive stable rounds needed.
        task: ``auto`` (from the data set), ``classification`` or ``segmentation``.
        fusion: Multi-modal inputs: ``early`` (modalities as channels) or ``late``
            (one encoder per modality, logits averaged).
        augment: TorchIO augmentation of the training data (never of held-out data).
        strategy: ``fedavg``, ``fedprox``, ``ftl`` (federated transfer learning) or ``cfl``
            (clustered FL, IFCA).
        prox_mu: FedProx proximal weight mu (``None``: 0.01 for fedprox, 0 otherwise).
        server_opt: Server optimizer on the averaged update: ``none`` (FedAvg), ``avgm``
            (FedAvgM) or ``adam`` (FedAdam).
        server_lr: Server learning rate (``None``: 1.0 for none/avgm, 0.01 for adam).
        server_momentum: FedAvgM momentum, FedAdam beta1.
        pretrained: safetensors weights to start from (required by ``ftl``).
        freeze: What to freeze: ``none``, ``backbone`` or comma-separated module prefixes
            (``None``: ``backbone`` for ftl, ``none`` otherwise).
        public_fraction: Share of the training split declared public (for pretraining)
            and kept away from the sites; 0 keeps every sample private.
        public_seed: Seed of the public/private split (must match ``securefed pretrain``).
        schedule: ``parallel`` (every site trains the same global model) or ``cyclic``
            (the model visits the sites one after another within a round).
        clusters: Number of cluster models K for ``cfl``.
        personalize: Digital twins: local fine-tuning epochs per site (0 = off).
        personalize_when: ``end`` (after the last round) or ``every`` round.
        personalize_lr: Learning rate of twin fine-tuning (``None``: ``lr``).
        reproducible_noise: Derive DP-SGD's noise and Poisson sampling from ``seed`` (for
            research reproducibility). Off (the default), each site draws them from a secret
            key of its own; on, anyone who knows the seed can replay a site's training, so
            the epsilon does not hold against them.

    """

    dataset: str = "synthetic"
    data_dir: str | None = None
    data: str | None = None
    data_options: dict[str, Any] | None = None
    model: str = "cnn"
    clients: int = 3
    partition: str = "iid"
    rounds: int = 10
    local_epochs: int = 2
    batch_size: int = 256
    max_physical_batch_size: int | None = None
    lr: float = 2.0
    momentum: float = 0.5
    client_fraction: float = 1.0
    dp_epsilon: float | None = 8.0
    dp_delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "pld"
    disclose_site_sizes: bool = False
    secure_agg: str = "none"
    secagg_threshold: int | None = None
    secagg_neighbors: int | None = None
    secagg_ring_bits: int = 64
    secagg_clip: float = 1e6
    he_poly_modulus_degree: int = 8192
    he_coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    he_scale_bits: int = 40
    dropout_clients: float = 0.0
    dropout_phase: str = "after"
    seed: int = 0
    device: str = "auto"
    conv_acc_tol: float = 0.005
    conv_loss_tol: float = 0.01
    conv_patience: int = 3
    task: str = "auto"
    fusion: str = "early"
    augment: bool = False
    strategy: str = "fedavg"
    prox_mu: float | None = None
    server_opt: str = "none"
    server_lr: float | None = None
    server_momentum: float = 0.9
    pretrained: str | None = None
    freeze: str | None = None
    public_fraction: float = 0.0
    public_seed: int = 0
    schedule: str = "parallel"
    clusters: int = 2
    personalize: int = 0
    personalize_when: str = "end"
    personalize_lr: float | None = None
    reproducible_noise: bool = False

    def __post_init__(self) -> None:
        _check(self.clients >= 1, f"`clients` must be at least 1 (got {self.clients}).")
        _check(self.rounds >= 1, f"`rounds` must be at least 1 (got {self.rounds}).")
        _check(
            self.local_epochs >= 1, f"`local_epochs` must be at least 1 (got {self.local_epochs})."
        )
        _check(self.batch_size >= 1, f"`batch_size` must be at least 1 (got {self.batch_size}).")
        _check(
            self.max_physical_batch_size is None
            or (
                isinstance(self.max_physical_batch_size, int)
                and not isinstance(self.max_physical_batch_size, bool)
                and self.max_physical_batch_size >= 1
            ),
            "`max_physical_batch_size` must be a positive integer or None "
            f"(got {self.max_physical_batch_size!r}).",
        )
        _check(math.isfinite(self.lr) and self.lr > 0, f"`lr` must be positive (got {self.lr}).")
        _check(0 <= self.momentum < 1, f"`momentum` must be in [0, 1) (got {self.momentum}).")
        _check(
            0 < self.client_fraction <= 1,
            f"`client_fraction` must be in (0, 1] (got {self.client_fraction}).",
        )
        if self.dp_epsilon is not None:
            _check(
                math.isfinite(self.dp_epsilon) and self.dp_epsilon > 0,
                f"`dp_epsilon` must be positive and finite, or None for no DP "
                f"(got {self.dp_epsilon}).",
            )
        if self.dp_delta is not None:
            _check(0 < self.dp_delta < 1, f"`dp_delta` must be in (0, 1) (got {self.dp_delta}).")
        _check(
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0,
            f"`max_grad_norm` must be positive (got {self.max_grad_norm}).",
        )
        _check(
            self.accountant not in LEGACY_ACCOUNTANTS,
            f"`accountant` {self.accountant!r} accounts add/remove neighbours, but what a site "
            "releases (its sampling rate, a round's sample total) depends on its size, so "
            "securefed states replace-one epsilon, which only 'pld' computes: use "
            "--accountant pld.",
        )
        _check(
            self.accountant in ACCOUNTANTS,
            f"`accountant` must be one of {', '.join(ACCOUNTANTS)} (got {self.accountant!r}).",
        )
        _check(
            self.secure_agg in SECURE_AGG_MODES,
            f"`secure_agg` must be one of {', '.join(SECURE_AGG_MODES)} (got {self.secure_agg!r}).",
        )
        _check(
            self.device in DEVICES,
            f"`device` must be one of {', '.join(DEVICES)} (got {self.device!r}).",
        )
        _check(
            self.secagg_ring_bits in (32, 64),
            f"`secagg_ring_bits` must be 32 or 64 (got {self.secagg_ring_bits}).",
        )
        _check(self.secagg_clip > 0, f"`secagg_clip` must be positive (got {self.secagg_clip}).")
        _check(
            self.dropout_clients >= 0
            and (self.dropout_clients < 1 or float(self.dropout_clients).is_integer()),
            "`dropout_clients` must be a whole count >= 1 or a rate in [0, 1) "
            f"(got {self.dropout_clients}).",
        )
        _check(
            self.dropout_phase in ("after", "before"),
            f"`dropout_phase` must be 'after' or 'before' (got {self.dropout_phase!r}).",
        )
        object.__setattr__(self, "he_coeff_mod_bit_sizes", tuple(self.he_coeff_mod_bit_sizes))
        _check(self.conv_patience >= 1, "`conv_patience` must be at least 1.")
        _check(self.conv_acc_tol >= 0 and self.conv_loss_tol >= 0, "tolerances must be >= 0.")
        self._check_strategy()

    def _check_strategy(self) -> None:
        for name, value, allowed in (
            ("task", self.task, TASKS),
            ("fusion", self.fusion, FUSIONS),
            ("strategy", self.strategy, STRATEGIES),
            ("server_opt", self.server_opt, SERVER_OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
            ("personalize_when", self.personalize_when, PERSONALIZE_WHEN),
        ):
            _check(
                value in allowed,
                f"`{name}` must be one of {', '.join(allowed)} (got {value!r}).",
            )
        if self.prox_mu is not None:
            _check(
                math.isfinite(self.prox_mu) and self.prox_mu >= 0,
                f"`prox_mu` must be >= 0 (got {self.prox_mu}).",
            )
        if self.server_lr is not None:
            _check(
                math.isfinite(self.server_lr) and self.server_lr > 0,
                f"`server_lr` must be positive (got {self.server_lr}).",
            )
        _check(
            0 <= self.server_momentum < 1,
            f"`server_momentum` must be in [0, 1) (got {self.server_momentum}).",
        )
        _check(
            0 <= self.public_fraction < 1,
            f"`public_fraction` must be in [0, 1) (got {self.public_fraction}).",
        )
        _check(self.clusters >= 1, f"`clusters` must be at least 1 (got {self.clusters}).")
        _check(self.personalize >= 0, f"`personalize` must be >= 0 (got {self.personalize}).")
        _check(
            isinstance(self.reproducible_noise, bool),
            f"`reproducible_noise` must be true or false (got {self.reproducible_noise!r}).",
        )
        if self.personalize_lr is not None:
            _check(
                math.isfinite(self.personalize_lr) and self.personalize_lr > 0,
                f"`personalize_lr` must be positive (got {self.personalize_lr}).",
            )
        _check(
            self.strategy != "ftl" or self.pretrained is not None,
            "strategy 'ftl' needs `pretrained` weights (--pretrained FILE.safetensors; "
            "make them with `securefed pretrain`).",
        )
        _check(
            self.schedule == "parallel" or self.secure_agg == "none",
            "schedule 'cyclic' hands the model from site to site, so the next site sees the "
            "previous site's model: it cannot be combined with secure aggregation "
            "(use --secure-agg none, or the parallel schedule).",
        )
        _check(
            self.strategy != "cfl" or not self.dp_enabled,
            "strategy 'cfl' (IFCA) picks each site's cluster from its un-noised training loss, "
            "a release no DP accounting covers: run it without DP (--dp-epsilon inf), or use "
            "fedavg, fedprox, ftl or --personalize under DP.",
        )
        _check(
            self.schedule == "parallel" or self.strategy in ("fedavg", "ftl", "fedprox"),
            f"schedule 'cyclic' has no meaning for strategy {self.strategy!r}.",
        )

    @property
    def effective_prox_mu(self) -> float:
        """Mu actually used: 0.01 for fedprox unless set, else the given value or 0."""
        if self.prox_mu is not None:
            return float(self.prox_mu)
        return 0.01 if self.strategy == "fedprox" else 0.0

    @property
    def effective_server_lr(self) -> float:
        """Server step size: 1.0 for FedAvg/FedAvgM, 0.01 for FedAdam unless set."""
        if self.server_lr is not None:
            return float(self.server_lr)
        return 0.01 if self.server_opt == "adam" else 1.0

    @property
    def effective_freeze(self) -> str:
        """What is frozen: ``backbone`` for ftl, ``none`` otherwise, unless set."""
        if self.freeze is not None:
            return self.freeze
        return "backbone" if self.strategy == "ftl" else "none"

    @property
    def dp_enabled(self) -> bool:
        """Whether local training is DP-SGD."""
        return self.dp_epsilon is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (``dp_epsilon`` None means no DP)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        """Read a configuration file written as JSON (e.g. a previous run's ``config.json``)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read configuration ({exc})") from exc
        if isinstance(data, dict) and "run" in data:
            data = data["run"]
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a configuration must be a JSON object")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)
