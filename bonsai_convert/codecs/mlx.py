"""MLX affine quantized layers at 1 and 2 bits (formats/mlx.md), pure numpy.

`mlx.nn.QuantizedLinear` computes w = scale·q + bias per group of 128 with q packed LSB-first into uint32 words
along the row. Binary is exact as 1-bit (q = (b+1)/2, scale = 2s, bias = −s); ternary as 2-bit (q = t+1, scale = s,
bias = −s; code 3 unused). `mx.quantize` is not used: on exactly-ternary weights it is lossy.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import to_bf16_exact, widen
from ..errors import InputError
from ..lowbit import GROUP_SIZE
from . import row_blocks

BITS = {"binary": 1, "ternary": 2}
_HALF_FP16_MAX = np.float16(32752.0)  # 2·s must stay finite in fp16


def encode(
    name: str, codes: np.ndarray, scales: np.ndarray, variant: str, float_dtype: str = "F16"
) -> tuple[np.ndarray, ...]:
    """int8 codes [out, in] + group scales [out, in/128] → (weight uint32 [out, in·bits/32], scales, biases).

    float_dtype "BF16" gives scales/biases as bf16 bit patterns (uint16), refusing a scale bf16 cannot hold exactly.
    """
    bits = BITS[variant]
    out_features, in_features = codes.shape
    if float_dtype == "F16" and variant == "binary" and (np.abs(scales) > _HALF_FP16_MAX).any():
        raise InputError(f"{name}: a binary scale above 32752 cannot be stored as an MLX 1-bit scale 2s in fp16")
    words = np.empty((out_features, in_features * bits // 32), dtype="<u4")
    for rows in row_blocks(out_features):
        words[rows] = _pack_rows(codes[rows], variant)
    words = words.astype(np.uint32, copy=False)
    if float_dtype == "BF16":
        s32 = scales.astype(np.float32)
        mlx_scales = s32 * np.float32(2) if variant == "binary" else s32
        return words, to_bf16_exact(f"{name} scales", mlx_scales), to_bf16_exact(f"{name} scales", -s32)
    s16 = scales.astype(np.float16)
    mlx_scales = (s16 * np.float16(2)).astype(np.float16) if variant == "binary" else s16
    return words, mlx_scales, (-s16).astype(np.float16)


def _pack_rows(codes: np.ndarray, variant: str) -> np.ndarray:
    """q packed LSB-first: 1-bit q = (b+1)/2, 2-bit q = t+1 (16 per word, compiled); 4 bytes LE = 1 word."""
    from .. import kernels

    if variant != "binary" and kernels.ENABLED and codes.shape[1] % 16 == 0:
        words = np.empty((codes.shape[0], codes.shape[1] // 16), dtype="<u4")
        kernels.pack_2bit_words(np.ascontiguousarray(codes, dtype=np.int8), words)
        return words
    return _pack_rows_reference(codes, variant)


def _pack_rows_reference(codes: np.ndarray, variant: str) -> np.ndarray:
    """`_pack_rows` in plain numpy (four 2-bit fields per byte)."""
    if variant == "binary":
        return np.packbits(codes > 0, axis=1, bitorder="little").view("<u4")
    q = (codes + 1).astype(np.uint8).reshape(codes.shape[0], codes.shape[1] // 4, 4)
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return np.ascontiguousarray(packed).view("<u4")


def _byte_table(bits: int) -> np.ndarray:
    """[256, 8/bits] uint8: the fields of one byte, LSB first."""
    per_byte = 8 // bits
    values = np.arange(256, dtype=np.uint16)[:, None] >> (np.arange(per_byte, dtype=np.uint16) * bits)
    return (values & ((1 << bits) - 1)).astype(np.uint8)


def unpack_reference(weight: np.ndarray, in_features: int, bits: int) -> np.ndarray:
    """`unpack` with shifts on whole words (the specification `unpack` is tested against)."""
    words = np.ascontiguousarray(weight, dtype="<u4")
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits
    q = (words[:, :, None] >> shifts) & ((1 << bits) - 1)
    return q.reshape(words.shape[0], -1)[:, :in_features].astype(np.uint8)


def unpack(weight: np.ndarray, in_features: int, bits: int) -> np.ndarray:
    """uint32 words [out, in·bits/32] → q uint8 [out, in] (LSB-first).

    Little-endian words read as bytes keep the order (byte j holds fields 8j/bits…), so one table lookup per byte
    gives the fields directly as uint8 (no 4-byte-per-weight intermediate)."""
    if bits not in (1, 2, 4, 8):
        return unpack_reference(weight, in_features, bits)
    data = np.ascontiguousarray(weight, dtype="<u4").view(np.uint8)
    q = _byte_table(bits)[data].reshape(data.shape[0], -1)
    return q[:, :in_features] if q.shape[1] != in_features else q


def decode(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """Back to (int8 codes, fp16 group scales s); raises ValueError if scales/biases are not of our exact form."""
    if variant not in BITS:
        raise ValueError(f"unknown variant {variant!r}")
    bits = BITS[variant]
    if weight.ndim != 2 or weight.dtype != np.uint32:
        raise ValueError(f"weight must be a 2-D uint32 array, got {weight.dtype} {list(weight.shape)}")
    if scales.ndim != 2 or scales.shape != biases.shape or scales.shape[0] != weight.shape[0]:
        raise ValueError(f"scales {list(scales.shape)} and biases {list(biases.shape)} do not fit the weight")
    in_features = scales.shape[1] * GROUP_SIZE
    if in_features < 1 or weight.shape[1] * 32 != in_features * bits:
        raise ValueError(f"{weight.shape[1]} words per row do not hold {in_features} {bits}-bit weights")
    if scales.dtype != np.float16 or biases.dtype != np.float16:  # bf16 (bits or widened): the released packs
        scale32 = widen(scales, "BF16").astype(np.float32)
        bias32 = widen(biases, "BF16").astype(np.float32)
        expected = -(scale32 / np.float32(2)) if variant == "binary" else -scale32
        relation = "−scales/2" if variant == "binary" else "−scales"
        if not np.array_equal(expected.view(np.uint32), bias32.view(np.uint32)):
            raise ValueError(f"biases are not {relation} bit for bit (not an exact {variant} tensor)")
        s = (-bias32).astype(np.float16)
        if not np.array_equal(s.astype(np.float32), -bias32):
            raise ValueError("a group scale does not fit fp16 exactly")
    else:
        s = (-biases.astype(np.float16)).astype(np.float16)
        expected_scales = (s * np.float16(2)).astype(np.float16) if variant == "binary" else s
        if not np.array_equal(expected_scales.view(np.uint16), scales.astype(np.float16).view(np.uint16)):
            raise ValueError("scales and biases are not of the exact binary/ternary form")
    # Codes straight from the bytes of the words through a table (binary 2q − 1, ternary q − 1): the same values
    # as unpacking q first, without the per-weight intermediates.
    data = np.ascontiguousarray(weight, dtype="<u4").view(np.uint8)
    fields = _byte_table(bits).astype(np.int8)
    if variant == "ternary" and (fields == 3).any(axis=1)[data].any():
        raise ValueError("2-bit code 3 is unused in ternary bundles")
    table = fields * 2 - 1 if variant == "binary" else fields - 1
    codes = table[data].reshape(data.shape[0], -1)
    return (codes[:, :in_features] if codes.shape[1] != in_features else codes), s
