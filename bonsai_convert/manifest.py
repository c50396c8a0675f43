"""manifest.json: every file with size and sha256, per-component payload, bits per weight; deterministic."""

from __future__ import annotations

from pathlib import Path

from . import __version__
from .description import ModelDescription, fp16_sizes
from .files import MANIFEST, load_manifest, read_json, safe_relative, sha256_file  # noqa: F401 - re-exported
from .layout import json_bytes
from .safetensors_io import read_header
from .schemas import validate
from .sources import Source
from .summary import FileEntry, numel, summarize  # noqa: F401 - re-exported
from .torch_zip import TorchZipFile

FORMAT_VERSION = 2


def bundle_entries(root: Path) -> list[FileEntry]:
    """Every file of a written bundle (manifest excluded), with tensor sizes from validated headers."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative == MANIFEST:
            continue
        tensors: tuple[tuple[str, int], ...] = ()
        if path.suffix == ".safetensors":
            infos, _ = read_header(path)
            tensors = tuple(sorted((name, info.nbytes) for name, info in infos.items()))
        elif path.suffix == ".pt":  # Gemlite's state_dict.pt, read without unpickling
            tensors = tuple(sorted((name, info.nbytes) for name, info in TorchZipFile(path).tensors.items()))
        elif path.suffix == ".gguf":  # each diffusers tensor inside it (formats/gguf.md)
            from .sources.gguf import piece_sizes

            tensors = piece_sizes(path)
        entries.append(FileEntry(relative, path.stat().st_size, tensors))
    return entries


def dependency_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in (
        "numpy",
        "safetensors",
        "torch",
        "diffusers",
        "transformers",
        "mlx",
        "mlx-lm",
        "huggingface-hub",
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def layout_folders(root: Path) -> dict[str, str]:
    """Component → folder, as pipeline.json records it."""
    return dict(read_json(root / "pipeline.json").get("folders", {}))


def layout_record(target: str, folders: dict[str, str], dense_dtype: str) -> dict:
    """Which layout the bundle has, and whether PrismML's released loaders can open it."""
    mlx = target in ("iphone", "ipad", "mac")
    hqq_text_encoder = folders.get("text_encoder") == "text_encoder-hqq-4bit"
    released = (mlx and dense_dtype == "BF16") or (target == "cuda" and hqq_text_encoder)
    record = {"folders": folders, "dense_dtype": dense_dtype, "released_loaders": released}
    if mlx and not released:
        record["note"] = "fp16 bundle (--dtype float16): the released MLX loaders read bf16 and cannot use it"
    if target == "cuda":
        record["note"] = (
            "both parts in the released layout: the transformer as image-studio's Gemlite loader reads it "
            "(state_dict.pt, config.json, quantization_config.json, gemlite_autotune.json), the text encoder as "
            "hqq's AutoHQQHFModel.from_quantized reads it (text_encoder-hqq-4bit/{config.json, qmodel.pt})"
        )
    return record


def build_manifest(
    root: Path,
    source: Source,
    options,
    variant: str,
    profile: dict,
    digests,
    golden,
    memory: dict | None,
    model: ModelDescription,
    dense_dtype: str = "F16",
) -> dict:
    """Write manifest.json for the bundle at root (validated against the manifest schema)."""
    entries = bundle_entries(root)
    low_bit_weights = sum(numel(t.shape) for t in source.tensors if t.low_bit)
    transformer_weights = sum(numel(t.shape) for t in source.tensors)
    summary = summarize(entries, fp16_sizes(model), low_bit_weights, transformer_weights)
    exact = options.quantize is None and source.exact
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "bonsai-convert", "version": __version__, "dependencies": dependency_versions()},
        "target": options.target,
        "profile": profile,
        "variant": variant,
        "exact": exact,
        "quantize": options.quantize,
        "base_model": source.base_model,
        "transformer_only": source.transformer_only,
        "source": {"label": source.label, "kind": source.kind, "files": source.identity(), "repo": source.repo},
        "files": [{"path": e.path, "bytes": e.bytes, "sha256": sha256_file(root / e.path)} for e in entries],
        **summary,
        "low_bit_tensors": len(digests),
        "weight_digests": digests,
        "golden": golden,
        "memory": memory,
        "layout": layout_record(options.target, layout_folders(root), dense_dtype),
    }
    validate(manifest, "manifest", f"{root.name}/{MANIFEST}")
    (root / MANIFEST).write_bytes(json_bytes(manifest))
    return manifest


def read_pipeline_settings(root: Path) -> dict:
    return read_json(root / "pipeline.json")
