"""Keep freed memory in the process for MLX's Linux CPU backend, so that each op does not fault in fresh pages.

On Linux MLX allocates CPU buffers with plain `malloc` and frees them as soon as their last user is gone (it has
no buffer cache there: `mx.get_cache_memory()` stays 0). glibc serves every request above its mmap threshold (at
most 32 MB) with a fresh `mmap` and returns it with `munmap` on free; MLX evaluates on its own thread, whose
arena cannot hold a block above 64 MB at all. So every activation or dequantized weight of a Klein layer (tens to
hundreds of MB) is new memory that the kernel zero-fills page by page as the op first writes it: a 113 MB fp32
`x + x` took 85 ms that way against 21 ms on reused memory (4.0 against 1.4 ns per element at 16 M elements;
a 1-bit layer's dequantize 160 against 77 ms; scripts/bench_runtime.py has the per-step effect).

`keep_freed_memory()` asks glibc (`mallopt`) to serve blocks up to MMAP_THRESHOLD from one arena (the main,
`brk`-grown heap, shared by every thread) and to give memory back to the system only when more than
TRIM_THRESHOLD is free at the heap's top. Freed blocks are then reused by the next op of the same size, which is
the pattern of a denoising step. The cost: up to TRIM_THRESHOLD of freed memory stays resident, and one arena
means one lock (MLX's CPU work is a single stream thread; BLAS threads do not allocate).

Called when `bonsai_mlx` is imported, before MLX starts its threads (their arenas are chosen on their first
allocation); `BONSAI_MLX_MALLOC=0` turns it off. Other C libraries than glibc, and macOS, are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 1 << 30  # blocks above 1 GB still get their own mapping (returned to the system on free)
TRIM_THRESHOLD = 1 << 30

_applied: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Apply the glibc settings above once; returns whether they are in effect."""
    if "done" in _applied:
        return _applied["done"]
    _applied["done"] = False
    if not sys.platform.startswith("linux") or os.environ.get("BONSAI_MLX_MALLOC", "") == "0":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _applied["done"] = all(mallopt(parameter, value) == 1 for parameter, value in settings)
    return _applied["done"]


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory` is in effect in this process."""
    return _applied.get("done", False)
