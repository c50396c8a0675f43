"""Source readers, one module per kind, each owning how its low-bit linears are read (`Source.read_low_bit`):

- `diffusers`: a diffusers-layout folder (full, transformer-only, PrismML's unpacked release) or a packed bundle
- `mlx`: a released MLX pack (or one of our MLX bundles)
- `gemlite`: a Gemlite pack (the release's transformer, or one of our cuda bundles)
- `bfl`: a BFL single .safetensors file
- `gguf`: one of our gguf bundles (its GGUF transformer, formats/gguf.md)
- `hub`: a Hub repo id, read in place from the Hub cache (then one of the folder kinds)
- `demo`: demo:binary / demo:ternary

Every reader validates headers first and hands out tensors one at a time (memory-mapped), never the whole model.
"""

from __future__ import annotations

from pathlib import Path

from .. import demo as demo_checkpoint
from ..errors import InputError
from ..files import plain_dir
from .base import Source, SourceTensor, component_tensors, component_weight_files, recorded_settings
from .bfl import open_bfl_file
from .demo import clean_demo_leftovers, demo_folder
from .diffusers import PackedBundleSource, open_diffusers_folder
from .gemlite import GemlitePackSource, GemliteTextEncoder, gemlite_folder, open_gemlite_pack
from .gguf import GGUFBundleSource, is_gguf_bundle, open_gguf_bundle
from .hub import download, parse_repo_id
from .mlx import MLX_TEXT_ENCODER, MLX_TRANSFORMER, MLXPackSource, QuantizedTextEncoder, open_mlx_pack
from .text_encoders import quantized_text_encoder

__all__ = [
    "GemlitePackSource",
    "GemliteTextEncoder",
    "GGUFBundleSource",
    "MLXPackSource",
    "MLX_TEXT_ENCODER",
    "MLX_TRANSFORMER",
    "PackedBundleSource",
    "QuantizedTextEncoder",
    "Source",
    "SourceTensor",
    "clean_demo_leftovers",
    "component_tensors",
    "component_weight_files",
    "open_folder",
    "open_source",
    "quantized_text_encoder",
    "recorded_settings",
]


def open_folder(root: Path, label: str) -> Source:
    """The reader of a model folder by its layout: an MLX pack, a Gemlite pack, a gguf bundle, else a diffusers
    folder."""
    if plain_dir(root / MLX_TRANSFORMER) and not (root / "transformer").exists():
        return open_mlx_pack(root, label)
    gemlite = gemlite_folder(root) if not (root / "transformer").exists() else None
    if gemlite is not None:
        return open_gemlite_pack(root, label, gemlite)
    if is_gguf_bundle(root):
        return open_gguf_bundle(root, label)
    return open_diffusers_folder(root, label)


def open_source(spec: str, seed: int = 0) -> Source:
    """Open SOURCE: `demo:binary|ternary`, a diffusers folder, a packed bundle, or a BFL .safetensors file."""
    variant = demo_checkpoint.demo_variant(spec)
    if variant:
        return open_folder(demo_folder(variant, seed), spec)
    if spec.startswith("demo:"):
        raise InputError(f"{spec}: unknown demo source (use demo:binary or demo:ternary)")
    repo = parse_repo_id(spec)
    if repo is not None:
        snapshot = download(*repo)
        source = open_folder(snapshot.folder, spec)
        source.repo = {"repo_id": snapshot.repo_id, "requested_revision": snapshot.requested, "commit": snapshot.commit}
        return source
    path = Path(spec)
    if path.is_symlink():
        raise InputError(f"{path}: is a symbolic link (refused)")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InputError(f"{path}: a single-file source must be a .safetensors BFL checkpoint (no pickles)")
        return open_bfl_file(path, spec)
    if path.is_dir():
        return open_folder(path, spec)
    raise InputError(f"{path}: no such file or folder")
