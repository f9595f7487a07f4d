"""glibc malloc settings that keep a training step's freed memory for the next step.

PyTorch's CPU tensors come from ``malloc``. With glibc's defaults a block above the mmap
threshold (dynamic: 128 KiB, raised to the largest block freed so far, at most 32 MiB) is a
fresh ``mmap`` each time, and free memory at the top of the heap above the trim threshold
(twice the mmap threshold) goes back to the kernel at once. A DP-SGD step allocates and frees
activations and per-sample gradients (a few MiB each) for every chunk, so with the defaults
the kernel hands out, zeroes and takes back pages again and again: the quick start took 1.9
to 9.1 million minor page faults and 4.7 to 22 s of system CPU in the runs measured. Holding
freed memory instead makes a round cheaper, most of all on virtual machines, where a page
fault costs more: on the 2-core development VM the quick start took about 0.15 million page
faults and its rounds 17 to 25 % less time in two alternating pairs of runs (``python
benchmarks/malloc_tuning.py``, docs/benchmarks.md, "Page faults").

What is set (``mallopt``, process-wide, only on Linux with glibc):

- ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's own ceiling for its dynamic threshold; glibc before
  2.35 refuses more): blocks below it come from the heap, where a freed block is reused
  without a page fault; larger ones (3D volumes) are still mapped and unmapped alone;
- ``M_TRIM_THRESHOLD`` = 512 MiB: free memory at the top of the heap is returned to the
  kernel only above it.

The cost: memory freed after a peak is kept (up to the trim threshold) instead of returned;
the peak itself is what the step needs, as before (the quick start's peak RSS is in the
README). Nothing is set when the user chose an allocator or glibc settings of their own
(an ``LD_PRELOAD`` naming a malloc, ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``, or one of
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
``MALLOC_MMAP_MAX_``, ``MALLOC_ARENA_MAX``), or when ``SECUREFED_MALLOC`` is ``system``; any
other value than ``system`` or ``tuned`` also keeps glibc's defaults, and the command says so
on stderr. ``securefed``'s commands, a deployed site's ClientApp process (the executor, or a
stock ``flwr-clientapp`` importing :mod:`securefed.deploy.site_app`) and the training children
of ``securefed bench`` call :func:`tune_malloc` when they start; a Python program that trains
through the API is left as it is, and may call it too.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 512 << 20

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# glibc's own variables for the two thresholds and their neighbours: a user's setting wins.
_MALLOC_VARS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_ARENA_MAX",
)
_OPT_OUT = "SECUREFED_MALLOC"

_applied: str | None = None


def tune_malloc() -> str:
    """Set glibc's mmap and trim thresholds for training, once per process.

    Returns:
        What was done, in a few words: ``"tuned"`` (the thresholds were set now or by an
        earlier call), or why not (``"not glibc"``, ``"user setting: NAME"``,
        ``"SECUREFED_MALLOC=system"``, ``"mallopt refused"``, or ``"unknown
        SECUREFED_MALLOC=...: ..."`` for a value that is neither ``system`` nor ``tuned``).

    """
    global _applied
    if _applied is None:
        _applied = _tune()
    return _applied


def _glibc() -> bool:
    try:  # a constant lookup; platform.libc_ver() would read the interpreter's binary
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def _tune() -> str:
    choice = os.environ.get(_OPT_OUT, "").strip().lower()
    if choice == "system":
        return f"{_OPT_OUT}=system"
    if choice not in ("", "tuned"):
        # Unrecognized: the conservative reading is "leave the allocator alone".
        return f"unknown {_OPT_OUT}={choice!r} (system or tuned): glibc's defaults kept"
    for name in _MALLOC_VARS:
        if name in os.environ:
            return f"user setting: {name}"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "user setting: GLIBC_TUNABLES"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc...
        return "user setting: LD_PRELOAD"
    if not sys.platform.startswith("linux") or not _glibc():
        return "not glibc"
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not glibc"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success. The mmap threshold first: a refused one changes nothing,
    # while a trim threshold set alone would fix the mmap threshold at glibc's 128 KiB
    # (setting either ends glibc's dynamic threshold), worse than the defaults.
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return "mallopt refused"
    if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "mallopt refused"
    return "tuned"
