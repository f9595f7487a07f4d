"""Teacher-student over Flower: nothing new leaves a site (the teacher travels in the fit
message), and the same model as in-process."""

from __future__ import annotations

import pytest

from tests.fl.test_teacher_student import _config, pretrain_teacher

pytestmark = pytest.mark.slow


@pytest.fixture
def teacher(tmp_path):
    """Segmentation weights pretrained on another synthetic-seg draw (public)."""
    return pretrain_teacher(tmp_path)


def test_over_flower_it_equals_the_in_process_run(teacher, tmp_path, task_identity):
    # Nothing new on the wire: the deployed ClientApp builds the same SiteRuntime, so the
    # Flower run trains the same model bit for bit (plaintext sums, reproducible noise).
    from safetensors.torch import load_file

    from securefed.fl.simulation import Federation
    from securefed.run import train
    from tests.deploy.test_parity import _close
    from tests.deploy.test_site_messages import _deploy

    config = _config(teacher, dp_epsilon=8.0, rounds=2, reproducible_noise=True)
    _, run = _deploy(
        config,
        tmp_path / "flower",
        node_extra={"allow-reproducible-noise": True, "allow-labelled-fraction": True},
    )
    flower = run.run()
    local = train(config, out_dir=tmp_path / "local", progress=False, federation=Federation(config))

    _close(
        load_file(str(flower / "model.safetensors")), load_file(str(local / "model.safetensors"))
    )
