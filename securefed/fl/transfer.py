"""Federated transfer learning: declared-public data, pretrained weights and their provenance.

The DP literature's public-pretraining setting: an operator *declares* some data public
(another data set, or a fraction of one), a model is pretrained on it at no privacy cost,
and the sites fine-tune it privately on data that must not overlap the public part. This
module draws the public/private split deterministically and checks, from the metadata
``securefed pretrain`` writes into the weights file, that a run keeps the two apart.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from securefed.data.dataset import ArraySplit, DatasetBundle
from securefed.data.partition import stratified_holdout
from securefed.data.patients import holdout_by_patient
from securefed.errors import ConfigError

__all__ = [
    "PRETRAIN_FORMAT",
    "indices_digest",
    "pretrain_metadata",
    "pretraining_provenance",
    "public_split",
]

#: Value of the ``securefed.format`` metadata key in weights written by ``securefed pretrain``.
PRETRAIN_FORMAT = "securefed.pretrain.v1"


def public_split(split: ArraySplit, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a training split's indices into (private, public), deterministically by seed.

    Classification splits are stratified (the public part keeps the class mix); others
    (segmentation) are split uniformly at random. With patient ids the split is by patient
    (stratified by each patient's first record's class): a patient is public or private as a
    whole, since records released without DP would otherwise weaken a patient-level ε.

    Args:
        split: The training split.
        fraction: Share declared public, in (0, 1).
        seed: ``public_seed``; ``securefed pretrain`` and ``securefed train`` must agree.

    With unlabelled records (``split.labelled``) the public part is drawn, by the same rule,
    from the labelled records alone (with patient ids, from the patients whose every record
    is labelled), ``fraction`` being of those: public data serve supervised pretraining, and
    an unlabelled record's zero map would teach it "background". Unlabelled records stay
    private. A split without unlabelled records is split exactly as before.

    Returns:
        Sorted, disjoint int64 index arrays ``(private, public)`` covering the split.

    """
    if not 0 < fraction < 1:
        raise ConfigError(f"`public_fraction` must be in (0, 1) (got {fraction}).")
    flags = getattr(split, "labelled", None)
    if flags is not None and not np.all(flags):
        return _public_of_labelled(split, np.asarray(flags), fraction, seed)
    patients = getattr(split, "patients", None)
    if patients is not None:
        return _public_patients(np.asarray(patients), np.asarray(split.labels), fraction, seed)
    labels = np.asarray(split.labels)
    if labels.ndim == 1:
        return stratified_holdout(labels, fraction=fraction, seed=seed)
    rng = np.random.default_rng(seed)
    n = len(split)
    n_public = min(max(int(round(fraction * n)), 1), n - 1)
    public = np.sort(rng.permutation(n)[:n_public]).astype(np.int64)
    return np.setdiff1d(np.arange(n), public).astype(np.int64), public


def _public_of_labelled(
    split: ArraySplit, flags: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    patients = getattr(split, "patients", None)
    if patients is None:
        eligible = np.flatnonzero(flags).astype(np.int64)
    else:
        ids = np.asarray(patients)
        eligible = np.flatnonzero(~np.isin(ids, ids[~flags])).astype(np.int64)
    if eligible.size < 2:
        raise ConfigError(
            f"`public_fraction` draws the public part from labelled records, and the training "
            f"split has {eligible.size} (of {len(split)}; unlabelled records stay private)."
        )
    _, public = public_split(split.subset(indices=eligible), fraction=fraction, seed=seed)
    public = eligible[public]
    return np.setdiff1d(np.arange(len(split)), public).astype(np.int64), public


def _public_patients(
    patients: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    ids, index = np.unique(patients, return_inverse=True)
    if len(ids) < 2:
        raise ConfigError("`public_fraction` needs at least 2 patients (the data have 1).")
    if labels.ndim == 1:
        return holdout_by_patient(labels, patients, fraction=fraction, seed=seed)
    rng = np.random.default_rng(seed)
    k = min(max(int(round(fraction * len(ids))), 1), len(ids) - 1)
    public = np.flatnonzero(np.isin(index, rng.permutation(len(ids))[:k])).astype(np.int64)
    return np.setdiff1d(np.arange(len(patients)), public).astype(np.int64), public


def indices_digest(indices: np.ndarray) -> str:
    """SHA-256 of an index set (sorted int64, little-endian): pins which samples were public."""
    data = np.ascontiguousarray(np.sort(np.asarray(indices, dtype=np.int64)), dtype="<i8")
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def pretrain_metadata(
    *,
    bundle: DatasetBundle,
    model: str,
    public_fraction: float,
    public_seed: int,
    public_indices: np.ndarray,
    epochs: int,
) -> dict[str, str]:
    """The safetensors header metadata of a pretrained model (strings only, by format)."""
    return {
        "securefed.format": PRETRAIN_FORMAT,
        "model": model,
        "dataset": bundle.name,
        "dataset_fingerprint": bundle.fingerprint,
        "public_fraction": repr(float(public_fraction)),
        "public_seed": str(int(public_seed)),
        "public_indices_sha256": indices_digest(public_indices),
        "public_samples": str(len(public_indices)),
        "epochs": str(int(epochs)),
        "privacy": "none: trained without DP on data the operator declared public",
    }


def pretraining_provenance(
    *,
    metadata: dict[str, str],
    file_sha256: str,
    bundle: DatasetBundle,
    public_fraction: float,
    public_seed: int,
    public_indices: np.ndarray | None,
) -> dict[str, Any]:
    """Check that pretraining data and the sites' private data are disjoint; describe both.

    Rules:
        - weights pretrained on *another* data set (different fingerprint): fine;
        - weights pretrained on a public fraction of *this* data set: the run must declare
          the same fraction and seed, so the sites never train on a public sample (and no
          private sample was used for pretraining);
        - weights pretrained on the whole of this data set's training split: refused.
        - weights without securefed metadata: accepted, provenance recorded as unverified
          (the operator vouches that their source was public).

    Raises:
        ConfigError: Pretraining and private data would overlap.

    """
    base: dict[str, Any] = {
        "file_sha256": file_sha256,
        "privacy_cost": "none: pretraining used only data declared public; the sites' "
        "epsilon covers the federated fine-tuning",
    }
    if metadata.get("securefed.format") != PRETRAIN_FORMAT:
        return {
            **base,
            "source": "unverified (no securefed pretraining metadata in the weights file)",
            "verified_disjoint": False,
        }
    same_data = metadata.get("dataset_fingerprint") == bundle.fingerprint
    info = {
        **base,
        "source": metadata.get("dataset"),
        "source_fingerprint": metadata.get("dataset_fingerprint"),
        "source_public_fraction": float(metadata.get("public_fraction", "0")),
        "source_public_indices_sha256": metadata.get("public_indices_sha256"),
        "same_dataset_as_sites": same_data,
    }
    if not same_data:
        return {**info, "verified_disjoint": True}
    pre_fraction = float(metadata.get("public_fraction", "0"))
    if pre_fraction <= 0:
        raise ConfigError(
            f"the pretrained weights were trained on all of {bundle.name}'s training split, "
            "which the sites treat as private; pretrain with --public-fraction instead"
        )
    if public_indices is None or not np.isclose(public_fraction, pre_fraction):
        raise ConfigError(
            f"the pretrained weights used a public {pre_fraction:.0%} of {bundle.name}; pass "
            f"--public-fraction {pre_fraction} --public-seed {metadata.get('public_seed')} so "
            "the sites' private data excludes it"
        )
    if indices_digest(public_indices) != metadata.get("public_indices_sha256"):
        raise ConfigError(
            f"the public split of {bundle.name} differs from the one used for pretraining "
            f"(pretrained with --public-seed {metadata.get('public_seed')}, this run uses "
            f"{public_seed}); use the same seed so public and private data stay disjoint"
        )
    return {**info, "verified_disjoint": True}
