"""``--strategy teacher-student``: semi-supervised federated segmentation by self-training.

Recipe: self-training from a teacher pretrained on public labelled volumes, as in the
federated liver-CT annotation system this strategy follows (an open, expert-labelled set
trains the 3D U-Net teacher; the hospitals' student learns from its pseudo-labels), with
FixMatch-style confidence-thresholded pseudo-labels (Sohn et al. 2020, "FixMatch", NeurIPS).
The teacher (``--teacher``):

- ``fixed`` (default): the model pretrained on declared-public labelled volumes
  (``securefed pretrain``, then ``--pretrained``), in every round. The server sends it beside
  the round's global model; its pseudo-labels do not change, so a site computes them once.
  The teacher stays what the public data made it, as in Noisy Student's teacher (Xie et al.
  2020) within one iteration.
- ``global``: the global model a site receives in round r is round r's teacher (round 1's is
  the pretrained one). The only recipe before schema 3.5. On the synthetic hospitals the
  student's global model stays weaker than the public teacher, so its pseudo-labels got
  worse than the teacher's and the arm fell behind supervised-only; the fixed teacher did
  not (benchmarks/results/semi_supervised.md).

At the site, each round:

1. the teacher (eval mode, no gradients) predicts every unlabelled volume, un-augmented;
2. a voxel whose largest softmax probability is at least ``--pseudo-threshold`` gets the
   argmax class as its pseudo-label, every other voxel is ignored (:func:`encode_pseudo`);
3. local DP-SGD trains the student on all the site's volumes: Dice-CE (the task's loss) on a
   labelled volume, ``--unlabelled-weight`` x cross-entropy over the confident voxels on an
   unlabelled one (summed over them and divided by all the volume's voxels), the student
   seeing unlabelled volumes under TorchIO augmentation, always (the teacher sees the clean
   volume: FixMatch's weak/strong split, the consistency that makes self-training more than
   copying the teacher), labelled volumes only with ``--augment``.

So that the DP-SGD trainer, its per-sample (or per-patient) clipping and its ledger need no
change, the round's training set carries both kinds of target in one label map
(:class:`SemiSupervisedLoss` decodes it per sample): true class c stays c, a pseudo-label c is
K + c and an ignored voxel is 2K. Each volume stays one sample, so DP-SGD clips and noises
both losses alike and every step is one the ledger counts.

Privacy: the pseudo-labels are a function of the site's private volumes; they never leave
the site and training on them is DP-SGD like any other step. Each volume's pseudo-labels are a
function of that volume and the teacher only (the public pretrained model, or the received
global model, itself a DP output) -- the threshold is fixed -- so replacing one volume
changes only its own target, which per-sample clipping bounds. A threshold computed across a
site's volumes would couple them and void that argument. The true label maps of the volumes
chosen unlabelled are replaced by zeros when the site is built (:func:`drop_labels`), so
nothing downstream can read them.

Unlabelled volumes come from two sources: ``--labelled-fraction F`` < 1 simulates them by
dropping label maps the site holds (a benchmark), and real ones are NIfTI subjects without
a label map, read with ``--data-option unlabelled=true`` (``ArraySplit.labelled`` False,
:func:`site_labelled`). Every other strategy refuses a training split holding real ones
(:func:`check_unlabelled`).

No mean-teacher EMA (Tarvainen & Valpola 2017): an EMA kept by the server of the global
models is post-processing and would cost no privacy, but it adds a hyper-parameter; the fixed
teacher is the published recipe, and the global one the simplest alternative.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from securefed.data.bundle import ArraySplit
from securefed.errors import ConfigError

__all__ = [
    "SemiSupervisedLoss",
    "TeacherStudentDataset",
    "check_unlabelled",
    "drop_labels",
    "encode_pseudo",
    "labelled_indices",
    "pseudo_label_maps",
    "site_labelled",
]

#: ``seed_for(seed, LABELLED_STREAM, site)`` chooses a site's labelled records (no privacy
#: mechanism: which records keep labels is a property of the benchmark, fine from --seed).
LABELLED_STREAM = 9


def labelled_indices(*, seed: int, fraction: float, num_samples: int, site_id: int) -> np.ndarray:
    """The sorted indices of the site's records that keep their labels.

    ``round(fraction * n)`` of them, at least 1, drawn by a generator seeded from ``seed`` and
    the site id, so the in-process runtime and a deployed site choose the same ones.

    Raises:
        ConfigError: ``fraction`` outside (0, 1].

    """
    from securefed.fl.planning import seed_for

    if not 0 < fraction <= 1:
        raise ConfigError(f"--labelled-fraction must be in (0, 1] (got {fraction}).")
    if fraction >= 1:
        return np.arange(num_samples, dtype=np.int64)
    k = min(num_samples, max(1, int(round(fraction * num_samples))))
    rng = np.random.default_rng(seed_for(seed, LABELLED_STREAM, site_id))
    return np.sort(rng.permutation(num_samples)[:k]).astype(np.int64)


def check_unlabelled(strategy: str, split: ArraySplit, *, who: str) -> None:
    """Refuse a training split with unlabelled records unless the strategy is teacher-student.

    An unlabelled record (``split.labelled`` False: a NIfTI subject without a label map, read
    with ``--data-option unlabelled=true``) carries an all-zero map; a supervised loss would
    learn it as "all background".

    Raises:
        ConfigError: One line naming ``who`` (the data, or the site) and the count.

    """
    missing = getattr(split, "unlabelled_count", 0)
    if missing and strategy != "teacher-student":
        raise ConfigError(
            f"{who}: the training split holds {missing} unlabelled record(s) (subjects without "
            f"a label map); --strategy {strategy} would train on their empty maps as "
            "background, only --strategy teacher-student can use them (or drop "
            "--data-option unlabelled=true and remove those subjects)."
        )


def site_labelled(split: ArraySplit, *, seed: int, fraction: float, site_id: int) -> np.ndarray:
    """The sorted indices of a site's records trained on with their label maps.

    The records :func:`labelled_indices` keeps at ``--labelled-fraction`` (all at 1), less
    those the data mark unlabelled (``split.labelled`` False). The draw is over all the
    site's records, as without flags, so the in-process runtime and a deployed site keep the
    same ones; unlike a fraction alone, which keeps at least one record, the result may be
    empty: a site holding only unlabelled subjects trains on pseudo-labels alone.
    """
    kept = labelled_indices(seed=seed, fraction=fraction, num_samples=len(split), site_id=site_id)
    flags = getattr(split, "labelled", None)
    if flags is None:
        return kept
    return np.intersect1d(kept, np.flatnonzero(flags)).astype(np.int64)


def drop_labels(split: ArraySplit, labelled: np.ndarray) -> ArraySplit:
    """``split`` with the label maps of every record not in ``labelled`` set to zeros.

    The site forgets the true labels of its unlabelled volumes before it builds anything
    else, so no later step (training, a twin, a cluster choice) can read them.
    """
    labels = np.zeros_like(split.labels)
    labels[labelled] = split.labels[labelled]
    return dataclasses.replace(split, labels=labels)


def encode_pseudo(
    probabilities: torch.Tensor, *, threshold: float, num_classes: int
) -> torch.Tensor:
    """Pseudo-label maps of the encoded form from the teacher's softmax output.

    Args:
        probabilities: (N, K, *spatial) class probabilities (a softmax over dim 1).
        threshold: A voxel is pseudo-labelled when its largest probability is at least this.
        num_classes: K.

    Returns:
        int64 (N, *spatial): ``K + argmax`` where confident, ``2K`` (ignored) elsewhere.

    """
    if probabilities.shape[1] != num_classes:
        raise ConfigError(
            f"teacher output has {probabilities.shape[1]} classes, the task {num_classes}"
        )
    confidence, cls = probabilities.max(dim=1)
    ignored = torch.full_like(cls, 2 * num_classes)
    return torch.where(confidence >= threshold, cls + num_classes, ignored).to(torch.int64)


@torch.no_grad()
def pseudo_label_maps(
    teacher: nn.Module,
    images: np.ndarray,
    *,
    num_classes: int,
    threshold: float,
    device: torch.device,
    batch_size: int = 1,
) -> np.ndarray:
    """The teacher's encoded pseudo-label maps of ``images`` (un-augmented, eval mode).

    One volume at a time by default: a volume's map then depends on that volume and the
    teacher alone by construction (batched kernels may round differently with the batch's
    shape), which is what per-sample clipping's argument assumes.
    """
    was_training = teacher.training
    teacher.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)
        probs = torch.softmax(teacher(x).float(), dim=1)
        out.append(encode_pseudo(probs, threshold=threshold, num_classes=num_classes).cpu())
    teacher.train(was_training)
    if not out:
        return np.zeros((0, *images.shape[2:]), dtype=np.int64)
    return torch.cat(out).numpy()


class SemiSupervisedLoss(nn.Module):
    """The task's loss over a batch that mixes labelled and pseudo-labelled volumes.

    A sample whose map holds any value >= K is pseudo-labelled: its term is ``weight`` x the
    sum of the cross-entropy over its voxels in [K, 2K) (class ``value - K``) divided by all
    its voxels; voxels at 2K (below the threshold) and anything else (an augmentation's
    padding) add nothing. Every other sample's term is ``supervised`` (Dice-CE with the Dice
    per sample). The loss is the mean of the per-sample terms, what per-sample clipping needs.

    Args:
        num_classes: K.
        unlabelled_weight: Weight of a pseudo-labelled sample's term.
        supervised: The loss of labelled samples, a mean of per-sample terms.

    """

    def __init__(self, *, num_classes: int, unlabelled_weight: float, supervised: nn.Module):
        super().__init__()
        self.num_classes = int(num_classes)
        self.unlabelled_weight = float(unlabelled_weight)
        self.supervised = supervised

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of each sample's term."""
        n, k = target.shape[0], self.num_classes
        if n == 0:
            return logits.sum() * 0.0
        pseudo = (target.reshape(n, -1) >= k).any(dim=1)
        total = logits.new_zeros(())
        if not bool(pseudo.all()):
            labelled = ~pseudo
            # `supervised` is a mean over its samples: times their count, a sum of terms.
            count = int(labelled.sum())
            total = total + self.supervised(logits[labelled], target[labelled]) * count
        if bool(pseudo.any()):
            t = target[pseudo]
            confident = (t >= k) & (t < 2 * k)
            cls = torch.where(confident, t - k, torch.zeros_like(t))
            ce = F.cross_entropy(logits[pseudo].float(), cls, reduction="none")
            per_sample = (ce * confident).reshape(len(t), -1).sum(dim=1) / ce[0].numel()
            total = total + self.unlabelled_weight * per_sample.sum()
        return total / n


class TeacherStudentDataset(Dataset):
    """A site's training volumes with their round's targets in the encoded form.

    ``dataset[i]`` is ``(image, target)``. A labelled record's target is its label map; an
    unlabelled record's is its pseudo-label map (:meth:`set_pseudo_labels`; all ignored,
    2K, until the first call), and its image and map pass through the augmentation of
    :class:`~securefed.data.transforms.AugmentedDataset` (spatial transforms move the map
    with the image; nearest-neighbour, so codes stay codes). Labelled records are augmented
    only when ``augment_labelled``. Draws depend on (seed, epoch, index) only.

    Args:
        split: The site's training split (unlabelled maps already dropped).
        labelled: Sorted indices of the labelled records.
        num_classes: K.
        augment_labelled: Augment labelled records too (``--augment``).
        spatial_dims: 2 or 3.
        seed: Augmentation seed.

    """

    def __init__(
        self,
        split: ArraySplit,
        *,
        labelled: np.ndarray,
        num_classes: int,
        augment_labelled: bool,
        spatial_dims: int,
        seed: int,
    ) -> None:
        from securefed.data.transforms import augment_transform

        self.images = split.images
        self.num_classes = int(num_classes)
        self.is_labelled = np.zeros(len(split), dtype=bool)
        self.is_labelled[np.asarray(labelled, dtype=np.int64)] = True
        self.unlabelled = np.flatnonzero(~self.is_labelled).astype(np.int64)
        targets = np.full(split.labels.shape, 2 * self.num_classes, dtype=np.int64)
        # Only the labelled records' maps are read: the others stay "ignored" until pseudo-
        # labelled by the teacher.
        targets[self.is_labelled] = split.labels[self.is_labelled]
        self.targets = targets
        self.augment_labelled = bool(augment_labelled)
        self.transform = augment_transform(spatial_dims=spatial_dims)
        self.seed = int(seed)
        self.epoch = 0
        self._augmented = self._rebuild()

    def _rebuild(self) -> Any:
        from securefed.data.transforms import AugmentedDataset

        split = ArraySplit(images=self.images, labels=self.targets.copy())
        out = AugmentedDataset(split, transform=self.transform, seed=self.seed)
        out.set_epoch(self.epoch)
        return out

    def set_pseudo_labels(self, encoded: np.ndarray) -> None:
        """The round's pseudo-label maps of the unlabelled records, in their order."""
        encoded = np.asarray(encoded, dtype=np.int64)
        if encoded.shape != (len(self.unlabelled), *self.targets.shape[1:]):
            raise ConfigError(
                f"pseudo-labels of shape {encoded.shape} for {len(self.unlabelled)} unlabelled "
                "volumes"
            )
        if encoded.size and (
            encoded.min() < self.num_classes or encoded.max() > 2 * self.num_classes
        ):
            raise ConfigError("pseudo-labels must be encoded in [K, 2K] (see encode_pseudo)")
        self.targets[self.unlabelled] = encoded
        self._augmented = self._rebuild()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (round) whose augmentation draws ``__getitem__`` returns."""
        self.epoch = int(epoch)
        self._augmented.set_epoch(self.epoch)

    def __len__(self) -> int:
        """Return the number of records (labelled and unlabelled)."""
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The record's (image, encoded target), augmented as the class says."""
        index = int(index)
        if self.is_labelled[index] and not self.augment_labelled:
            image = torch.tensor(self.images[index])
            return image, torch.tensor(self.targets[index])
        return self._augmented[index]
