"""Shared by the GPU-only scripts (gemlite_gpu_check.py, bench_cuda.py): a clean one-line exit without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path


def fail(message: str) -> None:
    """One line on stderr naming the script, exit 2."""
    print(f"{Path(sys.argv[0]).stem}: {message}", file=sys.stderr)
    raise SystemExit(2)


def require_gpu(doing: str = "nothing was run"):
    """torch and gemlite, or a one-line exit."""
    try:
        import torch
    except ImportError:
        fail("torch is not installed")
    if not torch.cuda.is_available():
        fail(f"needs a CUDA GPU (torch.cuda.is_available() is False); {doing}")
    try:
        import gemlite
    except Exception as error:  # gemlite raises various errors when triton/CUDA are unusable
        fail(f"cannot import gemlite ({type(error).__name__}: {error}); install gemlite==0.6.0.post2")
    return torch, gemlite
