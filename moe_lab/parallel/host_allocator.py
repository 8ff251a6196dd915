"""Host memory allocator tuning for XLA:CPU (glibc malloc), applied by the `moe-lab`
command-line entry point (`moe_lab/cli/main.py` main()) and by the benchmarks
(`moe_lab/bench/__init__.py` run_benchmark) before their jax work, and by
tests/conftest.py for the test suite; importing moe_lab changes nothing.

Why: XLA:CPU allocates every step's temporaries and outputs with malloc.  glibc
serves any block above its mmap threshold (at most 32 MiB) with a fresh mmap and
unmaps it on free, and per-thread arenas give memory back with MADV_DONTNEED, so
every large buffer of every step is page-faulted and zero-filled by the kernel
again; one arena, no mmap and no trimming remove those faults and make the large
MoE layers markedly faster on CPU (page faults, bandwidth and timings, with the
command: experiments/host_allocator/README.md).  This is the same fix as the
tcmalloc preload that TPU-VM and MaxText setups use, done with glibc's own
`mallopt` so nothing has to be installed.

Trade-off: freed memory stays in the process (up to the trim threshold, 2 GiB
above the heap top) instead of going back to the OS, and one arena serialises
small mallocs across threads (negligible next to XLA's own buffer reuse).
Opt out with MOE_LAB_SYSTEM_MALLOC=1.  No effect off glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # largest value mallopt's int accepts

_applied: bool | None = None


def tune_host_allocator() -> bool:
    """Apply the glibc settings once per process; True if they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MOE_LAB_SYSTEM_MALLOC", "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(
        mallopt(_M_ARENA_MAX, 1)
        and mallopt(_M_MMAP_MAX, 0)
        and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )
    return _applied
