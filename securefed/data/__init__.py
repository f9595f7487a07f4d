"""Data sets (synthetic, MedMNIST, image folders) and their partitioning across sites."""

from securefed.data.dataset import (
    SPLITS,
    ArraySplit,
    DatasetBundle,
    available_datasets,
    load_dataset,
)
from securefed.data.imagefolder import load_image_folder
from securefed.data.medmnist import MEDMNIST_CLASS_NAMES, load_medmnist, load_medmnist_npz
from securefed.data.partition import (
    available_partitioners,
    parse_partitioner,
    partition,
    partition_like,
)
from securefed.data.synthetic import make_synthetic

__all__ = [
    "MEDMNIST_CLASS_NAMES",
    "SPLITS",
    "ArraySplit",
    "DatasetBundle",
    "available_datasets",
    "available_partitioners",
    "load_dataset",
    "load_image_folder",
    "load_medmnist",
    "load_medmnist_npz",
    "make_synthetic",
    "parse_partitioner",
    "partition",
    "partition_like",
]
