"""The compiled fast paths of `pack` change no output byte: each kernel against the plain numpy implementation it
replaced (kept as the reference), and whole bundles and manifests packed with and without them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tree_digest
from hypothesis import given, settings
from hypothesis import strategies as st

from bonsai_convert import kernels
from bonsai_convert.codecs import gemlite, mlx, packed
from bonsai_convert.errors import InputError
from bonsai_convert.lowbit import (
    dense_from_codes,
    dense_from_codes_reference,
    split_exact,
    split_exact_stored,
)
from bonsai_convert.safetensors_io import SafetensorsWriter, TensorSpec, bf16_bits_to_float32

# bf16 bit patterns worth mixing in: ±0, subnormals, fp16-subnormal range, fp16 overflow, ±inf, NaN, max.
SPECIAL_BF16 = [0x0000, 0x8000, 0x0001, 0x8001, 0x3380, 0x3381, 0x477F, 0x4780, 0x4800, 0x7F80, 0xFF80, 0x7FC0, 0x7F7F]


def exact_rows(rng: np.random.Generator, rows: int, groups: int, variant: str) -> np.ndarray:
    """bf16 bits of an exact binary/ternary weight: per group one magnitude (some groups all zero)."""
    magnitude = rng.integers(0x0001, 0x4780, size=(rows, groups, 1), dtype=np.uint16)
    magnitude[rng.random((rows, groups, 1)) < 0.05] = 0
    bits = np.broadcast_to(magnitude, (rows, groups, 128)).copy()
    if variant == "ternary":
        bits[rng.random(bits.shape) < 0.33] = 0
    bits |= (rng.integers(0, 2, size=bits.shape, dtype=np.uint16) << 15).astype(np.uint16)
    return bits.reshape(rows, groups * 128)


def outcome(function):
    try:
        return function()
    except InputError as error:
        return str(error)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fused_split_equals_split_exact(data):
    variant = data.draw(st.sampled_from(["binary", "ternary", "auto"]))
    shape_variant = "binary" if variant == "binary" else data.draw(st.sampled_from(["binary", "ternary"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    rows, groups = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    bits = exact_rows(rng, rows, groups, shape_variant)
    for _ in range(data.draw(st.integers(0, 3))):  # break some groups (or not: a special may fit the group)
        r, c = int(rng.integers(rows)), int(rng.integers(groups * 128))
        bits[r, c] = data.draw(st.sampled_from(SPECIAL_BF16 + [int(rng.integers(0, 1 << 16))]))
    stored_dtype = data.draw(st.sampled_from(["BF16", "F16", "F32"]))
    values = bf16_bits_to_float32(bits)
    if stored_dtype == "BF16":
        stored = bits
    elif stored_dtype == "F16":
        with np.errstate(over="ignore", invalid="ignore"):
            stored = values.astype(np.float16)
        values = stored
    else:
        stored = values
    reference = outcome(lambda: split_exact("w", values, variant))
    fast = outcome(lambda: split_exact_stored("w", stored, stored_dtype, variant))
    if isinstance(reference, str):
        assert fast == reference
        return
    tensor, decoded = fast
    assert np.array_equal(tensor.codes, reference.codes)
    assert np.array_equal(tensor.scales.view(np.uint16), reference.scales.view(np.uint16))
    expected = dense_from_codes_reference(reference.codes, reference.scales).view(np.uint16)
    assert np.array_equal(decoded, expected)
    assert np.array_equal(dense_from_codes(tensor.codes, tensor.scales).view(np.uint16), expected)


def test_bf16_to_fp16_table_is_numpy_on_every_bit_pattern():
    wide = bf16_bits_to_float32(np.arange(1 << 16, dtype=np.uint16))
    with np.errstate(over="ignore", invalid="ignore"):
        expected = wide.astype(np.float16).view(np.uint16)
    finite = np.isfinite(wide)
    assert np.array_equal(kernels.BF16_TO_FP16[finite], expected[finite])
    assert np.array_equal(np.isnan(kernels.BF16_TO_FP16.view(np.float16)), np.isnan(expected.view(np.float16)))


@pytest.mark.parametrize("cols", [128, 640, 3072, 7, 13, 1])
def test_codec_kernels_equal_the_numpy_references(cols):
    rng = np.random.default_rng(cols)
    codes = rng.integers(-1, 2, size=(37, cols)).astype(np.int8)
    assert np.array_equal(packed._encode_rows(codes, "ternary"), packed._encode_rows_reference(codes, "ternary"))
    if cols % 128 == 0:
        assert np.array_equal(mlx._pack_rows(codes, "ternary"), mlx._pack_rows_reference(codes, "ternary"))
        for nbits in (1, 2, 4, 8):
            q = rng.integers(0, 2**nbits, size=(37, cols)).astype(np.uint8)
            fast, reference = gemlite.pack_words(q, nbits), gemlite.pack_words_reference(q, nbits)
            assert fast.dtype == reference.dtype and np.array_equal(fast, reference)
            unpacked = gemlite.unpack_words(fast, nbits, cols)
            assert unpacked.dtype == np.uint8 and np.array_equal(unpacked, q)
            assert np.array_equal(unpacked, gemlite.unpack_words_reference(fast, nbits, cols))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_dense_stored_conversion_equals_encode_dense(data):
    from bonsai_convert.targets.base import encode_dense, encode_dense_stored

    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    bits = (rng.standard_normal((3, 50), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    for _ in range(data.draw(st.integers(0, 2))):
        bits[int(rng.integers(3)), int(rng.integers(50))] = data.draw(st.sampled_from(SPECIAL_BF16))
    float_dtype = data.draw(st.sampled_from(["F16", "BF16"]))
    stored_dtype = data.draw(st.sampled_from(["BF16", "F16"]))
    if stored_dtype == "BF16":
        stored, values = bits, bf16_bits_to_float32(bits)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            stored = values = bf16_bits_to_float32(bits).astype(np.float16)
    reference = outcome(lambda: encode_dense("t", values, float_dtype))
    fast = outcome(lambda: encode_dense_stored("t", stored, stored_dtype, float_dtype))
    if isinstance(reference, str):
        assert fast == reference
    else:
        assert fast.dtype == reference.dtype and np.array_equal(fast.view(np.uint16), reference.view(np.uint16))


@pytest.mark.parametrize("pending", [1 << 30, 100])
def test_writer_hashes_what_it_writes_in_any_order(tmp_path, monkeypatch, pending):
    import bonsai_convert.safetensors_io as io

    monkeypatch.setattr(io, "PENDING_HASH_BYTES", pending)  # 100: most out-of-order writes are read back
    rng = np.random.default_rng(0)
    specs = [TensorSpec(f"t{i}", "U8", (int(rng.integers(0, 40)), 3)) for i in range(30)]
    arrays = {s.name: rng.integers(0, 255, size=s.shape, dtype=np.uint8) for s in specs}
    writer = SafetensorsWriter(tmp_path / "f.safetensors", specs, {"format": "pt"})
    for index in rng.permutation(len(specs)):
        name = specs[index].name
        rows = arrays[name].shape[0]
        if rows > 4:  # some tensors in row chunks, the later half first
            writer.write_rows(name, arrays[name][rows // 2 :], rows // 2)
            writer.write_rows(name, arrays[name][: rows // 2], 0)
        else:
            writer.write(name, arrays[name])
    writer.close()
    assert writer.sha256 == hashlib.sha256((tmp_path / "f.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def klein_width_ternary(tmp_path_factory):
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("syn") / "ternary"
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_synthetic_checkpoint.py"
    command = [sys.executable, str(script), str(out), "--variant", "ternary", "--num-layers", "1"]
    subprocess.run([*command, "--num-single-layers", "1", "--num-attention-heads", "3"], check=True)
    return out


@pytest.mark.parametrize("target", ["packed", "iphone", "cuda"])
@pytest.mark.parametrize("source", ["demo-binary", "demo-ternary", "synthetic-ternary"])
def test_bundles_and_manifests_are_byte_identical_without_the_fast_paths(
    demo_checkpoint, klein_width_ternary, tmp_path, monkeypatch, target, source
):
    from bonsai_convert.pack import PackOptions, pack

    path = klein_width_ternary if source == "synthetic-ternary" else demo_checkpoint(source.split("-")[1])
    fast = pack(str(path), tmp_path / "fast", PackOptions(target=target, golden=False))
    monkeypatch.setattr(kernels, "ENABLED", False)
    reference = pack(str(path), tmp_path / "reference", PackOptions(target=target, golden=False))
    assert fast == reference
    assert tree_digest(tmp_path / "fast") == tree_digest(tmp_path / "reference")
    assert (tmp_path / "fast" / "manifest.json").read_bytes() == (tmp_path / "reference" / "manifest.json").read_bytes()


@pytest.mark.parametrize(("setting", "enabled"), [(None, True), ("0", True), ("", True), ("1", False)])
def test_reference_switch_is_read_from_the_environment(setting: str | None, enabled: bool):
    """BONSAI_CONVERT_REFERENCE=1, and only that, turns the compiled passes off (read in a fresh interpreter)."""
    env = {key: value for key, value in os.environ.items() if key != "BONSAI_CONVERT_REFERENCE"}
    if setting is not None:
        env["BONSAI_CONVERT_REFERENCE"] = setting
    probe = "from bonsai_convert import kernels; print(kernels.ENABLED)"
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(enabled)


def random_text_values(rng: np.random.Generator, trial: int) -> np.ndarray:
    """A random float32 text-encoder weight, 64-wide groups, with the trial's hard cases: a constant group (every
    3rd trial), 20 % zeros (4th), a last row of -0.0 (5th)."""
    rows, cols = int(rng.integers(1, 40)), 64 * int(rng.integers(1, 6))
    values = (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-6, 3)).astype(np.float32)
    if trial % 3 == 0:
        values[0, :64] = 0  # a constant group
    if trial % 4 == 0:
        values[rng.random(values.shape) < 0.2] = 0
    if trial % 5 == 0:
        values[-1, :] = -0.0  # a zero minimum of either sign
    return values


def same_bytes(arrays: tuple, references: tuple) -> bool:
    """Every array has its reference's dtype and bytes (NaN patterns and -0.0 included)."""
    return all(
        a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
        for a, b in zip(arrays, references, strict=True)
    )


@pytest.mark.parametrize("trial", range(24))
def test_text_encoder_4bit_kernels_equal_the_numpy_references(trial):
    import warnings

    from bonsai_convert.targets import cuda
    from bonsai_convert.targets import mlx as mlx_target

    rng = np.random.default_rng(trial)
    values = random_text_values(rng, trial)
    if trial % 5 == 0:
        values[-1, 3] = 0.0
    if trial % 7 == 0:
        values[0, 5] = np.float32(1e30)
    if trial % 11 == 0:
        values[0, 0], values[0, 1] = np.float32(-3e38), np.float32(3e38)
    if trial % 13 == 0:
        values[-1, -1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dense_dtype in ("BF16", "F16"):
            fast = outcome(lambda d=dense_dtype: mlx_target.quantize_text("x", values, d))
            reference = outcome(lambda d=dense_dtype: mlx_target.quantize_text_reference("x", values, d))
            if isinstance(reference, str):
                assert fast == reference
                continue
            assert same_bytes(fast, reference)
        if not np.isnan(values).any():
            half = values.astype(np.float16)
            fast, reference = cuda.quantize_affine_4bit(half), cuda.quantize_affine_4bit_reference(half)
            assert same_bytes(fast, reference)


@pytest.mark.parametrize("trial", range(16))
@pytest.mark.parametrize("stored_dtype", ["BF16", "F16"])
@pytest.mark.parametrize("target_name", ["iphone", "cuda"])
def test_text_encoder_from_stored_patterns_equals_the_widened_path(trial, stored_dtype, target_name):
    """`encode_text_encoder_stored` (bf16/fp16 patterns through a widening table, never widened in memory) gives
    `encode_text_encoder`'s bytes on the widened values, or None where the plain path must report a problem."""
    import warnings

    from bonsai_convert.layout import make_target

    target = make_target(target_name, None)
    rng = np.random.default_rng(100 + trial)
    values = random_text_values(rng, trial)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # bf16 by truncation: any pattern will do
    if stored_dtype == "F16":
        bits = values.astype(np.float16).view(np.uint16)
    if trial % 7 == 0:
        bits[0, 5] = 0x7A00 if stored_dtype == "BF16" else 0x7BFF  # beyond fp16 (bf16) / fp16 max
    if trial % 13 == 0:
        bits[-1, -1] = 0x7FC0 if stored_dtype == "BF16" else 0x7E00  # NaN
    widened = bf16_bits_to_float32(bits) if stored_dtype == "BF16" else bits.view(np.float16)
    name = "model.layers.0.mlp.up_proj.weight"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = outcome(lambda: target.encode_text_encoder(name, widened))
        fast = outcome(lambda: target.encode_text_encoder_stored(name, bits, stored_dtype))
    stays_dense = len(target.text_encoder_outputs(name, bits.shape, stored_dtype)) == 1
    if fast is None and stays_dense:  # not quantized here (HQQ's nibble pairs need an even group count): pack
        assert isinstance(plain, str) or list(plain) == [name]  # writes it through its dense path instead
        return
    if fast is None or isinstance(fast, str):
        assert isinstance(plain, str), "the stored path declined a tensor the plain path encodes"
        assert fast is None or fast == plain
        return
    assert isinstance(plain, dict) and fast.keys() == plain.keys()
    for key in plain:
        assert fast[key].dtype == plain[key].dtype and np.array_equal(
            fast[key].view(np.uint8), plain[key].view(np.uint8)
        )


@pytest.mark.parametrize("stored_dtype, via_fp16", [("BF16", False), ("BF16", True), ("F16", False)])
def test_group_extremes_on_stored_patterns_equal_numpy_on_the_widened_values(stored_dtype, via_fp16):
    """Every 16-bit pattern (shuffled into groups of 64, plus groups of one repeated pattern) gives numpy's
    min/max of the table values, −0 below +0, or False for a group with a NaN, an infinity or an overflow."""
    table = kernels.widening_table(stored_dtype, via_fp16)
    rng = np.random.default_rng(7)
    patterns = rng.permutation(1 << 16).astype(np.uint16)
    stored = np.concatenate([patterns, np.repeat(rng.integers(0, 1 << 16, 64).astype(np.uint16), 64)])
    stored = stored.reshape(-1, 64)
    low = np.empty((stored.shape[0], 1), np.float32)
    high = np.empty_like(low)
    for row in range(stored.shape[0]):
        group = stored[row : row + 1]
        finite = kernels.group_min_max_stored(group, table, 64, low[row : row + 1], high[row : row + 1])
        values = table[group[0]]
        assert finite == bool(np.isfinite(values).all())
        if finite:
            ordered = values.view(np.int32) ^ ((values.view(np.int32) >> 31) & 0x7FFFFFFF)  # −0 below +0
            assert low[row, 0].view(np.int32) == values[np.argmin(ordered)].view(np.int32)
            assert high[row, 0].view(np.int32) == values[np.argmax(ordered)].view(np.int32)


@pytest.mark.parametrize("variant", ["binary", "ternary"])
@pytest.mark.parametrize("trial", range(6))
def test_gemlite_encode_from_codes_equals_the_numpy_path(variant, trial, monkeypatch):
    """The one-pass compiled Gemlite packer gives the numpy path's tensors, and its error where codes or scales
    are not the variant's (a stray code, a binary scale beyond fp16 when doubled)."""
    rng = np.random.default_rng(trial)
    rows, cols = int(rng.integers(1, 70)), 128 * int(rng.integers(1, 5))
    low = -1 if variant == "ternary" else 0
    codes = rng.integers(low, 2, size=(rows, cols)).astype(np.int8)
    if variant == "binary":
        codes[codes == 0] = -1
    scales = rng.uniform(1e-3, 1.0, size=(rows, cols // 128)).astype(np.float16)
    if trial == 4:
        codes[rows // 2, cols - 1] = 2 if variant == "ternary" else 0
    if trial == 5 and variant == "binary":
        scales[0, 0] = 60000.0

    def encoded():
        try:
            return gemlite.encode(codes, scales, variant)
        except (InputError, ValueError) as error:
            return f"{type(error).__name__}: {error}"

    fast = encoded()
    monkeypatch.setattr(kernels, "ENABLED", False)
    reference = encoded()
    if not isinstance(reference, dict):
        assert fast == reference
        return
    assert fast.keys() == reference.keys()
    for key in reference:
        assert fast[key].dtype == reference[key].dtype and np.array_equal(fast[key], reference[key]), key
