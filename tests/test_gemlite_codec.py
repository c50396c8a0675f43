"""The Gemlite codec: exact round trips, the spec's worked vectors, byte-exact specs, hostile states."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bonsai_convert.codecs import gemlite
from bonsai_convert.errors import InputError
from bonsai_convert.lowbit import GROUP_SIZE, dense_from_codes, split_exact
from bonsai_convert.safetensors_io import DTYPE_OF_NUMPY

BINARY_SCALE_MAX = 32752.0  # largest fp16 s with 2s finite
SPECIAL = [0.0, -0.0, 2.0**-24, -(2.0**-24), 2.0**-14 - 2.0**-24, 2.0**-14, 1.0, 0.0999, 32752.0, 65504.0]


@st.composite
def layers(draw, variant: str):
    """(codes int8 [N, K], scales fp16 [N, K/128]) with random codes and fp16 scales including extremes."""
    rows = draw(st.integers(1, 24))
    groups = draw(st.integers(1, 4))
    values = (-1, 1) if variant == "binary" else (-1, 0, 1)
    codes = draw(hnp.arrays(np.int8, (rows, groups * GROUP_SIZE), elements=st.sampled_from(values)))
    limit = BINARY_SCALE_MAX if variant == "binary" else 65504.0
    finite = st.floats(-limit, limit, width=16, allow_nan=False, allow_infinity=False)
    special = st.sampled_from([v for v in SPECIAL if abs(v) <= limit])
    scales = draw(hnp.arrays(np.float16, (rows, groups), elements=st.one_of(finite, special)))
    return codes, scales


def _bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def _assert_weight_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    """Bit-equal fp16, except that ±0 may differ in sign (binary groups with s = 0, formats/gemlite.md)."""
    assert actual.dtype == np.float16 and actual.shape == expected.shape
    assert np.array_equal(actual, expected)
    nonzero = expected != 0
    assert np.array_equal(actual.view(np.uint16)[nonzero], expected.view(np.uint16)[nonzero])


@pytest.mark.parametrize("variant", ["binary", "ternary"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_roundtrip_is_bit_exact(variant: str, data) -> None:
    codes, scales = data.draw(layers(variant))
    state = gemlite.encode(codes, scales, variant)
    decoded_codes, decoded_scales = gemlite.decode(state)
    assert decoded_codes.dtype == np.int8 and np.array_equal(decoded_codes, codes)
    assert decoded_scales.dtype == np.float16 and _bits(decoded_scales) == _bits(scales)
    _assert_weight_equal(gemlite.dequantize(state), dense_from_codes(codes, scales))


@pytest.mark.parametrize("variant", ["binary", "ternary"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_tensor_specs_predict_encode_exactly(variant: str, data) -> None:
    codes, scales = data.draw(layers(variant))
    state = gemlite.encode(codes, scales, variant)
    specs = gemlite.tensor_specs("blocks.0.attn.to_q", codes.shape[0], codes.shape[1], variant)
    assert [name for name, _, _ in specs] == [f"blocks.0.attn.to_q.{key}" for key in gemlite.STORED_LAYER_KEYS]
    for name, dtype, shape in specs:
        array = state[name.rsplit(".", 1)[1]]
        assert (DTYPE_OF_NUMPY[array.dtype.str], array.shape) == (dtype, shape)
        assert array.flags.c_contiguous


def test_all_zero_ternary_groups() -> None:
    rng = np.random.default_rng(1)
    weight = rng.choice(np.array([-0.25, 0.0, 0.25], np.float32), size=(6, 3 * GROUP_SIZE))
    weight[0, :GROUP_SIZE] = 0.0  # s = 0: split_exact keeps sign codes
    weight[1, GROUP_SIZE : 2 * GROUP_SIZE] = -0.0
    weight[2, 2 * GROUP_SIZE :] = 0.0
    low = split_exact("w", weight, "ternary")
    state = gemlite.encode(low.codes, low.scales, "ternary")
    codes, scales = gemlite.decode(state)
    assert np.array_equal(codes, low.codes) and _bits(scales) == _bits(low.scales)
    assert _bits(gemlite.dequantize(state)) == _bits(weight.astype(np.float16))
    zero_codes = np.zeros((4, GROUP_SIZE), np.int8)  # all codes 0 with a nonzero scale
    state = gemlite.encode(zero_codes, np.full((4, 1), 0.5, np.float16), "ternary")
    assert np.array_equal(gemlite.decode(state)[0], zero_codes)
    assert not gemlite.dequantize(state).view(np.uint16).any()


def test_split_exact_binary_through_gemlite() -> None:
    rng = np.random.default_rng(2)
    scales = rng.uniform(0.01, 0.06, (5, 3)).astype(np.float16)
    weight = rng.choice(np.array([-1, 1], np.float16), size=(5, 384)) * np.repeat(scales, GROUP_SIZE, axis=1)
    low = split_exact("w", weight, "binary")
    assert _bits(gemlite.dequantize(gemlite.encode(low.codes, low.scales, "binary"))) == _bits(weight)


def _vector_layers() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    k = np.arange(256)
    binary = np.stack([np.where(k % 2 == 0, 1, -1), np.where(k < 128, 1, -1)]).astype(np.int8)
    ternary = np.stack([np.array([-1, 0, 1, 0])[k % 4], np.where(k < 128, 0, 1)]).astype(np.int8)
    return {
        "binary": (binary, np.array([[0.5, 0.25], [1.0, 2.0]], np.float16)),
        "ternary": (ternary, np.array([[0.5, 0.25], [1.0, 2.0]], np.float16)),
    }


def _words(rows: list[tuple[int, int]], repeat: int) -> np.ndarray:
    return np.array([row for row in rows for _ in range(repeat)], dtype=np.uint32).view(np.int32)


def _half(bits: list[list[int]]) -> np.ndarray:
    return np.array(bits, dtype=np.uint16).view(np.float16)


WORKED = {  # formats/gemlite.md, "Worked test vector" (hand-computed, independent of the encoder)
    "binary": {
        "W_q": _words([(0x55555555, 0xFFFFFFFF), (0x55555555, 0x00000000)], 4),
        "scales": _half([[0x3C00, 0x4000], [0x3800, 0x4400]]),
        "zeros": _half([[0xB800, 0xBC00], [0xB400, 0xC000]]),
        "metadata": np.array([0, 1, 128, 1, 32, 1, 1, 0, 1, 0, 4, 1], np.int32),
        "orig_shape": np.array([2, 256], np.int32),
    },
    "ternary": {
        "W_q": _words([(0x64646464, 0x55555555), (0x64646464, 0xAAAAAAAA)], 8),
        "scales": _half([[0x3800, 0x3C00], [0x3400, 0x4000]]),
        "zeros": np.array(1, np.int32),
        "metadata": np.array([0, 2, 128, 3, 16, 1, 1, 0, 1, 0, 3, 1], np.int32),
        "orig_shape": np.array([2, 256], np.int32),
    },
}


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_worked_vector(variant: str) -> None:
    codes, scales = _vector_layers()[variant]
    state = gemlite.encode(codes, scales, variant)
    expected = WORKED[variant]
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and state[key].shape == value.shape, key
        assert _bits(state[key]) == _bits(value), key
    decoded_codes, decoded_scales = gemlite.decode(expected)
    assert np.array_equal(decoded_codes, codes) and _bits(decoded_scales) == _bits(scales)


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_per_channel_case_when_k_is_one_group(variant: str) -> None:
    """K == 128: gemlite's per-channel branch (W_group_mode 1, channel_scale_mode 1, zeros kept as given)."""
    codes = np.array([[1, -1] * 64, [-1] * 128], np.int8)
    scales = np.array([[0.75], [2.0**-20]], np.float16)
    state = gemlite.encode(codes, scales, variant)
    assert state["metadata"][9:11].tolist() == [1, 1]
    if variant == "binary":
        assert _bits(state["zeros"]) == _bits(np.full((1, 2), 0.5, np.float16))
        assert _bits(state["scales"]) == _bits(np.array([[1.5, 2.0**-19]], np.float16))
    decoded_codes, decoded_scales = gemlite.decode(state)
    assert np.array_equal(decoded_codes, codes) and _bits(decoded_scales) == _bits(scales)
    _assert_weight_equal(gemlite.dequantize(state), dense_from_codes(codes, scales))


def test_affine_4bit_matches_the_kernel_formula() -> None:
    rng = np.random.default_rng(3)
    q = rng.integers(0, 16, (8, 256), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.1, (8, 4)).astype(np.float16)
    zeros = rng.uniform(0, 15, (8, 4)).astype(np.float16)
    state = gemlite.encode_affine(q, scales, zeros, 4, 64)
    assert state["W_q"].shape == (32, 8) and state["metadata"].tolist() == [
        0,
        4,
        64,
        15,
        8,
        1,
        1,
        0,
        1,
        0,
        4,
        1,
    ]
    stored = (-zeros.astype(np.float32) * scales.astype(np.float32)).astype(np.float16)
    assert _bits(state["zeros"]) == _bits(stored.T)
    expected = q * np.repeat(scales, 64, 1).astype(np.float64) + np.repeat(stored, 64, 1).astype(np.float64)
    assert _bits(gemlite.dequantize(state)) == _bits(expected.astype(np.float16))
    for name, dtype, shape in gemlite.affine_tensor_specs("te.q_proj", 8, 256, 4, 64, int_zero=False):
        array = state[name.rsplit(".", 1)[1]]
        assert (DTYPE_OF_NUMPY[array.dtype.str], array.shape) == (dtype, shape)
    scalar = gemlite.encode_affine(q, scales, 8, 4, 64)
    assert scalar["zeros"].shape == () and scalar["metadata"][10] == 3
    assert np.array_equal(gemlite.unpack_words(scalar["W_q"], 4, 256), q)


def test_binary_scale_too_large_for_fp16_is_refused() -> None:
    with pytest.raises(InputError, match="2·s"):
        gemlite.encode(np.ones((1, 128), np.int8), np.array([[32768.0]], np.float16), "binary")


def test_encode_rejects_bad_codes() -> None:
    with pytest.raises(ValueError):
        gemlite.encode(np.zeros((1, 128), np.int8), np.ones((1, 1), np.float16), "binary")
    with pytest.raises(ValueError):
        gemlite.encode(np.full((1, 128), 2, np.int8), np.ones((1, 1), np.float16), "ternary")
    with pytest.raises(ValueError):
        gemlite.encode(np.ones((1, 100), np.int8), np.ones((1, 1), np.float16), "ternary")


def _tampered(variant: str, key: str, value: np.ndarray) -> dict[str, np.ndarray]:
    codes, scales = _vector_layers()[variant]
    state = gemlite.encode(codes, scales, variant)
    state[key] = value
    return state


@pytest.mark.parametrize(
    ("variant", "key", "value", "message"),
    [
        ("ternary", "W_q", np.full((16, 2), -1, np.int32), "code 3"),
        ("ternary", "zeros", np.array(2, np.int32), "zero point 1"),
        ("binary", "zeros", np.zeros((2, 2), np.float16), "not an exact binary"),
        ("binary", "metadata", np.array([0, 1, 128, 1, 32, 2, 1, 0, 1, 0, 4, 1], np.int32), "input_dtype"),
        (
            "binary",
            "metadata",
            np.array([0, 1, 128, 1, 32, 1, 1, 0, 1, 1, 1, 1], np.int32),
            "channel_scale_mode",
        ),
        ("binary", "W_q", np.zeros((8, 2), np.uint32), "W_q is uint32"),
        ("binary", "scales", np.zeros((2, 3), np.float16), "scales is"),
        ("ternary", "orig_shape", np.array([2, 512], np.int32), "W_q is"),
    ],
)
def test_decode_rejects_malformed_states(variant: str, key: str, value: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=message):
        gemlite.decode(_tampered(variant, key, value))


def test_decode_requires_every_tensor() -> None:
    codes, scales = _vector_layers()["binary"]
    state = gemlite.encode(codes, scales, "binary")
    assert "meta_scale" not in state  # gemlite's load_state_dict defaults it to 0.0; the released loader rejects it
    gemlite.decode(dict(state, meta_scale=np.array(0.0, np.float32)))  # gemlite's own state_dict() has it
    for key in ("W_q", "scales", "metadata", "orig_shape"):
        partial = {name: value for name, value in state.items() if name != key}
        with pytest.raises(InputError, match=f"missing tensor {key}"):
            gemlite.decode(partial)
