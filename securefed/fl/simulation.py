"""The in-process runtime: N simulated sites and one server in a single Python process."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.config import RunConfig
from securefed.data.dataset import ArraySplit, DatasetBundle, load_dataset
from securefed.data.partition import partition, partition_like
from securefed.dp.accounting import (
    calibrate_noise,
    run_delta_bound,
    sample_rate,
    site_delta,
    steps_per_epoch,
)
from securefed.dp.ledger import PrivacyLedger
from securefed.dp.noise import NoiseSource, SecretNoise, SeededNoise
from securefed.dp.trainer import DPPlan, SiteTrainer
from securefed.errors import ConfigError, DataError, DropoutRecoveryError
from securefed.fl.aggregation import AggregateOutcome, Aggregator, build_aggregator
from securefed.fl.params import ParamLayout
from securefed.fl.strategies import ServerOptimizer, build_server_optimizer
from securefed.fl.tasks import Task, build_task
from securefed.fl.transfer import pretraining_provenance, public_split
from securefed.metrics import detect_convergence
from securefed.models import BuiltModel, ModelSpec, build_model

__all__ = [
    "Federation",
    "RoundRecord",
    "Site",
    "resolve_device",
    "METRICS_SCHEMA_VERSION",
    "local_update",
    "mechanism_noise",
    "model_spec",
    "task_for",
    "training_dataset",
    "personalize_rounds",
    "plan_site_privacy",
    "check_site_plan",
    "sample_participants",
    "site_splits",
]

#: metrics.json schema: 1.1 added task, strategy, primary_metric, site_mean, clusters and
#: personalization; 2.0 removed the per-site train_loss and num_train_samples (they no longer
#: leave a site; num_train_samples stays when the sites disclose their sizes).
METRICS_SCHEMA_VERSION = "2.0"


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when it is available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from securefed.errors import ConfigError

        raise ConfigError("`device` is 'cuda' but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def _seed_for(*parts: int) -> int:
    """A 63-bit seed derived from ``parts`` (SeedSequence mixes them; no folding to 32 bits)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def mechanism_noise(config: RunConfig, *labels: int) -> NoiseSource:
    """The randomness of a site's DP mechanism (Poisson sampling and Gaussian noise).

    A fresh :class:`SecretNoise` key by default: the seed is public (it is in config.json),
    so noise derived from it could be replayed by anyone who reads the configuration. Only
    with ``reproducible_noise`` is it :class:`SeededNoise` of the seed and ``labels``.
    """
    if config.reproducible_noise:
        return SeededNoise(config.seed, *labels)
    return SecretNoise()


def _aggregator_options(config: RunConfig) -> dict[str, Any]:
    if config.secure_agg == "mask":
        return {
            "threshold": config.secagg_threshold,
            "neighbors": config.secagg_neighbors,
            "ring_bits": config.secagg_ring_bits,
            "clip_range": config.secagg_clip,
        }
    if config.secure_agg == "he":
        return {
            "poly_modulus_degree": config.he_poly_modulus_degree,
            "coeff_mod_bit_sizes": tuple(config.he_coeff_mod_bit_sizes),
            "global_scale_bits": config.he_scale_bits,
        }
    return {}


def task_for(bundle: DatasetBundle, config: RunConfig) -> Task:
    """The run's task (``--task``, or the data set's own), checked against the data."""
    data_task = getattr(bundle, "task", "classification")
    name = data_task if config.task == "auto" else config.task
    if name != data_task:
        raise ConfigError(
            f"--task {name} does not match the data: {bundle.name} is a {data_task} data set"
        )
    return build_task(
        name=name,
        num_classes=bundle.num_classes,
        label_convention=getattr(bundle, "label_convention", None),
    )


def model_spec(bundle: DatasetBundle, task: Task, config: RunConfig) -> ModelSpec:
    """The model shape a data set implies (the same on a server and at every site)."""
    return ModelSpec(
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        spatial_dims=bundle.spatial_dims,
        task=task.name,
        image_shape=tuple(bundle.image_shape),
        fusion=config.fusion,
    )


def training_dataset(
    config: RunConfig, *, train: ArraySplit, spatial_dims: int, site_id: int
) -> torch.utils.data.Dataset:
    """A site's training data as torch sees it; with ``--augment``, reproducibly augmented."""
    if not config.augment:
        return train.to_torch()
    from securefed.data.transforms import AugmentedDataset, augment_transform

    return AugmentedDataset(
        train,
        transform=augment_transform(spatial_dims=spatial_dims),
        seed=_seed_for(config.seed, 8, site_id),
    )


def personalize_rounds(config: RunConfig) -> int:
    """How many times the digital twins are fine-tuned over a run."""
    if config.personalize == 0:
        return 0
    return config.rounds if config.personalize_when == "every" else 1


def plan_site_privacy(config: RunConfig, *, num_samples: int) -> DPPlan:
    """One site's DP-SGD plan: sigma calibrated for every step the site may take in the run.

    Calibrates for the worst case: the site takes part in every round, and its twin
    fine-tuning (on the same records) is accounted too. Sampling by the server is not
    counted as amplification. Runs at the site, which picks its own delta (the run's, lowered
    to at most ``1/(10 n)`` for its size); the same in-process and over Flower.
    """
    delta = site_delta(num_samples=num_samples, run_delta=config.dp_delta)
    q = sample_rate(num_samples=num_samples, batch_size=config.batch_size)
    spe = steps_per_epoch(num_samples=num_samples, batch_size=config.batch_size)
    steps = config.planned_epochs * spe
    sigma = calibrate_noise(
        target_epsilon=float(config.dp_epsilon),
        delta=delta,
        sample_rate=q,
        steps=steps,
        accountant=config.accountant,
    )
    return DPPlan(
        noise_multiplier=sigma,
        sample_rate=q,
        max_grad_norm=config.max_grad_norm,
        planned_steps=steps,
        delta=delta,
        accountant=config.accountant,
    )


def check_site_plan(config: RunConfig, plan: DPPlan) -> None:
    """Check a plan a site reports (its size stays private) against the run's rules.

    The server and the audit cannot re-derive a site's plan without its size n, but every
    rule that ties the plan to the run can be checked from the plan alone: an epoch is a whole
    number 1/q of steps, the planned steps cover every round, delta is within the run's bound
    and sigma is exactly the calibration for that (q, steps, delta).

    Raises:
        ProtocolError: Naming the rule the plan breaks.

    """
    from securefed.errors import ProtocolError

    if not config.dp_enabled:
        raise ProtocolError("a site reported a DP plan for a run without DP")
    spe = round(1.0 / plan.sample_rate) if plan.sample_rate > 0 else 0
    if spe < 1 or 1.0 / spe != plan.sample_rate:
        raise ProtocolError(f"sample rate {plan.sample_rate!r} is not 1/ceil(n/B) for any n")
    epochs = config.planned_epochs
    if plan.planned_steps != epochs * spe:
        raise ProtocolError(
            f"planned steps {plan.planned_steps} != {epochs} epochs x {spe} steps per epoch"
        )
    bound = run_delta_bound(config.dp_delta)
    if not 0 < plan.delta <= bound:
        raise ProtocolError(f"delta {plan.delta:g} is outside (0, {bound:g}]")
    if plan.max_grad_norm != config.max_grad_norm or plan.accountant != config.accountant:
        raise ProtocolError("clipping bound or accountant differ from the run's")
    sigma = calibrate_noise(
        target_epsilon=float(config.dp_epsilon),
        delta=plan.delta,
        sample_rate=plan.sample_rate,
        steps=plan.planned_steps,
        accountant=config.accountant,
    )
    if plan.noise_multiplier != sigma:
        raise ProtocolError(
            f"sigma {plan.noise_multiplier!r} is not the calibrated {sigma!r} for its (q, steps, "
            "delta)"
        )


def sample_participants(config: RunConfig, *, ids: list[int], round_index: int) -> list[int]:
    """Sites sampled for a round (from a generator of its own, not the training RNG)."""
    k = max(1, round(config.client_fraction * len(ids)))
    if k >= len(ids):
        return list(ids)
    rng = np.random.default_rng(_seed_for(config.seed, 3, round_index))
    return sorted(int(i) for i in rng.choice(ids, size=k, replace=False))


def site_splits(
    config: RunConfig, *, train: ArraySplit, val: ArraySplit
) -> list[tuple[ArraySplit, ArraySplit | None]]:
    """Partition ``train`` over ``config.clients`` sites, and ``val`` into held-out sets like it.

    Deterministic in ``config.seed``: a site process that holds the whole data set (a trial
    on one machine) derives exactly the shard the in-process runtime gives that site.
    """
    if config.clients > len(train):
        raise DataError(f"{config.clients} sites but only {len(train)} training samples")
    groups = getattr(train, "groups", None)
    parts = partition(
        train.labels,
        spec=config.partition,
        n_sites=config.clients,
        seed=_seed_for(config.seed, 1),
        **({"groups": groups} if groups is not None else {}),
    )
    site_labels = [train.labels[p] for p in parts]
    val_groups = getattr(val, "groups", None)
    extra = (
        {"heldout_groups": val_groups, "site_train_groups": [groups[p] for p in parts]}
        if groups is not None and val_groups is not None
        else {}
    )
    held = partition_like(
        val.labels, site_train_labels=site_labels, seed=_seed_for(config.seed, 2), **extra
    )
    return [
        (train.subset(indices=p), val.subset(indices=h) if len(h) else None)
        for p, h in zip(parts, held)
    ]


def local_update(
    config: RunConfig,
    *,
    trainer: SiteTrainer,
    layout: ParamLayout,
    model: nn.Module,
    round_index: int,
) -> tuple[np.ndarray, float, float, dict[str, torch.Tensor]]:
    """One site's round: train a copy of ``model``, return ``[n * update..., n]`` and more.

    Returns:
        The vector to aggregate (pre-scaled by the sample count, so a weighted FedAvg needs
        only sums), the mean training loss, the training seconds and the trained state.

    """
    local = copy.deepcopy(model)
    mu = config.effective_prox_mu
    # FedProx's anchor is a copy of the round's weights; without FedProx, no copy.
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()} if mu else None
    # The seeded generator serves what is no privacy mechanism (the baseline's shuffling);
    # DP-SGD's sampling and noise come from `mechanism_noise`.
    gen = torch.Generator(device="cpu").manual_seed(
        _seed_for(config.seed, 4, round_index, trainer.client_id)
    )
    noise = (
        mechanism_noise(config, 4, round_index, trainer.client_id) if config.dp_enabled else None
    )
    result = trainer.train_round(
        model=local,
        round_index=round_index,
        epochs=config.local_epochs,
        generator=gen,
        noise=noise,
        prox_mu=mu,
        anchor=anchor,
    )
    update = layout.flatten(result.state) - layout.flatten(model.state_dict())
    vec = np.concatenate([result.num_samples * update, [float(result.num_samples)]])
    return vec, result.mean_loss, result.seconds, result.state


def _plain(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers and tuples as lists (JSON's view).

    Non-finite floats are kept (the checkpoint JSON allows them): a no-DP site's epsilon
    history is ``inf`` and must come back as ``inf``.
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@dataclass
class Site:
    """One hospital: its private training data, held-out data, local trainer and twin."""

    client_id: int
    train: ArraySplit
    heldout: ArraySplit | None
    trainer: SiteTrainer
    epsilon_per_round: list[float] = field(default_factory=list)
    #: Site-local training log (per round: mean training loss); never sent to the server.
    train_log: list[dict[str, float]] = field(default_factory=list)
    cluster: int | None = None
    twin: nn.Module | None = None


@dataclass
class RoundRecord:
    """What one round produced, for ``metrics.json``."""

    data: dict[str, Any]
    applied: bool


class Federation:
    """Sets up sites, privacy plans, strategy and aggregator for a :class:`RunConfig`.

    The server side of a round only sees what the aggregator returns: a sum of the
    sites' weighted updates ``sum_i n_i u_i`` and the total weight ``sum_i n_i`` (per
    cluster under clustered FL). Strategies:

    - ``fedavg`` / ``fedprox``: one global model; FedProx adds a decoupled proximal step
      at the sites. A server optimizer (FedAvgM, FedAdam) may post-process the average.
    - ``ftl``: the global model starts from pretrained weights; what ``freeze`` names is
      frozen, so only the trainable parameters are noised, sent and aggregated.
    - ``cfl``: IFCA (Ghosh et al. 2020). K cluster models; each site evaluates all K on its
      own data, trains the best, and each cluster is aggregated on its own.
    - ``personalize``: each site fine-tunes a private copy (a digital twin) that it keeps.

    Args:
        config: The run configuration.
        bundle: Data, if already loaded (else loaded from ``config``).
        dropout_schedule: ``f(round, participants) -> (drop_before, drop_after)``; ``None``
            for no simulated dropouts.

    """

    def __init__(
        self,
        config: RunConfig,
        *,
        bundle: DatasetBundle | None = None,
        dropout_schedule: Callable[[int, list[int]], tuple[set[int], set[int]]] | None = None,
    ) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.bundle = bundle or load_dataset(
            name=config.dataset,
            data_dir=config.data_dir,
            data=config.data,
            seed=config.seed,
            **config.loader_options,
        )
        self.dropout_schedule = dropout_schedule
        self.task: Task = self._make_task()
        self.public_indices: np.ndarray | None = None
        self.private_train = self.bundle.train
        if config.public_fraction > 0:
            private, self.public_indices = public_split(
                self.bundle.train, fraction=config.public_fraction, seed=config.public_seed
            )
            self.private_train = self.bundle.train.subset(indices=private)
        n_models = config.clusters if config.strategy == "cfl" else 1
        self.spec = model_spec(self.bundle, self.task, config)
        builds = []
        for k in range(n_models):
            # Cluster k > 0 gets its own initialisation: IFCA needs distinct models to start.
            torch.manual_seed(_seed_for(config.seed, 0x30DE1, *([k] if k else [])))
            builds.append(build_model(name=config.model, spec=self.spec))
        self.built: BuiltModel = builds[0]
        self.models: list[nn.Module] = [b.module.to(self.device) for b in builds]
        self.transfer = self._apply_transfer()
        state = self.models[0].state_dict()
        trainable = [n for n, p in self.models[0].named_parameters() if p.requires_grad]
        self.layout = ParamLayout(state, keys=trainable if self.transfer["frozen"] else None)
        self.server_opts: list[ServerOptimizer] = [
            build_server_optimizer(
                name=config.server_opt,
                lr=config.effective_server_lr,
                momentum=config.server_momentum,
            )
            for _ in self.models
        ]
        self.ledger = PrivacyLedger()
        self.sites = self._make_sites()
        self.delta, self.plans = self._plan_privacy()
        for site in self.sites:
            site.trainer = SiteTrainer(
                client_id=site.client_id,
                dataset=self._training_data(site),
                plan=self.plans.get(site.client_id),
                ledger=self.ledger,
                batch_size=config.batch_size,
                lr=config.lr,
                momentum=config.momentum,
                device=self.device,
                max_grad_norm=config.max_grad_norm,
                loss_fn=self.task.loss_fn,
                max_physical_batch_size=config.max_physical_batch_size,
            )
        self._aggregators: dict[int, Aggregator] = {}
        self.aggregator: Aggregator = self._aggregator_for(len(self.participants(1)))
        if dropout_schedule is None and config.dropout_clients > 0:
            self.dropout_schedule = self._simulated_dropouts
        self.records: list[RoundRecord] = []
        self.elapsed = 0.0

    # -- set-up ---------------------------------------------------------------------------
    def _make_task(self) -> Task:
        return task_for(self.bundle, self.config)

    @property
    def global_model(self) -> nn.Module:
        """The model the federation serves: the only one, or (CFL) the largest cluster's."""
        return self.models[self.largest_cluster()]

    def largest_cluster(self) -> int:
        """Index of the cluster with most sites (ties: the lowest index); 0 without CFL."""
        if len(self.models) == 1:
            return 0
        counts = np.bincount(
            [s.cluster for s in self.sites if s.cluster is not None], minlength=len(self.models)
        )
        return int(np.argmax(counts))

    def _apply_transfer(self) -> dict[str, Any]:
        """Load pretrained weights and freeze what ``freeze`` names, in every model."""
        from securefed.models.transfer import freeze, load_pretrained

        cfg = self.config
        info: dict[str, Any] = {"pretrained": None, "frozen": [], "reinitialised": []}
        if cfg.pretrained is not None:
            loads = [
                load_pretrained(m, path=cfg.pretrained, head_prefixes=self.built.head_prefixes)
                for m in self.models
            ]
            info["pretrained"] = pretraining_provenance(
                metadata=dict(loads[0].metadata),
                file_sha256=loads[0].sha256,
                bundle=self.bundle,
                public_fraction=cfg.public_fraction,
                public_seed=cfg.public_seed,
                public_indices=self.public_indices,
            )
            info["pretrained"]["path"] = str(cfg.pretrained)
            info["reinitialised"] = list(loads[0].reinitialised)
        spec = cfg.effective_freeze
        if spec != "none":
            frozen = [
                freeze(m, spec=spec, head_prefixes=self.built.head_prefixes) for m in self.models
            ]
            info["frozen"] = list(frozen[0])
        n_train = sum(p.numel() for p in self.models[0].parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.models[0].parameters())
        info.update({"freeze": spec, "trainable_parameters": n_train, "all_parameters": n_all})
        return info

    def _make_sites(self) -> list[Site]:
        try:
            splits = site_splits(self.config, train=self.private_train, val=self.bundle.val)
        except DataError as exc:
            raise DataError(f"{self.bundle.source}: {exc}") from exc
        return [
            Site(
                client_id=cid,
                train=train,
                heldout=held,
                trainer=None,  # type: ignore[arg-type]  # set once plans exist
            )
            for cid, (train, held) in enumerate(splits)
        ]

    def set_progress(self, enabled: bool) -> None:
        """Show a bar (site, step/total) on stderr while a site's local training runs long."""
        for site in self.sites:
            site.trainer.progress = enabled

    def memory_warning(self) -> str | None:
        """One line when DP-SGD's per-sample gradients will not fit in memory, else None.

        See :func:`securefed.dp.memory.memory_warning`; without DP there are none to store.
        """
        from securefed.dp.memory import memory_warning

        if not self.config.dp_enabled:
            return None
        largest = max(len(site.trainer.dataset) for site in self.sites)
        return memory_warning(
            self.models[0],
            sample_shape=tuple(self.bundle.train.images.shape[1:]),
            batch_size=min(self.config.batch_size, largest),
            max_physical_batch_size=self.config.max_physical_batch_size,
            device=self.device,
        )

    def site_summaries(self) -> list[dict[str, Any]]:
        """Per site: epsilon history, held-out size, and disclosed training size and classes."""
        out = []
        for s in self.sites:
            entry: dict[str, Any] = {
                "client_id": s.client_id,
                "num_heldout": len(s.heldout) if s.heldout is not None else 0,
                "epsilon_per_round": list(s.epsilon_per_round),
            }
            if self.config.disclose_site_sizes:
                entry["num_samples"] = len(s.train)
                entry["class_counts"] = s.train.class_counts(
                    num_classes=self.bundle.num_classes
                ).tolist()
            out.append(entry)
        return out

    def _training_data(self, site: Site) -> torch.utils.data.Dataset:
        return training_dataset(
            self.config,
            train=site.train,
            spatial_dims=self.bundle.spatial_dims,
            site_id=site.client_id,
        )

    def personalize_rounds(self) -> int:
        """How many times the twins are fine-tuned over the run."""
        return personalize_rounds(self.config)

    def _plan_privacy(self) -> tuple[float | None, dict[int, DPPlan]]:
        """Every site's plan; the run's delta is the largest any site uses."""
        cfg = self.config
        if not cfg.dp_enabled:
            return None, {}
        plans = {s.client_id: plan_site_privacy(cfg, num_samples=len(s.train)) for s in self.sites}
        return max(p.delta for p in plans.values()), plans

    def _aggregator_for(self, n_sites: int) -> Aggregator:
        """One aggregator per group size (masking's parameters depend on it; CKKS keys don't)."""
        key = n_sites if self.config.secure_agg == "mask" else 0
        if key not in self._aggregators:
            self._aggregators[key] = build_aggregator(
                mode=self.config.secure_agg, n_clients=n_sites, **_aggregator_options(self.config)
            )
        return self._aggregators[key]

    def _simulated_dropouts(self, round_index: int, chosen: list[int]) -> tuple[set[int], set[int]]:
        """``--dropout-clients``: K (or a rate of) sampled sites drop, from their own RNG.

        The draw never touches the training RNG, so a run with dropouts trains the same
        local models as one without; only the sites averaged differ.
        """
        # The count RunConfig validated (with every sampled site chosen, as without cfl).
        count = min(self.config.dropouts_per_round, len(chosen))
        rng = np.random.default_rng(_seed_for(self.config.seed, 5, round_index))
        gone = {int(c) for c in rng.choice(chosen, size=count, replace=False)} if count else set()
        return (gone, set()) if self.config.dropout_phase == "before" else (set(), gone)

    # -- rounds ---------------------------------------------------------------------------
    def participants(self, round_index: int) -> list[int]:
        """Sites sampled for a round (from a generator of its own, not the training RNG)."""
        return sample_participants(
            self.config, ids=[s.client_id for s in self.sites], round_index=round_index
        )

    @torch.no_grad()
    def _data_loss(self, model: nn.Module, split: ArraySplit, batch_size: int = 256) -> float:
        model.eval()
        images, labels = torch.tensor(split.images), torch.tensor(split.labels)
        total = 0.0
        for i in range(0, len(split), batch_size):
            x, y = images[i : i + batch_size].to(self.device), labels[i : i + batch_size]
            total += float(self.task.loss_fn(model(x).float(), y.to(self.device))) * len(y)
        return total / len(split)

    def select_cluster(self, site: Site) -> int:
        """IFCA's client step: the cluster model with the lowest loss on the site's data.

        Runs at the site; only the chosen index is disclosed (the report says so).
        """
        losses = [self._data_loss(m, site.train) for m in self.models]
        return int(np.argmin(losses))

    def _local_update(
        self, site: Site, model: nn.Module, round_index: int
    ) -> tuple[np.ndarray, float, float, dict[str, torch.Tensor]]:
        return local_update(
            self.config,
            trainer=site.trainer,
            layout=self.layout,
            model=model,
            round_index=round_index,
        )

    def run_round(self, round_index: int) -> RoundRecord:
        """Train, aggregate and evaluate one round. A failed round changes no model."""
        start = time.perf_counter()
        chosen = self.participants(round_index)
        drop_before, drop_after = (
            self.dropout_schedule(round_index, chosen) if self.dropout_schedule else (set(), set())
        )
        if self.config.schedule == "cyclic":
            info = self._cyclic_round(round_index, chosen, drop_before)
        else:
            info = self._parallel_round(round_index, chosen, drop_before, drop_after)
        twin_seconds = 0.0
        if self.personalize_rounds() and (
            self.config.personalize_when == "every" or round_index == self.config.rounds
        ):
            twin_seconds = self._personalize(round_index)
        eval_start = time.perf_counter()
        record = self._evaluate(round_index, chosen, info["train_loss"])
        eval_seconds = time.perf_counter() - eval_start
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        applied = info["applied"]
        record.update(
            {
                "seconds": seconds,
                "cumulative_seconds": self.elapsed,
                "applied": applied,
                "error": info["error"],
                "participants": chosen,
                "survivors": info["survivors"],
                "dropped": sorted(set(chosen) - set(info["survivors"])),
                "timing": {
                    "local_training": info["train_seconds"],
                    "protection": info["protect"],
                    "aggregation": info["agg_seconds"],
                    "personalization": twin_seconds,
                    "evaluation": eval_seconds,
                },
                "bytes_per_client": info["bytes"],
                "clipped_values": info["clipped"],
            }
        )
        if "clusters" in info:
            record["clusters"] = info["clusters"]
        rec = RoundRecord(data=record, applied=applied)
        self.records.append(rec)
        return rec

    def _parallel_round(
        self, round_index: int, chosen: list[int], drop_before: set[int], drop_after: set[int]
    ) -> dict[str, Any]:
        cfl = self.config.strategy == "cfl"
        assign: dict[int, int] = {}
        for cid in chosen:
            assign[cid] = self.select_cluster(self.sites[cid]) if cfl else 0
        inputs: dict[int, np.ndarray] = {}
        train_loss: dict[int, float] = {}
        train_seconds = 0.0
        for cid in chosen:
            vec, loss, secs, _ = self._local_update(
                self.sites[cid], self.models[assign[cid]], round_index
            )
            inputs[cid], train_loss[cid] = vec, loss
            train_seconds += secs
        agg_start = time.perf_counter()
        outcomes: dict[int, AggregateOutcome] = {}
        skipped: dict[int, str] = {}
        error = None
        try:
            for k in range(len(self.models)):
                members = sorted(c for c in chosen if assign[c] == k)
                if not members:
                    continue
                if cfl and self.config.secure_agg != "none" and len(members) < 2:
                    # A "sum" of one update is that update: aggregating it securely would
                    # only pretend. The cluster keeps its model this round.
                    skipped[k] = "one site: a secure sum of one update would reveal it"
                    continue
                outcomes[k] = self._aggregator_for(len(members)).aggregate(
                    {c: inputs[c] for c in members},
                    round_index=round_index,
                    drop_before_upload=set(members) & drop_before,
                    drop_after_upload=set(members) & drop_after,
                )
        except DropoutRecoveryError as exc:
            outcomes, error = {}, str(exc)
        agg_seconds = time.perf_counter() - agg_start
        del inputs  # the runtime is done with the sites' vectors
        # Apply every cluster's step or none, so a failed round is never half-applied.
        for k, outcome in outcomes.items():
            model = self.models[k]
            state = {n: v.detach().clone() for n, v in model.state_dict().items()}
            current = self.layout.flatten(state)
            delta = outcome.total[:-1] / float(outcome.total[-1])
            new_vec = self.server_opts[k].step(current=current, delta=delta)
            model.load_state_dict({**state, **self.layout.unflatten(new_vec)}, strict=True)
        if cfl and error is None:
            for cid in chosen:
                self.sites[cid].cluster = assign[cid]
        if error is None and not outcomes:
            error = "no cluster could be aggregated this round: " + "; ".join(
                f"cluster {k}: {why}" for k, why in sorted(skipped.items())
            )
        applied = error is None
        survivors = sorted(c for o in outcomes.values() for c in o.survivors)
        info: dict[str, Any] = {
            "applied": applied,
            "error": error,
            "train_loss": train_loss,
            "train_seconds": train_seconds,
            "agg_seconds": sum(o.server_seconds for o in outcomes.values()) or agg_seconds,
            "protect": sum(sum(o.client_seconds.values()) for o in outcomes.values()),
            "survivors": survivors,
            "bytes": {str(c): b for o in outcomes.values() for c, b in o.bytes_per_client.items()},
            "clipped": sum(o.clipped for o in outcomes.values()),
        }
        if cfl:
            info["clusters"] = [
                {
                    "cluster": k,
                    "members": sorted(c for c in chosen if assign[c] == k),
                    "applied": k in outcomes,
                    "skipped": skipped.get(k),
                }
                for k in range(len(self.models))
            ]
        return info

    def _cyclic_round(
        self, round_index: int, chosen: list[int], drop_before: set[int]
    ) -> dict[str, Any]:
        """Cyclic weight transfer: the model visits the sites in a fresh order each round."""
        order = np.random.default_rng(_seed_for(self.config.seed, 7, round_index)).permutation(
            chosen
        )
        current = copy.deepcopy(self.models[0])
        train_loss: dict[int, float] = {}
        visited: list[int] = []
        train_seconds = 0.0
        for cid in (int(c) for c in order):
            _, loss, secs, state = self._local_update(self.sites[cid], current, round_index)
            train_seconds += secs
            if cid in drop_before:
                continue  # it never handed its model on; the next site starts from the last one
            current.load_state_dict(state, strict=True)
            train_loss[cid] = loss
            visited.append(cid)
        applied = bool(visited)
        if applied:
            self.models[0].load_state_dict(current.state_dict(), strict=True)
        size = 4 * self.layout.size
        return {
            "applied": applied,
            "error": None if applied else "every site dropped before handing the model on",
            "train_loss": train_loss,
            "train_seconds": train_seconds,
            "agg_seconds": 0.0,
            "protect": 0.0,
            "survivors": sorted(visited),
            "bytes": {str(c): size for c in visited},
            "clipped": 0,
        }

    def _personalize(self, round_index: int) -> float:
        """Each site fine-tunes a private copy of the model it uses (its digital twin)."""
        start = time.perf_counter()
        for site in self.sites:
            base = self.models[site.cluster or 0] if len(self.models) > 1 else self.models[0]
            twin = copy.deepcopy(base)
            gen = torch.Generator(device="cpu").manual_seed(
                _seed_for(self.config.seed, 6, round_index, site.client_id)
            )
            noise = (
                mechanism_noise(self.config, 6, round_index, site.client_id)
                if self.config.dp_enabled
                else None
            )
            result = site.trainer.train_round(
                model=twin,
                round_index=round_index,
                epochs=self.config.personalize,
                generator=gen,
                noise=noise,
                phase="personalize",
                lr=self.config.personalize_lr,
            )
            twin.load_state_dict(result.state, strict=True)
            site.twin = twin
        return time.perf_counter() - start

    def _site_model(self, site: Site) -> nn.Module:
        if len(self.models) == 1:
            return self.models[0]
        if site.cluster is None:
            site.cluster = self.select_cluster(site)
        return self.models[site.cluster]

    def _evaluate(
        self, round_index: int, chosen: list[int], train_loss: dict[int, float]
    ) -> dict[str, Any]:
        ev = self.task.evaluate
        primary = self.task.primary_metric
        clients = []
        for site in self.sites:
            eps = site.trainer.epsilon() if self.config.dp_enabled else None
            site.epsilon_per_round.append(eps if eps is not None else float("inf"))
            model = self._site_model(site)
            if site.client_id in train_loss:
                # The training loss is an un-noised function of the site's records: it stays
                # in the site's own log and never enters the server's files.
                site.train_log.append(
                    {"round": round_index, "train_loss": train_loss[site.client_id]}
                )
            entry: dict[str, Any] = {
                "client_id": site.client_id,
                "participated": site.client_id in chosen,
                "epsilon": eps,
            }
            if self.config.disclose_site_sizes:
                entry["num_train_samples"] = len(site.train)
            if len(self.models) > 1:
                entry["cluster"] = site.cluster
            if site.heldout is not None:
                entry.update(ev(model=model, split=site.heldout, device=self.device))
                if site.twin is not None:
                    entry["twin"] = ev(model=site.twin, split=site.heldout, device=self.device)
            clients.append(entry)
        out: dict[str, Any] = {
            "round": round_index,
            "global": ev(model=self.global_model, split=self.bundle.test, device=self.device),
            "clients": clients,
        }
        scored = [c for c in clients if c.get(primary) is not None]
        out["site_mean"] = {
            primary: float(np.mean([c[primary] for c in scored])) if scored else None
        }
        twins = [c["twin"][primary] for c in scored if "twin" in c]
        if twins:
            out["site_mean"]["twin_" + primary] = float(np.mean(twins))
        if len(self.models) > 1:
            out["global_model_cluster"] = self.largest_cluster()
            out["cluster_test"] = [
                {
                    "cluster": k,
                    primary: ev(model=m, split=self.bundle.test, device=self.device)[primary],
                }
                for k, m in enumerate(self.models)
            ]
        return out

    # -- checkpoint -----------------------------------------------------------------------
    def checkpoint_state(
        self,
    ) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
        """What :func:`securefed.fl.checkpoint.save_checkpoint` needs after a completed round.

        Returns:
            ``(model_state, optimizer_state, meta, extra)``: the first model and its server
            optimizer as the deployed runtime stores them, CFL's other cluster models and
            optimizers as extra tensor groups, and JSON for the rest. Digital twins are not
            stored: every twin is fine-tuned afresh from the served model before it is read.
            The sites' training losses are not stored either: they never leave a site.

        """
        extra: dict[str, dict[str, torch.Tensor]] = {}
        for k in range(1, len(self.models)):
            extra[f"model{k}"] = dict(self.models[k].state_dict())
            extra[f"serveropt{k}"] = {
                n: torch.from_numpy(np.asarray(v, np.float64))
                for n, v in self.server_opts[k].state().items()
            }
        meta = _plain(
            {
                "runtime": "in-process",
                "config": self.config.to_dict(),
                "dataset_fingerprint": self.bundle.fingerprint,
                "pretrained_sha256": (self.transfer.get("pretrained") or {}).get("file_sha256"),
                "plans": {str(k): dataclasses.asdict(p) for k, p in sorted(self.plans.items())},
                "events": [e.to_dict() for e in self.ledger.events],
                "epsilon_per_round": {str(s.client_id): s.epsilon_per_round for s in self.sites},
                "clusters": {str(s.client_id): s.cluster for s in self.sites},
                "records": [{"data": r.data, "applied": r.applied} for r in self.records],
                "elapsed": self.elapsed,
            }
        )
        return (
            dict(self.models[0].state_dict()),
            self.server_opts[0].state(),
            meta,
            extra,
        )

    def restore(self, ck: Any) -> int:
        """Continue from a checkpoint of this same run; returns the last completed round.

        Every site's privacy events go back into the ledger in their original order, each
        checked against the site's (deterministic) plan first, so the resumed run accounts
        exactly what an uninterrupted one would.

        Raises:
            ConfigError: If the checkpoint belongs to another configuration, data set,
                pretrained file or privacy plan.

        """
        import json

        from securefed.dp.ledger import PrivacyEvent

        meta = ck.meta
        if meta.get("runtime") != "in-process":
            raise ConfigError("the checkpoint is not one of an in-process run")
        if meta["config"] != json.loads(json.dumps(_plain(self.config.to_dict()))):
            raise ConfigError("the checkpoint was written for another configuration")
        if meta["dataset_fingerprint"] != self.bundle.fingerprint:
            raise ConfigError(
                "the data set changed since the checkpoint (fingerprint differs); resume "
                "with the same data"
            )
        pretrained = (self.transfer.get("pretrained") or {}).get("file_sha256")
        if meta.get("pretrained_sha256") != pretrained:
            raise ConfigError("the pretrained weights changed since the checkpoint")
        plans = {int(k): DPPlan(**p) for k, p in meta["plans"].items()}
        if plans != self.plans:
            raise ConfigError("the sites' privacy plans differ from the checkpoint's")
        expected = {f"model{k}" for k in range(1, len(self.models))}
        if not expected <= set(ck.extra):
            raise ConfigError("the checkpoint lacks cluster models this run needs")
        events = [PrivacyEvent(**e) for e in meta["events"]]
        for e in events:
            plan = self.plans.get(e.client_id)
            if plan is None or (e.noise_multiplier, e.sample_rate, e.max_grad_norm) != (
                plan.noise_multiplier,
                plan.sample_rate,
                plan.max_grad_norm,
            ):
                raise ConfigError(
                    f"site {e.client_id}: a checkpointed privacy event (round {e.round}) does "
                    "not match its plan"
                )
        if self.ledger.events:
            raise ConfigError("this federation already trained; resume into a fresh one")
        self.models[0].load_state_dict(ck.model_state, strict=True)
        self.server_opts[0].load_state(ck.optimizer_state)
        for k in range(1, len(self.models)):
            self.models[k].load_state_dict(ck.extra[f"model{k}"], strict=True)
            self.server_opts[k].load_state(
                {n: v.numpy() for n, v in ck.extra.get(f"serveropt{k}", {}).items()}
            )
        for e in events:
            self.ledger.record(e)
        for site in self.sites:
            site.epsilon_per_round = [
                float("inf") if x is None else float(x)
                for x in meta["epsilon_per_round"].get(str(site.client_id), [])
            ]
            cluster = meta["clusters"].get(str(site.client_id))
            site.cluster = None if cluster is None else int(cluster)
        self.records = [RoundRecord(data=r["data"], applied=r["applied"]) for r in meta["records"]]
        self.elapsed = float(meta["elapsed"])
        return int(ck.round)

    # -- summaries ------------------------------------------------------------------------
    def sign_privacy(self, privacy: dict[str, Any], *, run: dict[str, Any]) -> None:
        """Each simulated site signs its claim in ``privacy`` with a key of its own.

        The in-process runtime plays every site, so it holds one fresh key per simulated site
        (from ``os.urandom``); a deployed site signs with its own persistent key instead.
        """
        from securefed.dp.signing import SiteSigner, sign_report

        signers = {
            int(c["client_id"]): SiteSigner.generate()
            for c in privacy["clients"]
            if c.get("noise_multiplier") is not None
        }
        sign_report(privacy, run=run, signers=signers)

    def personalization_table(self) -> list[dict[str, Any]]:
        """Per site: the global (or cluster) model vs the twin on the site's held-out data."""
        if not self.records:
            return []
        primary = self.task.primary_metric
        rows = []
        for c in self.records[-1].data["clients"]:
            if "twin" not in c:
                continue
            row = {"client_id": c["client_id"], "num_heldout": c.get("num_samples")}
            for key in self.task.headline:
                row[f"global_{key}"] = c.get(key)
                row[f"twin_{key}"] = c["twin"].get(key)
            row["twin_gain"] = c["twin"][primary] - c[primary]
            rows.append(row)
        return rows

    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: per-round records, final figures and convergence."""
        rounds = [r.data for r in self.records]
        primary = self.task.primary_metric
        conv = detect_convergence(
            accuracies=[r["global"][primary] for r in rounds],
            losses=[r["global"]["loss"] for r in rounds],
            seconds=[r["seconds"] for r in rounds],
            acc_tol=self.config.conv_acc_tol,
            loss_tol=self.config.conv_loss_tol,
            patience=self.config.conv_patience,
        )
        best = max(rounds, key=lambda r: r["global"][primary]) if rounds else None
        out: dict[str, Any] = {
            "schema_version": METRICS_SCHEMA_VERSION,
            "task": self.task.name,
            "strategy": self.config.strategy,
            "primary_metric": primary,
            "rounds": rounds,
            "final": rounds[-1]["global"] if rounds else None,
            "best": {"round": best["round"], **best["global"]} if best else None,
            "convergence": conv,
            "convergence_criteria": {
                "metric": primary,
                "acc_tol": self.config.conv_acc_tol,
                "loss_tol": self.config.conv_loss_tol,
                "patience": self.config.conv_patience,
            },
            "total_seconds": self.elapsed,
        }
        if self.personalize_rounds():
            out["personalization"] = self.personalization_table()
        if len(self.models) > 1:
            out["clusters"] = {
                "final_membership": {str(s.client_id): s.cluster for s in self.sites},
                "served_cluster": self.largest_cluster(),
            }
        return out
