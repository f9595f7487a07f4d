"""securefed.fl.heap: freed tensor-sized blocks go back to the system, not into the heap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Allocates 24 blocks of 6 MB (touched), frees every other one, and prints how much resident
# memory that gave back. Blocks in the heap's middle stay resident when freed; mapped ones
# do not. A 20 MB block freed first is what makes glibc raise its threshold above 6 MB.
_PROBE = """
import ctypes, sys
from securefed.fl.heap import limit_heap_retention
print(limit_heap_retention())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
def block(n):
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    return p
libc.free(block(20 << 20))
blocks = [block(6 << 20) for _ in range(24)]
before = rss()
for p in blocks[::2]:
    libc.free(p)
print((before - rss()) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_blocks_leave_resident_memory():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    applied, released_mb = proc.stdout.split()
    if applied != "True":
        pytest.skip("not glibc")
    # 12 blocks of 6 MB were freed: nearly all of it must leave resident memory.
    assert int(released_mb) >= 60
