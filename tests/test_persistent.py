"""The per-site persistent store: ConfigRecord values only, once-only claims, Flower round trip."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from securefed import persistent
from securefed.errors import ProtocolError


def test_a_claim_is_refused_the_second_time_and_survives_a_round_trip_through_context_state():
    # Without the store in context.state, a fresh site process would forget what it did.
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    store = persistent.load(context)
    store.claim_once("mask.rounds", 3, what="round 3")
    persistent.save(context, store)
    again = persistent.load(context)
    assert again.to_dict() == {"mask.rounds": [3]}
    with pytest.raises(ProtocolError, match="already done once"):
        again.claim_once("mask.rounds", 3, what="round 3")
    again.claim_once("mask.rounds", 4, what="round 4")
    assert again["mask.rounds"] == [3, 4]


@pytest.mark.parametrize("value", [{"a": 1}, [1, "x"], [[1]], None])
def test_values_flower_cannot_hold_are_refused(value):
    with pytest.raises(ProtocolError, match="persistent store"):
        persistent.PersistentStore()["key"] = value


def test_a_site_files_its_state_0600_in_a_0700_folder_and_reads_it_back(tmp_path):
    # Without the file a restarted SuperNode (context.state in memory only) forgets it all.
    key = tmp_path / "site0.signing.key"
    session = "ab" * 32
    path = persistent.state_path({"signing-key": str(key)}, session)
    assert path == tmp_path / "site0.signing.key.state" / f"{session}.json"
    assert persistent.read_site_file(path, session) == (persistent.PersistentStore(), None)
    store = persistent.PersistentStore({"fit.rounds": [1, 2], "ckks.decryptions": 3, "k": b"\x01"})
    events = [{"round": 1, "phase": "federated", "steps": 4}]
    persistent.write_site_file(path, session, store, events)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert not path.with_name(path.name + ".tmp").exists()
    again, ledger = persistent.read_site_file(path, session)
    assert again.to_dict() == store.to_dict() and ledger == events


def test_a_site_without_a_signing_key_has_no_state_file():
    assert persistent.state_path({"site-id": 0}, "ab" * 32) is None


@pytest.mark.parametrize(
    "body",
    [
        "{not json",
        '{"session": "%s", "store": {"fit.rounds": [1, "x"]}, "ledger": null}',
        '{"session": "%s", "store": {}, "ledger": "all of it"}',
        '{"session": "cd", "store": {"fit.rounds": [1]}, "ledger": null}',
    ],
)
def test_a_corrupt_or_foreign_state_file_is_refused_not_forgotten(tmp_path, body):
    # Treating it as empty would let the server re-run every round the site did.
    from securefed.errors import ConfigError

    session = "ab" * 32
    path = tmp_path / "k.state" / f"{session}.json"
    path.parent.mkdir()
    path.write_text(body.replace("%s", session))
    with pytest.raises(ConfigError, match="run state is corrupt") as info:
        persistent.read_site_file(path, session)
    assert "\n" not in str(info.value)


def test_a_context_record_of_another_session_is_ignored():
    # The server picks the Flower run a run joins: a record another run left is not this one's.
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    store = persistent.PersistentStore({"fit.rounds": [1]})
    persistent.save(context, store, "aa")
    assert persistent.load(context, "aa").to_dict() == {"fit.rounds": [1]}
    assert persistent.load(context, "bb").to_dict() == {}


def test_the_session_lock_is_private_to_the_site_and_taken_by_one_holder_at_a_time(tmp_path):
    import fcntl
    import os
    import stat

    path = tmp_path / "key.state" / "ab.json"
    with persistent.site_lock(path):
        lock = path.with_name("ab.json.lock")
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        # Another open file (another process's) cannot take it while it is held.
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the step ended
    finally:
        os.close(fd)
    with persistent.site_lock(None):  # no signing key: no disk state, nothing to lock
        pass
