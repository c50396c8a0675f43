"""CUDA bundles: every low-bit linear as the state dict GemLiteLinearTriton loads without re-packing; the text
encoder as HQQ 4-bit (`text_encoder-hqq-4bit/qmodel.pt`, what PrismML's release loads with hqq)."""

from __future__ import annotations

import re

import numpy as np
from bonsai_common.torch_zip import TensorRef

from ..codecs import gemlite as codec
from ..codecs import hqq
from ..lowbit import LowBitTensor, to_fp16
from ..safetensors_io import TensorSpec
from .base import Planned, Target, block_pattern, dense_output

TEXT_GROUP_SIZE = hqq.GROUP_SIZE
TEXT_BITS = hqq.NBITS
_PART_OF = {
    "W_q": "low_bit_codes",
    "scales": "scales",
    "zeros": "zeros",
    "metadata": "metadata",
    "orig_shape": "metadata",
    "meta_scale": "metadata",
    "scale": "scales",
    "zero": "zeros",
}
# The Qwen3 linears (not the embedding: GemLite is a Linear kernel).
_TEXT_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def quantize_affine_4bit(
    values: np.ndarray, group_size: int = TEXT_GROUP_SIZE, table: np.ndarray | None = None
) -> tuple[np.ndarray, ...] | None:
    """Round-to-nearest asymmetric 4-bit per group (min/max, as MLX's affine mode): q, fp16 scales, fp16 zeros.

    W ≈ (q − zero)·scale with zero = −min/scale, so GemLite's stored fma zero −zero·scale equals min.
    Group min/max and the codes are compiled passes (bonsai_convert.kernels) giving the reference's bytes; anything
    unusual (non-finite, a zero minimum whose sign numpy picks, a zero fp16 scale) takes the reference's numpy code.
    With `table` (kernels.widening_table), `values` are stored 16-bit patterns read through it (never widened in
    memory); the reference then gets table[values], except that a non-finite value (e.g. one beyond fp16) returns
    None: `to_fp16` on the plain path reports it.
    """
    from .. import kernels

    def reference() -> tuple[np.ndarray, ...]:
        return quantize_affine_4bit_reference(values if table is None else table[values], group_size)

    rows, cols = values.shape
    if not kernels.ENABLED or cols % group_size or group_size % 8 or not values.size:
        return reference()
    low = np.empty((rows, cols // group_size), dtype=np.float32)
    high = np.empty_like(low)
    block = max(1, (4 << 20) // (4 * cols))  # rows widened to float32 at a time (never the whole tensor)
    for start in range(0, rows, block):
        part = slice(start, start + block)
        if table is None:
            flat = np.ascontiguousarray(values[part], dtype=np.float32)
            finite = kernels.group_min_max(flat, group_size, low[part], high[part])
        else:
            finite = kernels.group_min_max_stored(values[part], table, group_size, low[part], high[part])
        if not finite:
            return reference() if table is None else None
    if (low == 0).any():
        return reference()
    scales = np.maximum((high - low) / 15.0, 1e-8).astype(np.float16)
    safe = scales.astype(np.float32)
    zeros = (-low / safe).astype(np.float16)
    offsets = zeros.astype(np.float32)
    if not ((safe > 0).all() and np.isfinite(safe).all() and np.isfinite(offsets).all()):
        return reference()
    q = np.empty((rows, cols), dtype=np.uint8)
    for start in range(0, rows, block):
        part = slice(start, start + block)
        if table is None:
            flat = np.ascontiguousarray(values[part], dtype=np.float32)
            kernels.affine_codes_4bit(flat, safe[part], offsets[part], group_size, False, q[part])
        else:
            kernels.affine_codes_4bit_stored(values[part], table, safe[part], offsets[part], group_size, False, q[part])
    return q, scales, zeros


def quantize_affine_4bit_reference(values: np.ndarray, group_size: int = TEXT_GROUP_SIZE) -> tuple[np.ndarray, ...]:
    """`quantize_affine_4bit` in plain numpy (the specification of its bytes)."""
    rows, cols = values.shape
    grouped = values.astype(np.float32).reshape(rows, cols // group_size, group_size)
    low, high = grouped.min(axis=-1), grouped.max(axis=-1)
    scales = np.maximum((high - low) / 15.0, 1e-8).astype(np.float16)
    safe = scales.astype(np.float32)
    zeros = (-low / safe).astype(np.float16)
    q = np.clip(np.round(grouped / safe[..., None] + zeros.astype(np.float32)[..., None]), 0, 15)
    return q.reshape(rows, cols).astype(np.uint8), scales, zeros


AUTOTUNE_FILE = "gemlite_autotune.json"


class CudaTarget(Target):
    """PrismML's released CUDA layout: `transformer-gemlite-int{1,2}/` holding `state_dict.pt` (torch.save's zip of
    plain tensors), `config.json`, `quantization_config.json` and `gemlite_autotune.json`; the text encoder as
    `text_encoder-hqq-4bit/{config.json, qmodel.pt}` (hqq's `save_quantized` layout)."""

    name = "cuda"
    quantizes_text_encoder = True
    truncates_text_encoder = False  # the runtime is diffusers/transformers: every layer is kept
    transformer_file = "state_dict.pt"
    carries_quantized_text_encoder = "hqq"  # a cuda bundle's (or the release's) HQQ text encoder, carried
    transformer_container = "torch-zip"
    text_encoder_file = hqq.WEIGHTS_FILE
    text_encoder_container = "torch-zip"  # a dict of module state dicts (formats/hqq.md)

    def folders(self, variant: str) -> dict[str, str]:
        result = super().folders(variant)
        result["transformer"] = f"transformer-gemlite-int{codec.VARIANT_BITS[variant]}"
        result["text_encoder"] = hqq.FOLDER
        return result

    def quantization_config(self, variant: str, low_bit_names: list[str], dense_names: list[str]) -> dict:
        """What image-studio's loader reads: format, bits, group size, packing bitwidth, solver, skip patterns and
        the quantized modules (`quantized_fqns`); the dtypes we store are stated too."""
        bits = codec.VARIANT_BITS[variant]
        return {
            "format": f"gemlite-int{bits}-{variant}-g{codec.GROUP_SIZE}",
            "bits": bits,
            "group_size": codec.GROUP_SIZE,
            "packing_bitwidth": codec.PACKING_BITWIDTH,
            "solver": variant,
            "scales_dtype": "float16",
            "dtype": "bfloat16" if self.dense_dtype == "BF16" else "float16",
            "skip_patterns": sorted({block_pattern(name) for name in dense_names}),
            "quantized_fqns": sorted(name[: -len(".weight")] for name in low_bit_names),
        }

    def extra_json_files(self, folders: dict[str, str], variant: str) -> dict[str, dict]:
        """gemlite_autotune.json: empty (Gemlite tunes on first use) until `bonsai-convert tune` fills it."""
        return {f"{folders['transformer']}/{AUTOTUNE_FILE}": {}}

    def low_bit_outputs(self, name: str, shape: tuple[int, int], variant: str) -> list[Planned]:
        prefix = name[: -len(".weight")]
        return [
            Planned(TensorSpec(out_name, dtype, tuple(out_shape)), _PART_OF[out_name.rsplit(".", 1)[1]], name)
            for out_name, dtype, out_shape in codec.tensor_specs(prefix, shape[0], shape[1], variant)
        ]

    def encode_low_bit(self, tensor: LowBitTensor, variant: str) -> dict[str, np.ndarray]:
        prefix = tensor.name[: -len(".weight")]
        state = codec.encode(tensor.codes, tensor.scales, variant)
        return {f"{prefix}.{key}": value for key, value in state.items()}

    def text_encoder_outputs(self, name: str, shape: tuple[int, ...], dtype: str) -> list[Planned]:
        """A Qwen3 linear whose weights fill whole pairs of 64-groups: HQQ's W_q, scale, zero; the rest dense."""
        if not _TEXT_LINEAR.match(name) or not hqq.quantizable(tuple(shape)):
            return [dense_output(name, shape, dtype, self.dense_dtype)]
        prefix = name[: -len(".weight")]
        return [
            Planned(TensorSpec(out_name, out_dtype, out_shape), _PART_OF[out_name.rsplit(".", 1)[1]], name)
            for out_name, out_dtype, out_shape in hqq.tensor_specs(prefix, shape[0], shape[1])
        ]

    def text_encoder_modules(self, tensors: dict[str, tuple[tuple[int, ...], str]], config: dict) -> dict:
        """qmodel.pt's modules (formats/hqq.md): an HQQ layer's entries, or a dense module's {key: tensor}; a tied
        lm_head shares the embedding's storage, as `save_quantized` writes it."""
        modules: dict[str, dict[str, object]] = {}
        for name, (shape, dtype) in sorted(tensors.items(), key=lambda item: _natural(item[0])):
            module, _, key = name.rpartition(".")
            outputs = self.text_encoder_outputs(name, shape, dtype)
            if len(outputs) > 1:
                modules[module] = hqq.layer_entries(module, shape[0], shape[1])
            else:
                modules.setdefault(module, {})[key] = TensorRef(name)
        embedding = "model.embed_tokens.weight"
        if config.get("tie_word_embeddings", False) and embedding in tensors and "lm_head.weight" not in tensors:
            modules["lm_head"] = {"weight": TensorRef(embedding)}
        return modules

    def _hqq_state(self, name: str, quantized: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        q, scales, zeros = quantized
        prefix = name[: -len(".weight")]
        return {f"{prefix}.{key}": value for key, value in hqq.encode(q, scales, zeros).items()}

    def encode_text_encoder(self, name: str, values: np.ndarray) -> dict[str, np.ndarray]:
        if len(self.text_encoder_outputs(name, values.shape, "F32")) == 1:
            return super().encode_text_encoder(name, values)
        return self._hqq_state(name, quantize_affine_4bit(hqq.grouped(to_fp16(name, values))))

    def encode_text_encoder_stored(self, name: str, stored: np.ndarray, stored_dtype: str) -> dict | None:
        """`encode_text_encoder` of the widened values, from the stored bf16/fp16 patterns (same bytes): the
        fp16 rounding goes through a table and a value that overflows it takes the plain path, which refuses it."""
        from .. import kernels

        outputs = self.text_encoder_outputs(name, stored.shape, stored_dtype)
        if len(outputs) == 1 or stored_dtype not in ("BF16", "F16"):
            return None
        bits = hqq.grouped(np.ascontiguousarray(stored).view(np.uint16))
        quantized = quantize_affine_4bit(bits, TEXT_GROUP_SIZE, kernels.widening_table(stored_dtype, via_fp16=True))
        return None if quantized is None else self._hqq_state(name, quantized)

    def text_encoder_row_separable(self, name: str) -> bool:
        """HQQ packs group r with group r + G/2 into one byte: only dense tensors can be written in row chunks."""
        return len(self.text_encoder_outputs(name, (2, 64), "F32")) == 1

    def text_encoder_as_shipped(self, name: str, values: np.ndarray) -> np.ndarray:
        encoded = self.encode_text_encoder(name, values)
        if len(encoded) == 1:
            return encoded[name]
        prefix = name[: -len(".weight")]
        state = {key: encoded[f"{prefix}.{key}"] for key in hqq.TENSOR_KEYS}
        return hqq.dequantize(state["W_q"], state["scale"], state["zero"], values.shape)

    def text_encoder_config(self, config: dict) -> dict:
        """The source's Qwen3 config with `architectures` (hqq's `create_model` picks the model class from it) and
        a `bonsai_quantization` record (informational; transformers and hqq ignore it)."""
        result = dict(config)
        result["architectures"] = ["Qwen3ForCausalLM"]
        result["bonsai_quantization"] = {
            "format": "hqq",
            "nbits": TEXT_BITS,
            "group_size": TEXT_GROUP_SIZE,
            "axis": 1,
            "compute_dtype": hqq.COMPUTE_DTYPE,
            "scheme": "min/max round-to-nearest (MLX affine), unrounded fp16 zero; not HQQ's optimizer",
        }
        return result


def _natural(name: str) -> tuple:
    """Sort key putting `model.layers.2` before `model.layers.10` (the model's own order of modules)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))
