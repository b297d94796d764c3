"""``keep_freed_memory()``: let glibc's malloc keep the memory a training step frees for the next step.

A CPU training step allocates and frees the same few hundred MB every step (activations, gradients,
2-8 MB per tensor for the default model). By default glibc serves blocks that large with fresh ``mmap``s,
or trims the heap back to the kernel once they are freed, so every step faults the same pages in again
(~3,400 page faults a step for sem_small at 16 x 128 on 2 threads, ~12 ms of kernel time, and each new
page arrives cold in the cache). Raising the mmap threshold to 32 MiB (glibc's ceiling) and the trim
threshold to 1 GiB keeps freed blocks in the heap: ~450 faults and ~2 ms a step, 1.04x the step's
speed (``python -m bench.allocator``, BENCHMARKS.md). The process's resident memory then stays at its
peak instead of shrinking between steps, which a training process reaches every step anyway. A no-op
where the C library is not glibc (macOS, Windows, musl) or with ``SEM_MALLOC_TUNING=0``. Plain Python.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30
ENV = "SEM_MALLOC_TUNING"


def keep_freed_memory() -> str | None:
    """Set glibc's mmap and trim thresholds for this process (once is enough; again is harmless).
    Returns what was set, for the run's log, or None where nothing was (not glibc, or turned off)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return None
    if not ok:
        return None
    return (f"malloc: freed blocks kept for reuse (glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
            f"{TRIM_THRESHOLD >> 20} MiB; {ENV}=0 leaves glibc's defaults)")
