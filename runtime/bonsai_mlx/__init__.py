"""Minimal MLX runtime for Bonsai FLUX.2 [klein] bundles (no torch): load a bundle, generate an image.

`import bonsai_mlx` changes nothing in the process and does not import MLX. On Linux, call `enable_cpu_speedups()`
first thing, before MLX is imported (`bonsai-convert generate` / `verify`, the benchmarks and the test suite do):
it loads an optimized BLAS for MLX's CPU backend (blas.py) and makes glibc keep freed memory for reuse
(allocator.py); both only take full effect before MLX is loaded.
"""

from __future__ import annotations

import sys

from .allocator import keep_freed_memory
from .blas import load_fast_blas

__all__ = ["GenerationResult", "MLXPipeline", "enable_cpu_speedups", "load_pipeline"]


def enable_cpu_speedups() -> dict[str, object]:
    """Load the fast BLAS and keep freed memory (Linux; no-ops elsewhere and when called again).

    Returns what is in effect: the BLAS path (None: MLX's own), whether freed memory is kept, and whether MLX was
    already imported (then the BLAS may not be the one MLX calls).
    """
    mlx_was_imported = "mlx.core" in sys.modules
    kept = keep_freed_memory()
    return {"blas": load_fast_blas(), "keep_freed_memory": kept, "mlx_was_imported": mlx_was_imported}


def __getattr__(name: str):
    """The pipeline API, imported (with MLX) on first use."""
    if name in ("GenerationResult", "MLXPipeline", "load_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'bonsai_mlx' has no attribute {name!r}")
