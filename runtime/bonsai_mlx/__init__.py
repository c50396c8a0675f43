"""Minimal MLX runtime for Bonsai FLUX.2 [klein] bundles (no torch): load a bundle, generate an image.

Import this package before `mlx` itself: on Linux it first loads an optimized BLAS for MLX's CPU backend
(bonsai_mlx/blas.py), which only takes effect when it is loaded before MLX.
"""

from .blas import load_fast_blas

load_fast_blas()

from .pipeline import GenerationResult, MLXPipeline, load_pipeline  # noqa: E402

__all__ = ["GenerationResult", "MLXPipeline", "load_pipeline"]
