"""The canonical `packed` format (formats/packed.md): codes at information size, pure numpy.

binary: 1 bit per weight, bit 1 = +s, LSB-first within each byte, in/8 bytes per row.
ternary: 5 weights per byte, byte = sum_i (t_i + 1) * 3**i over each 5-weight chunk of a row; the last chunk of a
row is padded with t = 0; ceil(in/5) bytes per row.
"""

from __future__ import annotations

import numpy as np

from . import row_blocks

_POWERS_OF_3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def code_bytes_per_row(in_features: int, variant: str) -> int:
    """Bytes of packed codes per row."""
    if variant == "binary":
        return -(-in_features // 8)
    return -(-in_features // 5)


def encode(codes: np.ndarray, variant: str) -> np.ndarray:
    """int8 codes [out, in] → uint8 packed codes [out, code_bytes_per_row] (in row blocks)."""
    out = np.empty((codes.shape[0], code_bytes_per_row(codes.shape[1], variant)), dtype=np.uint8)
    for rows in row_blocks(codes.shape[0]):
        out[rows] = _encode_rows(codes[rows], variant)
    return out


def _encode_rows(codes: np.ndarray, variant: str) -> np.ndarray:
    from .. import kernels

    if variant != "binary" and kernels.ENABLED:
        out = np.empty((codes.shape[0], code_bytes_per_row(codes.shape[1], variant)), dtype=np.uint8)
        kernels.pack_ternary_base3(np.ascontiguousarray(codes, dtype=np.int8), out)
        return out
    return _encode_rows_reference(codes, variant)


def _encode_rows_reference(codes: np.ndarray, variant: str) -> np.ndarray:
    """`_encode_rows` in plain numpy."""
    if variant == "binary":
        return np.packbits(codes > 0, axis=1, bitorder="little")
    out_features, in_features = codes.shape
    padded = np.ones((out_features, code_bytes_per_row(in_features, variant) * 5), dtype=np.uint8)
    padded[:, :in_features] = (codes + 1).astype(np.uint8)
    digits = padded.reshape(out_features, -1, 5)
    # 2 * (1+3+9+27+81) = 242 < 256: the sum fits uint8 without overflow.
    return (digits * _POWERS_OF_3).sum(axis=2, dtype=np.uint8)


def decode(packed: np.ndarray, in_features: int, variant: str) -> np.ndarray:
    """uint8 packed codes [out, bytes] → int8 codes [out, in] in {-1,+1} or {-1,0,+1}."""
    if variant not in ("binary", "ternary"):
        raise ValueError(f"unknown variant {variant!r}")
    if packed.ndim != 2 or packed.dtype != np.uint8:
        raise ValueError(f"packed codes must be a 2-D uint8 array, got {packed.dtype} {list(packed.shape)}")
    if in_features < 1 or packed.shape[1] != code_bytes_per_row(in_features, variant):
        raise ValueError(f"{packed.shape[1]} bytes per row do not hold {in_features} {variant} weights")
    if variant == "binary":
        bits = np.unpackbits(packed, axis=1, count=in_features, bitorder="little")
        return (bits.astype(np.int8) * 2 - 1).astype(np.int8)
    digits = (packed[:, :, None] // _POWERS_OF_3) % 3
    return (digits.reshape(packed.shape[0], -1)[:, :in_features].astype(np.int8) - 1).astype(np.int8)


def invalid_ternary_bytes(packed: np.ndarray) -> np.ndarray:
    """Mask of bytes that no 5-trit chunk produces (> 242): a corrupted ternary file."""
    return packed > 242
