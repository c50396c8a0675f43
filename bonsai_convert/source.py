"""Source readers: a diffusers-layout folder (full or transformer-only), a BFL single file, a packed bundle, demo:*.

Every reader validates headers first and hands out tensors one at a time (memory-mapped), never the whole model.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import demo
from .codecs import packed as packed_codec
from .errors import InputError
from .lowbit import GROUP_SIZE, LowBitTensor, is_low_bit_key
from .model_shapes import KLEIN_4B_TRANSFORMER, KLEIN_TEXT_ENCODER_OUT_LAYERS, transformer_shapes
from .safetensors_io import FLOAT_DTYPES, SafetensorsFile, bf16_bits_to_float32

BFL_PREFIX = "model.diffusion_model."
MAX_JSON_BYTES = 10_000_000
DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.2-klein-4B"


def read_json(path: Path) -> dict:
    """Read a small JSON object file, refusing oversized, non-UTF-8 or non-object content with one line."""
    try:
        if path.is_symlink():
            raise InputError(f"{path}: is a symbolic link (refused)")
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise InputError(f"{path}: {size} bytes is too large for a config file")
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as error:
        raise InputError(f"{path}: missing") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from error
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from error
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object")
    return value


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Streaming sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safe_files_under(root: Path) -> list[Path]:
    """All regular files below root, refusing symlinks (nothing outside the folder is ever followed)."""
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise InputError(f"{path}: is a symbolic link (refused: it may point outside {root})")
        if path.is_file():
            files.append(path)
    return files


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
    kind: str  # diffusers | transformer-only | bfl | packed
    transformer_config: dict
    tensors: list[SourceTensor]
    root: Path | None = None
    components: dict[str, Path] = field(default_factory=dict)  # text_encoder, tokenizer, vae, scheduler
    files: list[Path] = field(default_factory=list)
    packed_variant: str | None = None
    packed_exact: bool = True
    text_encoder_out_layers: tuple[int, ...] = KLEIN_TEXT_ENCODER_OUT_LAYERS
    base_model: str = DEFAULT_BASE_MODEL

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
        """A packed source gives codes directly; other sources give the weight values to split."""
        if self.kind != "packed":
            return tensor.load()
        scales_key = tensor.name[: -len(".weight")] + ".scales"
        scales = np.asarray(tensor.file.raw(scales_key))
        in_features = scales.shape[1] * GROUP_SIZE
        codes_raw = np.asarray(tensor.file.raw(tensor.key))
        if self.packed_variant == "ternary" and packed_codec.invalid_ternary_bytes(codes_raw).any():
            raise InputError(f"{tensor.file.path}: tensor {tensor.key}: byte > 242 is not a valid 5-trit chunk")
        if not np.isfinite(scales).all():
            raise InputError(f"{tensor.file.path}: tensor {scales_key}: non-finite scale")
        codes = packed_codec.decode(codes_raw, in_features, self.packed_variant)
        return LowBitTensor(tensor.name, codes, scales)


def _check_klein(label: str, config: dict, tensors: dict[str, tuple[int, ...]]) -> None:
    """Refuse a model that is not FLUX.2 Klein: every expected tensor present with its shape, nothing unknown."""
    class_name = config.get("_class_name", "Flux2Transformer2DModel")
    if class_name != "Flux2Transformer2DModel":
        raise InputError(f"{label}: transformer is {class_name}, not Flux2Transformer2DModel (FLUX.2 Klein)")
    if config.get("guidance_embeds", False):
        raise InputError(f"{label}: transformer has guidance_embeds (FLUX.2 dev), not a distilled FLUX.2 Klein")
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


def _open_safetensors(paths: list[Path]) -> dict[str, tuple[SafetensorsFile, str]]:
    by_name: dict[str, tuple[SafetensorsFile, str]] = {}
    for path in paths:
        handle = SafetensorsFile(path)
        for key in handle.tensors:
            if key in by_name:
                raise InputError(f"{path}: tensor {key} also appears in {by_name[key][0].path.name}")
            by_name[key] = (handle, key)
    return by_name


def _transformer_weight_files(folder: Path) -> list[Path]:
    index_files = sorted(folder.glob("*.safetensors.index.json"))
    if index_files:
        index = read_json(index_files[0])
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_files[0]}: no weight_map")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or "/" in name or name.startswith("."):
                raise InputError(f"{index_files[0]}: shard name {name!r} is not a plain file name")
        paths = [folder / name for name in names]
        for path in paths:
            if not path.is_file() or path.is_symlink():
                raise InputError(f"{path}: shard listed in {index_files[0].name} is missing")
        return paths
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise InputError(f"{folder}: no .safetensors weights")
    return paths


def _open_diffusers_folder(root: Path, label: str) -> Source:
    transformer_dir = root / "transformer"
    config = read_json(transformer_dir / "config.json")
    manifest_path = root / "manifest.json"
    packed_variant = None
    packed_exact = True
    base_model = DEFAULT_BASE_MODEL
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        if manifest.get("target") != "packed":
            raise InputError(f"{manifest_path}: a {manifest.get('target')} bundle is not a source; use a packed bundle")
        packed_variant = manifest.get("variant")
        if packed_variant not in ("binary", "ternary"):
            raise InputError(f"{manifest_path}: unknown variant {packed_variant!r}")
        packed_exact = bool(manifest.get("exact", True))
        base_model = manifest.get("base_model", base_model)
    files = _transformer_weight_files(transformer_dir)
    by_name = _open_safetensors(files)
    if packed_variant:
        shapes = {}
        for key, (handle, _) in by_name.items():
            if key.endswith(".scales"):
                continue
            info = handle.tensors[key]
            if is_low_bit_key(key):
                scales = by_name.get(key[: -len(".weight")] + ".scales")
                if scales is None:
                    raise InputError(f"{handle.path}: tensor {key} has no .scales")
                out_features, groups = scales[0].tensors[scales[1]].shape
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
    components = {}
    for name in ("text_encoder", "tokenizer", "vae", "scheduler"):
        if (root / name).is_dir():
            components[name] = root / name
    all_files = list(files) + [transformer_dir / "config.json"]
    for folder in components.values():
        all_files.extend(safe_files_under(folder))
    out_layers = KLEIN_TEXT_ENCODER_OUT_LAYERS
    for settings in (root / "bonsai_demo.json", root / "pipeline.json"):
        if settings.exists():
            out_layers = tuple(read_json(settings).get("text_encoder_out_layers", out_layers))
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
        base_model=base_model,
    )


def _bfl_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Infer the Flux2 config of a BFL single-file checkpoint from its tensor shapes."""
    hidden, in_channels = shapes["img_in.weight"]
    double = {int(k.split(".")[1]) for k in shapes if k.startswith("double_blocks.")}
    single = {int(k.split(".")[1]) for k in shapes if k.startswith("single_blocks.")}
    mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0] // 2 if double else hidden * 3
    config = dict(KLEIN_4B_TRANSFORMER)
    config.update(
        in_channels=in_channels,
        num_layers=len(double),
        num_single_layers=len(single),
        num_attention_heads=hidden // config["attention_head_dim"],
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
    import torch
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    handle = SafetensorsFile(path)
    keys = {key: key[len(BFL_PREFIX) :] if key.startswith(BFL_PREFIX) else key for key in handle.tensors}
    shapes = {short: handle.tensors[full].shape for full, short in keys.items()}
    if "img_in.weight" not in shapes or "txt_in.weight" not in shapes:
        raise InputError(f"{path}: not a FLUX.2 BFL checkpoint (no img_in.weight / txt_in.weight)")
    config = _bfl_config(shapes)
    row_ids = {short: torch.arange(shape[0] if shape else 1) for short, shape in shapes.items()}
    origin = {id(t): short for short, t in row_ids.items()}
    try:
        converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(row_ids))
    except Exception as error:  # noqa: BLE001 - diffusers raises KeyError/ValueError on unknown keys
        raise InputError(f"{path}: cannot map BFL keys to diffusers names ({error!r})") from error
    full_name = {short: full for full, short in keys.items()}
    mapped: dict[str, SourceTensor] = {}
    for name, rows in converted.items():
        source_key = origin.get(id(rows))
        if source_key is None:
            # A chunk/cat result: find the source tensor whose row count this selection came from.
            source_key = _find_source_of(name, rows, shapes)
        full = full_name[source_key]
        source_shape = shapes[source_key]
        row_list = tuple(int(r) for r in rows.tolist())
        identity = row_list == tuple(range(source_shape[0] if source_shape else 1))
        shape = (len(row_list), *source_shape[1:]) if source_shape else source_shape
        mapped[name] = SourceTensor(name, shape, handle, full, None if identity else row_list)
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


def _demo_folder(variant: str, seed: int) -> Path:
    """Build the demo checkpoint once per process into a temporary folder (removed at exit)."""
    key = (variant, seed)
    if key not in _DEMO_CACHE:
        folder = Path(tempfile.mkdtemp(prefix=f"bonsai-demo-{variant}-"))
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
    path = Path(spec)
    if path.is_symlink():
        raise InputError(f"{path}: is a symbolic link (refused)")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InputError(f"{path}: a single-file source must be a .safetensors BFL checkpoint (no pickles)")
        return _open_bfl_file(path, spec)
    if path.is_dir():
        if not (path / "transformer").is_dir():
            raise InputError(f"{path}: no transformer/ folder (expected a diffusers-layout FLUX.2 Klein checkpoint)")
        return _open_diffusers_folder(path, spec)
    raise InputError(f"{path}: no such file or folder")
