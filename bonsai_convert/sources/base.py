"""What every source reader shares: the Source and SourceTensor records, Klein's shape checks, and the weight files
of a component folder (an index or plain files, validated before any tensor is read)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..files import plain_dir, read_json, refused_link, safe_files_under, sha256_file
from ..lowbit import LowBitTensor, check_group_shape, is_low_bit_key
from ..model_shapes import KLEIN_TEXT_ENCODER_OUT_LAYERS, transformer_shapes
from ..safetensors_io import FLOAT_DTYPES, SafetensorsFile, bf16_bits_to_float32
from ..torch_zip import TorchZipFile
from ..vocabulary import DEFAULT_BASE_MODEL
from .hqq import HqqTextEncoder, is_hqq_folder

TORCH_ZIP_FILE = "state_dict.pt"  # a Gemlite pack's transformer (formats/gemlite.md)


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
    """A checkpoint to pack: the transformer's tensors plus the folders of the other components.

    This class reads sources that store weight values (a diffusers folder, a transformer-only folder, a BFL file):
    `read_low_bit` gives the values, which pack splits into codes and scales. Sources that store codes (a packed
    bundle, an MLX or a Gemlite pack) are subclasses that decode them and set `stored_variant`.
    """

    label: str
    kind: str  # recorded in the manifest: diffusers | transformer-only | bfl | packed | mlx | gemlite | gguf
    transformer_config: dict
    tensors: list[SourceTensor]
    root: Path | None = None  # the model's folder (None for a single file)
    components: dict[str, Path] = field(default_factory=dict)  # text_encoder, tokenizer, vae, scheduler
    files: list[Path] = field(default_factory=list)
    stored_variant: str | None = None  # binary|ternary when the source stores codes (never re-split)
    exact: bool = True  # False for a packed bundle whose codes came from a lossy --quantize
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
        """A low-bit linear as the source stores it: here its weight values (codes for the subclasses)."""
        return tensor.load()


def check_config(label: str, config: dict) -> None:
    """Refuse a transformer config that is not FLUX.2 Klein's model class (checked before any weight is read)."""
    class_name = config.get("_class_name", "Flux2Transformer2DModel")
    if class_name != "Flux2Transformer2DModel":
        raise InputError(f"{label}: transformer is {class_name}, not Flux2Transformer2DModel (FLUX.2 Klein)")
    if config.get("guidance_embeds", False):
        raise InputError(f"{label}: transformer has guidance_embeds (FLUX.2 dev), not a distilled FLUX.2 Klein")


def check_klein(label: str, config: dict, tensors: dict[str, tuple[int, ...]]) -> None:
    """Refuse a model that is not FLUX.2 Klein: every expected tensor present with its shape, nothing unknown."""
    check_config(label, config)
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


def open_tensor_files(paths: list[Path]) -> dict[str, tuple[SafetensorsFile, str]]:
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


def component_weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None, Path | None]:
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


def check_index(index_path: Path, weight_map: dict[str, str], by_name: dict[str, tuple[SafetensorsFile, str]]) -> None:
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
    files, weight_map, index_path = component_weight_files(folder)
    by_name = open_tensor_files(files)
    if weight_map is not None and index_path is not None:
        check_index(index_path, weight_map, by_name)
    shapes = {key: (handle.tensors[key].shape, handle.tensors[key].dtype) for key, (handle, _) in by_name.items()}
    return shapes, {key: handle for key, (handle, _) in by_name.items()}


def other_components(root: Path, renamed: dict[str, str]) -> tuple[dict[str, Path], list[Path]]:
    """The text encoder, tokenizer, VAE and scheduler folders present (under their diffusers names unless
    `renamed`), with every file in them; the text encoder's and VAE's headers and index are validated now
    (pack reads their weights later)."""
    components = {}
    for name in ("text_encoder", "tokenizer", "vae", "scheduler"):
        path = root / renamed.get(name, name)
        if plain_dir(path):
            components[name] = path
    for name in ("text_encoder", "vae"):
        if name == "text_encoder" and name in components and is_hqq_folder(components[name]):
            HqqTextEncoder(components[name])  # HQQ's qmodel.pt, checked without unpickling
        elif name in components:
            component_tensors(components[name])
    files = [path for folder in components.values() for path in safe_files_under(folder)]
    return components, files


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
