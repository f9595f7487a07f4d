"""Fixtures of the deployment tests."""

import pytest


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps messages with the running task's identity; this process is the server."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
