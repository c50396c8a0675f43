"""Low-bit layers on MLX's CPU device: dequantize + matmul instead of `quantized_matmul`.

MLX's CPU `quantized_matmul` is a scalar loop (~1.5 s for a 1152×3840×640 product at any bit width, REFERENCE.md
§12) while `mx.dequantize` of the layer followed by a BLAS matmul takes ~40 ms. The weights are the same: the
dequantized matrix is exactly scale·q + bias of every element (binary ±s, ternary −s/0/+s); only the fp32
summation order of the product differs (as between any two BLAS kernels). On Apple GPUs the quantized Metal
kernels stay in use.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class DequantizedLinear(nn.QuantizedLinear):
    """An nn.QuantizedLinear (same parameters and names) computing x @ dequantize(W).T with a dense matmul.

    The dense weight exists only while the layer runs (one layer at a time inside a lazily evaluated graph)."""

    def __call__(self, x: mx.array) -> mx.array:
        weight = mx.dequantize(
            self["weight"],
            scales=self["scales"],
            biases=self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        out = mx.matmul(x, weight.astype(x.dtype).T)
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
