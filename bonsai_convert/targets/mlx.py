"""MLX bundles for iphone/ipad/mac: stock 1-bit/2-bit `nn.QuantizedLinear` tensors, 4-bit Qwen3 (mlx-lm style)."""

from __future__ import annotations

import re

import numpy as np

from ..codecs import mlx as codec
from ..lowbit import GROUP_SIZE, LowBitTensor
from ..safetensors_io import TensorSpec
from .base import Planned, Target, dense_output

TEXT_GROUP_SIZE = 64
TEXT_BITS = 4
# mlx-lm quantizes every Linear and the Embedding whose last dim divides the group size.
_TEXT_QUANTIZED = re.compile(
    r"^model\.(embed_tokens|layers\.\d+\.(self_attn|mlp)\.\w+_proj)\.weight$|^lm_head\.weight$"
)


class MLXTarget(Target):
    safetensors_format = "mlx"
    quantizes_text_encoder = True
    truncates_text_encoder = True

    def __init__(self, name: str):
        self.name = name

    def low_bit_outputs(self, name: str, shape: tuple[int, int], variant: str) -> list[Planned]:
        out_features, in_features = shape
        bits = codec.BITS[variant]
        prefix = name[: -len(".weight")]
        groups = in_features // GROUP_SIZE
        return [
            Planned(TensorSpec(name, "U32", (out_features, in_features * bits // 32)), "low_bit_codes", name),
            Planned(TensorSpec(f"{prefix}.scales", "F16", (out_features, groups)), "scales", name),
            Planned(TensorSpec(f"{prefix}.biases", "F16", (out_features, groups)), "biases", name),
        ]

    def encode_low_bit(self, tensor: LowBitTensor, variant: str) -> dict[str, np.ndarray]:
        prefix = tensor.name[: -len(".weight")]
        weight, scales, biases = codec.encode(tensor.name, tensor.codes, tensor.scales, variant)
        return {tensor.name: weight, f"{prefix}.scales": scales, f"{prefix}.biases": biases}

    def transformer_config(self, config: dict, variant: str, low_bit_names: list[str]) -> dict:
        """mlx-lm style: the default applies to the low-bit linears; every other Linear is listed as not quantized."""
        result = dict(config)
        quantization: dict[str, object] = {
            "group_size": GROUP_SIZE,
            "bits": codec.BITS[variant],
            "mode": "affine",
        }
        result["quantization"] = quantization
        result["quantized_layers"] = sorted(name[: -len(".weight")] for name in low_bit_names)
        return result

    def text_encoder_outputs(self, name: str, shape: tuple[int, ...], dtype: str) -> list[Planned]:
        if not _TEXT_QUANTIZED.match(name) or len(shape) != 2 or shape[1] % TEXT_GROUP_SIZE:
            return [dense_output(name, shape, dtype)]
        prefix = name[: -len(".weight")]
        rows, cols = shape
        groups = cols // TEXT_GROUP_SIZE
        return [
            Planned(TensorSpec(name, "U32", (rows, cols * TEXT_BITS // 32)), "low_bit_codes", name),
            Planned(TensorSpec(f"{prefix}.scales", "F16", (rows, groups)), "scales", name),
            Planned(TensorSpec(f"{prefix}.biases", "F16", (rows, groups)), "biases", name),
        ]

    def encode_text_encoder(self, name: str, values: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.text_encoder_outputs(name, values.shape, "F32")
        if len(outputs) == 1:
            return super().encode_text_encoder(name, values)
        import mlx.core as mx

        from ..lowbit import to_fp16

        weight, scales, biases = mx.quantize(
            mx.array(to_fp16(name, values)), group_size=TEXT_GROUP_SIZE, bits=TEXT_BITS
        )
        prefix = name[: -len(".weight")]
        return {
            name: np.array(weight, copy=False),
            f"{prefix}.scales": np.array(scales, copy=False),
            f"{prefix}.biases": np.array(biases, copy=False),
        }

    def text_encoder_as_shipped(self, name: str, values: np.ndarray) -> np.ndarray:
        """The weight the runtime will see: 4-bit quantized then dequantized (the reference uses it too)."""
        encoded = self.encode_text_encoder(name, values)
        if len(encoded) == 1:
            return encoded[name]
        import mlx.core as mx

        prefix = name[: -len(".weight")]
        weight = mx.dequantize(
            mx.array(encoded[name]),
            # fp32 scales/biases: the runtime computes scale·q + bias without rounding the weight to fp16
            mx.array(encoded[f"{prefix}.scales"].astype(np.float32)),
            mx.array(encoded[f"{prefix}.biases"].astype(np.float32)),
            group_size=TEXT_GROUP_SIZE,
            bits=TEXT_BITS,
        )
        return np.array(weight)

    def text_encoder_config(self, config: dict) -> dict:
        result = dict(config)
        result["quantization"] = {"group_size": TEXT_GROUP_SIZE, "bits": TEXT_BITS, "mode": "affine"}
        return result
