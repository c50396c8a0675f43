"""Minimal MLX runtime for Bonsai FLUX.2 [klein] bundles (no torch): load a bundle, generate an image."""

from .pipeline import GenerationResult, MLXPipeline, load_pipeline

__all__ = ["GenerationResult", "MLXPipeline", "load_pipeline"]
