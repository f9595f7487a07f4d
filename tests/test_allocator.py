"""securefed.allocator: glibc keeps a training step's freed memory instead of remapping it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from securefed.allocator import _glibc

# musl raises inside confstr and macOS lacks the name: _glibc() answers False for both.
GLIBC = sys.platform.startswith("linux") and _glibc()

# Allocates and frees a 16 MiB block, then reports where glibc put it: mmapped blocks are
# mapped afresh (and zero-filled page by page) on every allocation.
_PROBE = r"""
import ctypes, json, sys
from securefed import allocator
state = allocator.tune_malloc() if sys.argv[1] == "tune" else None
if sys.argv[1] == "cli":  # what the command itself did: nothing here calls tune_malloc
    from click.testing import CliRunner
    from securefed.cli import cli
    result = CliRunner().invoke(cli, ["audit", "--help"])
    assert result.exit_code == 0, result.output
    state = allocator._applied
if sys.argv[1] == "executor":  # a site executor refused at once (not a loopback address)
    from securefed.deploy import executor
    assert executor.main(["--runtime-api-address", "192.0.2.1:9094"]) == 2
    state = allocator._applied
if sys.argv[1] == "site_app":  # a stock flwr-clientapp process importing the ClientApp
    import securefed.deploy.site_app  # noqa: F401
    state = allocator._applied
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = libc.mallinfo2().hblkhd
p = libc.malloc(16 << 20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(p)
kept = libc.mallinfo2().arena
print(json.dumps({"state": state, "mapped": mapped, "arena_after_free": kept}))
"""


def _probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("GLIBC_TUNABLES", None)
    clean.pop("SECUREFED_MALLOC", None)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only exists on Linux with glibc")
def test_a_tuned_process_serves_and_keeps_a_step_sized_block_from_its_heap():
    untuned = _probe("none")
    tuned = _probe("tune")
    # glibc's default maps a 16 MiB block afresh (a page fault per page on every step) ...
    assert untuned["state"] is None and untuned["mapped"] >= 16 << 20
    # ... the tuned one serves it from the heap and keeps it after the free.
    assert tuned["state"] == "tuned"
    assert tuned["mapped"] == 0
    assert tuned["arena_after_free"] >= 16 << 20


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only exists on Linux with glibc")
@pytest.mark.parametrize("entry", ["cli", "executor", "site_app"])
def test_every_training_entry_point_tunes_on_start(entry):
    got = _probe(entry)
    assert got["state"] == "tuned"
    assert got["mapped"] == 0


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only exists on Linux with glibc")
@pytest.mark.parametrize(
    ("env", "state"),
    [
        ({"SECUREFED_MALLOC": "system"}, "SECUREFED_MALLOC=system"),
        ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "user setting: MALLOC_TRIM_THRESHOLD_"),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}, "user setting: GLIBC_TUNABLES"),
        ({"MALLOC_ARENA_MAX": "2"}, "user setting: MALLOC_ARENA_MAX"),
        (
            {"SECUREFED_MALLOC": "off"},
            "unknown SECUREFED_MALLOC='off' (system or tuned): glibc's defaults kept",
        ),
    ],
)
def test_a_users_own_setting_or_opt_out_is_left_alone(env, state):
    got = _probe("tune", **env)
    assert got["state"] == state
    # Nothing was set: glibc's behaviour (or the user's) stands.
    assert got["mapped"] >= 16 << 20


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only exists on Linux with glibc")
def test_unrelated_glibc_tunables_do_not_stop_the_tuning():
    got = _probe("tune", GLIBC_TUNABLES="glibc.pthread.mutex_spin_count=100")
    assert got["state"] == "tuned" and got["mapped"] == 0


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only exists on Linux with glibc")
def test_an_unknown_opt_out_value_is_said_on_stderr(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["SECUREFED_MALLOC"] = "of"
    out = subprocess.run(
        [sys.executable, "-m", "securefed.cli", "audit", str(tmp_path / "missing")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "warning: unknown SECUREFED_MALLOC='of'" in out.stderr
