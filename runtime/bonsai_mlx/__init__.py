"""Minimal MLX runtime for Bonsai FLUX.2 [klein] bundles (no torch): load a bundle, generate an image.

Import this package before `mlx` itself: on Linux it first loads an optimized BLAS for MLX's CPU backend
(bonsai_mlx/blas.py) and makes glibc keep freed memory for reuse (bonsai_mlx/allocator.py); both only take full
effect before MLX is loaded.
"""

from .allocator import keep_freed_memory
from .blas import load_fast_blas

keep_freed_memory()
load_fast_blas()

from .pipeline import GenerationResult, MLXPipeline, load_pipeline  # noqa: E402

__all__ = ["GenerationResult", "MLXPipeline", "load_pipeline"]
