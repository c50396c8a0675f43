"""The table-driven MLX word unpacker equals the shift-based specification."""

from __future__ import annotations

import numpy as np
import pytest

from bonsai_convert.codecs.mlx import unpack, unpack_reference


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_unpack_equals_reference(bits):
    rng = np.random.default_rng(bits)
    words = rng.integers(0, 2**32, size=(7, 12), dtype=np.uint32)
    in_features = 12 * 32 // bits
    for width in (in_features, in_features - 3):
        assert np.array_equal(unpack(words, width, bits), unpack_reference(words, width, bits))


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_decode_codes_equal_unpacked_fields(variant):
    from bonsai_convert.codecs.mlx import decode

    bits = 1 if variant == "binary" else 2
    rng = np.random.default_rng(3)
    q = rng.integers(0, 2 if variant == "binary" else 3, size=(5, 256))
    words = np.zeros((5, 256 * bits // 32), dtype=np.uint32)
    for i in range(32 // bits):
        words |= q[:, i :: 32 // bits].astype(np.uint32) << np.uint32(i * bits)
    assert np.array_equal(unpack_reference(words, 256, bits), q)
    s = rng.uniform(0.01, 0.06, size=(5, 2)).astype(np.float16)
    scales = (s * np.float16(2)).astype(np.float16) if variant == "binary" else s
    codes, decoded_scales = decode(words, scales, (-s).astype(np.float16), variant)
    expected = q * 2 - 1 if variant == "binary" else q - 1
    assert codes.dtype == np.int8 and np.array_equal(codes, expected) and np.array_equal(decoded_scales, s)
    if variant == "ternary":
        words[0, 0] |= np.uint32(3)
        with pytest.raises(ValueError, match="code 3"):
            decode(words, scales, (-s).astype(np.float16), variant)
