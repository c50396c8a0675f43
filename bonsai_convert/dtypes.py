"""Exact float conversions shared by codecs and targets: bf16 bit patterns, refusing anything not held exactly."""

from __future__ import annotations

import numpy as np

from .errors import InputError


def to_bf16_exact(name: str, values: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of float values, refusing any value bf16 cannot hold exactly (or non-finite)."""
    wide = np.ascontiguousarray(values, dtype=np.float32)
    if not np.isfinite(wide).all():
        index = np.unravel_index(int(np.argmin(np.isfinite(wide))), wide.shape)
        raise InputError(f"{name}: non-finite value {wide[index]} at index {tuple(int(i) for i in index)}")
    bits = wide.view(np.uint32)
    inexact = (bits & 0xFFFF) != 0
    if inexact.any():
        index = np.unravel_index(int(np.argmax(inexact)), wide.shape)
        raise InputError(
            f"{name}: value {wide[index]!r} at index {tuple(int(i) for i in index)} is not exact in bf16 "
            "(use --dtype float16 for an fp16 bundle)"
        )
    return (bits >> 16).astype(np.uint16)


def widen(values: np.ndarray, float_dtype: str) -> np.ndarray:
    """An encoded dense tensor back to float32 values (bf16 bits widened exactly)."""
    if float_dtype == "BF16" and values.dtype == np.uint16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values


def widen_bf16_rows(stored: np.ndarray) -> np.ndarray:
    """float32 values of bf16 bit patterns (exact); the compiled pass writes them into this thread's reused buffer
    (valid until its next call), the reference path (BONSAI_CONVERT_REFERENCE=1) into a fresh array."""
    from . import kernels

    if not kernels.ENABLED:
        return (np.asarray(stored, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    values = kernels.scratch("widened", stored.shape, np.uint32)
    kernels.widen_bf16(np.ascontiguousarray(stored).reshape(-1), values.reshape(-1))
    return values.view(np.float32)
