"""MLX on the CPU device: the optimized BLAS is loaded, and low-bit layers run as dequantize + matmul."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bonsai_mlx  # noqa: F401  (first: loads the BLAS before MLX)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from bonsai_mlx import blas
from bonsai_mlx.cpu_layers import DequantizedLinear, use_dense_kernels

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_openblas_copy_exports_cblas_names():
    source = blas.find_openblas()
    if source is None:
        pytest.skip("scipy-openblas32 not installed")
    data, renamed = blas.unprefix_exports(source.read_bytes())
    assert renamed > 1000
    assert blas.loaded_blas() is not None
    import ctypes

    library = ctypes.CDLL(blas.loaded_blas())
    for name in ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm", "sgetrf_"):
        assert getattr(library, name)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_mlx_matmul_correct_with_loaded_blas():
    """In a fresh process (bonsai_mlx imported before mlx): the BLAS is in the process and matmuls are right."""
    code = (
        "import bonsai_mlx, numpy as np, mlx.core as mx\n"
        "from bonsai_mlx import blas\n"
        "assert blas.loaded_blas(), 'no BLAS loaded'\n"
        "assert blas.loaded_blas() in open('/proc/self/maps').read()\n"
        "rng = np.random.default_rng(0)\n"
        "a = rng.standard_normal((300, 520), dtype=np.float32); b = rng.standard_normal((520, 130), dtype=np.float32)\n"
        "c = np.array(mx.array(a) @ mx.array(b))\n"
        "ref = a.astype(np.float64) @ b.astype(np.float64)\n"
        "assert np.abs(c - ref).max() < 1e-3, np.abs(c - ref).max()\n"
    )
    env = {"PYTHONPATH": str(RUNTIME), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def exact_layer(bits: int, rows: int = 64, cols: int = 256, seed: int = 0) -> tuple[nn.QuantizedLinear, np.ndarray]:
    """A QuantizedLinear holding exact binary (1-bit) / ternary (2-bit) weights built from codes, and the weights."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.01, 0.06, size=(rows, cols // 128)).astype(np.float32)
    if bits == 1:
        signs = rng.choice([-1.0, 1.0], size=(rows, cols)).astype(np.float32)
        dense = signs * np.repeat(scales, 128, axis=1)
        codes, q_scales, q_biases = (signs + 1) / 2, 2 * scales, -scales
    else:
        trits = rng.choice([-1.0, 0.0, 1.0], size=(rows, cols)).astype(np.float32)
        dense = trits * np.repeat(scales, 128, axis=1)
        codes, q_scales, q_biases = trits + 1, scales, -scales
    per_word = 32 // bits
    fields = codes.astype(np.uint32).reshape(rows, cols // per_word, per_word)
    words = np.zeros((rows, cols // per_word), dtype=np.uint32)
    for i in range(per_word):
        words |= fields[:, :, i] << np.uint32(i * bits)
    layer = nn.QuantizedLinear(cols, rows, bias=False, group_size=128, bits=bits)
    layer.weight, layer.scales, layer.biases = mx.array(words), mx.array(q_scales), mx.array(q_biases)
    return layer, dense


@pytest.mark.parametrize("bits", [1, 2])
def test_dequantized_linear_same_weights_and_outputs(bits):
    layer, dense = exact_layer(bits)
    weight = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=128, bits=bits)
    assert np.array_equal(np.array(weight), dense)  # the exact binary / ternary weights, element for element
    x = mx.array(np.random.default_rng(1).standard_normal((5, 17, 256), dtype=np.float32))
    quantized = np.array(layer(x))
    layer.__class__ = DequantizedLinear
    dequantized = np.array(layer(x))
    reference = np.array(x).astype(np.float64) @ dense.T.astype(np.float64)
    # Same values up to fp32 summation order: both as close to the float64 product.
    scale = np.abs(reference).max()
    assert np.abs(dequantized - quantized).max() <= 1e-5 * scale
    assert np.abs(dequantized - reference).max() <= 1e-5 * scale


def test_use_dense_kernels_swaps_only_on_cpu():
    model = nn.Sequential(nn.Linear(256, 64, bias=False), nn.Linear(64, 64, bias=False))
    nn.quantize(model, group_size=64, bits=4)
    assert use_dense_kernels(model, mx.gpu) == 0
    assert use_dense_kernels(model, mx.cpu) == 2
    assert all(type(m) is DequantizedLinear for m in model.layers)
