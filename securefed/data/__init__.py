"""Data sets (synthetic, MedMNIST, image folders, NIfTI) and their partitioning across sites.

The TorchIO transforms live in :mod:`securefed.data.transforms`, loaded on first use (they
import torch and TorchIO).
"""

from typing import Any

from securefed.data.bundle import LABEL_CONVENTIONS, SPLITS, TASKS, ArraySplit, DatasetBundle
from securefed.data.dataset import available_datasets, load_dataset
from securefed.data.imagefolder import load_image_folder
from securefed.data.medmnist import MEDMNIST_CLASS_NAMES, load_medmnist, load_medmnist_npz
from securefed.data.nifti import load_nifti_segmentation
from securefed.data.partition import (
    available_partitioners,
    parse_partitioner,
    partition,
    partition_like,
)
from securefed.data.segmentation import (
    BRATS_CLASS_NAMES,
    BRATS_MODALITIES,
    BRATS_REGIONS,
    make_synthetic_segmentation,
)
from securefed.data.synthetic import make_synthetic

__all__ = [
    "BRATS_CLASS_NAMES",
    "BRATS_MODALITIES",
    "BRATS_REGIONS",
    "LABEL_CONVENTIONS",
    "MEDMNIST_CLASS_NAMES",
    "SPLITS",
    "TASKS",
    "ArraySplit",
    "AugmentedDataset",
    "DatasetBundle",
    "augment_transform",
    "available_datasets",
    "available_partitioners",
    "load_dataset",
    "load_image_folder",
    "load_medmnist",
    "load_medmnist_npz",
    "load_nifti_segmentation",
    "make_synthetic",
    "make_synthetic_segmentation",
    "parse_partitioner",
    "partition",
    "partition_like",
    "preprocess_transform",
]

_LAZY = frozenset({"AugmentedDataset", "augment_transform", "preprocess_transform"})


def __getattr__(name: str) -> Any:
    # PEP 562: keep `import securefed.data` free of torch and TorchIO until a transform is used.
    if name in _LAZY:
        from securefed.data import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
