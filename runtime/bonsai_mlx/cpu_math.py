"""SiLU, SwiGLU and softmax attention for MLX's CPU device, their exponentials computed by numpy.

MLX's Linux CPU build computes `mx.exp` one value at a time (16–25 ns per value; `mx.sigmoid`, `mx.tanh`,
`mx.softmax` alike), and the kernels `mx.compile` generates there are scalar loops (`g++ -O3` without `-march`,
split at its 11-op fusion depth): a float32 polynomial exp written in MLX ops still took 4.5 ns per value and held
five input-sized intermediates. numpy's float32 exp is SIMD-dispatched (AVX-512 here): 0.58 ns per value, within
2.1 × 10⁻⁷ relative of float64 (about 3 ulp), measured on this 2-core x86-64 with numpy 2.4. An evaluated MLX
array is readable and writable from numpy without a copy (`np.asarray`; MLX documents that writes through such a
view are what MLX then reads), so on the CPU device:

- `attention` computes q·kᵀ·scale with MLX (one BLAS product per head), then, in the scores' own buffer, subtracts
  each row's max and takes the exp with numpy, sums the rows with numpy, and multiplies by v with MLX before
  dividing by the sums (one division per output value instead of per score). Heads run in slices of at most
  CHUNK_VALUES scores, each evaluated before the next, so no more than one slice of scores is alive.
- `silu` and `silu_multiply` run numpy's ufuncs over ROW_CHUNK_VALUES-sized pieces of rows (cache-sized, no
  input-sized temporaries) into one float32 output, which MLX copies once.

Everything is computed in float32 and returned in the input's dtype. On a GPU these are MLX's own (`nn.silu`,
`mx.fast.scaled_dot_product_attention`), which are fast there.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .staging import staged, staged_slices

CHUNK_VALUES = 1 << 22  # attention scores per slice of heads (16 MB in fp32)
ROW_CHUNK_VALUES = 1 << 16  # values per numpy piece of silu / silu_multiply (256 KB in fp32: within L2)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _float32_view(x: mx.array) -> np.ndarray:
    """x in float32, evaluated, as a numpy view of MLX's buffer (rows × last axis; no copy for contiguous rows)."""
    x32 = staged(x.astype(mx.float32))
    return np.asarray(x32).reshape(-1, x.shape[-1]) if x.ndim else np.asarray(x32).reshape(1, 1)


def _silu_rows(gate: mx.array, up: mx.array | None) -> mx.array:
    """silu(gate) (· up) in float32 by numpy, ROW_CHUNK_VALUES at a time, as an MLX array of gate's dtype."""
    g = _float32_view(gate)
    u = None if up is None else _float32_view(up)
    out = np.empty(g.shape, dtype=np.float32)
    rows = max(1, ROW_CHUNK_VALUES // max(1, g.shape[1]))
    with np.errstate(over="ignore"):  # exp(−g) = inf for g < −88: g / inf = −0, silu's limit
        for start in range(0, g.shape[0], rows):
            piece, g_piece = out[start : start + rows], g[start : start + rows]
            np.negative(g_piece, out=piece)
            np.exp(piece, out=piece)
            piece += 1
            np.divide(g_piece, piece, out=piece)
            if u is not None:
                piece *= u[start : start + rows]
    return mx.array(out).reshape(gate.shape).astype(gate.dtype)


def silu(x: mx.array) -> mx.array:
    """x·sigmoid(x)."""
    return _silu_rows(x, None) if on_cpu() else nn.silu(x)


def silu_multiply(gate: mx.array, up: mx.array) -> mx.array:
    """SwiGLU's silu(gate)·up, in one pass on the CPU."""
    return _silu_rows(gate, up) if on_cpu() else nn.silu(gate) * up


def _attention_heads(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    scores = staged((q.astype(mx.float32) * scale) @ k.astype(mx.float32).swapaxes(-1, -2))
    view = np.asarray(scores)  # the product's own (fresh, contiguous) buffer: written in place below
    np.subtract(view, view.max(axis=-1, keepdims=True), out=view)
    np.exp(view, out=view)
    sums = view.sum(axis=-1, keepdims=True)
    weights = scores if not view.flags.owndata else mx.array(view)  # a copy, were MLX ever to export one
    return ((weights @ v.astype(mx.float32)) / mx.array(sums)).astype(v.dtype)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Unmasked softmax(q·kᵀ·scale)·v on (B, H, S, D), computed as MLX's CPU fallback of
    scaled_dot_product_attention does (scale q, matmul, float32 softmax, matmul), the softmax's max, exp and sums
    by numpy; on the CPU a few heads at a time (at most CHUNK_VALUES scores), each evaluated before the next."""
    if not on_cpu():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    heads_per_slice = max(1, CHUNK_VALUES // max(1, q.shape[0] * q.shape[2] * k.shape[2]))
    return staged_slices(lambda s: _attention_heads(q[:, s], k[:, s], v[:, s], scale), q.shape[1], heads_per_slice, 1)
