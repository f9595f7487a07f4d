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


def test_a_file_that_is_not_an_archive_is_left_to_the_loader(tmp_path):
    path = tmp_path / "a.npz"
    path.write_bytes(b"PK\x03\x04 not a zip")
    assert npz_split_sizes(path) == {}
    validate_inputs(RunConfig(data=str(path)))  # the loader will say what is wrong


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
