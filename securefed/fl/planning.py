"""What both sides derive from the run configuration alone, identically in every runtime.

The shard of each site, its DP-SGD plan (and the server's check of a reported plan), which
sites a round samples, the task and model shape a data set implies, and the seeds of what is
no privacy mechanism. Pure functions of ``RunConfig`` and data: no state, no network.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from securefed.config import RunConfig
from securefed.data.dataset import ArraySplit, DatasetBundle
from securefed.data.partition import partition, partition_like
from securefed.dp import releases
from securefed.dp.accounting import (
    calibrate_noise,
    run_delta_bound,
    sample_rate,
    site_delta,
    steps_per_epoch,
)
from securefed.dp.noise import NoiseSource, SecretNoise, SeededNoise
from securefed.dp.trainer import DPPlan
from securefed.errors import ConfigError, DataError
from securefed.fl.tasks import Task, build_task
from securefed.models import ModelSpec

__all__ = [
    "check_site_plan",
    "mechanism_noise",
    "model_choice",
    "model_spec",
    "personalize_rounds",
    "personalizes_in",
    "plan_site_privacy",
    "resolve_device",
    "sample_participants",
    "seed_for",
    "site_splits",
    "task_for",
    "training_dataset",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when it is available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from securefed.errors import ConfigError

        raise ConfigError("`device` is 'cuda' but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def seed_for(*parts: int) -> int:
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


def task_for(bundle: DatasetBundle, config: RunConfig) -> Task:
    """The run's task (``--task``, or the data set's own), checked against the data."""
    data_task = getattr(bundle, "task", "classification")
    name = data_task if config.task == "auto" else config.task
    if name != data_task:
        raise ConfigError(
            f"--task {name} does not match the data: {bundle.name} is a {data_task} data set"
        )
    teacher_student = config.strategy == "teacher-student"
    if teacher_student and name != "segmentation":
        raise ConfigError(
            f"--strategy teacher-student is for segmentation; {bundle.name} is a {name} data set"
        )
    return build_task(
        name=name,
        num_classes=bundle.num_classes,
        label_convention=getattr(bundle, "label_convention", None),
        unlabelled_weight=config.unlabelled_weight if teacher_student else None,
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


def model_choice(config: RunConfig) -> dict[str, Any]:
    """What ``--model auto`` needs beyond the data's shape (:func:`securefed.models.auto_model`)."""
    return {
        "private": config.dp_enabled,
        "pretrained": config.pretrained is not None,
        "rule": config.auto_rule,
    }


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
        seed=seed_for(config.seed, 8, site_id),
    )


def personalize_rounds(config: RunConfig) -> int:
    """How many times the digital twins are fine-tuned over a run."""
    if config.personalize == 0:
        return 0
    return config.rounds if config.personalize_when == "every" else 1


def personalizes_in(config: RunConfig, round_index: int) -> bool:
    """Whether the digital twins are fine-tuned after ``round_index`` (both sides check it)."""
    return bool(config.personalize) and (
        config.personalize_when == "every" or round_index == config.rounds
    )


def plan_site_privacy(config: RunConfig, *, num_samples: int) -> DPPlan:
    """One site's DP-SGD plan: sigma calibrated for every step the site may take in the run.

    Calibrates for the worst case: the site takes part in every round, and its twin
    fine-tuning (on the same records), the decision calibration's release
    (:mod:`securefed.dp.calibration`), q-FFL's loss releases and logit adjustment's class
    prior are accounted too (:func:`securefed.dp.releases.entries`). Sampling by the server is not
    counted as amplification. Runs at the site, which picks its own delta (the run's, lowered
    to at most ``1/(10 n)`` for its size); the same in-process and over Flower.
    """
    delta = site_delta(num_samples=num_samples, run_delta=config.dp_delta)
    q = sample_rate(
        num_samples=num_samples, batch_size=config.effective_batch_size, min_steps=config.min_steps
    )
    spe = steps_per_epoch(
        num_samples=num_samples, batch_size=config.effective_batch_size, min_steps=config.min_steps
    )
    steps = config.planned_epochs * spe
    sigma = calibrate_noise(
        target_epsilon=float(config.dp_epsilon),
        delta=delta,
        sample_rate=q,
        steps=steps,
        accountant=config.accountant,
        extra=releases.entries(config.to_dict()),
        search=config.sigma_search,
    )
    return DPPlan(
        noise_multiplier=sigma,
        sample_rate=q,
        max_grad_norm=config.effective_max_grad_norm,
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
    if plan.max_grad_norm != config.effective_max_grad_norm or plan.accountant != config.accountant:
        raise ProtocolError("clipping bound or accountant differ from the run's")
    sigma = calibrate_noise(
        target_epsilon=float(config.dp_epsilon),
        delta=plan.delta,
        sample_rate=plan.sample_rate,
        steps=plan.planned_steps,
        accountant=config.accountant,
        extra=releases.entries(config.to_dict()),
        search=config.sigma_search,
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
    rng = np.random.default_rng(seed_for(config.seed, 3, round_index))
    return sorted(int(i) for i in rng.choice(ids, size=k, replace=False))


def site_splits(
    config: RunConfig, *, train: ArraySplit, val: ArraySplit
) -> list[tuple[ArraySplit, ArraySplit | None]]:
    """Partition ``train`` over ``config.clients`` sites, and ``val`` into held-out sets like it.

    Deterministic in ``config.seed``: a site process that holds the whole data set (a trial
    on one machine) derives exactly the shard the in-process runtime gives that site.

    With patient ids (``train.patients``) the patients are partitioned, not the records, so
    every patient's records are at exactly one site (patient-level DP needs a patient's whole
    contribution in one site's accounting). Each patient stands for one row, with the label
    (class, or label map for segmentation) and the group of its first record, and the same
    ``partition`` (spec, seed) runs on those rows; each site then gets the records of its
    patients. With patient ids on ``val`` too, its patients are dealt the same way (one row
    each, :func:`_deal_heldout_patients`), so no patient's held-out records are split across
    sites, and a patient who also has training records is held out at the site that trains
    on them. Without patient ids the result is that of the record-level partition, unchanged.

    Raises:
        DataError: Fewer training samples (or patients) than sites, or an infeasible spec.

    """
    if config.clients > len(train):
        raise DataError(f"{config.clients} sites but only {len(train)} training samples")
    groups = getattr(train, "groups", None)
    patients = getattr(train, "patients", None)
    if patients is None:
        parts = partition(
            train.labels,
            spec=config.partition,
            n_sites=config.clients,
            seed=seed_for(config.seed, 1),
            **({"groups": groups} if groups is not None else {}),
        )
    else:
        parts = _partition_patients(config, train=train)
    if getattr(val, "patients", None) is None:
        site_labels = [train.labels[p] for p in parts]
        val_groups = getattr(val, "groups", None)
        extra = (
            {"heldout_groups": val_groups, "site_train_groups": [groups[p] for p in parts]}
            if groups is not None and val_groups is not None
            else {}
        )
        held = partition_like(
            val.labels, site_train_labels=site_labels, seed=seed_for(config.seed, 2), **extra
        )
    else:
        held = _deal_heldout_patients(config, train=train, val=val, parts=parts)
    return [
        (train.subset(indices=p), val.subset(indices=h) if len(h) else None)
        for p, h in zip(parts, held)
    ]


def _deal_heldout_patients(
    config: RunConfig, *, train: ArraySplit, val: ArraySplit, parts: list[np.ndarray]
) -> list[np.ndarray]:
    """Sorted ``val`` record indices per site, dealing whole held-out patients.

    The rule of the training partition: each held-out patient is one row (label and group of
    its first record), and :func:`partition_like` deals those rows in proportion to each site's
    training rows, which are its patients when ``train`` has ids (else its records). A
    held-out patient who also has training records goes to the site holding them instead, so
    one patient's records never sit at two sites.
    """
    train_ids = getattr(train, "patients", None)
    groups = getattr(train, "groups", None)
    val_groups = getattr(val, "groups", None)
    if train_ids is None:
        site_rows = list(parts)
    else:  # a site's patients, each by its first record (parts are sorted)
        site_rows = [p[np.unique(train_ids[p], return_index=True)[1]] for p in parts]
    units = val.units()
    first = np.array([u[0] for u in units], dtype=np.int64)
    owner: dict[int, int] = {}
    if train_ids is not None:
        for site, p in enumerate(parts):
            owner.update(dict.fromkeys(np.unique(train_ids[p]).tolist(), site))
    ids = val.patients[first].tolist()
    free = np.array([i for i, pid in enumerate(ids) if pid not in owner], dtype=np.int64)
    extra = (
        {
            "heldout_groups": val_groups[first[free]],
            "site_train_groups": [groups[r] for r in site_rows],
        }
        if groups is not None and val_groups is not None
        else {}
    )
    dealt = partition_like(
        val.labels[first[free]],
        site_train_labels=[train.labels[r] for r in site_rows],
        seed=seed_for(config.seed, 2),
        **extra,
    )
    site_units: list[list[int]] = [[] for _ in parts]
    for site, rows in enumerate(dealt):
        site_units[site].extend(free[rows].tolist())
    for i, pid in enumerate(ids):
        if pid in owner:
            site_units[owner[pid]].append(i)
    return [
        np.sort(np.concatenate([units[u] for u in us])).astype(np.int64)
        if us
        else np.empty(0, dtype=np.int64)
        for us in site_units
    ]


def _partition_patients(config: RunConfig, *, train: ArraySplit) -> list[np.ndarray]:
    """Sorted record indices per site, from a partition of the patients (one row each)."""
    units = train.units()
    if config.clients > len(units):
        raise DataError(
            f"{config.clients} sites but only {len(units)} patients in the training split; "
            "every site needs at least one patient"
        )
    first = np.array([u[0] for u in units], dtype=np.int64)  # units hold sorted indices
    groups = getattr(train, "groups", None)
    try:
        unit_parts = partition(
            train.labels[first],
            spec=config.partition,
            n_sites=config.clients,
            seed=seed_for(config.seed, 1),
            **({"groups": groups[first]} if groups is not None else {}),
        )
    except DataError as exc:
        # The partitioner counts its rows as samples; here each row is a patient.
        raise DataError(f"partitioning {len(units)} patients (one row each): {exc}") from None
    return [
        np.sort(np.concatenate([units[u] for u in part])).astype(np.int64) for part in unit_parts
    ]
