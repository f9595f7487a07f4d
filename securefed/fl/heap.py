"""Keep the C heap from hoarding freed tensor memory during in-process training.

Why: DP-SGD allocates many tensors of a few to tens of MB whose sizes change every step
(Poisson batches differ in size). glibc's malloc serves a block from the heap when it is under
the mmap threshold, and raises that threshold (up to 32 MB) each time a larger block is
freed; after the first steps these tensors all came from the heap, whose freed holes glibc
keeps: the quick start's resident memory grew round after round to 2.7 GB (docs/memory.md).
Fixing the threshold at glibc's own starting value (128 KiB) turns the raising off: every
larger block is mapped on its own and unmapped when freed. It changes no computed value; the
page faults of fresh mappings cost system time (5 to 7 % more wall time for the quick start on
the development machine, for 1.1 GB less peak memory). Elsewhere (macOS, musl) this is a
no-op, as it is when the user set ``MALLOC_MMAP_THRESHOLD_`` themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

__all__ = ["MMAP_THRESHOLD", "limit_heap_retention"]

#: Blocks at least this large are mapped and unmapped on their own (glibc's initial value).
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


@functools.cache
def limit_heap_retention() -> bool:
    """Fix glibc's mmap threshold for this process (once); False where it was not set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
