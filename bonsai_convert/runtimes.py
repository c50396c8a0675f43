"""Dispatch generation to the reference runtime of a bundle's target (runtime/ packages; they never import us)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError
from .vocabulary import MLX_TARGETS


@dataclass
class RuntimeOutput:
    image: np.ndarray  # uint8 (H, W, 3)
    latents: np.ndarray  # float32 (1, 128, H/16, W/16)
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    truncated: bool = False
    backend: str = ""


def enable_runtime_speedups() -> None:
    """Process-wide settings the MLX runtime needs on Linux CPU (fast BLAS, freed memory kept), applied before
    anything imports MLX: the `generate` and `verify` commands call it first."""
    try:
        import bonsai_mlx
    except ImportError:  # MLX's runtime is not installed: nothing to set up
        return
    bonsai_mlx.enable_cpu_speedups()


def generate(
    bundle: Path,
    target: str,
    prompt: str,
    seed: int,
    steps: int | None,
    width: int | None,
    height: int | None,
    noise: np.ndarray | None = None,
    dtype: str | None = None,
    on_step=None,
) -> RuntimeOutput:
    """Run the target's reference runtime on a bundle."""
    if target in MLX_TARGETS:
        import bonsai_mlx

        bonsai_mlx.enable_cpu_speedups()  # a no-op when the command already did it before anything imported MLX
        import mlx.core as mx
        from bonsai_mlx import load_pipeline

        if dtype is None and mx.default_device() == mx.cpu:
            dtype = "float32"  # MLX's CPU backend has no fast fp16 kernels (a 1-bit fp16 matmul is ~40x slower)
        pipeline = load_pipeline(bundle, dtype=dtype)
        result = pipeline.generate(
            prompt, seed=seed, steps=steps, width=width, height=height, noise=noise, on_step=on_step
        )
        return RuntimeOutput(
            result.image, result.latents, result.step_seconds, result.peak_memory_bytes, result.truncated, "mlx"
        )
    if target == "cuda":
        import json
        import time

        import torch
        from bonsai_cuda import generate as cuda_generate
        from bonsai_cuda import load_pipeline

        settings = json.loads((Path(bundle) / "pipeline.json").read_text())
        torch_dtype = getattr(torch, dtype) if dtype else None
        pipe = load_pipeline(bundle, dtype=torch_dtype)
        width = int(width or settings["width"])
        height = int(height or settings["height"])
        steps = int(steps or settings["num_inference_steps"])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = cuda_generate(pipe, prompt, seed, steps, width, height, noise=noise)
        seconds = time.perf_counter() - start
        peak = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
        backend = getattr(pipe, "bonsai_backend", "cuda")
        return RuntimeOutput(result.image, result.latents, [seconds / steps] * steps, peak, False, str(backend))
    if target == "gguf":
        raise UsageError(
            "target 'gguf' has no runtime here: it is for stable-diffusion.cpp / ggml (formats/gguf.md); "
            "pack the bundle for iphone/ipad/mac/cuda to generate with bonsai-convert"
        )
    raise UsageError(f"target {target!r} has no runtime (a packed bundle is a source: pack it for a device first)")
