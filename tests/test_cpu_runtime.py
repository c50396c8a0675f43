"""MLX on the CPU device: the optimized BLAS is loaded, and low-bit layers run as dequantize + matmul."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx  # after conftest's bonsai_mlx.enable_cpu_speedups()
import mlx.nn as nn
import numpy as np
import pytest
from bonsai_mlx import blas
from bonsai_mlx.cpu_layers import DequantizedLinear, use_dense_kernels
from bonsai_mlx.staging import staged

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
    """In a fresh process (speed-ups enabled before mlx is imported): the BLAS is in the process, matmuls right."""
    code = (
        "import bonsai_mlx; bonsai_mlx.enable_cpu_speedups()\n"
        "import numpy as np, mlx.core as mx\n"
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


def test_cpu_silu_and_attention_at_extreme_inputs_are_their_limits_without_warnings():
    """numpy's exp overflows to inf for silu's exp(−x) below −88: silu is then −0 (its limit), not NaN, and no
    overflow warning escapes; attention over scores 10⁴ apart puts all weight on the largest."""
    import warnings

    from bonsai_mlx import cpu_math

    x = mx.array([-1000.0, -89.0, -20.0, 0.0, 20.0, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = np.array(cpu_math.silu(x))
        q = mx.array([[[[100.0, 0.0]]]])
        k = mx.array([[[[100.0, 0.0], [-100.0, 0.0], [0.0, 0.0]]]])
        v = mx.array([[[[1.0], [2.0], [3.0]]]])
        weighted = np.array(cpu_math.attention(q, k, v, 1.0))
    expected = np.array(
        [-0.0, -89.0 / (1 + np.exp(89.0)), -20.0 / (1 + np.exp(20.0)), 0.0, 20.0 / (1 + np.exp(-20.0)), 1000.0]
    )
    assert np.allclose(got, expected, rtol=1e-6, atol=1e-30) and np.signbit(got[0])
    assert weighted.ravel().tolist() == [1.0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_silu_and_attention_match_their_definitions(dtype):
    from bonsai_mlx import cpu_math

    assert cpu_math.on_cpu()
    rng = np.random.default_rng(0)
    gate, up = (rng.normal(size=(2, 33, 200)).astype(np.float32) * 6 for _ in range(2))
    q, k, v = (rng.normal(size=(1, 3, 70, 16)).astype(np.float32) for _ in range(3))
    as_mx = lambda a: mx.array(a).astype(getattr(mx, dtype))  # noqa: E731
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    gate64 = np.array(as_mx(gate).astype(mx.float32), dtype=np.float64)
    up64 = np.array(as_mx(up).astype(mx.float32), dtype=np.float64)
    silu = gate64 / (1 + np.exp(-gate64))
    got = cpu_math.silu_multiply(as_mx(gate), as_mx(up))
    assert got.dtype == getattr(mx, dtype)
    assert np.allclose(np.array(got.astype(mx.float32)), silu * up64, rtol=tolerance, atol=tolerance)
    assert np.allclose(np.array(cpu_math.silu(as_mx(gate)).astype(mx.float32)), silu, rtol=tolerance, atol=tolerance)
    q64, k64, v64 = (np.array(as_mx(a).astype(mx.float32), dtype=np.float64) for a in (q, k, v))
    scores = q64 @ k64.swapaxes(-1, -2) * 0.25
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    expected = weights / weights.sum(axis=-1, keepdims=True) @ v64
    got = cpu_math.attention(as_mx(q), as_mx(k), as_mx(v), 0.25)
    assert got.dtype == getattr(mx, dtype)
    assert np.allclose(np.array(got.astype(mx.float32)), expected, rtol=tolerance, atol=tolerance)


def _rms_norm64(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def _rope64(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """diffusers apply_rotary_emb (use_real, unbind -1): interleaved pairs (x0, x1) → (−x1, x0) for the sin term."""
    rotated = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cpu_rope_attention_and_layer_norm_modulate_match_their_definitions(dtype):
    """Flux2's joint attention (text part then image part, each with its own q/k RMSNorm weight; RoPE; softmax)
    and the modulated LayerNorm, computed by numpy on the CPU, against float64 numpy written from diffusers'
    definitions."""
    from bonsai_mlx import cpu_math

    rng = np.random.default_rng(2)
    batch, text, image, heads, dim, eps = 2, 5, 27, 3, 16, 1e-6
    as_mx = lambda a: mx.array(a.astype(np.float32)).astype(getattr(mx, dtype))  # noqa: E731
    as64 = lambda a: np.array(a.astype(mx.float32), dtype=np.float64)  # noqa: E731
    parts = {
        name: as_mx(rng.normal(size=(batch, n, heads, dim)))
        for name, n in [("cq", text), ("q", image), ("ck", text), ("k", image), ("cv", text), ("v", image)]
    }
    weights = {name: as_mx(rng.uniform(0.5, 1.5, size=dim)) for name in ("cq", "q", "ck", "k")}
    angles = rng.uniform(-3, 3, size=(text + image, dim // 2))
    cos, sin = (np.repeat(f(angles), 2, axis=1) for f in (np.cos, np.sin))
    inputs = (
        [(parts["cq"], weights["cq"]), (parts["q"], weights["q"])],
        [(parts["ck"], weights["ck"]), (parts["k"], weights["k"])],
        [parts["cv"], parts["v"]],
        (mx.array(cos.astype(np.float32)), mx.array(sin.astype(np.float32))),
        eps,
    )
    got = cpu_math.rope_attention(*inputs)
    assert got.dtype == getattr(mx, dtype) and got.shape == (batch, text + image, heads * dim)

    def joined(a: str, b: str, norm: bool) -> np.ndarray:
        x, y = as64(parts[a]), as64(parts[b])
        if norm:
            x, y = _rms_norm64(x, as64(weights[a]), eps), _rms_norm64(y, as64(weights[b]), eps)
        return np.concatenate([x, y], axis=1).transpose(0, 2, 1, 3)  # (B, H, S, D)

    q, k = _rope64(joined("cq", "q", True), cos, sin), _rope64(joined("ck", "k", True), cos, sin)
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(dim)
    probabilities = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    expected = (probabilities @ joined("cv", "v", False)).transpose(0, 2, 1, 3).reshape(got.shape)
    tolerance = 1e-5 if dtype == "float32" else 4e-3
    assert np.allclose(as64(got), expected, rtol=tolerance, atol=tolerance)
    gate, up = (as_mx(rng.normal(size=(batch, text + image, 40))) for _ in range(2))
    both = cpu_math.attention_and_swiglu(*inputs, gate, up)
    concatenated = mx.concatenate([got, cpu_math.silu_multiply(gate, up)], axis=-1)
    assert np.array_equal(np.array(both.astype(mx.float32)), np.array(concatenated.astype(mx.float32)))

    x, scale, shift = (as_mx(rng.normal(size=shape) * 3) for shape in [(batch, 40, 24), (batch, 1, 24), (batch, 1, 24)])
    x64 = as64(x)
    normed = (x64 - x64.mean(axis=-1, keepdims=True)) / np.sqrt(x64.var(axis=-1, keepdims=True) + eps)
    modulated = cpu_math.layer_norm_modulate(x, scale, shift, eps)
    assert modulated.dtype == getattr(mx, dtype)
    expected = (1 + as64(scale)) * normed + as64(shift)
    assert np.allclose(as64(modulated), expected, rtol=tolerance, atol=10 * tolerance)


def test_cpu_attention_skips_the_max_only_where_the_scores_are_bounded(monkeypatch):
    """Softmax is shift-invariant: blocks of rows whose Cauchy–Schwarz bound keeps the base-2 scores within
    SAFE_EXPONENT skip subtracting their max, others do not. Both ways give softmax's values, up to scores that
    would overflow float32's exp without the max (here up to ~±100)."""
    from bonsai_mlx import cpu_math

    rng = np.random.default_rng(4)
    q, k, v = (rng.normal(size=(1, 2, 64, 16)) for _ in range(3))

    def expected(scale: float) -> np.ndarray:
        scores = q @ k.swapaxes(-1, -2) * scale
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return weights / weights.sum(axis=-1, keepdims=True) @ v

    as_mx = lambda a: mx.array(a.astype(np.float32))  # noqa: E731
    subtracted = []
    original = np.subtract
    monkeypatch.setattr(cpu_math.np, "subtract", lambda *a, **kw: subtracted.append(1) or original(*a, **kw))
    for scale, bounded in ((0.25, True), (8.0, False)):
        subtracted.clear()
        got = np.array(cpu_math.attention(as_mx(q), as_mx(k), as_mx(v), scale))
        assert np.allclose(got, expected(scale), rtol=2e-5, atol=2e-5)
        assert (not subtracted) == bounded
        monkeypatch.setattr(cpu_math, "SAFE_EXPONENT", 0.0)  # always subtract: the same values
        again = np.array(cpu_math.attention(as_mx(q), as_mx(k), as_mx(v), scale))
        monkeypatch.setattr(cpu_math, "SAFE_EXPONENT", 64.0)
        assert np.allclose(got, again, rtol=2e-5, atol=2e-5)


def test_sgemm_on_strided_views_matches_numpy():
    """blas.sgemm (cblas_sgemm through ctypes) on a head's strided slice of a (S, H, D) array, into strided
    columns of an output, with alpha and a transposed operand; numpy does the same where the layout does not fit."""
    rng = np.random.default_rng(3)
    packed = rng.normal(size=(50, 4, 8)).astype(np.float32)
    a, b = packed[:, 1], packed[:, 2]  # (50, 8) views, row stride 32 values
    out = np.zeros((50, 3, 50), dtype=np.float32)
    blas.sgemm(a, b, out[:, 1], alpha=0.5, transpose_b=True)
    assert np.allclose(out[:, 1], 0.5 * a @ b.T, rtol=1e-5, atol=1e-5) and not out[:, [0, 2]].any()
    square = np.zeros((8, 8), dtype=np.float32)
    blas.sgemm(a.T, b, square)  # a.T has adjacent rows, not adjacent columns: numpy's product
    assert np.allclose(square, a.T @ b, rtol=1e-5, atol=1e-4)


def test_cpu_silu_and_attention_in_pieces_are_bit_identical_and_bounded(monkeypatch):
    """In pieces of rows (silu) and blocks of query rows (attention) far smaller than the inputs, the values are
    the whole-array ones bit for bit (every value depends on its own row only), and nothing input-sized is
    allocated besides the output: MLX holds the output (numpy writes into it), numpy one piece per worker
    (tracemalloc sees numpy's buffers); attention's scores exist one block of query rows per worker at a time."""
    import tracemalloc

    from bonsai_mlx import cpu_math

    rng = np.random.default_rng(1)
    gate, up = (mx.array(rng.normal(size=(1, 512, 2048)).astype(np.float32) * 6) for _ in range(2))
    q, k, v = (mx.array(rng.normal(size=(1, 8, 256, 32)).astype(np.float32)) for _ in range(3))
    mx.eval(gate, up, q, k, v)
    whole = [cpu_math.silu(gate), cpu_math.silu_multiply(gate, up), cpu_math.attention(q, k, v, 0.2)]
    mx.eval(*whole)
    monkeypatch.setattr(cpu_math, "ROW_CHUNK_VALUES", 4096)
    monkeypatch.setattr(cpu_math, "QUERY_BLOCK", 16)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tracemalloc.start()
    sliced = staged(cpu_math.silu_multiply(gate, up))
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert numpy_peak < 0.05 * sliced.nbytes
    assert mx.get_peak_memory() - base < 1.1 * sliced.nbytes
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tracemalloc.start()
    attended = staged(cpu_math.attention(q, k, v, 0.2))
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    block_scores_bytes = 16 * 256 * 4
    assert numpy_peak < 2 * block_scores_bytes + 64 * 1024
    assert mx.get_peak_memory() - base < 1.1 * attended.nbytes
    sliced = [cpu_math.silu(gate), sliced, attended]
    for a, b in zip(whole, sliced, strict=True):
        assert np.array_equal(np.array(a), np.array(b))


def test_freed_memory_is_kept_for_reuse_in_a_fresh_process():
    """enable_cpu_speedups sets glibc's allocator up before MLX starts (allocator.py); BONSAI_MLX_MALLOC=0 not."""
    code = (
        "import bonsai_mlx\nbonsai_mlx.enable_cpu_speedups()\n"
        "from bonsai_mlx import allocator\nprint(allocator.freed_memory_kept())\n"
    )
    for setting, expected in (("", sys.platform.startswith("linux")), ("0", False)):
        env = {**os.environ, "BONSAI_MLX_MALLOC": setting, "PYTHONPATH": str(RUNTIME)}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert result.stdout.strip() == str(expected), result.stderr


def test_importing_bonsai_mlx_changes_nothing_in_the_process():
    """`import bonsai_mlx` loads no BLAS, leaves malloc alone and does not import MLX; the pipeline API loads lazily."""
    code = (
        "import sys, bonsai_mlx\n"
        "from bonsai_mlx import allocator, blas\n"
        "print(blas.loaded_blas(), allocator.freed_memory_kept(), 'mlx.core' in sys.modules)\n"
        "bonsai_mlx.load_pipeline\n"
        "print('mlx.core' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(RUNTIME)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "False", "False", "True"]


def test_kept_dense_weights_give_the_same_outputs_within_the_budget():
    """keep_dense_weights keeps fp32 dequantized weights of whole layers while they fit the budget; the kept
    layers compute the same values as the per-call dequantization."""
    from bonsai_mlx.cpu_layers import keep_dense_weights

    layers = [exact_layer(bits, rows=64, cols=256, seed=bits)[0] for bits in (1, 2, 2)]
    model = nn.Sequential(*layers)
    assert use_dense_kernels(model, mx.cpu) == 3
    x = mx.array(np.random.default_rng(2).standard_normal((1, 9, 256), dtype=np.float32))
    per_call = [np.array(layer(x)) for layer in model.layers]
    one_layer = 64 * 256 * 4
    assert keep_dense_weights(model, 2 * one_layer + 100) == 2 * one_layer
    kept = [getattr(layer, "_dense_cache", None) is not None for layer in model.layers]
    assert sorted(kept) == [False, True, True]
    for layer, expected in zip(model.layers, per_call, strict=True):
        assert np.array_equal(np.array(layer(x)), expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_blas_threads_fit_the_free_cores():
    """fit_blas_threads_to_machine sets OpenBLAS to the cores other processes leave free (at least one), judged
    by their CPU use since the previous call: a child spinning on a core while this process sleeps is seen."""
    import time

    if blas.loaded_blas() is None:
        pytest.skip("no OpenBLAS loaded")
    cores = len(os.sched_getaffinity(0))
    blas.others_busy_cores()  # start an interval
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 0.6\nwhile time.time() < end: pass"]
    )
    time.sleep(0.5)
    others = blas.others_busy_cores()
    spinner.wait()
    assert others is not None and others >= 0.5
    time.sleep(0.1)
    count = blas.fit_blas_threads_to_machine()
    assert count is not None and 1 <= count <= cores
    assert blas.blas_threads() == count
    assert blas.set_blas_threads(cores) and blas.blas_threads() == cores
