"""A site's SecAgg state survives a process boundary (a deployed site runs one step per process)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from securefed.crypto import SecAggClient, SecAggConfig, SecAggServer
from securefed.errors import ProtocolError


def _hop(client: SecAggClient, config: SecAggConfig) -> SecAggClient:
    """What a fresh site process does: rebuild the client from its exported bytes."""
    return SecAggClient.from_state(client.export_state(), config=config)


@pytest.mark.parametrize("drop_before_upload", [(), (3,)])
def test_sum_is_exact_when_every_step_runs_in_a_new_process(drop_before_upload) -> None:
    # Prepare: 5 sites, one vanishes after sharing keys (its masks must be recovered).
    config = SecAggConfig(n_clients=5, threshold=3, clip_range=4.0)
    rng = np.random.default_rng(0)
    inputs = {s: rng.uniform(-1, 1, size=33) for s in range(5)}
    server = SecAggServer(config=config, round_index=2, site_ids=list(inputs), dim=33)
    clients = {s: SecAggClient(site_id=s, config=config, round_index=2, dim=33) for s in inputs}

    # Execute: export and restore every client between every step.
    for s in inputs:
        server.receive_advertise_keys(clients[s].advertise_keys())
        clients[s] = _hop(clients[s], config)
    keys = server.public_keys()
    for s in inputs:
        server.receive_encrypted_shares(clients[s].share_keys(keys))
        clients[s] = _hop(clients[s], config)
    for s, relay in server.relay_shares().items():
        if s in drop_before_upload:
            continue
        server.receive_masked_input(clients[s].masked_input(relay, values=inputs[s]))
        clients[s] = _hop(clients[s], config)
    request = server.unmask_request()
    for s in server.survivors:
        server.receive_unmask_shares(clients[s].unmask(request))
    total = server.aggregate()

    # Assert: the survivors' sum, to the fixed-point quantum.
    expected = sum(v for s, v in inputs.items() if s not in drop_before_upload)
    assert np.allclose(total, expected, atol=len(inputs) * config.codec.quantum)
    assert set(server.dropped) == set(drop_before_upload)


def test_state_holds_no_input_and_refuses_tampering() -> None:
    config = SecAggConfig(n_clients=3, threshold=2)
    client = SecAggClient(site_id=1, config=config, round_index=1, dim=4)
    client.advertise_keys()
    state = json.loads(client.export_state())
    assert state["phase"] == "SHARE" and "values" not in state

    state["version"] = 99
    with pytest.raises(ProtocolError, match="cannot be restored"):
        SecAggClient.from_state(json.dumps(state).encode(), config=config)
    with pytest.raises(ProtocolError, match="cannot be restored"):
        SecAggClient.from_state(b"{not json", config=config)


def test_a_restored_client_keeps_its_phase() -> None:
    config = SecAggConfig(n_clients=3, threshold=2)
    client = SecAggClient(site_id=0, config=config, round_index=1, dim=4)
    client.advertise_keys()
    again = SecAggClient.from_state(client.export_state(), config=config)
    with pytest.raises(ProtocolError, match="phase SHARE"):
        again.advertise_keys()
