"""Linear layers on MLX's CPU device: dequantize + fp32 matmul instead of `quantized_matmul` or a 16-bit matmul.

MLX's CPU `quantized_matmul` is a scalar loop (~1.5 s for a 1152×3840×640 product at any bit width, measured
with mlx 0.32.4) while `mx.dequantize` of the layer followed by a BLAS matmul takes ~40 ms. The weights are the
same: the dequantized matrix is exactly scale·q + bias of every element (binary ±s, ternary −s/0/+s); only the
fp32 summation order of the product differs (as between any two BLAS kernels). 1- and 2-bit layers are unpacked
with MLX ops fused by `mx.compile` (`unpack_affine`, bit-identical to `mx.dequantize` and ~3× faster on the CPU).

Every product runs in float32 whatever the compute dtype: MLX's CPU float16 / bfloat16 matmul is its own SIMD loop,
not the BLAS (a 1152×640 by 640×5760 product: 2.1 s in fp16, 1.6 s in bf16, 0.04 s as sgemm on this 2-core
x86-64). A 16-bit layer's inputs are widened (exact), the product accumulates in fp32 (as MLX's and torch's CPU
16-bit kernels do) and is rounded once to the compute dtype. A single-row product (the modulation's, of the time
embedding) stays a 16-bit matrix-vector product: it reads each weight once, where widening would write it again.
On Apple GPUs the quantized Metal kernels and 16-bit matmuls stay in use.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .staging import staged, staged_slices

DENSE_CHUNK_VALUES = 1 << 24  # dequantized (fp32) weight values per matmul: 64 MB
PRODUCT_DTYPE = mx.float32
EXACT_BITS = (1, 2)  # Bonsai's binary / ternary layers: scale·q + bias is exact, however it is computed


def _affine_values(words: mx.array, scales: mx.array, biases: mx.array, shifts: mx.array, mask: int) -> mx.array:
    """(rows, groups, words per group, 1) uint32 → (rows, groups, words per group, values per word)."""
    return ((words >> shifts) & mask).astype(scales.dtype) * scales + biases


_affine_values_compiled = mx.compile(_affine_values)


def unpack_affine(weight: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """`mx.dequantize` of a 1- or 2-bit affine layer as MLX elementwise ops (shift, mask, scale·q + bias per
    group) fused by `mx.compile` into one pass: the same values (q·s + b of a small integer q is exact for
    Bonsai's scales; tests compare them bit for bit), 1.1–1.2 ns per value on the CPU against 2.5–3.7 ns for the
    same ops uncompiled and ~3× that for `mx.dequantize`, and no temporary beyond the output. Fields are LSB-first,
    32/bits per uint32 word along the row, as MLX packs them; the inputs are reshaped (free) so that every
    broadcast is along a trailing axis of the fused loop."""
    rows = weight.shape[0]
    groups = scales.shape[-1]
    words = weight.reshape(rows, groups, -1, 1)
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    values = _affine_values_compiled(
        words, scales.reshape(rows, groups, 1, 1), biases.reshape(rows, groups, 1, 1), shifts, (1 << bits) - 1
    )
    return values.reshape(rows, groups * group_size)


def _rows(x: mx.array) -> int:
    return x.size // max(1, x.shape[-1])


def blocked_product(x: mx.array, dense: Callable[[slice], mx.array], out_features: int, in_features: int) -> mx.array:
    """x @ dense(rows).T in float32, in blocks of at most DENSE_CHUNK_VALUES weights (each evaluated before the
    next is built), each block rounded to x's dtype."""
    x_wide = x.astype(PRODUCT_DTYPE)
    block = max(1, DENSE_CHUNK_VALUES // in_features)
    return staged_slices(
        lambda rows: mx.matmul(x_wide, dense(rows).astype(PRODUCT_DTYPE).T).astype(x.dtype), out_features, block, -1
    )


class DequantizedLinear(nn.QuantizedLinear):
    """An nn.QuantizedLinear (same parameters and names) computing x @ dequantize(W).T with a dense fp32 matmul.

    The dense weight exists only while its rows are multiplied: layers wider than DENSE_CHUNK_VALUES run in
    blocks of output rows, each evaluated before the next is dequantized (MLX's CPU dequantize peaks at twice its
    output), so Klein's 27648×3072 projection holds 0.13 GB of dense weight at a time instead of 0.68 GB
    (formats/memory.md)."""

    def _dense(self, rows: slice) -> mx.array:
        biases = self.get("biases")
        scales = self["scales"][rows].astype(PRODUCT_DTYPE)
        if self.bits in EXACT_BITS and self.mode == "affine" and biases is not None:
            return unpack_affine(
                self["weight"][rows], scales, biases[rows].astype(PRODUCT_DTYPE), self.bits, self.group_size
            )
        return mx.dequantize(
            self["weight"][rows],
            scales=scales,
            biases=None if biases is None else biases[rows].astype(PRODUCT_DTYPE),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )

    def __call__(self, x: mx.array) -> mx.array:
        cached = getattr(self, "_dense_cache", None)
        if cached is not None:
            out = mx.matmul(x.astype(PRODUCT_DTYPE), cached.T).astype(x.dtype)
        else:
            in_features = self["scales"].shape[1] * self.group_size
            out = blocked_product(x, self._dense, self["weight"].shape[0], in_features)
        if "bias" in self:
            out = out + self["bias"]
        return out

    def dense_bytes(self) -> int:
        """Bytes of this layer's fp32 dequantized weight."""
        return self["weight"].shape[0] * self["scales"].shape[1] * self.group_size * PRODUCT_DTYPE.size

    def keep_dense(self) -> None:
        """Dequantize once and keep the fp32 weight (a plain attribute, not a parameter): later calls skip the
        per-call dequantization. Built block by block; the peak is twice this layer's dense weight while the blocks are
        joined."""
        out_features, in_features = self["weight"].shape[0], self["scales"].shape[1] * self.group_size
        block = max(1, DENSE_CHUNK_VALUES // in_features)
        dense = staged_slices(self._dense, out_features, block, axis=0)
        object.__setattr__(self, "_dense_cache", staged(dense))


def keep_dense_weights(model: nn.Module, budget_bytes: int) -> int:
    """Keep the fp32 dequantized weights of `model`'s DequantizedLinear layers (in `named_modules` order) while
    their total stays within `budget_bytes` (the packed codes stay too); returns the bytes kept.

    Trades memory for time on the CPU: unpacking costs ~1.2 ns per weight per call on one core (a Klein-width
    step at 256² spends ~14 % of its time there), while the kept weights cost 4 bytes per weight for as long as the
    model lives — what a dense fp32 model (diffusers' CPU reference) holds for the same layers."""
    kept = 0
    for _, module in model.named_modules():
        if isinstance(module, DequantizedLinear) and getattr(module, "_dense_cache", None) is None:
            if kept + module.dense_bytes() > budget_bytes:
                continue
            module.keep_dense()
            kept += module.dense_bytes()
    return kept


class WideLinear(nn.Linear):
    """An nn.Linear with 16-bit weights whose products (of more than one row) run in float32 blocks."""

    def __call__(self, x: mx.array) -> mx.array:
        if _rows(x) <= 1:
            return super().__call__(x)
        weight = self["weight"]
        out = blocked_product(x, lambda rows: weight[rows], weight.shape[0], weight.shape[1])
        if "bias" in self:
            out = out + self["bias"]
        return out


def use_dense_kernels(model: nn.Module, device: mx.Device | None = None) -> int:
    """On the CPU device, make every QuantizedLinear of `model` a DequantizedLinear and every nn.Linear with 16-bit
    weights a WideLinear (call after the dtype is set); returns how many changed."""
    device = device or mx.default_device()
    if device != mx.cpu:
        return 0
    changed = 0
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = DequantizedLinear
            changed += 1
        elif type(module) is nn.Linear and module["weight"].dtype in (mx.float16, mx.bfloat16):
            module.__class__ = WideLinear
            changed += 1
    return changed
