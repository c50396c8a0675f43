"""A `gguf` bundle as a source (formats/gguf.md): its GGUF transformer read back under diffusers names, exactly.

Also what manifest (tensor sizes) and verify (decoding) read a GGUF transformer with.

Each BFL tensor of the file is split into the diffusers tensors it holds (q/k/v row thirds, norm_out's halves
swapped back); Q1_0/Q2_0 linears decode to codes and fp16 scales (`codecs.gguf.decode`, which refuses a Q2_0 tensor
that is not ternary g128); dense tensors are read as stored, memory-mapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..codecs import gguf as codec
from ..errors import InputError
from ..files import load_manifest, read_json, refused_link
from ..gguf_io import BF16, F16, F32, GGUFFile, GGUFTensor
from ..gguf_names import diffusers_parts
from ..lowbit import LowBitTensor, is_low_bit_key
from ..vocabulary import DEFAULT_BASE_MODEL, GGUF_TARGET, VARIANTS
from .base import Source, SourceTensor, check_config, check_klein, other_components, recorded_settings

GGUF_FILE = "diffusion_model.gguf"


def split_tensors(file: GGUFFile) -> list[tuple[str, str, int, int, bool]]:
    """(diffusers name, BFL name, first row, stop row, halves swapped) of every tensor part of the file."""
    parts = []
    for bfl_name, stored in file.tensors.items():
        try:
            for name, start, stop, swapped in diffusers_parts(bfl_name, stored.shape[0]):
                parts.append((name, bfl_name, start, stop, swapped))
        except ValueError as error:
            raise InputError(f"{file.path}: {error}") from error
    return sorted(parts)


def piece_sizes(path: Path) -> tuple[tuple[str, int], ...]:
    """Bytes of each diffusers tensor inside a GGUF transformer (what the manifest's parts count)."""
    file = GGUFFile(path)
    sizes = []
    for name, bfl_name, start, stop, _ in split_tensors(file):
        stored = file.tensors[bfl_name]
        row_bytes = GGUFTensor(bfl_name, stored.ggml_type, stored.shape).row_bytes
        sizes.append((name, (stop - start) * row_bytes if len(stored.shape) > 1 else row_bytes))
    return tuple(sorted(sizes))


def gguf_shapes(file: GGUFFile, variant: str) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...] | None]]:
    """diffusers name → (logical shape, BFL key, rows of that key or None for all), types checked per tensor."""
    low_bit_type = codec.TYPE_OF_VARIANT[variant]
    result = {}
    for name, bfl_name, start, stop, swapped in split_tensors(file):
        stored = file.tensors[bfl_name]
        expected = (low_bit_type,) if is_low_bit_key(name) else (BF16, F16, F32)
        if stored.ggml_type not in expected:
            raise InputError(
                f"{file.path}: tensor {bfl_name} (holding {name}) has ggml type {stored.ggml_type}, "
                f"expected {' or '.join(str(t) for t in expected)} in a {variant} bundle"
            )
        if len(stored.shape) == 1:
            result[name] = (stored.shape, bfl_name, None)
            continue
        shape = (stop - start, stored.shape[1])
        if swapped:
            half = stored.shape[0] // 2
            rows: tuple[int, ...] | None = tuple(range(half, 2 * half)) + tuple(range(half))
        elif (start, stop) == (0, stored.shape[0]):
            rows = None
        else:
            rows = tuple(range(start, stop))
        result[name] = (shape, bfl_name, rows)
    return result


def read_gguf_low_bit(name: str, file: GGUFFile, key: str, rows: tuple[int, ...] | None, variant: str) -> LowBitTensor:
    """A Q1_0/Q2_0 tensor part back to int8 codes and fp16 scales (exact; refused if not binary/ternary g128)."""
    blocks = file.raw(key)
    if rows is not None:
        blocks = blocks[rows[0] : rows[-1] + 1]
    in_features = file.tensors[key].shape[1]
    codes, scales = codec.decode(f"{file.path}: tensor {key}", np.asarray(blocks), in_features, variant)
    if not np.isfinite(scales).all():
        raise InputError(f"{file.path}: tensor {key}: non-finite scale")
    return LowBitTensor(name, codes, scales)


class GGUFTransformer:
    """A gguf bundle's transformer by diffusers name, for verify: low-bit linears decoded, dense tensors widened."""

    def __init__(self, folder: Path, variant: str):
        self.file = GGUFFile(folder / GGUF_FILE)
        self.variant = variant
        self.placed = gguf_shapes(self.file, variant)

    def __contains__(self, name: str) -> bool:
        return name in self.placed

    def low_bit(self, name: str) -> LowBitTensor:
        if name not in self.placed or not is_low_bit_key(name):
            raise InputError(f"{self.file.path}: no low-bit tensor {name}")
        _, key, rows = self.placed[name]
        return read_gguf_low_bit(name, self.file, key, rows, self.variant)

    def load(self, name: str) -> np.ndarray:
        """A dense tensor's values as float32 (bf16/fp16 widened exactly)."""
        if name not in self.placed:
            raise InputError(f"tensor {name}: missing from the bundle")
        _, key, rows = self.placed[name]
        raw = self.file.raw(key)
        selected = np.asarray(raw if rows is None else raw[list(rows)])
        if self.file.tensors[key].ggml_type == BF16:
            return (selected.astype(np.uint32) << 16).view(np.float32)
        return selected.astype(np.float32)


@dataclass
class GGUFBundleSource(Source):
    """One of our gguf bundles: each Q1_0/Q2_0 tensor part decoded exactly to codes and fp16 scales."""

    def read_low_bit(self, tensor: SourceTensor) -> LowBitTensor:
        return read_gguf_low_bit(tensor.name, tensor.file, tensor.key, tensor.rows, str(self.stored_variant))  # type: ignore[arg-type]


def is_gguf_bundle(root: Path) -> bool:
    return (root / "transformer" / GGUF_FILE).exists()


def open_gguf_bundle(root: Path, label: str) -> GGUFBundleSource:
    """A gguf bundle: its GGUF transformer under diffusers names; text encoder, VAE and the rest as in diffusers."""
    manifest = load_manifest(root)  # schema-validated: a GGUF transformer is read only inside our own bundle
    if manifest.get("target") != GGUF_TARGET:
        raise InputError(f"{root / 'manifest.json'}: a {manifest.get('target')} bundle holding {GGUF_FILE}")
    variant = manifest.get("variant")
    if variant not in VARIANTS:
        raise InputError(f"{root / 'manifest.json'}: unknown variant {variant!r}")
    transformer_dir = root / "transformer"
    path = transformer_dir / GGUF_FILE
    if refused_link(path) or not path.is_file():
        raise InputError(f"{path}: missing or a symbolic link")
    config = read_json(transformer_dir / "config.json")
    check_config(str(transformer_dir / "config.json"), config)
    config = {key: value for key, value in config.items() if key != "bonsai_gguf"}
    file = GGUFFile(path)
    placed = gguf_shapes(file, variant)
    check_klein(str(path), config, {name: shape for name, (shape, _, _) in placed.items()})
    tensors = [SourceTensor(name, shape, file, key, rows) for name, (shape, key, rows) in sorted(placed.items())]  # type: ignore[arg-type]
    components, component_files = other_components(root, {})
    out_layers, max_sequence_length = recorded_settings(root)
    return GGUFBundleSource(
        label=label,
        kind=GGUF_TARGET,
        transformer_config=config,
        tensors=tensors,
        root=root,
        components=components,
        files=sorted([path, transformer_dir / "config.json", *component_files]),
        stored_variant=variant,
        exact=bool(manifest.get("exact", True)),
        text_encoder_out_layers=out_layers,
        max_sequence_length=max_sequence_length,
        base_model=manifest.get("base_model", DEFAULT_BASE_MODEL),
    )
