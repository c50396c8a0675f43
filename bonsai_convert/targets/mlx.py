"""MLX bundles for iphone/ipad/mac in PrismML's released layout (formats/mlx.md).

Stock 1-bit/2-bit `nn.QuantizedLinear` tensors in `transformer-packed-mflux/`, a 4-bit mlx-lm Qwen3 in
`text_encoder-mlx-4bit/`; every non-packed tensor BF16 (the loaders reinterpret float bytes as bf16), or F16 when
asked for explicitly (`--dtype float16`: then not for those loaders).
"""

from __future__ import annotations

import re

import numpy as np

from ..codecs import mlx as codec
from ..errors import InputError
from ..lowbit import GROUP_SIZE, LowBitTensor, to_fp16
from ..safetensors_io import TensorSpec
from .base import Planned, Target, block_pattern, dense_output, to_bf16_exact, widen

TEXT_GROUP_SIZE = 64
TEXT_BITS = 4
# mlx-lm quantizes every Linear and the Embedding whose last dim divides the group size.
_TEXT_QUANTIZED = re.compile(
    r"^model\.(embed_tokens|layers\.\d+\.(self_attn|mlp)\.\w+_proj)\.weight$|^lm_head\.weight$"
)
FOLDERS = {
    "transformer": "transformer-packed-mflux",
    "text_encoder": "text_encoder-mlx-4bit",
    "vae": "vae",
    "tokenizer": "tokenizer",
    "scheduler": "scheduler",
}


class MLXTarget(Target):
    safetensors_format = "mlx"
    quantizes_text_encoder = True
    truncates_text_encoder = True
    transformer_file = "diffusion_pytorch_model.safetensors"
    text_encoder_file = "model.safetensors"
    tokenizer_in_text_encoder = True
    carries_quantized_text_encoder = "mlx"

    def __init__(self, name: str, dense_dtype: str = "BF16"):
        self.name = name
        self.dense_dtype = dense_dtype

    def folders(self, variant: str) -> dict[str, str]:
        return dict(FOLDERS)

    def low_bit_outputs(self, name: str, shape: tuple[int, int], variant: str) -> list[Planned]:
        out_features, in_features = shape
        bits = codec.BITS[variant]
        prefix = name[: -len(".weight")]
        groups = in_features // GROUP_SIZE
        return [
            Planned(TensorSpec(name, "U32", (out_features, in_features * bits // 32)), "low_bit_codes", name),
            Planned(TensorSpec(f"{prefix}.scales", self.dense_dtype, (out_features, groups)), "scales", name),
            Planned(TensorSpec(f"{prefix}.biases", self.dense_dtype, (out_features, groups)), "biases", name),
        ]

    def encode_low_bit(self, tensor: LowBitTensor, variant: str) -> dict[str, np.ndarray]:
        prefix = tensor.name[: -len(".weight")]
        weight, scales, biases = codec.encode(tensor.name, tensor.codes, tensor.scales, variant, self.dense_dtype)
        return {tensor.name: weight, f"{prefix}.scales": scales, f"{prefix}.biases": biases}

    def transformer_config(self, config: dict, variant: str, low_bit_names: list[str]) -> dict:
        """mlx-lm style: the default applies to the low-bit linears; every other Linear is listed as not quantized."""
        result = dict(config)
        result["quantization"] = {"group_size": GROUP_SIZE, "bits": codec.BITS[variant], "mode": "affine"}
        result["quantized_layers"] = sorted(name[: -len(".weight")] for name in low_bit_names)
        return result

    def quantization_config(self, variant: str, low_bit_names: list[str], dense_names: list[str]) -> dict:
        """What the released loaders read: bits 1|2, group 128, solver (ternary: bias = −scale), skip patterns."""
        bits = codec.BITS[variant]
        return {
            "format": f"mlx-int{bits}-{variant}-g{GROUP_SIZE}",
            "bits": bits,
            "group_size": GROUP_SIZE,
            "mode": "affine",
            "solver": variant,
            "dtype": "bfloat16" if self.dense_dtype == "BF16" else "float16",
            "bias_relation": "-scales/2" if variant == "binary" else "-scales",
            "skip_patterns": sorted({block_pattern(name) for name in dense_names}),
            "quantized_layers": sorted(name[: -len(".weight")] for name in low_bit_names),
        }

    def text_encoder_outputs(self, name: str, shape: tuple[int, ...], dtype: str) -> list[Planned]:
        if not _TEXT_QUANTIZED.match(name) or len(shape) != 2 or shape[1] % TEXT_GROUP_SIZE:
            return [dense_output(name, shape, dtype, self.dense_dtype)]
        prefix = name[: -len(".weight")]
        rows, cols = shape
        groups = cols // TEXT_GROUP_SIZE
        return [
            Planned(TensorSpec(name, "U32", (rows, cols * TEXT_BITS // 32)), "low_bit_codes", name),
            Planned(TensorSpec(f"{prefix}.scales", self.dense_dtype, (rows, groups)), "scales", name),
            Planned(TensorSpec(f"{prefix}.biases", self.dense_dtype, (rows, groups)), "biases", name),
        ]

    def encode_text_encoder(self, name: str, values: np.ndarray) -> dict[str, np.ndarray]:
        """4-bit mlx-lm affine, group 64: scales and biases rounded to the bundle's dtype, codes chosen against them."""
        outputs = self.text_encoder_outputs(name, values.shape, "F32")
        if len(outputs) == 1:
            return super().encode_text_encoder(name, values)
        weight, scales, biases = quantize_text(name, values, self.dense_dtype)
        prefix = name[: -len(".weight")]
        return {name: weight, f"{prefix}.scales": scales, f"{prefix}.biases": biases}

    def encode_text_encoder_stored(self, name: str, stored: np.ndarray, stored_dtype: str) -> dict | None:
        """`encode_text_encoder` of the widened values, from the stored bf16/fp16 patterns (same bytes)."""
        outputs = self.text_encoder_outputs(name, stored.shape, stored_dtype)
        if len(outputs) == 1 or stored_dtype not in ("BF16", "F16"):
            return None
        from .. import kernels

        table = kernels.widening_table(stored_dtype)
        weight, scales, biases = quantize_text(name, stored.view(np.uint16), self.dense_dtype, table)
        prefix = name[: -len(".weight")]
        return {name: weight, f"{prefix}.scales": scales, f"{prefix}.biases": biases}

    def text_encoder_as_shipped(self, name: str, values: np.ndarray) -> np.ndarray:
        """The weight the runtime will see: 4-bit quantized then dequantized (the reference uses it too)."""
        encoded = self.encode_text_encoder(name, values)
        if len(encoded) == 1:
            return widen(encoded[name], self.dense_dtype)
        prefix = name[: -len(".weight")]
        return dequantize_text(
            encoded[name], encoded[f"{prefix}.scales"], encoded[f"{prefix}.biases"], self.dense_dtype
        )

    def text_encoder_config(self, config: dict) -> dict:
        result = dict(config)
        quantization = {"group_size": TEXT_GROUP_SIZE, "bits": TEXT_BITS, "mode": "affine"}
        result["quantization"] = quantization
        result["quantization_config"] = dict(quantization)
        rope = config.get("rope_parameters")
        if "rope_theta" not in result and isinstance(rope, dict) and "rope_theta" in rope:
            result["rope_theta"] = rope["rope_theta"]  # the WebGPU page reads it at the top level
        return result


def _round_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bf16 (ties to even), as float32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def quantize_text(
    name: str, values: np.ndarray, dense_dtype: str, table: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min/max affine 4-bit per group of 64 (MLX's affine mode): (uint32 words, scales, biases).

    The scale (max−min)/15 and bias min are rounded to the stored dtype first and the codes are chosen against the
    rounded values, so scale·q + bias of the stored tensors is the weight the golden reference and runtime both use.
    Group min/max and the codes are compiled passes (bonsai_convert.kernels) giving `quantize_text_reference`'s
    bytes; anything unusual (a non-finite value, a group whose min is zero) takes the reference's own numpy code.
    With `table` (kernels.widening_table), `values` are the stored 16-bit patterns, read through it unwidened.
    """
    from .. import kernels

    def widened() -> np.ndarray:
        return values if table is None else table[values]

    rows, cols = values.shape
    if not kernels.ENABLED or cols % TEXT_GROUP_SIZE or not values.size:
        return quantize_text_reference(name, widened(), dense_dtype)
    low = np.empty((rows, cols // TEXT_GROUP_SIZE), dtype=np.float32)
    high = np.empty_like(low)
    if table is None:
        flat = np.ascontiguousarray(values, dtype=np.float32)
        finite = kernels.group_min_max(flat, TEXT_GROUP_SIZE, low, high)
    else:
        flat = np.ascontiguousarray(values, dtype=np.uint16)
        finite = kernels.group_min_max_stored(flat, table, TEXT_GROUP_SIZE, low, high)
    if not finite:
        return quantize_text_reference(name, widened(), dense_dtype)  # raises the non-finite error
    zero_min = np.nonzero((low == 0).any(axis=1))[0]
    if zero_min.size:  # the sign of a zero minimum is numpy's choice: take numpy's reduction for those rows
        zero_rows = flat[zero_min] if table is None else table[flat[zero_min]]
        low[zero_min] = zero_rows.reshape(zero_min.size, -1, TEXT_GROUP_SIZE).min(axis=-1)
    scale, bias, stored_scale, stored_bias = _group_scale_bias(name, low, high, dense_dtype)
    if not (np.isfinite(scale).all() and (scale > 0).all() and np.isfinite(bias).all()):
        return quantize_text_reference(name, widened(), dense_dtype)
    words = np.empty((rows, cols // 8), dtype=np.uint32)
    if table is None:
        kernels.affine_codes_4bit(flat, scale, bias, TEXT_GROUP_SIZE, True, words)
    else:
        kernels.affine_codes_4bit_stored(flat, table, scale, bias, TEXT_GROUP_SIZE, True, words)
    return words, stored_scale, stored_bias


def _group_scale_bias(name: str, low: np.ndarray, high: np.ndarray, dense_dtype: str) -> tuple[np.ndarray, ...]:
    """Per group: scale (max−min)/15 and bias min rounded to the stored dtype, as float32 and as stored."""
    scale = np.maximum((high - low) / np.float32(15), np.float32(1e-7))
    if dense_dtype == "BF16":
        scale, bias = _round_to_bf16(scale), _round_to_bf16(low)
        return scale, bias, to_bf16_exact(name, scale), to_bf16_exact(name, bias)
    stored_scale, stored_bias = to_fp16(name, scale), to_fp16(name, low)
    return stored_scale.astype(np.float32), stored_bias.astype(np.float32), stored_scale, stored_bias


def quantize_text_reference(
    name: str, values: np.ndarray, dense_dtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`quantize_text` in plain numpy (the specification of its bytes)."""
    rows, cols = values.shape
    grouped = np.asarray(values, dtype=np.float32).reshape(rows, cols // TEXT_GROUP_SIZE, TEXT_GROUP_SIZE)
    if not np.isfinite(grouped).all():
        raise InputError(f"{name}: non-finite value in a text-encoder weight")
    low, high = grouped.min(axis=-1), grouped.max(axis=-1)
    scale, bias, stored_scale, stored_bias = _group_scale_bias(name, low, high, dense_dtype)
    q = np.rint((grouped - bias[..., None]) / scale[..., None])
    q = np.clip(q, 0, 15).astype(np.uint32).reshape(rows, cols // 8, 8)
    words = np.zeros((rows, cols // 8), dtype=np.uint32)
    for position in range(8):  # LSB-first: element i of a word at bits 4i..4i+3
        words |= q[:, :, position] << np.uint32(4 * position)
    return words, stored_scale, stored_bias


def dequantize_text(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, dense_dtype: str) -> np.ndarray:
    """scale·q + bias in float32 from the stored tensors (bf16 bits widened exactly)."""
    import mlx.core as mx

    result = mx.dequantize(
        mx.array(weight),
        mx.array(widen(scales, dense_dtype).astype(np.float32)),
        mx.array(widen(biases, dense_dtype).astype(np.float32)),
        group_size=TEXT_GROUP_SIZE,
        bits=TEXT_BITS,
    )
    return np.array(result)
