"""The early validation: cheap checks of a run's inputs, for the CLI and the Python API."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.config import RunConfig
from securefed.errors import ConfigError, DataError
from securefed.validate import npz_split_sizes, validate_inputs
from tests.conftest import write_small_npz


@pytest.mark.parametrize("compressed", [False, True])
def test_split_sizes_come_from_the_array_headers(tmp_path, compressed):
    path = tmp_path / "a.npz"
    save = np.savez_compressed if compressed else np.savez
    save(
        path,
        train_images=np.zeros((7, 4, 4), np.uint8),
        train_labels=np.zeros((7, 1), np.uint8),
        val_labels=np.zeros(3, np.int64),
    )
    assert npz_split_sizes(path) == {"train": 7, "val": 3}


def _arrays(n=(6, 3, 3), image=(8, 8), dtype=np.uint8, **changes):
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = np.zeros((count, *image), dtype)
        arrays[f"{split}_labels"] = (np.arange(count) % 2).reshape(-1, 1).astype(np.uint8)
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


# Files the loader refuses; each is refused before training by the same code, in the same words.
BAD_FILES = {
    "not-a-zip": None,
    "missing-key": _arrays(test_labels=None),
    "both-val-spellings": _arrays(valid_images=np.zeros((3, 8, 8), np.uint8)),
    "length-mismatch": _arrays(val_labels=np.zeros((2, 1), np.uint8)),
    "negative-label": _arrays(train_labels=np.array([[0], [1], [-1], [0], [1], [0]])),
    "label-outside-the-classes": _arrays(test_labels=np.array([[0], [1], [5]])),
    "multi-label": _arrays(train_labels=np.zeros((6, 2), np.uint8)),
    "image-dtype": _arrays(dtype=np.int32),
    "image-shape": _arrays(val_images=np.zeros((3, 9, 8), np.uint8)),
    "empty-split": _arrays(n=(6, 0, 3)),
    "pickled-images": _arrays(test_images=np.array([None, 1, 2], dtype=object)),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("compressed", [False, True])
def test_a_file_the_loader_refuses_is_refused_before_training_in_its_words(
    tmp_path, case, compressed
):
    from securefed.data.medmnist import load_medmnist_npz

    path = tmp_path / "a.npz"
    if BAD_FILES[case] is None:
        path.write_bytes(b"PK\x03\x04 not a zip")
    else:
        (np.savez_compressed if compressed else np.savez)(path, **BAD_FILES[case])
    with pytest.raises(DataError) as loaded:
        load_medmnist_npz(path=path)
    with pytest.raises(DataError) as checked:
        validate_inputs(RunConfig(data=str(path)))
    assert str(checked.value) == str(loaded.value)


def test_the_check_reads_labels_but_no_image(tmp_path, monkeypatch):
    path = tmp_path / "a.npz"
    np.savez(path, **_arrays(test_labels=np.array([[0], [1], [5]])))
    read = []
    npz_file = np.lib.npyio.NpzFile
    getitem = npz_file.__getitem__
    monkeypatch.setattr(npz_file, "__getitem__", lambda self, k: read.append(k) or getitem(self, k))
    with pytest.raises(DataError, match="test_labels"):
        validate_inputs(RunConfig(data=str(path)))
    assert read and not [k for k in read if "images" in k], read


def test_float_pixels_are_left_to_the_loader(tmp_path):
    # A header carries no values: pixels outside [0, 1] are refused when the images load.
    from securefed.data.medmnist import load_medmnist_npz

    path = tmp_path / "a.npz"
    np.savez(path, **_arrays(dtype=np.float32, train_images=np.full((6, 8, 8), 2.0, np.float32)))
    validate_inputs(RunConfig(data=str(path)))
    with pytest.raises(DataError, match="outside"):
        load_medmnist_npz(path=path)


def test_the_python_api_gets_the_same_checks_before_any_folder_is_made(tmp_path):
    from securefed.run import train

    npz = write_small_npz(tmp_path / "tiny.npz", n_train=20, n_val=8, n_test=8)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="`--partition`"):
        train(RunConfig(data=str(npz), partition="bogus"), out_dir=out, progress=False)
    with pytest.raises(DataError, match="21 sites but only 20 training samples"):
        train(RunConfig(data=str(npz), clients=21), out_dir=out, progress=False)
    with pytest.raises(ConfigError, match="`--model`"):
        train(RunConfig(data=str(npz), model="nosuch"), out_dir=out, progress=False)
    assert not out.exists()


def test_a_model_that_cannot_do_the_requested_task_is_refused():
    with pytest.raises(ConfigError, match="cannot do --task segmentation"):
        validate_inputs(RunConfig(model="cnn", task="segmentation"))


def test_valid_inputs_pass(tmp_path):
    npz = write_small_npz(tmp_path / "tiny.npz", n_train=20, n_val=8, n_test=8)
    validate_inputs(RunConfig(data=str(npz), clients=20, secure_agg="mask"))
    validate_inputs(RunConfig(dataset="synthetic-seg", model="unet", partition="by-group"))
    validate_inputs(RunConfig(secure_agg="he"))
