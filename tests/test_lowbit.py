"""The exactness rule: splitting exact binary/ternary weights into codes and fp16 scales loses no bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bonsai_convert.errors import InputError
from bonsai_convert.lowbit import (
    dense_from_codes,
    is_low_bit_key,
    needs_ternary,
    quantize_absmean,
    split_exact,
)
from bonsai_convert.safetensors_io import bf16_bits_to_float32, float32_to_bf16_bits

# fp16 scales including subnormals, the largest finite value, zero and negative zero.
fp16_scales = st.one_of(
    st.sampled_from([0.0, -0.0, 2.0**-24, 2.0**-14 - 2.0**-24, 65504.0, 1.0, 0.0123]),
    st.floats(min_value=2.0**-24, max_value=65504.0, width=16),
)


@st.composite
def exact_weights(draw, variant: str):
    rows = draw(st.integers(1, 4))
    groups = draw(st.integers(1, 3))
    codes_pool = [-1, 1] if variant == "binary" else [-1, 0, 1]
    codes = draw(arrays(np.int8, (rows, groups * 128), elements=st.sampled_from(codes_pool)))
    scales = draw(arrays(np.float16, (rows, groups), elements=fp16_scales))
    scales = np.abs(scales)
    if variant == "ternary" and draw(st.booleans()):
        codes[0, :128] = 0  # an all-zero group
    weight = dense_from_codes(codes, scales)
    return weight


def fp16_bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float16).view(np.uint16)


@settings(max_examples=150, deadline=None)
@given(exact_weights("binary"))
def test_binary_split_reproduces_every_bit(weight):
    tensor = split_exact("w", weight, "binary")
    assert set(np.unique(tensor.codes)) <= {-1, 1}
    assert np.array_equal(fp16_bits(tensor.dense()), fp16_bits(weight))


@settings(max_examples=150, deadline=None)
@given(exact_weights("ternary"))
def test_ternary_split_reproduces_every_value(weight):
    tensor = split_exact("w", weight, "ternary")
    dense = tensor.dense()
    # Bit for bit, except that -0.0 in a group with a non-zero scale decodes as +0.0 (formats/exactness.md).
    group_scale = np.repeat(np.abs(weight).reshape(weight.shape[0], -1, 128).max(-1), 128, axis=1)
    expected = np.where((weight == 0) & (group_scale != 0), np.float16(0), weight)
    assert np.array_equal(fp16_bits(dense), fp16_bits(expected))


def test_negative_zero_keeps_its_sign_in_binary():
    weight = np.full((1, 128), -0.0, dtype=np.float16)
    weight[0, ::2] = 0.0
    tensor = split_exact("w", weight, "binary")
    assert np.array_equal(fp16_bits(tensor.dense()), fp16_bits(weight))


def test_bf16_source_is_exact_after_fp16_cast():
    rng = np.random.default_rng(1)
    codes = rng.choice([-1, 0, 1], size=(3, 256)).astype(np.int8)
    scales = np.array([[0.015625, 0.0234375]] * 3, dtype=np.float16)  # exact in bf16 and fp16
    weight32 = dense_from_codes(codes, scales).astype(np.float32)
    stored_bf16 = bf16_bits_to_float32(float32_to_bf16_bits(weight32))
    tensor = split_exact("w", stored_bf16, "ternary")
    assert np.array_equal(tensor.codes, codes)
    assert np.array_equal(tensor.scales, scales)


def test_non_ternary_value_is_refused_naming_tensor_row_and_group():
    weight = dense_from_codes(np.ones((2, 256), dtype=np.int8), np.full((2, 2), 0.5, dtype=np.float16))
    weight[1, 130] = 0.25
    with pytest.raises(InputError) as error:
        split_exact("blocks.0.attn.to_q.weight", weight, "ternary")
    message = str(error.value)
    assert "blocks.0.attn.to_q.weight" in message and "row 1, group 1" in message and "0.25" in message


def test_zero_in_binary_tensor_is_refused():
    weight = np.full((1, 128), 0.5, dtype=np.float16)
    weight[0, 3] = 0
    with pytest.raises(InputError, match="not binary"):
        split_exact("w", weight, "binary")
    assert needs_ternary(split_exact("w", weight, "ternary").codes)


def test_overflow_and_nan_are_refused():
    with pytest.raises(InputError, match="overflows fp16"):
        split_exact("w", np.full((1, 128), 70000.0, dtype=np.float32), "binary")
    bad = np.ones((1, 128), dtype=np.float32)
    bad[0, 5] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        split_exact("w", bad, "binary")


def test_group_size_mismatch_names_the_requirement():
    with pytest.raises(InputError, match="not divisible by the group size 128"):
        split_exact("w", np.ones((2, 100), dtype=np.float32), "binary")


def test_low_bit_rule_holds_for_block_linears_only():
    assert is_low_bit_key("transformer_blocks.4.attn.to_out.0.weight")
    assert is_low_bit_key("transformer_blocks.0.ff_context.linear_in.weight")
    assert is_low_bit_key("single_transformer_blocks.19.attn.to_qkv_mlp_proj.weight")
    assert not is_low_bit_key("single_transformer_blocks.3.attn.norm_q.weight")
    assert not is_low_bit_key("double_stream_modulation_img.linear.weight")
    assert not is_low_bit_key("transformer_blocks.0.attn.to_q.bias")
    assert not is_low_bit_key("proj_out.weight")


def test_absmean_projection_is_ternary_and_lossy():
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.02, size=(4, 256)).astype(np.float32)
    tensor = quantize_absmean("w", weight, "ternary")
    assert set(np.unique(tensor.codes)) <= {-1, 0, 1}
    assert np.allclose(tensor.scales, np.abs(weight).reshape(4, 2, 128).mean(-1), rtol=1e-3)
    assert not np.array_equal(tensor.dense().astype(np.float32), weight)
