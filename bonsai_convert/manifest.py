"""manifest.json: every file with size and sha256, per-component payload, bits per weight; deterministic."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError
from .layout import json_bytes
from .lowbit import is_low_bit_key
from .safetensors_io import read_header
from .schemas import validate
from .source import Source, read_json, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAFE_PATH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler", "configs", "golden")
PAYLOAD_COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler", "configs")
_LOW_BIT_SUFFIXES = {
    ".scales": "scales",
    ".biases": "biases",
    ".zeros": "zeros",
    ".metadata": "metadata",
    ".orig_shape": "metadata",
    ".meta_scale": "metadata",
}


@dataclass(frozen=True)
class FileEntry:
    """A bundle file: relative path, size, and (for safetensors) its tensors' names and data bytes."""

    path: str
    bytes: int
    tensors: tuple[tuple[str, int], ...] = ()


def component_of(path: str) -> str:
    top = path.split("/", 1)[0]
    return top if top in COMPONENTS and "/" in path else "configs"


def transformer_part(name: str) -> str:
    for suffix, part in _LOW_BIT_SUFFIXES.items():
        if name.endswith(suffix):
            return part
    if name.endswith(".W_q") or is_low_bit_key(name):
        return "low_bit_codes"
    return "fp16_tensors"


def breakdown(entries: list[FileEntry]) -> dict[str, dict]:
    """Bytes per component; the transformer split into parts (tensor data) plus headers and configs."""
    components: dict[str, dict] = {}
    for entry in entries:
        name = component_of(entry.path)
        record = components.setdefault(name, {"bytes": 0})
        record["bytes"] += entry.bytes
        if name == "transformer":
            parts = record.setdefault(
                "parts",
                {p: 0 for p in ("low_bit_codes", "scales", "biases", "zeros", "metadata", "fp16_tensors")},
            )
            parts.setdefault("headers_and_configs", 0)
            parts["headers_and_configs"] += entry.bytes - sum(size for _, size in entry.tensors)
            for tensor_name, size in entry.tensors:
                parts[transformer_part(tensor_name)] += size
    return dict(sorted(components.items()))


def bundle_entries(root: Path) -> list[FileEntry]:
    """Every file of a written bundle (manifest excluded), with safetensors tensor sizes from validated headers."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative == MANIFEST:
            continue
        tensors: tuple[tuple[str, int], ...] = ()
        if path.suffix == ".safetensors":
            infos, _ = read_header(path)
            tensors = tuple(sorted((name, info.nbytes) for name, info in infos.items()))
        entries.append(FileEntry(relative, path.stat().st_size, tensors))
    return entries


def low_bit_bits_per_weight(components: dict, low_bit_weights: int) -> float:
    parts = components["transformer"]["parts"]
    low_bit_bytes = parts["low_bit_codes"] + parts["scales"] + parts["biases"] + parts["zeros"] + parts["metadata"]
    return low_bit_bytes * 8 / low_bit_weights if low_bit_weights else 0.0


def summarize(
    entries: list[FileEntry], fp16_bytes: dict[str, int], low_bit_weights: int, transformer_weights: int
) -> dict:
    """components (+fp16 and reduction), payload and total, bits per weight: shared by manifest, inspect, plan."""
    components = breakdown(entries)
    for name, record in components.items():
        if name in fp16_bytes:
            record["fp16_bytes"] = fp16_bytes[name]
            record["reduction"] = round(fp16_bytes[name] / record["bytes"], 4) if record["bytes"] else None
    payload = sum(record["bytes"] for name, record in components.items() if name in PAYLOAD_COMPONENTS)
    payload_fp16 = sum(fp16_bytes.values()) + sum(
        record["bytes"] for name, record in components.items() if name in PAYLOAD_COMPONENTS and name not in fp16_bytes
    )
    transformer = components.get("transformer", {})
    parts = transformer.get("parts", {})
    tensor_bytes = sum(v for k, v in parts.items() if k != "headers_and_configs")
    return {
        "components": components,
        "payload": {
            "bytes": payload,
            "fp16_bytes": payload_fp16,
            "reduction": round(payload_fp16 / payload, 4) if payload else None,
        },
        "total_bytes": sum(entry.bytes for entry in entries),
        "bits_per_weight": {
            "low_bit_linears": round(low_bit_bits_per_weight(components, low_bit_weights), 6),
            "transformer": round(tensor_bytes * 8 / transformer_weights, 6) if transformer_weights else 0.0,
        },
        "weights": {"low_bit": low_bit_weights, "transformer": transformer_weights},
    }


def numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


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


def build_manifest(
    root: Path,
    source: Source,
    options,
    variant: str,
    profile: dict,
    digests,
    golden,
    memory: dict | None = None,
) -> dict:
    """Write manifest.json for the bundle at root (validated against schemas/manifest.schema.json)."""
    entries = bundle_entries(root)
    low_bit_weights = sum(numel(t.shape) for t in source.tensors if t.low_bit)
    transformer_weights = sum(numel(t.shape) for t in source.tensors)
    from .plan import describe, fp16_sizes  # lazy: plan imports this module

    summary = summarize(entries, fp16_sizes(describe(source)), low_bit_weights, transformer_weights)
    exact = options.quantize is None and source.packed_exact
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
        "source": {"label": source.label, "kind": source.kind, "files": source.identity()},
        "files": [{"path": e.path, "bytes": e.bytes, "sha256": sha256_file(root / e.path)} for e in entries],
        **summary,
        "low_bit_tensors": len(digests),
        "weight_digests": digests,
        "golden": golden,
        "memory": memory,
    }
    validate(manifest, "manifest", f"{root.name}/{MANIFEST}")
    (root / MANIFEST).write_bytes(json_bytes(manifest))
    return manifest


def safe_relative(path: str) -> bool:
    """A relative path of safe characters with no `..` component (never leaves the bundle)."""
    return bool(SAFE_PATH.match(path)) and ".." not in path.split("/")


def load_manifest(root: Path) -> dict:
    """Read and schema-validate a bundle's manifest; every path must be a safe relative path."""
    path = root / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: missing (not a bonsai-convert bundle)")
    manifest = read_json(path)
    validate(manifest, "manifest", str(path))
    for entry in manifest["files"]:
        if not safe_relative(entry["path"]):
            raise InputError(f"{path}: file path {entry['path']!r} is not a safe relative path")
    if manifest["golden"] is not None and not safe_relative(manifest["golden"]):
        raise InputError(f"{path}: golden path {manifest['golden']!r} is not a safe relative path")
    return manifest


def read_pipeline_settings(root: Path) -> dict:
    return read_json(root / "pipeline.json")
