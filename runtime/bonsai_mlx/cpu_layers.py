"""Low-bit layers on MLX's CPU device: dequantize + matmul instead of `quantized_matmul`.

MLX's CPU `quantized_matmul` is a scalar loop (~1.5 s for a 1152×3840×640 product at any bit width, measured with mlx
0.32.4) while `mx.dequantize` of the layer followed by a BLAS matmul takes ~40 ms. The weights are the same: the
dequantized matrix is exactly scale·q + bias of every element (binary ±s, ternary −s/0/+s); only the fp32 summation
order of the product differs (as between any two BLAS kernels). 1- and 2-bit layers are unpacked with
MLX ops fused by `mx.compile` (`unpack_affine`, bit-identical to `mx.dequantize` and ~3× faster on the CPU). On
Apple GPUs the quantized Metal kernels stay in use.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .staging import staged_slices

DENSE_CHUNK_VALUES = 1 << 24  # dequantized weight values per matmul (64 MB in fp32)
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


class DequantizedLinear(nn.QuantizedLinear):
    """An nn.QuantizedLinear (same parameters and names) computing x @ dequantize(W).T with a dense matmul.

    The dense weight exists only while its rows are multiplied: layers wider than DENSE_CHUNK_VALUES run in
    blocks of output rows, each evaluated before the next is dequantized (MLX's CPU dequantize peaks at twice its
    output; a bf16/fp16 product is widened to fp32 on top), so Klein's 27648×3072 projection holds 0.13 GB of
    dense weight at a time instead of 0.68 GB (formats/memory.md)."""

    def _dense(self, rows: slice, dtype: mx.Dtype) -> mx.array:
        biases = self.get("biases")
        if self.bits in EXACT_BITS and self.mode == "affine" and biases is not None:
            return unpack_affine(self["weight"][rows], self["scales"][rows], biases[rows], self.bits, self.group_size)
        weight = mx.dequantize(
            self["weight"][rows],
            scales=self["scales"][rows],
            biases=None if biases is None else biases[rows],
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        return weight.astype(dtype)

    def __call__(self, x: mx.array) -> mx.array:
        out_features = self["weight"].shape[0]
        in_features = self["scales"].shape[1] * self.group_size
        block = max(1, DENSE_CHUNK_VALUES // in_features)
        out = staged_slices(lambda rows: mx.matmul(x, self._dense(rows, x.dtype).T), out_features, block, axis=-1)
        if "bias" in self:
            out = out + self["bias"]
        return out


def use_dense_kernels(model: nn.Module, device: mx.Device | None = None) -> int:
    """On the CPU device, make every QuantizedLinear of `model` a DequantizedLinear; returns how many changed."""
    device = device or mx.default_device()
    if device != mx.cpu:
        return 0
    changed = 0
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = DequantizedLinear
            changed += 1
    return changed
