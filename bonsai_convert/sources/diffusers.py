"""A diffusers-layout folder as a source: a full Flux2KleinPipeline tree, a transformer-only folder (PrismML's
unpacked release included), or one of our packed bundles (codes + fp16 scales, decoded exactly)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..codecs import packed as packed_codec
from ..errors import InputError
from ..files import is_our_manifest, load_manifest, plain_dir, read_json
from ..lowbit import GROUP_SIZE, LowBitTensor, is_low_bit_key
from ..vocabulary import DEFAULT_BASE_MODEL, PACKED_TARGET, VARIANTS
from .base import (
    Source,
    SourceTensor,
    check_config,
    check_index,
    check_klein,
    component_weight_files,
    open_tensor_files,
    other_components,
    recorded_settings,
)


@dataclass
class PackedBundleSource(Source):
    """One of our packed bundles: every low-bit layer's codes and fp16 scales, decoded exactly."""

    def read_low_bit(self, tensor: SourceTensor) -> LowBitTensor:
        scales_key = tensor.name[: -len(".weight")] + ".scales"
        scales = np.asarray(tensor.file.raw(scales_key))
        if scales.dtype != np.float16 or scales.ndim != 2:
            raise InputError(f"{tensor.file.path}: tensor {scales_key}: expected F16 [out, in/128]")
        in_features = scales.shape[1] * GROUP_SIZE
        codes_raw = np.asarray(tensor.file.raw(tensor.key))
        if self.stored_variant == "ternary" and packed_codec.invalid_ternary_bytes(codes_raw).any():
            raise InputError(f"{tensor.file.path}: tensor {tensor.key}: byte > 242 is not a valid 5-trit chunk")
        if not np.isfinite(scales).all():
            raise InputError(f"{tensor.file.path}: tensor {scales_key}: non-finite scale")
        codes = packed_codec.decode(codes_raw, in_features, str(self.stored_variant))
        return LowBitTensor(tensor.name, codes, scales)


def open_diffusers_folder(root: Path, label: str) -> Source:
    """A diffusers-layout folder (full pipeline or transformer/ only), or one of our packed bundles."""
    transformer_dir = root / "transformer"
    if not plain_dir(transformer_dir):
        raise InputError(f"{root}: no transformer/ folder (expected a diffusers-layout FLUX.2 Klein model)")
    config = read_json(transformer_dir / "config.json")
    check_config(str(transformer_dir / "config.json"), config)
    manifest_path = root / "manifest.json"
    stored_variant = None
    exact = True
    base_model = DEFAULT_BASE_MODEL
    if (manifest_path.exists() or manifest_path.is_symlink()) and is_our_manifest(read_json(manifest_path)):
        # Another tool's manifest.json (PrismML's release has one) is neither trusted nor a reason to refuse.
        manifest = load_manifest(root)  # schema-validated, every listed path a safe relative path
        if manifest.get("target") != PACKED_TARGET:
            raise InputError(f"{manifest_path}: a {manifest.get('target')} bundle is not a source; use a packed bundle")
        stored_variant = manifest.get("variant")
        if stored_variant not in VARIANTS:
            raise InputError(f"{manifest_path}: unknown variant {stored_variant!r}")
        exact = bool(manifest.get("exact", True))
        base_model = manifest.get("base_model", base_model)
    files, weight_map, index_path = component_weight_files(transformer_dir)
    by_name = open_tensor_files(files)
    if weight_map is not None and index_path is not None:
        check_index(index_path, weight_map, by_name)
    if stored_variant:
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
                expected_bytes = packed_codec.code_bytes_per_row(groups * GROUP_SIZE, stored_variant)
                if info.dtype != "U8" or info.shape != (out_features, expected_bytes):
                    raise InputError(f"{handle.path}: tensor {key}: expected U8 {[out_features, expected_bytes]}")
            else:
                shapes[key] = info.shape
    else:
        shapes = {key: handle.tensors[key].shape for key, (handle, _) in by_name.items()}
    check_klein(str(transformer_dir), config, shapes)
    tensors = [SourceTensor(name, shapes[name], *by_name[name]) for name in sorted(shapes)]
    components, component_files = other_components(root, {})
    all_files = list(files) + [transformer_dir / "config.json"] + component_files
    out_layers, max_sequence_length = recorded_settings(root)
    kind = "diffusers" if (root / "model_index.json").exists() else "transformer-only"
    reader = PackedBundleSource if stored_variant else Source
    return reader(
        label=label,
        kind=PACKED_TARGET if stored_variant else kind,
        transformer_config=config,
        tensors=tensors,
        root=root,
        components=components,
        files=sorted(all_files),
        stored_variant=stored_variant,
        exact=exact,
        text_encoder_out_layers=out_layers,
        max_sequence_length=max_sequence_length,
        base_model=base_model,
    )
