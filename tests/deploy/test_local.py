"""LocalDeployment's site environment (no process is started here)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("flwr")

from securefed.deploy.local import LocalDeployment  # noqa: E402


@pytest.mark.parametrize("sites", [1, 3, 64])
def test_sites_share_the_machines_cores(tmp_path, monkeypatch, sites) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    dep = LocalDeployment(tmp_path, sites=sites, tls=False)

    share = str(max(1, (os.cpu_count() or 1) // sites))
    assert dep.site_env["OMP_NUM_THREADS"] == share
    assert dep.site_env["MKL_NUM_THREADS"] == share
    # The server's processes keep the machine's defaults.
    assert "OMP_NUM_THREADS" not in dep.env


def test_a_thread_count_already_set_is_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    dep = LocalDeployment(tmp_path, sites=3, tls=False)

    assert dep.site_env["OMP_NUM_THREADS"] == "7"
