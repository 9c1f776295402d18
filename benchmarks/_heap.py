"""glibc heap settings for the CPU benchmarks' memory measurements (Linux with glibc only).

The resident set follows the live tensors only when glibc maps large blocks on their own and trims
its heap at once; that setting also makes every timed call page-fault, so the benchmarks measure
memory first with :func:`release_cpu_memory_eagerly`, then time with :func:`reuse_cpu_memory`.
Benchmark internals: not part of the library.
"""

from __future__ import annotations

import ctypes
import sys

MIB = 2**20


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def release_cpu_memory_eagerly() -> bool:
    """Memory phase: glibc maps every block >= 64 KiB on its own and trims its heap at once, so the
    resident set follows the live tensors. Call it before anything big is allocated: once a heap
    has served large blocks, its pages stay scattered and inflate later measurements.

    Process-wide; returns whether it took effect (glibc only).
    """
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) == 1
                and libc.mallopt(M_TRIM_THRESHOLD, 0) == 1)


def reuse_cpu_memory() -> None:
    """Timing phase: blocks under 32 MiB come from the heap again and freed memory is kept for
    reuse, as glibc's dynamic threshold settles in a long-running process (mapping every block
    would add page faults that no user's process pays). Measure memory before calling it.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 32 * MIB)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * MIB)


