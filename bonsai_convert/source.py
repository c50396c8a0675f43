"""Source readers: a diffusers-layout folder (full or transformer-only), a BFL single file, a packed bundle, demo:*.

Every reader validates headers first and hands out tensors one at a time (memory-mapped), never the whole model.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import demo
from .codecs import packed as packed_codec
from .errors import InputError
from .files import (  # noqa: F401 - read_json, sha256_file re-exported
    MAX_JSON_BYTES,
    is_our_manifest,
    load_manifest,
    plain_dir,
    read_json,
    refused_link,
    safe_files_under,
    sha256_file,
)
from .hub_source import download, parse_repo_id
from .lowbit import GROUP_SIZE, LowBitTensor, check_group_shape, is_low_bit_key
from .model_shapes import KLEIN_4B_TRANSFORMER, KLEIN_TEXT_ENCODER_OUT_LAYERS, transformer_shapes
from .safetensors_io import FLOAT_DTYPES, SafetensorsFile, bf16_bits_to_float32
from .torch_zip import TorchZipFile

TORCH_ZIP_FILE = "state_dict.pt"  # a Gemlite pack's transformer (formats/gemlite.md)

BFL_PREFIX = "model.diffusion_model."
DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.2-klein-4B"
MAX_BFL_ROWS = 1 << 20  # far above any FLUX.2 tensor (27648 rows); bounds the row-index tensors built below


@dataclass(frozen=True)
class SourceTensor:
    """A transformer tensor of the source, by diffusers name; `rows` selects rows of a fused BFL tensor."""

    name: str
    shape: tuple[int, ...]
    file: SafetensorsFile
    key: str
    rows: tuple[int, ...] | None = None

    @property
    def low_bit(self) -> bool:
        return is_low_bit_key(self.name)

    def load(self) -> np.ndarray:
        """The stored values as float32/float16 (bf16 widened exactly); integer tensors as stored."""
        return self.load_rows(0, self.shape[0] if self.shape else 1)

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) only (memory-mapped read of just those rows)."""
        dtype = self.file.tensors[self.key].dtype
        if dtype not in FLOAT_DTYPES and dtype not in ("I64", "I32"):
            raise InputError(f"{self.file.path}: tensor {self.key}: dtype {dtype} is not a weight dtype")
        raw = self.file.raw(self.key)
        if not self.shape:
            selected = raw
        elif self.rows is None:
            selected = raw[start:stop]
        else:
            selected = raw[list(self.rows[start:stop])]
        if dtype == "BF16":
            return bf16_bits_to_float32(selected)
        return np.array(selected)


@dataclass
class Source:
    """A checkpoint to pack: the transformer's tensors plus the folders of the other components."""

    label: str
    kind: str  # diffusers | transformer-only | bfl | packed | mlx | gemlite | gguf
    transformer_config: dict
    tensors: list[SourceTensor]
    root: Path | None = None
    components: dict[str, Path] = field(default_factory=dict)  # text_encoder, tokenizer, vae, scheduler
    files: list[Path] = field(default_factory=list)
    packed_variant: str | None = None
    packed_exact: bool = True
    text_encoder_out_layers: tuple[int, ...] = KLEIN_TEXT_ENCODER_OUT_LAYERS
    max_sequence_length: int = 512
    base_model: str = DEFAULT_BASE_MODEL
    text_encoder_prequantized: bool = False  # a released MLX pack's text encoder is already 4-bit
    text_encoder_format: str | None = None  # then its format: "mlx" (mlx-lm 4-bit) or "gemlite" (our cuda bundles)
    repo: dict | None = None  # a Hub source: repo id, requested revision, pinned commit

    @property
    def transformer_only(self) -> bool:
        return not {"text_encoder", "tokenizer", "vae", "scheduler"} <= set(self.components)

    def identity(self) -> list[dict]:
        """sha256 and size of every source file, relative to the source root."""
        entries = []
        for path in self.files:
            relative = path.relative_to(self.root) if self.root and path.is_relative_to(self.root) else path.name
            entries.append({"path": str(relative), "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        return entries

    def read_low_bit(self, tensor: SourceTensor) -> LowBitTensor | np.ndarray:
        """A packed or MLX-pack source gives codes directly; other sources give the weight values to split."""
        if self.kind == "mlx":
            return _read_mlx_low_bit(tensor, str(self.packed_variant))
        if self.kind == "gemlite":
            return _read_gemlite_low_bit(tensor, str(self.packed_variant))
        if self.kind == "gguf":
            from .gguf_source import read_gguf_low_bit

            return read_gguf_low_bit(tensor.name, tensor.file, tensor.key, tensor.rows, str(self.packed_variant))  # type: ignore[arg-type]
        if self.kind != "packed":
            return tensor.load()
        scales_key = tensor.name[: -len(".weight")] + ".scales"
        scales = np.asarray(tensor.file.raw(scales_key))
        if scales.dtype != np.float16 or scales.ndim != 2:
            raise InputError(f"{tensor.file.path}: tensor {scales_key}: expected F16 [out, in/128]")
        in_features = scales.shape[1] * GROUP_SIZE
        codes_raw = np.asarray(tensor.file.raw(tensor.key))
        if self.packed_variant == "ternary" and packed_codec.invalid_ternary_bytes(codes_raw).any():
            raise InputError(f"{tensor.file.path}: tensor {tensor.key}: byte > 242 is not a valid 5-trit chunk")
        if not np.isfinite(scales).all():
            raise InputError(f"{tensor.file.path}: tensor {scales_key}: non-finite scale")
        codes = packed_codec.decode(codes_raw, in_features, self.packed_variant)
        return LowBitTensor(tensor.name, codes, scales)


def _check_config(label: str, config: dict) -> None:
    """Refuse a transformer config that is not FLUX.2 Klein's model class (checked before any weight is read)."""
    class_name = config.get("_class_name", "Flux2Transformer2DModel")
    if class_name != "Flux2Transformer2DModel":
        raise InputError(f"{label}: transformer is {class_name}, not Flux2Transformer2DModel (FLUX.2 Klein)")
    if config.get("guidance_embeds", False):
        raise InputError(f"{label}: transformer has guidance_embeds (FLUX.2 dev), not a distilled FLUX.2 Klein")


def _check_klein(label: str, config: dict, tensors: dict[str, tuple[int, ...]]) -> None:
    """Refuse a model that is not FLUX.2 Klein: every expected tensor present with its shape, nothing unknown."""
    _check_config(label, config)
    try:
        expected = transformer_shapes(config)
    except Exception as error:  # noqa: BLE001 - any config the model class rejects is an input error
        raise InputError(f"{label}: transformer config is not a valid Flux2 config ({error})") from error
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing:
        raise InputError(f"{label}: missing transformer tensor {missing[0]} ({len(missing)} missing)")
    if unknown:
        raise InputError(f"{label}: unknown transformer tensor {unknown[0]} ({len(unknown)} unknown)")
    for name, shape in expected.items():
        if tuple(tensors[name]) != shape:
            raise InputError(f"{label}: tensor {name}: shape {list(tensors[name])}, expected {list(shape)}")
    for name, shape in expected.items():
        if is_low_bit_key(name):
            check_group_shape(name, shape)  # before any tensor is read: in_features must be a multiple of 128


def _open_safetensors(paths: list[Path]) -> dict[str, tuple[SafetensorsFile, str]]:
    """Every tensor of the files by name; a `state_dict.pt` (Gemlite's released container) is read without
    unpickling (`torch_zip.TorchZipFile`, same API)."""
    by_name: dict[str, tuple[SafetensorsFile, str]] = {}
    for path in paths:
        handle = TorchZipFile(path) if path.suffix == ".pt" else SafetensorsFile(path)
        for key in handle.tensors:
            if key in by_name:
                raise InputError(f"{path}: tensor {key} also appears in {by_name[key][0].path.name}")
            by_name[key] = (handle, key)
    return by_name


def _transformer_weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    """A component's weight files: from its index (returned too) or every *.safetensors; no links."""
    index_files = sorted(folder.glob("*.safetensors.index.json"))
    if len(index_files) > 1:
        raise InputError(f"{folder}: more than one *.safetensors.index.json")
    if index_files:
        index = read_json(index_files[0])
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_files[0]}: no weight_map")
        for name in weight_map.values():
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                raise InputError(f"{index_files[0]}: shard name {name!r} is not a plain file name")
        paths = [folder / name for name in sorted(set(weight_map.values()))]
        for path in paths:
            if refused_link(path):
                raise InputError(f"{path}: is a symbolic link (refused: it may point outside the source)")
            if not path.is_file():
                raise InputError(f"{path}: shard listed in {index_files[0].name} is missing")
        return paths, weight_map, index_files[0]
    paths = sorted(folder.glob("*.safetensors")) or sorted(folder.glob(TORCH_ZIP_FILE))
    for path in paths:
        if refused_link(path):
            raise InputError(f"{path}: is a symbolic link (refused: it may point outside the source)")
    if not paths:
        raise InputError(f"{folder}: no .safetensors weights")
    return paths, None, None


def _check_index(index_path: Path, weight_map: dict[str, str], by_name: dict[str, tuple[SafetensorsFile, str]]) -> None:
    """The index must list exactly the tensors the shards hold, each in the shard that holds it."""
    for key in sorted(set(weight_map) | set(by_name)):
        if key not in by_name:
            raise InputError(f"{index_path}: tensor {key} is listed but not in {weight_map[key]}")
        if key not in weight_map:
            raise InputError(f"{index_path}: tensor {key} (in {by_name[key][0].path.name}) is not listed")
        holder = by_name[key][0].path.name
        if holder != weight_map[key]:
            raise InputError(f"{index_path}: tensor {key} is listed in {weight_map[key]} but is in {holder}")


def component_tensors(
    folder: Path,
) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, SafetensorsFile]]:
    """Shapes/dtypes and the open (validated) file of every tensor of a component folder (index or plain files)."""
    files, weight_map, index_path = _transformer_weight_files(folder)
    by_name = _open_safetensors(files)
    if weight_map is not None and index_path is not None:
        _check_index(index_path, weight_map, by_name)
    shapes = {key: (handle.tensors[key].shape, handle.tensors[key].dtype) for key, (handle, _) in by_name.items()}
    return shapes, {key: handle for key, (handle, _) in by_name.items()}


MLX_TRANSFORMER = "transformer-packed-mflux"
MLX_TEXT_ENCODER = "text_encoder-mlx-4bit"


def _read_mlx_low_bit(tensor: SourceTensor, variant: str) -> LowBitTensor:
    """A released MLX pack's layer back to codes + scales, refusing anything not exactly Bonsai (naming it)."""
    from .codecs import mlx as mlx_codec

    prefix = tensor.key[: -len(".weight")]
    try:
        codes, scales = mlx_codec.decode(
            np.asarray(tensor.file.raw(tensor.key)),
            np.asarray(tensor.file.raw(prefix + ".scales")),
            np.asarray(tensor.file.raw(prefix + ".biases")),
            variant,
        )
    except (ValueError, KeyError) as error:
        raise InputError(f"{tensor.file.path}: tensor {tensor.key}: {error}") from error
    return LowBitTensor(tensor.name, codes, scales)


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
        from .codecs.mlx import unpack
        from .dtypes import widen

        stored = self.stored(name)
        module = name[: -len(".weight")]
        scales = widen(stored[module + ".scales"], "BF16").astype(np.float32)
        biases = widen(stored[module + ".biases"], "BF16").astype(np.float32)
        rows, groups = scales.shape
        q = unpack(stored[name], groups * self.group_size, self.bits).astype(np.float32)
        q = q.reshape(rows, groups, self.group_size)
        return (q * scales[..., None] + biases[..., None]).reshape(rows, groups * self.group_size)


GEMLITE_LAYER_KEYS = ("W_q", "scales", "zeros", "metadata", "orig_shape", "meta_scale", "bias")


def _gemlite_state(file, prefix: str) -> dict[str, np.ndarray]:
    return {k: np.asarray(file.raw(f"{prefix}.{k}")) for k in GEMLITE_LAYER_KEYS if f"{prefix}.{k}" in file.tensors}


def _gemlite_logical_shapes(files: dict, label: str) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Logical shapes of Gemlite tensors: each module with `X.W_q` is one weight `X.weight` [N, K] (orig_shape);
    every other tensor as stored. Returns the shapes and the Gemlite module names."""
    modules = {name[: -len(".W_q")] for name in files if name.endswith(".W_q")}
    shapes = {}
    for name, handle in files.items():
        module, _, key = name.rpartition(".")
        if module in modules:
            if key not in GEMLITE_LAYER_KEYS:
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
        from .codecs import gemlite as gemlite_codec

        prefix = name[: -len(".weight")]
        handle = self.files[prefix + ".W_q"]
        try:
            return gemlite_codec.dequantize(_gemlite_state(handle, prefix)).astype(np.float32)
        except InputError as error:
            raise InputError(f"{handle.path}: tensor {prefix}.W_q: {error}") from error


def quantized_text_encoder(folder: Path) -> QuantizedTextEncoder | GemliteTextEncoder:
    """The reader of a prequantized text encoder: Gemlite (our cuda bundles' config says so), else mlx-lm 4-bit."""
    config = read_json(folder / "config.json")
    if (config.get("bonsai_quantization") or {}).get("format") == "gemlite":
        return GemliteTextEncoder(folder)
    return QuantizedTextEncoder(folder)


def _read_gemlite_low_bit(tensor: SourceTensor, variant: str) -> LowBitTensor:
    """A Gemlite pack's layer back to codes + scales, refusing anything not exactly Bonsai (naming it)."""
    from .codecs import gemlite as gemlite_codec

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
    if bits != gemlite_codec.VARIANT_BITS[variant]:
        raise InputError(f"{label}: W_nbits {bits} in a {variant} pack")
    return LowBitTensor(tensor.name, codes, scales)


def gemlite_folder(root: Path) -> Path | None:
    """The `transformer-gemlite-int{1,2}` folder of a Gemlite pack (PrismML's release, our cuda bundles)."""
    found = [path for path in sorted(root.glob("transformer-gemlite-int*")) if plain_dir(path)]
    if len(found) > 1:
        raise InputError(f"{root}: more than one transformer-gemlite-int* folder")
    return found[0] if found else None


def _open_gemlite_pack(root: Path, label: str, folder: Path) -> Source:
    """A Gemlite pack (the released `transformer-gemlite-int{1,2}/state_dict.pt` layout) as a source: every layer
    decoded exactly back to codes + scales, state_dict.pt read without unpickling."""
    config = read_json(folder / "config.json")
    _check_config(str(folder / "config.json"), config)
    variant = mlx_pack_variant(folder, config, "Gemlite")  # the same rule: bits 1|2, group 128, solver
    if folder.name != f"transformer-gemlite-int{1 if variant == 'binary' else 2}":
        raise InputError(f"{folder}: the folder name does not match its {variant} quantization_config.json")
    if plain_dir(root / "text_encoder-hqq-4bit"):
        raise InputError(
            f"{root / 'text_encoder-hqq-4bit'}: HQQ text encoders are not read (qmodel.pt pickles HQQ's own "
            "metadata); pack from the unpacked or MLX release instead"
        )
    files, _, _ = _transformer_weight_files(folder)
    by_name = _open_safetensors(files)
    handles = {name: handle for name, (handle, _) in by_name.items()}
    shapes, modules = _gemlite_logical_shapes(handles, str(folder))
    for module in modules:
        if not is_low_bit_key(f"{module}.weight"):
            raise InputError(f"{folder}: gemlite tensors for {module}, which is not one of Klein's low-bit linears")
    _check_klein(str(folder), config, shapes)
    components, component_files = _other_components(root, {})
    prequantized = "text_encoder" in components and isinstance(
        quantized_text_encoder(components["text_encoder"]), GemliteTextEncoder
    )
    tensors = []
    for name in sorted(shapes):
        key = name[: -len(".weight")] + ".W_q" if name[: -len(".weight")] in modules else name
        tensors.append(SourceTensor(name, shapes[name], handles[key], key))
    extra = [folder / name for name in ("config.json", "quantization_config.json") if (folder / name).is_file()]
    out_layers, max_sequence_length = recorded_settings(root)
    return Source(
        label=label,
        kind="gemlite",
        transformer_config=config,
        tensors=tensors,
        root=root,
        components=components,
        files=sorted(list(files) + extra + component_files),
        packed_variant=variant,
        text_encoder_prequantized=prequantized,
        text_encoder_format="gemlite" if prequantized else None,
        text_encoder_out_layers=out_layers,
        max_sequence_length=max_sequence_length,
    )


def _other_components(root: Path, renamed: dict[str, str]) -> tuple[dict[str, Path], list[Path]]:
    """The text encoder, tokenizer, VAE and scheduler folders present (under their diffusers names unless
    `renamed`), with every file in them; the text encoder's and VAE's headers and index are validated now
    (pack reads their weights later)."""
    components = {}
    for name in ("text_encoder", "tokenizer", "vae", "scheduler"):
        path = root / renamed.get(name, name)
        if plain_dir(path):
            components[name] = path
    for name in ("text_encoder", "vae"):
        if name in components:
            component_tensors(components[name])
    files = [path for folder in components.values() for path in safe_files_under(folder)]
    return components, files


def _open_mlx_pack(root: Path, label: str) -> Source:
    """A released MLX pack (PrismML's `bonsai-image-*-4B-mlx-{1,2}bit` layout) as a source."""
    folder = root / MLX_TRANSFORMER
    config = read_json(folder / "config.json")
    _check_config(str(folder / "config.json"), config)
    variant = mlx_pack_variant(folder, config)
    files, weight_map, index_path = _transformer_weight_files(folder)
    by_name = _open_safetensors(files)
    if weight_map is not None and index_path is not None:
        _check_index(index_path, weight_map, by_name)
    shapes = _mlx_pack_shapes(by_name, 1 if variant == "binary" else 2)
    _check_klein(str(folder), config, shapes)
    components, component_files = _other_components(root, {"text_encoder": MLX_TEXT_ENCODER})
    all_files = list(files) + [folder / "config.json"] + component_files
    out_layers, max_sequence_length = recorded_settings(root)
    return Source(
        label=label,
        kind="mlx",
        transformer_config=config,
        tensors=[SourceTensor(name, shapes[name], *by_name[name]) for name in sorted(shapes)],
        root=root,
        components=components,
        files=sorted(all_files),
        packed_variant=variant,
        text_encoder_prequantized="text_encoder" in components,
        text_encoder_format="mlx" if "text_encoder" in components else None,
        text_encoder_out_layers=out_layers,
        max_sequence_length=max_sequence_length,
    )


def recorded_settings(root: Path) -> tuple[tuple[int, ...], int]:
    """Text-encoder hidden states and prompt length a source records (our demo's bonsai_demo.json, a bundle's
    pipeline.json), else Klein's (9, 18, 27) and 512."""
    out_layers = KLEIN_TEXT_ENCODER_OUT_LAYERS
    max_sequence_length = 512
    for settings in (root / "bonsai_demo.json", root / "pipeline.json"):
        if settings.exists() or settings.is_symlink():
            recorded = read_json(settings)
            length = recorded.get("max_sequence_length", max_sequence_length)
            if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= 4096:
                raise InputError(f"{settings}: max_sequence_length must be an integer in 1..4096")
            max_sequence_length = length
            value = recorded.get("text_encoder_out_layers", out_layers)
            if (
                not isinstance(value, (list, tuple))
                or not value
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i <= 1000 for i in value)
            ):
                raise InputError(f"{settings}: text_encoder_out_layers must list positive layer indices")
            out_layers = tuple(value)
    return out_layers, max_sequence_length


def _open_diffusers_folder(root: Path, label: str) -> Source:
    if plain_dir(root / MLX_TRANSFORMER) and not (root / "transformer").exists():
        return _open_mlx_pack(root, label)
    gemlite = gemlite_folder(root) if not (root / "transformer").exists() else None
    if gemlite is not None:
        return _open_gemlite_pack(root, label, gemlite)
    transformer_dir = root / "transformer"
    if not plain_dir(transformer_dir):
        raise InputError(f"{root}: no transformer/ folder (expected a diffusers-layout FLUX.2 Klein model)")
    config = read_json(transformer_dir / "config.json")
    _check_config(str(transformer_dir / "config.json"), config)
    manifest_path = root / "manifest.json"
    packed_variant = None
    packed_exact = True
    base_model = DEFAULT_BASE_MODEL
    if (manifest_path.exists() or manifest_path.is_symlink()) and is_our_manifest(read_json(manifest_path)):
        # Another tool's manifest.json (PrismML's release has one) is neither trusted nor a reason to refuse.
        manifest = load_manifest(root)  # schema-validated, every listed path a safe relative path
        if manifest.get("target") == "gguf":
            return _open_gguf_bundle(root, label, manifest)
        if manifest.get("target") != "packed":
            raise InputError(f"{manifest_path}: a {manifest.get('target')} bundle is not a source; use a packed bundle")
        packed_variant = manifest.get("variant")
        if packed_variant not in ("binary", "ternary"):
            raise InputError(f"{manifest_path}: unknown variant {packed_variant!r}")
        packed_exact = bool(manifest.get("exact", True))
        base_model = manifest.get("base_model", base_model)
    files, weight_map, index_path = _transformer_weight_files(transformer_dir)
    by_name = _open_safetensors(files)
    if weight_map is not None and index_path is not None:
        _check_index(index_path, weight_map, by_name)
    if packed_variant:
        shapes = {}
        for key, (handle, _) in by_name.items():
            info = handle.tensors[key]
            if key.endswith(".scales") and is_low_bit_key(key[: -len(".scales")] + ".weight"):
                if key[: -len(".scales")] + ".weight" not in by_name:
                    raise InputError(f"{handle.path}: tensor {key} has no low-bit .weight")
                continue
            if is_low_bit_key(key):
                scales = by_name.get(key[: -len(".weight")] + ".scales")
                if scales is None:
                    raise InputError(f"{handle.path}: tensor {key} has no .scales")
                scales_info = scales[0].tensors[scales[1]]
                if scales_info.dtype != "F16" or len(scales_info.shape) != 2 or scales_info.shape[1] == 0:
                    raise InputError(
                        f"{scales[0].path}: tensor {scales[1]}: expected F16 [out, in/128], "
                        f"got {scales_info.dtype} {list(scales_info.shape)}"
                    )
                out_features, groups = scales_info.shape
                shapes[key] = (out_features, groups * GROUP_SIZE)
                expected_bytes = packed_codec.code_bytes_per_row(groups * GROUP_SIZE, packed_variant)
                if info.dtype != "U8" or info.shape != (out_features, expected_bytes):
                    raise InputError(f"{handle.path}: tensor {key}: expected U8 {[out_features, expected_bytes]}")
            else:
                shapes[key] = info.shape
    else:
        shapes = {key: handle.tensors[key].shape for key, (handle, _) in by_name.items()}
    _check_klein(str(transformer_dir), config, shapes)
    tensors = [SourceTensor(name, shapes[name], *by_name[name]) for name in sorted(shapes)]
    components, component_files = _other_components(root, {})
    all_files = list(files) + [transformer_dir / "config.json"] + component_files
    out_layers, max_sequence_length = recorded_settings(root)
    kind = "packed" if packed_variant else ("diffusers" if (root / "model_index.json").exists() else "transformer-only")
    return Source(
        label=label,
        kind=kind,
        transformer_config=config,
        tensors=tensors,
        root=root,
        components=components,
        files=sorted(all_files),
        packed_variant=packed_variant,
        packed_exact=packed_exact,
        text_encoder_out_layers=out_layers,
        max_sequence_length=max_sequence_length,
        base_model=base_model,
    )


def _open_gguf_bundle(root: Path, label: str, manifest: dict) -> Source:
    """A `gguf` bundle (formats/gguf.md): its GGUF transformer under diffusers names, the rest as in diffusers."""
    from .gguf_io import GGUFFile
    from .gguf_source import GGUF_FILE, gguf_shapes

    transformer_dir = root / "transformer"
    variant = manifest.get("variant")
    if variant not in ("binary", "ternary"):
        raise InputError(f"{root / 'manifest.json'}: unknown variant {variant!r}")
    path = transformer_dir / GGUF_FILE
    if refused_link(path) or not path.is_file():
        raise InputError(f"{path}: missing or a symbolic link")
    config = read_json(transformer_dir / "config.json")
    _check_config(str(transformer_dir / "config.json"), config)
    config = {key: value for key, value in config.items() if key != "bonsai_gguf"}
    file = GGUFFile(path)
    placed = gguf_shapes(file, variant)
    _check_klein(str(path), config, {name: shape for name, (shape, _, _) in placed.items()})
    tensors = [SourceTensor(name, shape, file, key, rows) for name, (shape, key, rows) in sorted(placed.items())]  # type: ignore[arg-type]
    components, component_files = _other_components(root, {})
    out_layers, max_sequence_length = recorded_settings(root)
    return Source(
        label=label,
        kind="gguf",
        transformer_config=config,
        tensors=tensors,
        root=root,
        components=components,
        files=sorted([path, transformer_dir / "config.json", *component_files]),
        packed_variant=variant,
        packed_exact=bool(manifest.get("exact", True)),
        text_encoder_out_layers=out_layers,
        max_sequence_length=max_sequence_length,
        base_model=manifest.get("base_model", DEFAULT_BASE_MODEL),
    )


def _bfl_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Infer the Flux2 config of a BFL single file from its tensor shapes (KeyError/ValueError if odd)."""
    hidden, in_channels = shapes["img_in.weight"]
    double = {int(k.split(".")[1]) for k in shapes if k.startswith("double_blocks.")}
    single = {int(k.split(".")[1]) for k in shapes if k.startswith("single_blocks.")}
    for kind, blocks in (("double_blocks", double), ("single_blocks", single)):
        if blocks != set(range(len(blocks))):
            raise ValueError(f"{kind} indices {sorted(blocks)[:8]} are not 0..{len(blocks) - 1}")
    # The head dim is the length of a QK-norm scale (Klein 4B: 128); RoPE splits it over 4 equal axes.
    norm_key = "double_blocks.0.img_attn.norm.query_norm.scale" if double else "single_blocks.0.norm.query_norm.scale"
    head_dim = shapes[norm_key][0] if len(shapes.get(norm_key, ())) == 1 else KLEIN_4B_TRANSFORMER["attention_head_dim"]
    if hidden <= 0 or head_dim <= 0 or hidden % head_dim or head_dim % 4:
        raise ValueError(f"img_in.weight has {hidden} rows, not a multiple of the head dim {head_dim}")
    mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0] // 2 if double else hidden * 3
    config = dict(KLEIN_4B_TRANSFORMER)
    config.update(
        in_channels=in_channels,
        num_layers=len(double),
        num_single_layers=len(single),
        attention_head_dim=head_dim,
        axes_dims_rope=[head_dim // 4] * 4,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=shapes["txt_in.weight"][1],
        mlp_ratio=mlp_hidden / hidden,
        guidance_embeds=any(k.startswith("guidance_in.") for k in shapes),
    )
    return config


def _open_bfl_file(path: Path, label: str) -> Source:
    """Map a BFL single file to diffusers names with diffusers' own conversion function, streaming.

    The conversion only renames keys and splits/swaps rows along dim 0 (qkv chunking, shift/scale swap), so we run
    it on tensors holding each row's index and read the selected rows from the memory-mapped file afterwards.
    """
    handle = SafetensorsFile(path)  # the header is validated before torch/diffusers are even imported
    keys = {key: key[len(BFL_PREFIX) :] if key.startswith(BFL_PREFIX) else key for key in handle.tensors}
    if len(set(keys.values())) != len(keys):
        raise InputError(f"{path}: the same tensor appears with and without the {BFL_PREFIX} prefix")
    shapes = {short: handle.tensors[full].shape for full, short in keys.items()}
    if "img_in.weight" not in shapes or "txt_in.weight" not in shapes:
        raise InputError(f"{path}: not a FLUX.2 BFL checkpoint (no img_in.weight / txt_in.weight)")
    for full, short in keys.items():
        if shapes[short] and shapes[short][0] > MAX_BFL_ROWS:
            raise InputError(f"{path}: tensor {full}: {shapes[short][0]} rows is not a FLUX.2 tensor")
    try:
        config = _bfl_config(shapes)
    except (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError) as error:
        raise InputError(f"{path}: not a FLUX.2 BFL checkpoint (cannot infer a config: {error!r})") from error

    import torch
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    row_ids = {short: torch.arange(shape[0] if shape else 1) for short, shape in shapes.items()}
    origin = {id(t): short for short, t in row_ids.items()}
    full_name = {short: full for full, short in keys.items()}
    mapped: dict[str, SourceTensor] = {}
    try:
        converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(row_ids))
        for name, rows in converted.items():
            source_key = origin.get(id(rows))
            if source_key is None:
                # A chunk/cat result: find the source tensor whose row count this selection came from.
                source_key = _find_source_of(name, rows, shapes)
            full = full_name[source_key]
            source_shape = shapes[source_key]
            row_list = tuple(int(r) for r in rows.reshape(-1).tolist())
            identity = row_list == tuple(range(source_shape[0] if source_shape else 1))
            shape = (len(row_list), *source_shape[1:]) if source_shape else source_shape
            mapped[name] = SourceTensor(name, shape, handle, full, None if identity else row_list)
    except InputError as error:
        raise InputError(f"{path}: {error}") from error
    except Exception as error:  # noqa: BLE001 - diffusers raises KeyError/ValueError/RuntimeError on odd keys
        raise InputError(f"{path}: cannot map BFL keys to diffusers names ({error!r})") from error
    _check_klein(str(path), config, {name: t.shape for name, t in mapped.items()})
    return Source(
        label=label,
        kind="bfl",
        transformer_config=config,
        tensors=[mapped[name] for name in sorted(mapped)],
        root=path.parent,
        files=[path],
    )


def _find_source_of(name: str, rows, shapes: dict[str, tuple[int, ...]]) -> str:
    """The BFL key a split/swapped diffusers tensor came from (the only renames that change rows)."""
    parts = name.split(".")
    if name.startswith("norm_out.linear"):
        return "final_layer.adaLN_modulation.1." + parts[-1]
    if name.startswith("transformer_blocks."):
        stream = "img" if parts[3] in ("to_q", "to_k", "to_v") else "txt"
        return f"double_blocks.{parts[1]}.{stream}_attn.qkv.{parts[-1]}"
    raise InputError(f"cannot trace diffusers tensor {name} back to a BFL tensor")


_DEMO_CACHE: dict[tuple[str, int], Path] = {}
DEMO_TEMP_PREFIX = "bonsai-demo-"


def clean_demo_leftovers() -> list[Path]:
    """Remove demo temporary folders of killed runs (`bonsai-demo-<pid>-...` whose process is gone)."""
    removed = []
    for candidate in Path(tempfile.gettempdir()).glob(f"{DEMO_TEMP_PREFIX}*-*"):
        pid_text = candidate.name[len(DEMO_TEMP_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or candidate.is_symlink() or not candidate.is_dir():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
        except OSError:
            continue
    return removed


def _demo_folder(variant: str, seed: int) -> Path:
    """Build the demo checkpoint once per process in a temporary folder (removed at exit or by a later run)."""
    key = (variant, seed)
    if key not in _DEMO_CACHE:
        clean_demo_leftovers()
        folder = Path(tempfile.mkdtemp(prefix=f"{DEMO_TEMP_PREFIX}{os.getpid()}-{variant}-"))
        atexit.register(shutil.rmtree, folder, True)
        demo.write_demo(folder / "checkpoint", variant, seed)
        _DEMO_CACHE[key] = folder / "checkpoint"
    return _DEMO_CACHE[key]


def open_source(spec: str, seed: int = 0) -> Source:
    """Open SOURCE: `demo:binary|ternary`, a diffusers folder, a packed bundle, or a BFL .safetensors file."""
    variant = demo.demo_variant(spec)
    if variant:
        return _open_diffusers_folder(_demo_folder(variant, seed), spec)
    if spec.startswith("demo:"):
        raise InputError(f"{spec}: unknown demo source (use demo:binary or demo:ternary)")
    repo = parse_repo_id(spec)
    if repo is not None:
        snapshot = download(*repo)
        source = _open_diffusers_folder(snapshot.folder, spec)
        source.repo = {"repo_id": snapshot.repo_id, "requested_revision": snapshot.requested, "commit": snapshot.commit}
        return source
    path = Path(spec)
    if path.is_symlink():
        raise InputError(f"{path}: is a symbolic link (refused)")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InputError(f"{path}: a single-file source must be a .safetensors BFL checkpoint (no pickles)")
        return _open_bfl_file(path, spec)
    if path.is_dir():
        return _open_diffusers_folder(path, spec)
    raise InputError(f"{path}: no such file or folder")
