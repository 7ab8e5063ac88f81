"""The process's memory allocator, set for loops that make and free the same large buffers batch after batch
(generation, training): page faults on fresh memory otherwise cost the CPU a large share of the work."""

from __future__ import annotations

import ctypes
import os


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for the next batch instead of handing it back to the OS and faulting
    its pages in again (mallopt, as the MALLOC_*_ environment variables would at start-up): every buffer comes
    from the heap, however large (no mmap: buffers over 32 MiB, a paper-preset batch of 64, would otherwise be
    fresh zeroed pages every time), and freed memory stays there. Process-wide, so called at the edges: the
    `calofm` command line (every command) and `generate_to_file`. benchmarks/generation.md measures it. A no-op
    off glibc, or with CALOFM_MALLOPT=0 (for comparison)."""
    if os.environ.get("CALOFM_MALLOPT") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # malloc.h; mallopt takes C ints (< 2 GiB)
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    libc.mallopt(m_top_pad, 256 << 20)
