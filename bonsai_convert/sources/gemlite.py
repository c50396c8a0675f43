"""A Gemlite pack (PrismML's released `transformer-gemlite-int{1,2}/state_dict.pt` layout, and our cuda bundles) as a
source: every layer decoded exactly back to codes + scales, state_dict.pt read without unpickling; and our cuda
bundles' Gemlite 4-bit text encoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bonsai_common.gemlite_keys import LAYER_KEYS

from ..codecs import gemlite as gemlite_codec
from ..errors import InputError
from ..files import plain_dir, read_json
from ..lowbit import LowBitTensor, is_low_bit_key
from .base import (
    Source,
    SourceTensor,
    check_config,
    check_klein,
    component_tensors,
    component_weight_files,
    open_tensor_files,
    other_components,
    recorded_settings,
)
from .hqq import HQQ_TEXT_ENCODER, is_hqq_folder
from .mlx import mlx_pack_variant


def _gemlite_state(file, prefix: str) -> dict[str, np.ndarray]:
    return {k: np.asarray(file.raw(f"{prefix}.{k}")) for k in LAYER_KEYS if f"{prefix}.{k}" in file.tensors}


def _gemlite_logical_shapes(files: dict, label: str) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Logical shapes of Gemlite tensors: each module with `X.W_q` is one weight `X.weight` [N, K] (orig_shape);
    every other tensor as stored. Returns the shapes and the Gemlite module names."""
    modules = {name[: -len(".W_q")] for name in files if name.endswith(".W_q")}
    shapes = {}
    for name, handle in files.items():
        module, _, key = name.rpartition(".")
        if module in modules:
            if key not in LAYER_KEYS:
                raise InputError(f"{handle.path}: tensor {name} is not a gemlite layer tensor")
            if key == "W_q":
                orig = f"{module}.orig_shape"
                info = handle.tensors.get(orig)
                if orig not in files or info is None or info.dtype != "I32" or info.shape != (2,):
                    raise InputError(f"{handle.path}: tensor {orig}: expected I32 [2] (gemlite's [N, K])")
                out_features, in_features = (int(v) for v in np.asarray(handle.raw(orig)))
                shapes[f"{module}.weight"] = (out_features, in_features)
            continue
        shapes[name] = handle.tensors[name].shape
    return shapes, modules


class GemliteTextEncoder:
    """A cuda bundle's Gemlite 4-bit text encoder: its logical tensors (dequantized on read) and stored ones."""

    format = "gemlite"

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = read_json(folder / "config.json")
        self.stored_shapes, self.files = component_tensors(folder)
        self.shapes, self.modules = _gemlite_logical_shapes(self.files, str(folder))

    def quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self.modules

    def logical_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name → (shape, dtype): a quantized layer's weight [N, K] as F16 (what it dequantizes to)."""
        return {
            name: (shape, "F16" if self.quantized(name) else self.stored_shapes[name][1])
            for name, shape in self.shapes.items()
        }

    def stored(self, name: str) -> dict[str, np.ndarray]:
        """The tensors as stored: a quantized layer's gemlite tensors, else the tensor."""
        if not self.quantized(name):
            return {name: np.asarray(self.files[name].raw(name))}
        prefix = name[: -len(".weight")]
        return {f"{prefix}.{key}": value for key, value in _gemlite_state(self.files[prefix + ".W_q"], prefix).items()}

    def load(self, name: str) -> np.ndarray:
        """float32 values: the fp16 weight a gemlite layer stands for, else the stored values widened."""
        if not self.quantized(name):
            return np.asarray(self.files[name].load(name), dtype=np.float32)
        prefix = name[: -len(".weight")]
        handle = self.files[prefix + ".W_q"]
        try:
            return gemlite_codec.dequantize(_gemlite_state(handle, prefix)).astype(np.float32)
        except InputError as error:
            raise InputError(f"{handle.path}: tensor {prefix}.W_q: {error}") from error


def is_gemlite_text_encoder(folder: Path) -> bool:
    """Whether a prequantized text encoder folder is Gemlite's (our cuda bundles' config says so)."""
    return (read_json(folder / "config.json").get("bonsai_quantization") or {}).get("format") == "gemlite"


@dataclass
class GemlitePackSource(Source):
    """A Gemlite pack: every low-bit layer decoded back to codes + scales."""

    def read_low_bit(self, tensor: SourceTensor) -> LowBitTensor:
        """A layer back to codes + scales, refusing anything not exactly Bonsai (naming it)."""
        prefix = tensor.name[: -len(".weight")]
        state = _gemlite_state(tensor.file, prefix)
        label = f"{tensor.file.path}: tensor {prefix}.W_q"
        if "bias" in state:
            raise InputError(f"{label}: a bias, but Klein's low-bit linears have none")
        try:
            bits = gemlite_codec.read_metadata(state)["W_nbits"]
            codes, scales = gemlite_codec.decode(state)
        except InputError as error:
            raise InputError(f"{label}: {error}") from error
        if bits != gemlite_codec.VARIANT_BITS[str(self.stored_variant)]:
            raise InputError(f"{label}: W_nbits {bits} in a {self.stored_variant} pack")
        return LowBitTensor(tensor.name, codes, scales)


def gemlite_folder(root: Path) -> Path | None:
    """The `transformer-gemlite-int{1,2}` folder of a Gemlite pack (PrismML's release, our cuda bundles)."""
    found = [path for path in sorted(root.glob("transformer-gemlite-int*")) if plain_dir(path)]
    if len(found) > 1:
        raise InputError(f"{root}: more than one transformer-gemlite-int* folder")
    return found[0] if found else None


def open_gemlite_pack(root: Path, label: str, folder: Path) -> GemlitePackSource:
    """A Gemlite pack (the released `transformer-gemlite-int{1,2}/state_dict.pt` layout) as a source: every layer
    decoded exactly back to codes + scales, state_dict.pt read without unpickling; its HQQ text encoder
    (`text_encoder-hqq-4bit/`, the release's and ours) read the same way (sources/hqq.py)."""
    config = read_json(folder / "config.json")
    check_config(str(folder / "config.json"), config)
    variant = mlx_pack_variant(folder, config, "Gemlite")  # the same rule: bits 1|2, group 128, solver
    if folder.name != f"transformer-gemlite-int{1 if variant == 'binary' else 2}":
        raise InputError(f"{folder}: the folder name does not match its {variant} quantization_config.json")
    files, _, _ = component_weight_files(folder)
    by_name = open_tensor_files(files)
    handles = {name: handle for name, (handle, _) in by_name.items()}
    shapes, modules = _gemlite_logical_shapes(handles, str(folder))
    for module in modules:
        if not is_low_bit_key(f"{module}.weight"):
            raise InputError(f"{folder}: gemlite tensors for {module}, which is not one of Klein's low-bit linears")
    check_klein(str(folder), config, shapes)
    renamed = {"text_encoder": HQQ_TEXT_ENCODER} if plain_dir(root / HQQ_TEXT_ENCODER) else {}
    components, component_files = other_components(root, renamed)
    text_encoder = components.get("text_encoder")
    hqq_text_encoder = text_encoder is not None and is_hqq_folder(text_encoder)
    prequantized = text_encoder is not None and (hqq_text_encoder or is_gemlite_text_encoder(text_encoder))
    tensors = []
    for name in sorted(shapes):
        key = name[: -len(".weight")] + ".W_q" if name[: -len(".weight")] in modules else name
        tensors.append(SourceTensor(name, shapes[name], handles[key], key))
    extra = [folder / name for name in ("config.json", "quantization_config.json") if (folder / name).is_file()]
    out_layers, max_sequence_length = recorded_settings(root)
    return GemlitePackSource(
        label=label,
        kind="gemlite",
        transformer_config=config,
        tensors=tensors,
        root=root,
        components=components,
        files=sorted(list(files) + extra + component_files),
        stored_variant=variant,
        text_encoder_prequantized=prequantized,
        text_encoder_format=("hqq" if hqq_text_encoder else "gemlite") if prequantized else None,
        text_encoder_out_layers=out_layers,
        max_sequence_length=max_sequence_length,
    )
