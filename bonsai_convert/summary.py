"""Sizes of a bundle from its file list: bytes per component, the transformer's parts, bits per weight.

Shared by `plan` (files predicted from shapes), `pack`'s manifest and `inspect` (files as written).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lowbit import is_low_bit_key

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
    """The component a bundle path belongs to: its top folder, named `<component>[-<format>]`, else configs."""
    top = path.split("/", 1)[0].split("-", 1)[0]
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
