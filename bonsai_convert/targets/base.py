"""What a target writes, derived from shapes alone, so `plan` and `pack` share one layout (byte for byte)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..dtypes import to_bf16_exact, widen  # noqa: F401 - re-exported
from ..lowbit import LowBitTensor, to_fp16
from ..safetensors_io import FLOAT_DTYPES, TensorSpec

# Manifest parts of the transformer: low-bit codes, their scales, MLX biases / Gemlite zeros and metadata, and
# the tensors kept in fp16.
PARTS = ("low_bit_codes", "scales", "biases", "zeros", "metadata", "fp16_tensors")


def block_pattern(name: str) -> str:
    """A tensor's module path with block indices as `*` (e.g. `transformer_blocks.*.attn.norm_q`)."""
    module = name.rsplit(".", 1)[0]
    return re.sub(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.", r"\1.*.", module)


@dataclass(frozen=True)
class Planned:
    """One output tensor: its spec, the manifest part it counts toward, and the source tensor it comes from."""

    spec: TensorSpec
    part: str
    source: str


def dense_output(name: str, shape: tuple[int, ...], dtype: str, float_dtype: str = "F16") -> Planned:
    """A tensor kept dense: floats become float_dtype (F16 or BF16), integer buffers keep their dtype."""
    out_dtype = float_dtype if dtype in FLOAT_DTYPES else dtype
    return Planned(TensorSpec(name, out_dtype, tuple(shape)), "fp16_tensors", name)


def encode_dense(name: str, values: np.ndarray, float_dtype: str = "F16") -> np.ndarray:
    """Floats to fp16 (overflow checked) or exact bf16 bits; integers unchanged."""
    if np.issubdtype(values.dtype, np.floating):
        return to_bf16_exact(name, values) if float_dtype == "BF16" else to_fp16(name, values)
    return np.asarray(values)


def encode_dense_stored(
    name: str, stored: np.ndarray, stored_dtype: str, float_dtype: str, out: np.ndarray | None = None
) -> np.ndarray:
    """`encode_dense` of the widened values, from the stored values in one compiled pass (same bytes, same errors).

    bf16 → BF16 and f16 → F16 are copies with a finiteness check; bf16 → F16 goes through a 65536-entry table.
    Anything else, or a non-finite value to report, takes `encode_dense` itself.
    """
    from .. import kernels

    if kernels.ENABLED and stored_dtype in ("BF16", "F16") and float_dtype in ("BF16", "F16"):
        bits = np.ascontiguousarray(stored).view(np.uint16)
        flat = bits.reshape(-1)
        if stored_dtype == float_dtype:
            if kernels.all_finite(flat, np.uint16(0x7C00 if float_dtype == "F16" else 0x7F80)):
                return bits.view(np.float16) if float_dtype == "F16" else bits
        elif stored_dtype == "BF16":
            out = np.empty(bits.shape, dtype=np.uint16) if out is None else out  # out: a uint16 buffer to fill
            if kernels.convert_table(flat, kernels.BF16_TO_FP16, out.reshape(-1)):
                return out.view(np.float16)
    values = widen(np.asarray(stored), "BF16") if stored_dtype == "BF16" else stored
    return encode_dense(name, values, float_dtype)


class Target:
    """A device format. Subclasses define the low-bit layout; everything else is fp16 under diffusers names."""

    name: str = ""
    safetensors_format: str = "pt"
    quantizes_text_encoder: bool = False  # text encoder stored 4-bit (lossy, declared)
    truncates_text_encoder: bool = False  # layers after the last used hidden state dropped (own runtime only)
    dense_dtype: str = "F16"  # dtype of every dense float tensor (and of scales/biases where the format allows)
    transformer_file: str | None = None  # one unsharded transformer file of this name, else sharded + index
    transformer_container: str = "safetensors"  # or "torch-zip" (torch.save's zip, formats/gemlite.md)
    text_encoder_file: str | None = None  # one text-encoder file of this name (+ its index), else sharded
    text_encoder_container: str = "safetensors"  # or "torch-zip": one file, a dict of module state dicts (HQQ)
    tokenizer_in_text_encoder: bool = False  # tokenizer files also inside the text-encoder folder (mlx-lm)
    carries_quantized_text_encoder: str | None = None  # a prequantized text encoder of this format is carried as is

    def folders(self, variant: str) -> dict[str, str]:
        """Bundle folder of each component (diffusers names unless the target's released layout says otherwise)."""
        return {name: name for name in ("transformer", "text_encoder", "vae", "tokenizer", "scheduler")}

    def quantization_config(self, variant: str, low_bit_names: list[str], dense_names: list[str]) -> dict | None:
        """The transformer's quantization_config.json, for targets whose loaders read one."""
        return None

    def extra_json_files(self, folders: dict[str, str], variant: str) -> dict[str, dict]:
        """Further JSON files the target's released loaders require (bundle path → content)."""
        return {}

    def low_bit_outputs(self, name: str, shape: tuple[int, int], variant: str) -> list[Planned]:
        raise NotImplementedError

    def encode_low_bit(self, tensor: LowBitTensor, variant: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def transformer_config(self, config: dict, variant: str, low_bit_names: list[str]) -> dict:
        """The transformer config.json written into the bundle."""
        return dict(config)

    # Text encoder: kept dense (fp16) unless the target quantizes it.
    def text_encoder_outputs(self, name: str, shape: tuple[int, ...], dtype: str) -> list[Planned]:
        return [dense_output(name, shape, dtype, self.dense_dtype)]

    def encode_text_encoder(self, name: str, values: np.ndarray) -> dict[str, np.ndarray]:
        return {name: encode_dense(name, values, self.dense_dtype)}

    def encode_text_encoder_stored(self, name: str, stored: np.ndarray, stored_dtype: str) -> dict | None:
        """`encode_text_encoder` of the widened values computed from the stored bf16/fp16 patterns (same bytes),
        or None where the target has no such path (the caller widens and calls `encode_text_encoder`)."""
        return None

    def text_encoder_row_separable(self, name: str) -> bool:
        """Whether encoding rows separately and stacking them gives the whole tensor's encoding (row-major)."""
        return True

    def text_encoder_modules(self, tensors: dict[str, tuple[tuple[int, ...], str]], config: dict) -> dict | None:
        """For a torch-zip text encoder: module → {key: TensorRef or metadata} (its pickle), else None."""
        return None

    def text_encoder_as_shipped(self, name: str, values: np.ndarray) -> np.ndarray:
        """The text-encoder weight as the runtime will see it (what the golden reference must use too)."""
        return widen(encode_dense(name, values, self.dense_dtype), self.dense_dtype)

    def text_encoder_config(self, config: dict) -> dict:
        return dict(config)
