"""A released MLX pack (PrismML's `bonsai-image-*-4B-mlx-{1,2}bit` layout, and our MLX bundles) as a source: the
transformer's codes decoded exactly from stock `nn.QuantizedLinear` tensors, and its mlx-lm 4-bit text encoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..codecs import mlx as mlx_codec
from ..dtypes import widen
from ..errors import InputError
from ..files import read_json
from ..lowbit import GROUP_SIZE, LowBitTensor, is_low_bit_key
from ..safetensors_io import SafetensorsFile
from .base import (
    Source,
    SourceTensor,
    check_config,
    check_index,
    check_klein,
    component_tensors,
    component_weight_files,
    open_tensor_files,
    other_components,
    recorded_settings,
)

MLX_TRANSFORMER = "transformer-packed-mflux"
MLX_TEXT_ENCODER = "text_encoder-mlx-4bit"


def mlx_pack_variant(folder: Path, config: dict, what: str = "MLX") -> str:
    """binary/ternary of a released MLX (or Gemlite) pack from quantization_config.json (else the config's blocks)."""
    path = folder / "quantization_config.json"
    quantization = read_json(path) if path.exists() or path.is_symlink() else None
    quantization = quantization or config.get("quantization_config") or config.get("quantization") or {}
    bits, group = quantization.get("bits"), quantization.get("group_size")
    if bits not in (1, 2) or group != GROUP_SIZE:
        raise InputError(f"{path}: bits {bits!r}, group_size {group!r}: not a Bonsai {what} pack (bits 1|2, group 128)")
    variant = "binary" if bits == 1 else "ternary"
    solver = quantization.get("solver")
    if solver is not None and solver != variant:
        raise InputError(f"{path}: solver {solver!r} does not match {bits}-bit ({variant})")
    return variant


def _mlx_pack_shapes(by_name: dict[str, tuple[SafetensorsFile, str]], bits: int) -> dict[str, tuple[int, ...]]:
    """Logical shapes of a released MLX pack's transformer: each low-bit `.weight` [N, K·bits/32] is [N, K]."""
    shapes = {}
    for key, (handle, _) in by_name.items():
        info = handle.tensors[key]
        module = key.rsplit(".", 1)[0]
        if key.endswith((".scales", ".biases")) and is_low_bit_key(module + ".weight"):
            if module + ".weight" not in by_name:
                raise InputError(f"{handle.path}: tensor {key} has no low-bit .weight")
            continue
        if not is_low_bit_key(key):
            shapes[key] = info.shape
            continue
        parts = [by_name.get(f"{module}.{suffix}") for suffix in ("scales", "biases")]
        if any(part is None for part in parts):
            raise InputError(f"{handle.path}: tensor {key} needs {module}.scales and {module}.biases")
        scales = parts[0][0].tensors[parts[0][1]]  # type: ignore[index]
        biases = parts[1][0].tensors[parts[1][1]]  # type: ignore[index]
        if len(scales.shape) != 2 or scales.shape != biases.shape or scales.dtype not in ("BF16", "F16"):
            raise InputError(f"{handle.path}: tensor {module}.scales/.biases: expected BF16 [out, in/128]")
        out_features, groups = scales.shape
        expected = (out_features, groups * GROUP_SIZE * bits // 32)
        if info.dtype != "U32" or info.shape != expected:
            raise InputError(
                f"{handle.path}: tensor {key}: expected U32 {list(expected)}, got {info.dtype} {list(info.shape)}"
            )
        shapes[key] = (out_features, groups * GROUP_SIZE)
    return shapes


class QuantizedTextEncoder:
    """A released MLX pack's mlx-lm 4-bit text encoder: its logical tensors (dequantized on read) and stored ones."""

    format = "mlx"

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = read_json(folder / "config.json")
        quantization = self.config.get("quantization") or self.config.get("quantization_config") or {}
        self.bits, self.group_size = quantization.get("bits"), quantization.get("group_size")
        if (self.bits, self.group_size) != (4, 64):
            raise InputError(
                f"{folder / 'config.json'}: text encoder quantized at {self.bits!r} bits, group {self.group_size!r}: "
                "expected mlx-lm 4-bit, group 64"
            )
        self.stored_shapes, self.files = component_tensors(folder)

    def quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] + ".scales" in self.stored_shapes

    def logical_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name → (shape of the dequantized weight, dtype of its scales) for quantized layers, else as stored."""
        shapes = {}
        for name, (shape, dtype) in self.stored_shapes.items():
            module = name.rsplit(".", 1)[0]
            if name.endswith((".scales", ".biases")) and module + ".weight" in self.stored_shapes:
                continue
            if self.quantized(name):
                scales_shape, scales_dtype = self.stored_shapes[module + ".scales"]
                expected = (scales_shape[0], scales_shape[1] * self.group_size * self.bits // 32)
                if dtype != "U32" or tuple(shape) != expected:
                    raise InputError(f"{self.folder}: tensor {name}: expected U32 {list(expected)}, got {list(shape)}")
                shapes[name] = ((shape[0], shape[1] * 32 // self.bits), scales_dtype)
            else:
                shapes[name] = (shape, dtype)
        return shapes

    def stored(self, name: str) -> dict[str, np.ndarray]:
        """The tensors as stored (bf16 as bit patterns): a quantized layer's weight, scales and biases."""
        module = name[: -len(".weight")]
        keys = [name, module + ".scales", module + ".biases"] if self.quantized(name) else [name]
        return {key: np.asarray(self.files[key].raw(key)) for key in keys}

    def load(self, name: str) -> np.ndarray:
        """float32 values: scale·q + bias for a quantized layer, else the stored values widened."""
        if not self.quantized(name):
            return np.asarray(self.files[name].load(name), dtype=np.float32)
        stored = self.stored(name)
        module = name[: -len(".weight")]
        scales = widen(stored[module + ".scales"], "BF16").astype(np.float32)
        biases = widen(stored[module + ".biases"], "BF16").astype(np.float32)
        rows, groups = scales.shape
        q = mlx_codec.unpack(stored[name], groups * self.group_size, self.bits).astype(np.float32)
        q = q.reshape(rows, groups, self.group_size)
        return (q * scales[..., None] + biases[..., None]).reshape(rows, groups * self.group_size)


@dataclass
class MLXPackSource(Source):
    """An MLX pack: every low-bit layer decoded back to codes + scales."""

    def read_low_bit(self, tensor: SourceTensor) -> LowBitTensor:
        """A layer back to codes + scales, refusing anything not exactly Bonsai (naming it)."""
        prefix = tensor.key[: -len(".weight")]
        try:
            codes, scales = mlx_codec.decode(
                np.asarray(tensor.file.raw(tensor.key)),
                np.asarray(tensor.file.raw(prefix + ".scales")),
                np.asarray(tensor.file.raw(prefix + ".biases")),
                str(self.stored_variant),
            )
        except (ValueError, KeyError) as error:
            raise InputError(f"{tensor.file.path}: tensor {tensor.key}: {error}") from error
        return LowBitTensor(tensor.name, codes, scales)


def open_mlx_pack(root: Path, label: str) -> MLXPackSource:
    """A released MLX pack (PrismML's `bonsai-image-*-4B-mlx-{1,2}bit` layout) as a source."""
    folder = root / MLX_TRANSFORMER
    config = read_json(folder / "config.json")
    check_config(str(folder / "config.json"), config)
    variant = mlx_pack_variant(folder, config)
    files, weight_map, index_path = component_weight_files(folder)
    by_name = open_tensor_files(files)
    if weight_map is not None and index_path is not None:
        check_index(index_path, weight_map, by_name)
    shapes = _mlx_pack_shapes(by_name, 1 if variant == "binary" else 2)
    check_klein(str(folder), config, shapes)
    components, component_files = other_components(root, {"text_encoder": MLX_TEXT_ENCODER})
    all_files = list(files) + [folder / "config.json"] + component_files
    out_layers, max_sequence_length = recorded_settings(root)
    return MLXPackSource(
        label=label,
        kind="mlx",
        transformer_config=config,
        tensors=[SourceTensor(name, shapes[name], *by_name[name]) for name in sorted(shapes)],
        root=root,
        components=components,
        files=sorted(all_files),
        stored_variant=variant,
        text_encoder_prequantized="text_encoder" in components,
        text_encoder_format="mlx" if "text_encoder" in components else None,
        text_encoder_out_layers=out_layers,
        max_sequence_length=max_sequence_length,
    )
