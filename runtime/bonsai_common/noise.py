"""The shared initial latents: torch and MLX generators differ, so every runtime draws the noise with numpy."""

from __future__ import annotations

import numpy as np

LATENT_CHANNELS = 128  # 32 VAE latent channels × the 2×2 patchify
PIXELS_PER_LATENT = 16  # VAE 8× downsampling × 2×2 patchify


def initial_noise(seed: int, height: int, width: int, channels: int = LATENT_CHANNELS) -> np.ndarray:
    """Standard-normal float32 latents (1, channels, height // 16, width // 16), NCHW, from numpy's PCG64."""
    shape = (1, channels, height // PIXELS_PER_LATENT, width // PIXELS_PER_LATENT)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
