"""Element-wise work and softmax attention for MLX's CPU device, computed by numpy and the BLAS.

MLX's Linux CPU build computes `mx.exp` one value at a time (16–25 ns per value; `mx.sigmoid`, `mx.tanh`,
`mx.softmax` alike), its other element-wise kernels run on one thread at ~1–4 ns per value, and the kernels
`mx.compile` generates there are scalar loops (`g++ -O3` without `-march`). numpy's float32 ufuncs are
SIMD-dispatched (AVX-512 here): exp 0.55 ns per value, within 2.1 × 10⁻⁷ relative of float64 (about 3 ulp),
subtraction or a row sum by `einsum` 0.1–0.2 ns, measured on this 2-core x86-64 with numpy 2.4. An evaluated MLX
array is readable and writable from numpy without a copy (`np.asarray`, strided as the array is; MLX documents
that writes through such a view are what MLX then reads), so on the CPU device:

- `attention` and `rope_attention` give each head (and, where heads are fewer than workers, each range of its
  query rows) to one worker thread per core, with the BLAS on one thread meanwhile. A worker computes
  QUERY_BLOCK query rows' scores at a time into one reused buffer by `cblas_sgemm` (ctypes; the GIL released),
  exponentiates them in place (exp2, each row's max subtracted where the scores could leave float32's range) and
  sums the rows with numpy, multiplies by v (sgemm again) straight into the head's columns of the output, and
  divides by the sums (one division per output value). `rope_attention` first applies Flux2's RMSNorm and RoPE
  to the queries and keys of every head at once in numpy.
- `silu`, `silu_multiply` and `layer_norm_modulate` run numpy's ufuncs over ROW_CHUNK_VALUES-sized pieces of rows
  (cache-sized, no input-sized temporaries), the pieces shared among the same workers.

Outputs are MLX arrays allocated by MLX and filled through numpy views (no copy back). Everything is computed in
float32 and returned in the input's dtype. On a GPU these are MLX's own (`nn.silu`, `mx.fast.rms_norm`,
`mx.fast.layer_norm`, `mx.fast.scaled_dot_product_attention`), which are fast there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .blas import blas_threads, cpu_cores, set_blas_threads, sgemm
from .staging import staged

LOG2_E = 1.4426950408889634
SAFE_EXPONENT = 64.0  # |base-2 scores| within which softmax needs no max subtracted
QUERY_BLOCK = 256  # query rows whose attention scores are computed at once (by each worker)
CHUNK_VALUES = 1 << 22  # attention scores held by a worker at most (16 MB in fp32): fewer rows for long keys
ROW_CHUNK_VALUES = 1 << 18  # values per numpy piece of the element-wise functions (1 MB in fp32: L2-sized)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _float32_view(x: mx.array) -> np.ndarray:
    """x in float32, evaluated, as a numpy view of MLX's buffer (rows × last axis; no copy for contiguous rows)."""
    return _float32(x).reshape(-1, x.shape[-1]) if x.ndim else _float32(x).reshape(1, 1)


_workers: dict[str, ThreadPoolExecutor] = {}


def _pool() -> ThreadPoolExecutor:
    if "pool" not in _workers:
        _workers["pool"] = ThreadPoolExecutor(max_workers=cpu_cores(), thread_name_prefix="bonsai-mlx-cpu")
    return _workers["pool"]


def _worker_count() -> int:
    """As many workers as the BLAS has threads (fitted to the free cores), or every core without OpenBLAS."""
    return max(1, min(cpu_cores(), blas_threads() or cpu_cores()))


def _run_tasks(tasks: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run the tasks on the worker threads (in order of submission; results in that order), the BLAS on one
    thread meanwhile. Tasks use numpy and the BLAS only: MLX streams belong to the thread that made them, and a
    worker cannot evaluate this thread's pending MLX ops (inputs are evaluated before the tasks start)."""
    workers = _worker_count()
    if workers == 1 or len(tasks) == 1:
        return [task() for task in tasks]
    threads = blas_threads()
    set_blas_threads(1)
    try:
        return list(_pool().map(lambda task: task(), tasks))
    finally:
        if threads:
            set_blas_threads(threads)


def _fill_rows(out: np.ndarray, fill: Callable[[np.ndarray, int, slice], None]) -> None:
    """Fill a float32 (B, S, C) numpy view by `fill(piece, b, rows)` writing piece = out[b, rows]: ROW_CHUNK_VALUES-
    sized (cache-sized) pieces of each batch's rows, shared among the worker threads."""
    batch, length, columns = out.shape
    piece_rows = max(1, ROW_CHUNK_VALUES // max(1, columns))
    share = max(1, -(-length // _worker_count()))  # rows per worker

    def rows_from(b: int, first: int) -> None:
        for start in range(first, min(first + share, length), piece_rows):
            rows = slice(start, min(start + piece_rows, first + share))
            fill(out[b, rows], b, rows)

    _run_tasks(
        [lambda b=b, first=first: rows_from(b, first) for b in range(batch) for first in range(0, length, share)]
    )


def _filled(shape: tuple[int, ...], fill: Callable[[np.ndarray], None], dtype: mx.Dtype) -> mx.array:
    """A new MLX array of `shape`, `fill(view)` writing its float32 values through a numpy view, in `dtype`."""
    result = _float32_zeros(shape)
    fill(np.asarray(result))
    return result.astype(dtype)


def _silu_rows(gate: mx.array, up: mx.array | None, out: np.ndarray) -> None:
    """out (B, S, C) = silu(gate) (· up) in float32 by numpy."""
    g = _float32_view(gate).reshape(out.shape)
    u = None if up is None else _float32_view(up).reshape(out.shape)

    def fill(piece: np.ndarray, b: int, rows: slice) -> None:
        with np.errstate(over="ignore"):  # exp(−g) = inf for g < −88: g / inf = −0, silu's limit
            np.multiply(g[b, rows], np.float32(-LOG2_E), out=piece)
            np.exp2(piece, out=piece)  # exp(−g), by numpy's faster exp2
            piece += 1
            np.divide(g[b, rows], piece, out=piece)
            if u is not None:
                piece *= u[b, rows]

    _fill_rows(out, fill)


def _as_rows(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(B, S, C) for an array of `shape`: its last axis as C, the others as one batch's rows."""
    return (1, math.prod(shape[:-1]), shape[-1]) if shape else (1, 1, 1)


def silu(x: mx.array) -> mx.array:
    """x·sigmoid(x)."""
    if not on_cpu():
        return nn.silu(x)
    return _filled(_as_rows(x.shape), lambda out: _silu_rows(x, None, out), x.dtype).reshape(x.shape)


def silu_multiply(gate: mx.array, up: mx.array) -> mx.array:
    """SwiGLU's silu(gate)·up, in one pass on the CPU."""
    if not on_cpu():
        return nn.silu(gate) * up
    return _filled(_as_rows(gate.shape), lambda out: _silu_rows(gate, up, out), gate.dtype).reshape(gate.shape)


@mx.compile
def _modulate(normed: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    return (1 + scale) * normed + shift


def layer_norm_modulate(x: mx.array, scale: mx.array, shift: mx.array, eps: float) -> mx.array:
    """(1 + scale)·LayerNorm(x) + shift, the LayerNorm without affine parameters, for x (B, S, C) and scale, shift
    (B, 1, C): on the CPU in float32 by numpy (mean, centring, mean square, scaling; in pieces of rows on the
    workers), elsewhere mx.fast.layer_norm and one fused (mx.compile) pass. Returned in x's dtype."""
    if not on_cpu():
        return _modulate(mx.fast.layer_norm(x, None, None, eps), scale, shift)
    rows = _float32_view(x).reshape(x.shape)
    factors, offsets = (_float32_view(mx.broadcast_to(a, (x.shape[0], 1, x.shape[2]))) for a in (1 + scale, shift))

    def fill(piece: np.ndarray, b: int, span: slice) -> None:
        np.subtract(rows[b, span], rows[b, span].mean(axis=1, keepdims=True), out=piece)
        mean_square = np.einsum("ij,ij->i", piece, piece) / np.float32(x.shape[2])
        piece *= (1 / np.sqrt(mean_square + np.float32(eps)))[:, None]
        piece *= factors[b]
        piece += offsets[b]

    return _filled(x.shape, lambda out: _fill_rows(out, fill), x.dtype)


def _attention_rows(q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, scale: float) -> None:
    """out = softmax(q·kᵀ·scale)·v for float32 (rows, D) numpy views, QUERY_BLOCK query rows at a time: their
    scores (one reused buffer that stays in the core's cache) by the BLAS, exponentiated and summed by numpy in
    place, then the product with v, divided by the sums (one division per output value).

    The scores are taken times log2(e) (folded into the product's alpha) and exponentiated by exp2: numpy's float32
    exp2 takes 0.34 ns per value against exp's 0.55, within 1.7 ulp of float64 against exp's 3.4. Softmax does not
    change when a row's scores are shifted; the rows' maxima are subtracted only where the scores could leave
    float32's range otherwise: |q_i·k_j| ≤ ‖q_i‖·max_j ‖k_j‖ (Cauchy–Schwarz) bounds them, and a block whose bound
    stays within SAFE_EXPONENT (2^±64 after exp2) skips the max and the subtraction (0.3 of the 0.7 ns per score)."""
    keys = k.shape[0]
    rows = max(1, min(QUERY_BLOCK, q.shape[0], CHUNK_VALUES // max(1, keys)))
    scores = np.empty((rows, keys), dtype=np.float32)
    alpha = scale * LOG2_E  # scores in base-2 units
    key_norm = float(np.sqrt(np.einsum("ij,ij->i", k, k).max()))  # float32: a bound with 2^64 of headroom
    for start in range(0, q.shape[0], rows):
        stop = min(start + rows, q.shape[0])
        block = scores[: stop - start]
        sgemm(q[start:stop], k, block, alpha=alpha, transpose_b=True)
        query_norms = np.sqrt(np.einsum("ij,ij->i", q[start:stop], q[start:stop]))
        if not float(query_norms.max()) * key_norm * abs(alpha) <= SAFE_EXPONENT:
            np.subtract(block, block.max(axis=-1, keepdims=True), out=block)
        np.exp2(block, out=block)  # = exp of the scores (less their max)
        sums = np.einsum("ij->i", block)[:, None]  # a SIMD sum: 0.08 ns per value against 0.3 for ndarray.sum
        sgemm(block, v, out[start:stop])
        out[start:stop] /= sums


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Unmasked softmax(q·kᵀ·scale)·v on (B, H, S, D), in float32, returned in v's dtype. On the CPU
    (`_attention_rows`) each head, split into as many ranges of query rows as it takes to give every worker
    thread a task, is a task for the workers."""
    if not on_cpu():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    batch, heads, queries, _ = q.shape
    views = [_float32(x) for x in (q, k, v)]
    ranges = -(-_worker_count() // (batch * heads))
    share = -(-queries // ranges)
    tasks = [(b, h, start) for b in range(batch) for h in range(heads) for start in range(0, queries, share)]

    def fill(out: np.ndarray) -> None:
        def task(b: int, h: int, start: int) -> None:
            rows = slice(start, start + share)
            _attention_rows(views[0][b, h, rows], views[1][b, h], views[2][b, h], out[b, h, rows], scale)

        _run_tasks([lambda t=t: task(*t) for t in tasks])

    return _filled((batch, heads, queries, v.shape[-1]), fill, v.dtype)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """diffusers apply_rotary_emb (use_real, unbind -1) on x (B, H, S, D) in float32, cast back to x's dtype."""
    x32 = x.astype(mx.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = mx.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x32 * cos + rotated * sin).astype(x.dtype)


Normed = tuple[mx.array, mx.array]  # (B, S_i, H, D) projection, its RMSNorm weight (D,)


def rope_attention(
    queries: Sequence[Normed],
    keys: Sequence[Normed],
    values: Sequence[mx.array],
    rope: tuple[mx.array, mx.array],
    eps: float,
) -> mx.array:
    """Flux2's attention: softmax(q·kᵀ/√D)·v with q = RoPE(RMSNorm(query projection)), k likewise, where each
    of queries, keys and values is (B, S_i, H, D) parts joined along the sequence in the order given (text, then
    image), each query / key part with its own RMSNorm weight; rope is the (S, D) cos and sin. Returns
    (B, S, H·D) in the values' dtype.

    On the CPU, all in float32 numpy (the inputs cast once): RMSNorm and RoPE of every head at once
    (`_normed_rope`, pieces of rows on the workers), then each head is a task for the workers, `_attention_rows`
    straight into the head's columns of the output. MLX's CPU element-wise ops run on one thread at ~1–4 ns per
    value, numpy's at a fraction of that. Elsewhere MLX's rms_norm, RoPE and scaled_dot_product_attention."""
    dtype = values[0].dtype
    heads, head_dim = values[0].shape[2:]
    if not on_cpu():
        q, k = ([mx.fast.rms_norm(x, weight, eps) for x, weight in parts] for parts in (queries, keys))
        q, k, v = (mx.concatenate(parts, axis=1).transpose(0, 2, 1, 3) for parts in (q, k, values))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5).transpose(0, 2, 1, 3)
        return out.reshape(*out.shape[:2], heads * head_dim)
    shape = (values[0].shape[0], sum(x.shape[1] for x in values), heads * head_dim)
    return _filled(shape, lambda out: _rope_attention_rows(out, queries, keys, values, rope, eps), dtype)


def attention_and_swiglu(
    queries: Sequence[Normed],
    keys: Sequence[Normed],
    values: Sequence[mx.array],
    rope: tuple[mx.array, mx.array],
    eps: float,
    gate: mx.array,
    up: mx.array,
) -> mx.array:
    """[rope_attention(queries, keys, values, rope, eps), silu(gate)·up] joined along the last axis (the input of
    Flux2's single-stream output projection). On the CPU both fill their columns of one buffer: no concatenation,
    which copies every value once more (3.3 ms for the demo's 1152 × 2560 on this machine)."""
    if not on_cpu():
        return mx.concatenate([rope_attention(queries, keys, values, rope, eps), silu_multiply(gate, up)], axis=-1)
    heads, head_dim = values[0].shape[2:]
    width = heads * head_dim

    def fill(out: np.ndarray) -> None:
        _rope_attention_rows(out[..., :width], queries, keys, values, rope, eps)
        _silu_rows(gate, up, out[..., width:])

    shape = (*gate.shape[:-1], width + gate.shape[-1])
    return _filled(shape, fill, values[0].dtype)


def _rope_attention_rows(
    out: np.ndarray,
    queries: Sequence[Normed],
    keys: Sequence[Normed],
    values: Sequence[mx.array],
    rope: tuple[mx.array, mx.array],
    eps: float,
) -> None:
    """out (B, S, H·D) float32 view = rope_attention(...), one task per head on the workers."""
    heads, head_dim = values[0].shape[2:]
    cos, sin = (np.asarray(staged(x.astype(mx.float32))) for x in rope)
    rotation = np.empty((cos.shape[0], head_dim // 2), dtype=np.complex64)
    rotation.real, rotation.imag = cos[:, ::2], sin[:, ::2]
    q, k = (_normed_rope(parts, rotation, eps) for parts in (queries, keys))  # (B, S, H, D) float32
    value_parts = [_float32(x) for x in values]
    by_head = out.reshape(*out.shape[:2], heads, head_dim)  # a view: the columns of each head

    def task(b: int, h: int) -> None:
        v = value_parts[0][b, :, h] if len(value_parts) == 1 else np.concatenate([x[b, :, h] for x in value_parts])
        _attention_rows(q[b, :, h], k[b, :, h], v, by_head[b, :, h], head_dim**-0.5)

    _run_tasks([lambda b=b, h=h: task(b, h) for b in range(out.shape[0]) for h in range(heads)])


def _float32(x: mx.array) -> np.ndarray:
    """x in float32, evaluated, as a numpy view of MLX's buffer (strided as x is, where x is already float32)."""
    return np.asarray(staged(x.astype(mx.float32)))


def _normed_rope(parts: Sequence[Normed], rotation: np.ndarray, eps: float) -> np.ndarray:
    """RoPE(RMSNorm(x)) of (B, S_i, H, D) parts joined along the sequence, as a new float32 (B, S, H, D) numpy
    array: every head at once, in pieces of rows on the workers; RoPE as one complex multiply in place
    (interleaved pairs (x₀, x₁) rotated by (cos, sin) are the complex product (x₀ + i·x₁)(cos + i·sin))."""
    arrays = [(_float32(x), _float32(weight)) for x, weight in parts]
    batch, _, heads, head_dim = arrays[0][0].shape
    starts = np.cumsum([0] + [x.shape[1] for x, _ in arrays]).tolist()
    out = np.empty((batch, starts[-1], heads, head_dim), dtype=np.float32)

    def fill(piece: np.ndarray, b: int, rows: slice) -> None:
        piece = piece.reshape(-1, heads, head_dim)
        for (x, weight), start, stop in zip(arrays, starts, starts[1:], strict=False):
            first, last = max(rows.start, start), min(rows.stop, stop)
            if first >= last:
                continue
            source, target = x[b, first - start : last - start], piece[first - rows.start : last - rows.start]
            mean_square = np.einsum("shd,shd->sh", source, source) / np.float32(head_dim)
            np.multiply(source, (1 / np.sqrt(mean_square + np.float32(eps)))[..., None], out=target)
            target *= weight
        complex_view = piece.view(np.complex64)
        complex_view *= rotation[rows, None, :]

    _fill_rows(out.reshape(batch, starts[-1], heads * head_dim), fill)
    return out


def _float32_zeros(shape: tuple[int, ...]) -> mx.array:
    """An evaluated float32 MLX array of zeros whose buffer tasks then fill through `np.asarray` views (MLX reads
    what is written there)."""
    return staged(mx.zeros(shape, dtype=mx.float32))
