"""Reading a bundle component: JSON configs, (sharded) safetensors, and mlx-lm style quantization configs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class BundleError(ValueError):
    """The bundle is missing a file or holds something the runtime cannot use."""


def to_dtype(name: str | mx.Dtype) -> mx.Dtype:
    """'float32' / 'float16' / 'bfloat16' (or an mx.Dtype) → mx.Dtype."""
    if isinstance(name, mx.Dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise BundleError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def component_dir(bundle_dir: Path, settings: Mapping[str, Any], component: str) -> Path:
    """The folder of a component: pipeline.json's `folders` (the released layout names them
    `transformer-packed-mflux`, `text_encoder-mlx-4bit`, ...), else the diffusers name."""
    folders = settings.get("folders") or {}
    name = folders.get(component, component)
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise BundleError(f"{bundle_dir}/pipeline.json: folder of {component} is not a plain folder name")
    return Path(bundle_dir) / name


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file, naming the file in any error."""
    if not path.is_file():
        raise BundleError(f"{path}: missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return value


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a component: those its index names, else every *.safetensors file in it."""
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise BundleError(f"{directory}: no safetensors weights")
    for path in files:
        if not path.is_file():
            raise BundleError(f"{path}: listed in {INDEX_NAME} but missing")
    return files


def load_weights(directory: Path) -> dict[str, mx.array]:
    """All tensors of a component (memory is read lazily by MLX when first used)."""
    weights: dict[str, mx.array] = {}
    for path in safetensors_files(directory):
        loaded = mx.load(str(path))
        assert isinstance(loaded, dict)
        duplicate = weights.keys() & loaded.keys()
        if duplicate:
            raise BundleError(f"{path}: tensor {sorted(duplicate)[0]} is also in another shard")
        weights.update(loaded)
    return weights


def apply_quantization(
    model: nn.Module, quantization: Mapping[str, Any] | None, weights: Mapping[str, mx.array]
) -> None:
    """Swap layers for quantized ones as mlx-lm does: a layer is quantized iff `<path>.scales` is in the weights,
    with the config's defaults (group_size, bits, mode) or its per-layer `"<path>": {...}` / `false` override."""
    if not quantization:
        return
    defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        override = quantization.get(path)
        if override is False:
            return False
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        if isinstance(override, Mapping):
            return {**defaults, **{k: v for k, v in override.items() if k in ("group_size", "bits", "mode")}}
        return dict(defaults)

    nn.quantize(model, class_predicate=predicate)


def load_into(model: nn.Module, weights: Mapping[str, mx.array], dtype: mx.Dtype, where: Path) -> None:
    """Load weights strictly (names and shapes must match), then cast floating-point parameters to `dtype`."""
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise BundleError(f"{where}: weights do not match the model: {error}") from error
    model.set_dtype(dtype)
    model.eval()
