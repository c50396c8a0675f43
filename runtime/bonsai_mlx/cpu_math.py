"""SiLU, SwiGLU and softmax attention for MLX's CPU device, their exponentials computed by numpy.

MLX's Linux CPU build computes `mx.exp` one value at a time (16–25 ns per value; `mx.sigmoid`, `mx.tanh`,
`mx.softmax` alike), and the kernels `mx.compile` generates there are scalar loops (`g++ -O3` without `-march`,
split at its 11-op fusion depth): a float32 polynomial exp written in MLX ops still took 4.5 ns per value and held
five input-sized intermediates. numpy's float32 exp is SIMD-dispatched (AVX-512 here): 0.58 ns per value, within
2.1 × 10⁻⁷ relative of float64 (about 3 ulp), measured on this 2-core x86-64 with numpy 2.4. An evaluated MLX
array is readable and writable from numpy without a copy (`np.asarray`; MLX documents that writes through such a
view are what MLX then reads), so on the CPU device:

- `attention` computes each head's q·kᵀ·scale with MLX (a BLAS product), then, in the scores' own buffer,
  subtracts each row's max and takes the exp with numpy, sums the rows with numpy, and multiplies by v with MLX
  before dividing by the sums (one division per output value instead of per score). Heads (and, where one head
  has more than CHUNK_VALUES scores, blocks of its query rows) are tasks for one worker thread per core, each with
  its own MLX stream and the BLAS on one thread meanwhile: numpy and MLX release the GIL, and two single-threaded
  products plus the numpy passes keep two cores busier than one two-threaded product followed by one-core numpy
  (one Klein-width (24, 768, 128) attention: 47–50 ms against 63 ms; the demo's (10, 1152, 64): 26–29 against
  37–55 ms; torch's fused CPU kernel: 44 and 22 ms). Each worker holds one task's scores at a time.
- `silu` and `silu_multiply` run numpy's ufuncs over ROW_CHUNK_VALUES-sized pieces of rows (cache-sized, no
  input-sized temporaries) into one float32 output, the pieces shared among the same workers, which MLX copies
  once.

Everything is computed in float32 and returned in the input's dtype. On a GPU these are MLX's own (`nn.silu`,
`mx.fast.scaled_dot_product_attention`), which are fast there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .blas import blas_threads, cpu_cores, set_blas_threads
from .staging import staged

CHUNK_VALUES = 1 << 22  # attention scores per task at most (16 MB in fp32)
ROW_CHUNK_VALUES = 1 << 16  # values per numpy piece of silu / silu_multiply (256 KB in fp32: within L2)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _float32_view(x: mx.array) -> np.ndarray:
    """x in float32, evaluated, as a numpy view of MLX's buffer (rows × last axis; no copy for contiguous rows)."""
    x32 = staged(x.astype(mx.float32))
    return np.asarray(x32).reshape(-1, x.shape[-1]) if x.ndim else np.asarray(x32).reshape(1, 1)


_workers: dict[str, ThreadPoolExecutor] = {}
_worker_stream = threading.local()


def _pool() -> ThreadPoolExecutor:
    if "pool" not in _workers:
        _workers["pool"] = ThreadPoolExecutor(max_workers=cpu_cores(), thread_name_prefix="bonsai-mlx-cpu")
    return _workers["pool"]


def _worker_count() -> int:
    """As many workers as the BLAS has threads (fitted to the free cores), or every core without OpenBLAS."""
    return max(1, min(cpu_cores(), blas_threads() or cpu_cores()))


def _run_tasks(tasks: Sequence[Callable[[], mx.array | None]]) -> list[mx.array | None]:
    """Run the tasks on the worker threads (in order of submission; results in that order), the BLAS on one
    thread meanwhile. A task that builds MLX ops does so on its worker's own stream and evaluates what it
    returns: MLX streams belong to the thread that made them."""
    workers = _worker_count()
    if workers == 1 or len(tasks) == 1:
        return [task() for task in tasks]
    threads = blas_threads()
    set_blas_threads(1)
    try:
        return list(_pool().map(_on_worker_stream, tasks))
    finally:
        if threads:
            set_blas_threads(threads)


def _on_worker_stream(task: Callable[[], mx.array | None]) -> mx.array | None:
    if not hasattr(_worker_stream, "stream"):
        _worker_stream.stream = mx.new_stream(mx.cpu)
    with mx.stream(_worker_stream.stream):
        return task()


def _silu_rows(gate: mx.array, up: mx.array | None) -> mx.array:
    """silu(gate) (· up) in float32 by numpy, ROW_CHUNK_VALUES at a time, as an MLX array of gate's dtype."""
    g = _float32_view(gate)
    u = None if up is None else _float32_view(up)
    out = np.empty(g.shape, dtype=np.float32)
    rows = max(1, ROW_CHUNK_VALUES // max(1, g.shape[1]))
    share = max(1, -(-g.shape[0] // _worker_count()))  # rows per worker

    def rows_from(first: int) -> None:
        with np.errstate(over="ignore"):  # exp(−g) = inf for g < −88: g / inf = −0, silu's limit
            for start in range(first, min(first + share, g.shape[0]), rows):
                stop = min(start + rows, first + share)
                piece, g_piece = out[start:stop], g[start:stop]
                np.negative(g_piece, out=piece)
                np.exp(piece, out=piece)
                piece += 1
                np.divide(g_piece, piece, out=piece)
                if u is not None:
                    piece *= u[start:stop]

    _run_tasks([lambda first=first: rows_from(first) for first in range(0, g.shape[0], share)])
    return mx.array(out).reshape(gate.shape).astype(gate.dtype)


def silu(x: mx.array) -> mx.array:
    """x·sigmoid(x)."""
    return _silu_rows(x, None) if on_cpu() else nn.silu(x)


def silu_multiply(gate: mx.array, up: mx.array) -> mx.array:
    """SwiGLU's silu(gate)·up, in one pass on the CPU."""
    return _silu_rows(gate, up) if on_cpu() else nn.silu(gate) * up


def _attention_task(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q·kᵀ·scale)·v of evaluated (B, h, s, D) slices, evaluated."""
    scores = staged((q.astype(mx.float32) * scale) @ k.astype(mx.float32).swapaxes(-1, -2))
    view = np.asarray(scores)  # the product's own (fresh, contiguous) buffer: written in place below
    np.subtract(view, view.max(axis=-1, keepdims=True), out=view)
    np.exp(view, out=view)
    sums = view.sum(axis=-1, keepdims=True)
    weights = scores if not view.flags.owndata else mx.array(view)  # a copy, were MLX ever to export one
    return staged(((weights @ v.astype(mx.float32)) / mx.array(sums)).astype(v.dtype))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Unmasked softmax(q·kᵀ·scale)·v on (B, H, S, D), computed as MLX's CPU fallback of
    scaled_dot_product_attention does (scale q, matmul, float32 softmax, matmul), the softmax's max, exp and sums
    by numpy; on the CPU one task per head, or per block of query rows where a head has more than CHUNK_VALUES
    scores, on the worker threads."""
    if not on_cpu():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    mx.eval(q, k, v)  # the workers' streams cannot evaluate this thread's pending ops
    batch, heads, queries = q.shape[:3]
    rows = max(1, min(queries, CHUNK_VALUES // max(1, batch * k.shape[2])))
    blocks = [(head, start) for head in range(heads) for start in range(0, queries, rows)]
    parts = _run_tasks(
        [
            lambda h=h, r=r: _attention_task(q[:, h : h + 1, r : r + rows], k[:, h : h + 1], v[:, h : h + 1], scale)
            for h, r in blocks
        ]
    )
    per_head = -(-queries // rows)
    by_head = [_joined(parts[i : i + per_head], axis=2) for i in range(0, len(parts), per_head)]
    return _joined(by_head, axis=1)


def _joined(arrays: list[mx.array], axis: int) -> mx.array:
    return arrays[0] if len(arrays) == 1 else mx.concatenate(arrays, axis=axis)
