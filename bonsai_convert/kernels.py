"""Fused, compiled inner loops of `pack` (numba, cached on disk after the first run; every loop releases the GIL).

Each kernel is one pass over a block of rows that does what several numpy passes (and their temporaries) did:
cast bf16 → fp16 bit patterns through a 65536-entry table, split a group of 128 into codes and a scale, produce
the decoded fp16 bit patterns that the weight digest hashes, pack codes into the target's words. The kernels only
detect a problem; the caller reruns the plain numpy implementation to raise the exact error message, so errors
and output bytes are those of the reference code (tests/test_fast_paths.py checks both).
"""

from __future__ import annotations

import os
import threading

import numpy as np
from numba import njit

GROUP = 128
WORD_TILE = 16  # rows per tile of the transposed Gemlite packers: 16 uint32 outputs fill a 64-byte cache line
# BONSAI_CONVERT_REFERENCE=1 runs the plain numpy implementations instead (the byte-identity tests compare both).
ENABLED = os.environ.get("BONSAI_CONVERT_REFERENCE", "") != "1"


def _bf16_to_fp16_table() -> np.ndarray:
    """fp16 bit pattern of every bf16 bit pattern (round to nearest even; overflow → ±inf, NaN → NaN)."""
    wide = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return wide.astype(np.float16).view(np.uint16)


BF16_TO_FP16 = _bf16_to_fp16_table()


def widening_table(stored_dtype: str, via_fp16: bool = False) -> np.ndarray:
    """float32 value of every 16-bit pattern of `stored_dtype` (BF16 or F16): its exact widening, or with
    via_fp16 a bf16 value first rounded to fp16 as numpy's astype does (overflow → ±inf)."""
    key = (stored_dtype, via_fp16 and stored_dtype == "BF16")
    table = _WIDENING.get(key)
    if table is None:
        patterns = np.arange(1 << 16, dtype=np.uint32)
        if stored_dtype == "F16":
            table = patterns.astype(np.uint16).view(np.float16).astype(np.float32)
        elif key[1]:
            table = BF16_TO_FP16.view(np.float16).astype(np.float32)
        else:
            table = (patterns << 16).view(np.float32)
        table = _WIDENING[key] = np.ascontiguousarray(table)
    return table


_WIDENING: dict[tuple[str, bool], np.ndarray] = {}


@njit(nogil=True, cache=True)
def split_groups(src, table, use_table, ternary, codes, scales, decoded):  # pragma: no cover - compiled
    """Exact split of rows of fp16 (or bf16, through `table`) bit patterns.

    Writes codes int8 [r, n], scale bits uint16 [r, n/128], decoded fp16 bits uint16 [r, n] (what s·code gives:
    the input, except a ternary ±0 in a group with s ≠ 0 decodes as +0). Returns (first bad group as a flat
    index or -1, number of zero codes). A group is bad if it holds a non-finite value or more magnitudes than
    the variant allows.
    """
    rows, cols = src.shape
    groups = cols // GROUP
    zero_codes = 0
    for i in range(rows):
        for g in range(groups):
            base = g * GROUP
            top = np.uint16(0)
            for k in range(GROUP):
                b = src[i, base + k]
                if use_table:
                    b = table[b]
                decoded[i, base + k] = b
                m = b & np.uint16(0x7FFF)
                top = max(top, m)
            if top >= np.uint16(0x7C00):  # inf / NaN (the max magnitude is one of them if any is present)
                return i * groups + g, zero_codes
            scales[i, g] = top
            bad = 0
            zeros = 0
            for k in range(GROUP):
                b = decoded[i, base + k]
                m = b & np.uint16(0x7FFF)
                at = np.int8(m == top)
                is_zero = np.int8(m == 0)
                sign = np.int8(1) - np.int8(2) * np.int8(b >> np.uint16(15))
                codes[i, base + k] = sign * at
                decoded[i, base + k] = b * np.uint16(at)
                if ternary:
                    bad |= (1 - at) & (1 - is_zero)
                else:
                    bad |= 1 - at
                zeros += 1 - at
            if bad:
                return i * groups + g, zero_codes
            zero_codes += zeros
    return -1, zero_codes


@njit(nogil=True, cache=True)
def convert_table(src, table, out):  # pragma: no cover - compiled
    """out = table[src] over flat uint16 arrays; returns True if every result is finite fp16."""
    finite = True
    for i in range(src.shape[0]):
        b = table[src[i]]
        out[i] = b
        finite &= (b & np.uint16(0x7C00)) != np.uint16(0x7C00)
    return finite


@njit(nogil=True, cache=True)
def all_finite(bits, exponent):  # pragma: no cover - compiled
    """True if no bit pattern of the flat uint16 array has all `exponent` bits set (0x7C00 fp16, 0x7F80 bf16)."""
    finite = True
    for i in range(bits.shape[0]):
        finite &= (bits[i] & exponent) != exponent
    return finite


@njit(nogil=True, cache=True)
def decode_codes(codes, scales, out):  # pragma: no cover - compiled
    """fp16 bits of scale·code for int8 codes [r, n] and scale bits [r, n/128] (code 0 → +0, −1 flips the sign)."""
    rows, cols = codes.shape
    for i in range(rows):
        for k in range(cols):
            c = codes[i, k]
            s = scales[i, k // GROUP]
            value = s if c != 0 else np.uint16(0)
            if c < 0:
                value ^= np.uint16(0x8000)
            out[i, k] = value


@njit(nogil=True, cache=True)
def pack_ternary_base3(codes, out):  # pragma: no cover - compiled
    """formats/packed.md ternary: byte j of a row = Σ_i (t_{5j+i} + 1)·3^i, the last chunk padded with t = 0."""
    rows, cols = codes.shape
    full = cols // 5
    for i in range(rows):
        for j in range(full):
            k = 5 * j
            out[i, j] = np.uint8(
                (codes[i, k] + 1)
                + 3 * (codes[i, k + 1] + 1)
                + 9 * (codes[i, k + 2] + 1)
                + 27 * (codes[i, k + 3] + 1)
                + 81 * (codes[i, k + 4] + 1)
            )
        if full * 5 < cols:
            value = 0
            power = 1
            for k in range(full * 5, full * 5 + 5):
                digit = codes[i, k] + 1 if k < cols else 1
                value += digit * power
                power *= 3
            out[i, full] = np.uint8(value)


@njit(nogil=True, cache=True)
def pack_2bit_words(codes, out):  # pragma: no cover - compiled
    """q = t + 1 packed LSB-first 16 per uint32 word along the row (MLX 2-bit)."""
    rows, cols = codes.shape
    words = cols // 16
    for i in range(rows):
        for w in range(words):
            value = np.uint32(0)
            for j in range(16):
                value |= np.uint32(codes[i, 16 * w + j] + 1) << np.uint32(2 * j)
            out[i, w] = value


@njit(nogil=True, cache=True)
def pack_words_transposed(q, nbits, out):  # pragma: no cover - compiled
    """Gemlite: uint8 q [N, K] → uint32 words [K/e, N], q[n, k] at bit (k % e)·nbits of word [k // e, n]."""
    n_rows, k_cols = q.shape
    per_word = 32 // nbits
    for n0 in range(0, n_rows, WORD_TILE):  # tiles of rows: contiguous output writes (see WORD_TILE)
        for w in range(k_cols // per_word):
            for n in range(n0, min(n0 + WORD_TILE, n_rows)):
                value = np.uint32(0)
                for j in range(per_word):
                    value |= np.uint32(q[n, w * per_word + j]) << np.uint32(j * nbits)
                out[w, n] = value


@njit(nogil=True, cache=True)
def unpack_words_transposed(words, nbits, out):  # pragma: no cover - compiled
    """Inverse of `pack_words_transposed`: uint32 words [K/e, N] → uint8 q [N, K] (tiles of WORD_TILE rows)."""
    n_rows, k_cols = out.shape
    per_word = 32 // nbits
    mask = np.uint32((1 << nbits) - 1)
    for n0 in range(0, n_rows, WORD_TILE):
        for w in range(k_cols // per_word):
            for n in range(n0, min(n0 + WORD_TILE, n_rows)):
                value = words[w, n]
                for j in range(per_word):
                    out[n, w * per_word + j] = np.uint8((value >> np.uint32(j * nbits)) & mask)


@njit(nogil=True, cache=True)
def gemlite_words_from_codes(codes, nbits, out):  # pragma: no cover - compiled
    """Gemlite A16W1 / A16W2 words straight from int8 codes [N, K]: q = (c + 1) / 2 (binary, c = ±1) or c + 1
    (ternary), packed as `pack_words_transposed` into uint32 [K/e, N]. Tiles of WORD_TILE rows keep the output
    writes contiguous. Returns False if a code is outside the variant's values (the caller then runs the numpy
    code, which names the problem)."""
    n_rows, k_cols = codes.shape
    per_word = 32 // nbits
    bad = np.int32(0)
    for n0 in range(0, n_rows, WORD_TILE):
        n1 = min(n0 + WORD_TILE, n_rows)
        for w in range(k_cols // per_word):
            for n in range(n0, n1):
                value = np.uint32(0)
                for j in range(per_word):
                    c = np.int32(codes[n, w * per_word + j])
                    if nbits == 1:
                        bad |= np.int32(c * c != 1)
                        q = np.uint32((c + 1) >> 1)
                    else:
                        bad |= np.int32(np.uint32(c + 1) > np.uint32(2))
                        q = np.uint32(c + 1)
                    value |= q << np.uint32(j * nbits)
                out[w, n] = value
    return bad == 0


@njit(nogil=True, cache=True)
def _ordered(b):  # pragma: no cover - compiled
    """float32 bits → an int32 ordered like the values (−0 just below +0); its own inverse."""
    return b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))


@njit(nogil=True, cache=True)
def _code_4bit(v, s, o, subtract):  # pragma: no cover - compiled
    """clip(rint((v − o) / s), 0, 15) (subtract, MLX) or clip(rint(v / s + o), 0, 15) (Gemlite), in float32."""
    x = (v - o) / s if subtract else v / s + o
    # round half to even, as np.rint: exact for |x| < 2**22 (1.5·2**23 added and taken away in float32); larger
    # |x| only ever clips to 0 or 15 below, as np.rint's result would
    q = (x + np.float32(12582912.0)) - np.float32(12582912.0)
    return min(max(q, np.float32(0)), np.float32(15))


@njit(nogil=True, cache=True)
def group_min_max(values, group, low, high):  # pragma: no cover - compiled
    """Per group of `group` consecutive float32 values of a row: min and max; returns False on inf/NaN.

    Integer work on the bit patterns (vectorizes): `_ordered` bits order finite floats like their values, and an
    exponent of all ones marks inf/NaN. Where both zeros occur the sign of a zero minimum is the caller's to
    settle (numpy's reductions pick one).
    """
    rows, cols = values.shape
    bits = values.view(np.int32)
    special = np.int32(0)
    for i in range(rows):
        for g in range(cols // group):
            lo = np.int32(0x7FFFFFFF)
            hi = np.int32(-0x7FFFFFFF - 1)
            for k in range(g * group, (g + 1) * group):
                b = bits[i, k]
                special |= np.int32((b & np.int32(0x7F800000)) == np.int32(0x7F800000))
                lo = min(lo, _ordered(b))
                hi = max(hi, _ordered(b))
            low.view(np.int32)[i, g] = _ordered(lo)
            high.view(np.int32)[i, g] = _ordered(hi)
    return special == 0


@njit(nogil=True, cache=True)
def _ordered16(b):  # pragma: no cover - compiled
    """A 16-bit float pattern → an int32 ordered like the values (−0 just below +0, NaNs beyond the infinities)."""
    s = np.int32(np.int16(b))
    return s ^ ((s >> np.int32(15)) & np.int32(0x7FFF))


@njit(nogil=True, cache=True)
def group_min_max_stored(stored, table, group, low, high):  # pragma: no cover - compiled
    """`group_min_max` of table[stored]: 16-bit stored patterns (bf16/fp16) and a 65536-entry float32 table that
    is monotone in their order (every `widening_table`: the exact widening, or bf16 → fp16 → float32).

    Monotone, so a group's extremes are the table values of its extreme patterns: min/max run on the 16-bit
    integers (vectorized) and only those two go through the table. A NaN pattern sorts beyond the infinities, so
    a group holding one, an infinity or a value the table sends to ±inf has a non-finite extreme: False."""
    rows, cols = stored.shape
    wide = table.view(np.int32)
    special = np.int32(0)
    for i in range(rows):
        for g in range(cols // group):
            lo = np.int32(0x7FFF)
            hi = np.int32(-0x8000)
            for k in range(g * group, (g + 1) * group):
                o = _ordered16(stored[i, k])
                lo = min(lo, o)
                hi = max(hi, o)
            b_lo = wide[np.uint16(_ordered16(lo))]
            b_hi = wide[np.uint16(_ordered16(hi))]
            special |= np.int32((b_lo & np.int32(0x7F800000)) == np.int32(0x7F800000))
            special |= np.int32((b_hi & np.int32(0x7F800000)) == np.int32(0x7F800000))
            low.view(np.int32)[i, g] = b_lo
            high.view(np.int32)[i, g] = b_hi
    return special == 0


@njit(nogil=True, cache=True)
def affine_codes_4bit(values, scales, offsets, group, subtract, out):  # pragma: no cover - compiled
    """4-bit codes, in float32 exactly as numpy computes them (`_code_4bit`; MLX: offset = bias, subtract;
    Gemlite: offset = zero point).

    out uint32 [rows, cols/8] packs 8 codes per word LSB-first (MLX), or uint8 [rows, cols] holds them (Gemlite).
    """
    rows, cols = values.shape
    packed = out.shape[1] != cols
    for i in range(rows):
        for g in range(cols // group):
            s = scales[i, g]
            o = offsets[i, g]
            for k in range(g * group, (g + 1) * group, 8):
                word = np.uint32(0)
                for j in range(8):
                    q = _code_4bit(values[i, k + j], s, o, subtract)
                    if packed:
                        word |= np.uint32(q) << np.uint32(4 * j)
                    else:
                        out[i, k + j] = np.uint8(q)
                if packed:
                    out[i, k // 8] = word


@njit(nogil=True, cache=True)
def affine_codes_4bit_stored(stored, table, scales, offsets, group, subtract, out):  # pragma: no cover - compiled
    """`affine_codes_4bit` of table[stored] (16-bit stored patterns through a float32 table, as
    `group_min_max_stored`)."""
    rows, cols = stored.shape
    packed = out.shape[1] != cols
    for i in range(rows):
        for g in range(cols // group):
            s = scales[i, g]
            o = offsets[i, g]
            for k in range(g * group, (g + 1) * group, 8):
                word = np.uint32(0)
                for j in range(8):
                    q = _code_4bit(table[stored[i, k + j]], s, o, subtract)
                    if packed:
                        word |= np.uint32(q) << np.uint32(4 * j)
                    else:
                        out[i, k + j] = np.uint8(q)
                if packed:
                    out[i, k // 8] = word


@njit(nogil=True, cache=True)
def widen_bf16(src, out):  # pragma: no cover - compiled
    """float32 bit patterns of bf16 ones (exact: bf16 is the upper half of a float32), flat uint16 → flat uint32."""
    for i in range(src.shape[0]):
        out[i] = np.uint32(src[i]) << np.uint32(16)


_SCRATCH = threading.local()


def scratch(key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A reusable buffer of this thread (contents undefined), so hot loops do not fault in fresh zeroed pages
    for every block. Only for arrays that do not outlive the call that asked for them."""
    dtype = np.dtype(dtype)
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    buffer = pool.get(key)
    if buffer is None or buffer.nbytes < need:
        buffer = pool[key] = np.empty(max(need, 1), dtype=np.uint8)
    return buffer[:need].view(dtype).reshape(shape)
