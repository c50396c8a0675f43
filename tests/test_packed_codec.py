"""The canonical packed codec: exact round trips and the test vector of formats/packed.md."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bonsai_convert.codecs import packed


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_round_trip_any_shape(data):
    variant = data.draw(st.sampled_from(["binary", "ternary"]))
    rows = data.draw(st.integers(1, 5))
    cols = data.draw(st.integers(1, 700))
    pool = [-1, 1] if variant == "binary" else [-1, 0, 1]
    codes = data.draw(arrays(np.int8, (rows, cols), elements=st.sampled_from(pool)))
    encoded = packed.encode(codes, variant)
    assert encoded.dtype == np.uint8
    assert encoded.shape == (rows, packed.code_bytes_per_row(cols, variant))
    assert np.array_equal(packed.decode(encoded, cols, variant), codes)


def test_binary_test_vector():
    # formats/packed.md: weights + + - - - - - + | - ... → byte 0 = 0b10000011 = 0x83 (LSB-first, bit 1 = +s)
    codes = np.array([[1, 1, -1, -1, -1, -1, -1, 1] + [-1] * 8], dtype=np.int8)
    assert packed.encode(codes, "binary").tolist() == [[0x83, 0x00]]


def test_ternary_test_vector():
    # formats/packed.md: t = [-1, 0, 1, 1, -1 | 0, 0] → digits [0,1,2,2,0] = 0+3+18+54+0 = 75;
    # padded chunk [1,1,1,1,1] (t = 0) = 121; the second row byte: [1,1,1,1,1] = 121 too.
    codes = np.array([[-1, 0, 1, 1, -1, 0, 0]], dtype=np.int8)
    assert packed.encode(codes, "ternary").tolist() == [[75, 121]]
    assert packed.decode(np.array([[75, 121]], dtype=np.uint8), 7, "ternary").tolist() == codes.tolist()


def test_all_zero_ternary_group_is_byte_121():
    codes = np.zeros((2, 128), dtype=np.int8)
    assert (packed.encode(codes, "ternary")[:, :25] == 121).all()


def test_bytes_above_242_are_flagged():
    assert packed.invalid_ternary_bytes(np.array([[242, 243, 255]], dtype=np.uint8)).tolist() == [[False, True, True]]
