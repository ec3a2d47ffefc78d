"""Process memory on glibc: freed buffers handed back to the OS (elsewhere these do nothing).

glibc keeps freed heap memory resident, so a process that frees big buffers (a loader dropping each part's
fp32 tensors, a sampler's prefill activations) would otherwise peak above what it holds.
"""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """Hand the pages of freed heap buffers back to the OS (glibc's malloc_trim)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def map_big_buffers() -> None:
    """Keep every buffer of 256 KiB or more in its own mapping, returned to the OS when freed (glibc's
    mallopt M_MMAP_THRESHOLD). glibc raises that threshold each time a big buffer is freed, after which
    buffers of that size come from the heap and stay resident: a batch-8 prefill's activations then added
    15-25 MB to sampling's peak that nothing used again (measured, bench/RESULTS.md). Process-wide."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 256 * 1024)  # -3: M_MMAP_THRESHOLD; a fixed value also stops the raising


def _libc():
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None
