"""Writes the committed broken-input corpus of tests/corpus/ (deterministic; see README.md for each file).

Run `python tests/corpus/build_corpus.py` to regenerate; tests/test_hostile.py checks that the committed bytes
equal what this script builds, so the corpus cannot drift silently.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _header(entries: dict, pad: bool = True) -> bytes:
    """Length prefix + compact JSON header (space-padded to 8 bytes like real writers)."""
    encoded = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    if pad:
        encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def _file(entries: dict, data_bytes: int) -> bytes:
    return _header(entries) + bytes(range(256)) * (data_bytes // 256) + bytes(range(data_bytes % 256))


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


META = {"__metadata__": {"format": "pt"}}
TWO_F32 = {**META, "a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 8, 16)}

SAFETENSORS: dict[str, Callable[[], bytes]] = {
    "no_header_length.safetensors": lambda: b"\x10\x00\x00\x00\x00",
    "header_length_past_eof.safetensors": lambda: struct.pack("<Q", 4096) + b'{"a":1}',
    "header_length_over_100mb.safetensors": lambda: struct.pack("<Q", 200_000_000) + b"{}" + b" " * 6,
    "header_not_utf8.safetensors": lambda: struct.pack("<Q", 8) + b"\xff\xfe{\x00}\x80  ",
    "header_invalid_json.safetensors": lambda: struct.pack("<Q", 16) + b'{"a":{"dtype":  ',
    "header_nested_too_deeply.safetensors": lambda: struct.pack("<Q", 6000) + b"[" * 3000 + b"]" * 3000,
    "header_duplicate_tensor.safetensors": lambda: (
        struct.pack("<Q", 120)
        + (
            b'{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
        ).ljust(120)
        + b"xy"
    ),
    "header_not_an_object.safetensors": lambda: _header([1, 2, 3]),  # type: ignore[arg-type]
    "metadata_not_strings.safetensors": lambda: _file({"__metadata__": {"format": 1}, "a": _entry("U8", [4], 0, 4)}, 4),
    "entry_missing_fields.safetensors": lambda: _file({"a": {"dtype": "U8", "shape": [4]}}, 4),
    "unknown_dtype.safetensors": lambda: _file({"a": _entry("Q4_K", [4], 0, 4)}, 4),
    "negative_dimension.safetensors": lambda: _file({"a": _entry("U8", [-4], 0, 4)}, 4),
    "dtype_shape_mismatch.safetensors": lambda: _file({"a": _entry("F32", [4], 0, 8)}, 8),
    "overlapping_offsets.safetensors": lambda: _file(
        {**META, "a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, 12
    ),
    "gap_between_tensors.safetensors": lambda: _file(
        {**META, "a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 12, 20)}, 20
    ),
    "offsets_past_eof.safetensors": lambda: _file({**META, "a": _entry("F32", [1024], 0, 4096)}, 64),
    "truncated_data.safetensors": lambda: _file(TWO_F32, 16)[:-5],
    "trailing_bytes.safetensors": lambda: _file(TWO_F32, 16) + b"\x00" * 8,
    "huge_shape.safetensors": lambda: _file({"a": _entry("F32", [2**31, 2**31, 2**31], 0, 2**95)}, 16),
    "bfl_not_flux.safetensors": lambda: _file({**META, "encoder.weight": _entry("F16", [2, 2], 0, 8)}, 8),
    "bfl_img_in_not_2d.safetensors": lambda: _file(
        {**META, "img_in.weight": _entry("F16", [4], 0, 8), "txt_in.weight": _entry("F16", [2, 2], 8, 16)}, 16
    ),
    "bfl_block_index_gap.safetensors": lambda: _file(
        {
            **META,
            "double_blocks.1.img_attn.qkv.weight": _entry("F16", [2], 0, 4),
            "img_in.weight": _entry("F16", [128, 1], 4, 260),
            "txt_in.weight": _entry("F16", [128, 1], 260, 516),
        },
        516,
    ),
}

JSON_FILES: dict[str, Callable[[], bytes]] = {
    # transformer/config.json replacements
    "config_invalid_json.json": lambda: b'{"_class_name": "Flux2Transformer2DModel", "num_layers": 1,\n',
    "config_nan_value.json": lambda: b'{"_class_name": "Flux2Transformer2DModel", "mlp_ratio": NaN}\n',
    "config_flux1_dev.json": lambda: _json(
        {
            "_class_name": "FluxTransformer2DModel",
            "_diffusers_version": "0.30.0.dev0",
            "attention_head_dim": 128,
            "axes_dims_rope": [16, 56, 56],
            "guidance_embeds": True,
            "in_channels": 64,
            "joint_attention_dim": 4096,
            "num_attention_heads": 24,
            "num_layers": 19,
            "num_single_layers": 38,
            "patch_size": 1,
            "pooled_projection_dim": 768,
        }
    ),
    "config_flux2_dev.json": lambda: _json(
        {
            "_class_name": "Flux2Transformer2DModel",
            "attention_head_dim": 128,
            "axes_dims_rope": [32, 32, 32, 32],
            "guidance_embeds": True,
            "in_channels": 128,
            "joint_attention_dim": 15360,
            "mlp_ratio": 3.0,
            "num_attention_heads": 48,
            "num_layers": 8,
            "num_single_layers": 48,
            "patch_size": 1,
            "rope_theta": 2000,
            "timestep_guidance_channels": 256,
        }
    ),
    # transformer/diffusion_pytorch_model.safetensors.index.json
    "index_path_traversal.json": lambda: _json(
        {"metadata": {"total_size": 8}, "weight_map": {"x_embedder.weight": "../../outside.safetensors"}}
    ),
}


def _json(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def corpus() -> dict[str, bytes]:
    """Every committed corpus file by name."""
    return {name: build() for name, build in {**SAFETENSORS, **JSON_FILES}.items()}


def main() -> None:
    for name, data in corpus().items():
        (HERE / name).write_bytes(data)
    print(f"wrote {len(SAFETENSORS) + len(JSON_FILES)} files to {HERE}")


if __name__ == "__main__":
    main()
