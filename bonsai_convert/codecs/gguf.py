"""GGUF block codecs for the low-bit linears (formats/gguf.md): binary ↔ Q1_0, ternary ↔ Q2_0, pure numpy, no I/O.

Upstream ggml (ggml/src/ggml-common.h, ggml-quants.c; the ggml vendored in PyPI llama-cpp-python 0.3.36):
- Q1_0, type 41: 128 weights in 18 bytes, fp16 `d` then 16 bytes; weight j is bit j % 8 of byte j // 8 (LSB first),
  bit 1 → +d, bit 0 → −d. A binary g128 group is one block, exactly.
- Q2_0, type 42: 64 weights in 18 bytes, fp16 `d` then 16 bytes; weight j is bits 2·(j % 4)..+1 of byte j // 4,
  q ∈ {0,1,2,3} → (q − 1)·d. A ternary g128 group is two blocks carrying the same d, code c stored as q = c + 1
  (q = 3, i.e. +2·d, never occurs). A fork's 128-weight Q2_0 under the same type id (34-byte blocks) is a
  different format: this module writes upstream's.

gguf-py 0.19.0 (PyPI `gguf`) lists type 41 in GGMLQuantizationType and GGML_QUANT_SIZES but has no quant class for
it, and does not know type 42 at all. `Q1_0` and `Q2_0` below follow gguf-py's `__Quant` pattern (qtype,
block_size, type_size, `quantize_blocks` / `dequantize_blocks` over `[n_blocks, ...]` arrays, as ggml's reference
functions compute them) in our code, without registering into gguf-py (its registry keys on its enum).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..lowbit import GROUP_SIZE
from . import row_blocks

Q1_0_TYPE = 41
Q2_0_TYPE = 42
TYPE_OF_VARIANT = {"binary": Q1_0_TYPE, "ternary": Q2_0_TYPE}
BLOCK_BYTES = 18  # both: fp16 d + 16 bytes of codes
_SHIFTS_2BIT = np.array([0, 2, 4, 6], dtype=np.uint8)


class Q1_0:
    """ggml Q1_0 (type 41) in gguf-py's quant-class shape: 128 weights per 18-byte block."""

    qtype = Q1_0_TYPE
    block_size = 128
    type_size = BLOCK_BYTES

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """ggml's quantize_row_q1_0_ref: d = mean |x| as fp16, bit = x >= 0 (lossy in general; exact for ±s)."""
        values = np.asarray(blocks, dtype=np.float32)
        scale = (np.abs(values).sum(axis=-1, dtype=np.float32) / np.float32(cls.block_size)).astype(np.float16)
        bits = np.packbits(values >= 0, axis=-1, bitorder="little")
        return np.concatenate([scale.reshape(-1, 1).view(np.uint8), bits], axis=-1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """ggml's dequantize_row_q1_0: bit ? d : −d, in float32."""
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        bits = np.unpackbits(blocks[:, 2:], axis=-1, bitorder="little").astype(bool)
        return np.where(bits, d, -d)


class Q2_0:
    """ggml Q2_0 (type 42, upstream 64-weight blocks) in gguf-py's quant-class shape."""

    qtype = Q2_0_TYPE
    block_size = 64
    type_size = BLOCK_BYTES

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """ggml's quantize_row_q2_0_ref: d = max |x| as fp16, q = clamp(roundf(x / d) + 1, 0, 3)."""
        values = np.asarray(blocks, dtype=np.float32)
        amax = np.abs(values).max(axis=-1, keepdims=True)
        inverse = np.where(amax > 0, np.float32(1) / np.where(amax > 0, amax, 1), np.float32(0))
        scaled = values * inverse
        rounded = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))  # roundf: half away from zero
        q = np.clip(rounded + 1, 0, 3).astype(np.uint8).reshape(-1, cls.block_size // 4, 4)
        packed = (q << _SHIFTS_2BIT).sum(axis=-1, dtype=np.uint8)
        return np.concatenate([amax.astype(np.float16).view(np.uint8), packed], axis=-1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """ggml's dequantize_row_q2_0: ((q − 1)·d) in float32."""
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        q = (blocks[:, 2:, None] >> _SHIFTS_2BIT) & np.uint8(3)
        return (q.reshape(blocks.shape[0], cls.block_size).astype(np.float32) - 1) * d


QUANT_OF_TYPE = {Q1_0_TYPE: Q1_0, Q2_0_TYPE: Q2_0}


def row_bytes(in_features: int, variant: str) -> int:
    """Bytes per row of a binary (Q1_0) or ternary (Q2_0) linear with in_features weights per row."""
    quant = QUANT_OF_TYPE[TYPE_OF_VARIANT[variant]]
    if in_features % GROUP_SIZE:
        raise ValueError(f"in_features {in_features} is not a multiple of {GROUP_SIZE}")
    return in_features // quant.block_size * quant.type_size


def _check_codes(codes: np.ndarray, scales: np.ndarray, variant: str) -> None:
    if variant not in TYPE_OF_VARIANT:
        raise ValueError(f"unknown variant {variant!r}")
    if codes.ndim != 2 or codes.dtype != np.int8 or codes.shape[1] % GROUP_SIZE:
        raise ValueError(f"codes must be int8 [N, K] with K % {GROUP_SIZE} == 0, got {codes.dtype} {list(codes.shape)}")
    groups = (codes.shape[0], codes.shape[1] // GROUP_SIZE)
    if scales.dtype != np.float16 or scales.shape != groups:
        raise ValueError(f"scales must be fp16 {list(groups)}, got {scales.dtype} {list(scales.shape)}")


def encode(name: str, codes: np.ndarray, scales: np.ndarray, variant: str) -> np.ndarray:
    """int8 codes [N, K] and fp16 scales [N, K/128] → uint8 blocks [N, row_bytes(K)] (Q1_0 or Q2_0), in row blocks.

    Ternary: a scale with its sign bit set is refused (ggml decodes code 0 as 0·d = −0.0 there, not +0.0).
    """
    _check_codes(codes, scales, variant)
    if variant == "binary" and not (np.abs(codes) == 1).all():
        raise ValueError("binary codes must be -1 or +1")
    if variant == "ternary":
        if not (np.abs(codes) <= 1).all():
            raise ValueError("ternary codes must be -1, 0 or +1")
        negative = np.signbit(scales)
        if negative.any():
            row, group = (int(i) for i in np.argwhere(negative)[0])
            raise InputError(f"{name}: row {row}, group {group}: scale {scales[row, group]} has its sign bit set")
    out = np.empty((codes.shape[0], row_bytes(codes.shape[1], variant)), dtype=np.uint8)
    for rows in row_blocks(codes.shape[0]):
        out[rows] = _encode_rows(codes[rows], scales[rows], variant)
    return out


def _encode_rows(codes: np.ndarray, scales: np.ndarray, variant: str) -> np.ndarray:
    rows, in_features = codes.shape
    if variant == "binary":  # one block per group: d, then the 128 sign bits
        blocks = np.empty((rows, in_features // GROUP_SIZE, BLOCK_BYTES), dtype=np.uint8)
        blocks[..., :2] = np.ascontiguousarray(scales).view(np.uint8).reshape(rows, -1, 2)
        grouped = codes.reshape(rows, -1, GROUP_SIZE) > 0
        blocks[..., 2:] = np.packbits(grouped, axis=-1, bitorder="little")
        return blocks.reshape(rows, -1)
    half = Q2_0.block_size  # two blocks per group, both carrying the group's d
    blocks = np.empty((rows, in_features // half, BLOCK_BYTES), dtype=np.uint8)
    doubled = np.repeat(np.ascontiguousarray(scales), 2, axis=1)
    blocks[..., :2] = doubled.view(np.uint8).reshape(rows, -1, 2)
    q = (codes + 1).astype(np.uint8).reshape(rows, in_features // half, half // 4, 4)
    blocks[..., 2:] = (q << _SHIFTS_2BIT).sum(axis=-1, dtype=np.uint8)
    return blocks.reshape(rows, -1)


def decode(name: str, data: np.ndarray, in_features: int, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 blocks [N, row_bytes(K)] → (int8 codes [N, K], fp16 scales [N, K/128]).

    Q2_0 is refused (InputError naming the tensor) where the two 64-blocks of a 128-group carry different d bits or a
    block uses q = 3 (+2·d): such a tensor is not ternary g128.
    """
    if variant not in TYPE_OF_VARIANT:
        raise ValueError(f"unknown variant {variant!r}")
    if data.ndim != 2 or data.dtype != np.uint8:
        raise InputError(f"{name}: GGUF blocks must be a 2-D uint8 array, got {data.dtype} {list(data.shape)}")
    if in_features < GROUP_SIZE or in_features % GROUP_SIZE or data.shape[1] != row_bytes(in_features, variant):
        raise InputError(f"{name}: {data.shape[1]} bytes per row do not hold {in_features} {variant} weights")
    rows = data.shape[0]
    codes = np.empty((rows, in_features), dtype=np.int8)
    scales = np.empty((rows, in_features // GROUP_SIZE), dtype=np.float16)
    for block in row_blocks(rows):
        part = data[block].reshape(block.stop - block.start, -1, BLOCK_BYTES)
        d = np.ascontiguousarray(part[..., :2]).view(np.uint16)[..., 0]
        if variant == "binary":
            scales[block] = d.view(np.float16)
            bits = np.unpackbits(part[..., 2:], axis=-1, bitorder="little")
            codes[block] = (bits.astype(np.int8) * 2 - 1).reshape(-1, in_features)
            continue
        first, second = d[:, 0::2], d[:, 1::2]
        if (first != second).any():
            row, group = (int(i) for i in np.argwhere(first != second)[0])
            raise InputError(
                f"{name}: row {block.start + row}, group {group}: its two Q2_0 blocks carry different scales "
                f"(0x{int(first[row, group]):04x} vs 0x{int(second[row, group]):04x}): not ternary g128"
            )
        q = (part[..., 2:, None] >> _SHIFTS_2BIT) & np.uint8(3)
        if (q == 3).any():
            row = int(np.argwhere((q == 3).any(axis=(2, 3)))[0][0])
            raise InputError(f"{name}: row {block.start + row} uses Q2_0 code 3 (+2·d): not ternary")
        scales[block] = first.view(np.float16)
        codes[block] = (q.astype(np.int8) - 1).reshape(-1, in_features)
    return codes, scales


def dequantize(data: np.ndarray, in_features: int, variant: str) -> np.ndarray:
    """uint8 blocks [N, row_bytes(K)] → float32 [N, K] by ggml's dequantize_row_* formulas (no checks)."""
    quant = QUANT_OF_TYPE[TYPE_OF_VARIANT[variant]]
    rows = data.shape[0]
    return quant.dequantize_blocks(np.ascontiguousarray(data).reshape(-1, quant.type_size)).reshape(rows, in_features)
