"""GGUF codecs (Q1_0 / Q2_0, formats/gguf.md): worked bytes, exact round trips, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from bonsai_convert.codecs import gguf as codec
from bonsai_convert.errors import InputError
from bonsai_convert.lowbit import dense_from_codes


def _random_tensor(rng: np.random.Generator, variant: str, rows: int = 6, cols: int = 384):
    values = [-1, 1] if variant == "binary" else [-1, 0, 1]
    codes = rng.choice(values, size=(rows, cols)).astype(np.int8)
    scales = np.abs(rng.standard_normal((rows, cols // 128))).astype(np.float16)
    scales[0, 0] = 0.0  # a zero scale: binary −1 codes then stand for −0.0
    return codes, scales


def test_q1_0_worked_block():
    codes = np.ones((1, 128), dtype=np.int8)
    codes[0, 1:8] = -1  # weights 1..7 negative: byte 0 = 0b00000001
    codes[0, 127] = -1  # last weight negative: byte 15 = 0b01111111
    scales = np.array([[1.0]], dtype=np.float16)  # 0x3C00, little-endian 00 3C
    block = codec.encode("w", codes, scales, "binary")
    assert block.tobytes().hex() == "003c01" + "ff" * 14 + "7f"


def test_q2_0_worked_blocks_carry_the_group_scale_twice():
    codes = np.zeros((1, 128), dtype=np.int8)
    codes[0, :4] = [-1, 0, 1, 1]  # q = 0,1,2,2 → 0 | 1<<2 | 2<<4 | 2<<6 = 0xa4
    codes[0, 64] = 1  # first weight of the second block: q = 2 → 0b01010110 = 0x56
    scales = np.array([[0.5]], dtype=np.float16)  # 0x3800
    blocks = codec.encode("w", codes, scales, "ternary")
    assert blocks.tobytes().hex() == "0038" + "a4" + "55" * 15 + "0038" + "56" + "55" * 15


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_round_trip_is_exact(variant):
    codes, scales = _random_tensor(np.random.default_rng(1), variant)
    data = codec.encode("w", codes, scales, variant)
    assert data.shape == (6, codec.row_bytes(384, variant))
    decoded_codes, decoded_scales = codec.decode("w", data, 384, variant)
    assert np.array_equal(decoded_codes, codes)
    assert np.array_equal(decoded_scales.view(np.uint16), scales.view(np.uint16))


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_ggml_dequantization_equals_the_weight_bit_for_bit(variant):
    codes, scales = _random_tensor(np.random.default_rng(2), variant)
    dense = dense_from_codes(codes, scales).astype(np.float32)
    ggml = codec.dequantize(codec.encode("w", codes, scales, variant), 384, variant)
    assert np.array_equal(ggml.view(np.uint32), dense.view(np.uint32))  # −0.0 included


def test_sizes_are_the_information_sizes():
    assert codec.row_bytes(3072, "binary") * 8 / 3072 == 9 * 8 / 64  # 1.125 bpw
    assert codec.row_bytes(3072, "ternary") * 8 / 3072 == 2.25


def test_quant_classes_follow_ggml_reference_quantizers():
    values = np.where(np.arange(128) % 3 == 0, -0.25, 0.25).astype(np.float32)[None]
    assert np.array_equal(codec.Q1_0.dequantize_blocks(codec.Q1_0.quantize_blocks(values)), values)
    ternary = (np.arange(64) % 3 - 1).astype(np.float32)[None] * np.float32(0.75)
    assert np.array_equal(codec.Q2_0.dequantize_blocks(codec.Q2_0.quantize_blocks(ternary)), ternary)


def test_q2_0_with_halves_of_different_scales_is_refused():
    codes, scales = _random_tensor(np.random.default_rng(3), "ternary")
    data = codec.encode("blocks.w", codes, scales, "ternary")
    data[2, 18 * 3] ^= 1  # second 64-block of group 1 in row 2: its d changes
    with pytest.raises(InputError, match=r"blocks\.w: row 2, group 1: .*different scales"):
        codec.decode("blocks.w", data, 384, "ternary")


def test_q2_0_code_plus_two_is_refused():
    codes, scales = _random_tensor(np.random.default_rng(4), "ternary")
    data = codec.encode("blocks.w", codes, scales, "ternary")
    data[4, 2] |= 0b11  # weight 0 of row 4: q = 3
    with pytest.raises(InputError, match=r"blocks\.w: row 4 uses Q2_0 code 3"):
        codec.decode("blocks.w", data, 384, "ternary")


def test_wrong_row_length_is_refused():
    with pytest.raises(InputError, match="w: 36 bytes per row do not hold 256 ternary weights"):
        codec.decode("w", np.zeros((2, 36), dtype=np.uint8), 256, "ternary")


def test_ternary_negative_scale_is_refused():
    codes = np.zeros((1, 128), dtype=np.int8)
    scales = np.array([[-0.0]], dtype=np.float16)
    with pytest.raises(InputError, match="sign bit"):
        codec.encode("w", codes, scales, "ternary")
