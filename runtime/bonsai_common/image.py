"""Image comparison: PSNR as Apple's ml-stable-diffusion computes it, and the Bonsai demo's sanity check."""

from __future__ import annotations

import numpy as np


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """20·log10((max|ref| + 1e-5) / (RMSE + 1e-10)) over float64 copies of the arrays (same shape required)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(test, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"psnr: shapes differ: {ref.shape} vs {out.shape}")
    rmse = float(np.sqrt(np.mean((ref - out) ** 2)))
    peak = float(np.abs(ref).max())
    return float(20.0 * np.log10((peak + 1e-5) / (rmse + 1e-10)))


def is_sane(image_uint8: np.ndarray) -> bool:
    """True unless the image is (nearly) black or flat: mean pixel > 5 and standard deviation > 15."""
    pixels = np.asarray(image_uint8, dtype=np.float64)
    return bool(pixels.mean() > 5.0 and pixels.std() > 15.0)
