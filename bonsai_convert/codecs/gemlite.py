"""The Gemlite (GemLiteLinearTriton, gemlite 0.6.0.post2) tensors of a low-bit linear, byte for byte.

Pure numpy, no I/O, no torch. `encode` gives exactly what `GemLiteLinearTriton.state_dict()` holds after
`.pack(W_q uint8, scales, zeros, bias=None, fma_mode=True, packing_bitwidth=32)` for an fp16 layer with group
size 128 (formats/gemlite.md). `decode`/`dequantize` read such a state back, written from the spec rather
than by inverting the encoder.
"""

from __future__ import annotations

import numpy as np
from bonsai_common.gemlite_keys import STORED_LAYER_KEYS

from ..errors import InputError
from . import row_blocks

GROUP_SIZE = 128
PACKING_BITWIDTH = 32  # what `encode` writes unless told otherwise (int32 words)
PACKING_BITWIDTHS = (8, 32)  # uint8 bytes (the released packs) or int32 words; same bit order
VARIANT_BITS = {"binary": 1, "ternary": 2}
FP16_MAX = float(np.finfo(np.float16).max)

# gemlite.dtypes.DType values used in `metadata`.
DTYPE_FP32 = 0
DTYPE_FP16 = 1
# metadata field order (GemLiteLinearTriton.get_meta_args).
METADATA_FIELDS = (
    "scaled_activations",
    "W_nbits",
    "group_size",
    "unpack_mask",
    "elements_per_sample",
    "input_dtype",
    "output_dtype",
    "acc_dtype",
    "meta_dtype",
    "channel_scale_mode",
    "W_group_mode",
    "data_contiguous",
)


def _metadata(
    nbits: int, group_size: int, channel_scale_mode: int, group_mode: int, packing_bitwidth: int = PACKING_BITWIDTH
) -> np.ndarray:
    """metadata int32[12] of an fp16-in/fp16-out layer with fp16 scales and fp32 accumulation."""
    return np.array(
        [
            0,
            nbits,
            group_size,
            2**nbits - 1,
            packing_bitwidth // nbits,
            DTYPE_FP16,
            DTYPE_FP16,
            DTYPE_FP32,
            DTYPE_FP16,
            channel_scale_mode,
            group_mode,
            1,
        ],
        dtype=np.int32,
    )


def pack_words(q: np.ndarray, nbits: int, packing_bitwidth: int = PACKING_BITWIDTH) -> np.ndarray:
    """uint8 q [N, K] → int32 words [K/e, N], e = 32/nbits; q[n, k] at bit (k % e)·nbits of word [k//e, n].

    packing_bitwidth 8: uint8 bytes [K/e, N], e = 8/nbits, the same fields (a little-endian int32 word is four
    such bytes of consecutive k)."""
    from .. import kernels

    if packing_bitwidth == 8:
        return _pack_bytes(q, nbits).T.copy()
    if kernels.ENABLED and q.shape[1] % (PACKING_BITWIDTH // nbits) == 0:
        words = np.empty((q.shape[1] * nbits // PACKING_BITWIDTH, q.shape[0]), dtype=np.uint32)
        kernels.pack_words_transposed(np.ascontiguousarray(q, dtype=np.uint8), nbits, words)
        return words.view(np.int32)
    return pack_words_reference(q, nbits)


def _pack_bytes(q: np.ndarray, nbits: int) -> np.ndarray:
    """uint8 q [N, K] → uint8 [N, K·nbits/8], q[n, k] at bit (k % e)·nbits of byte k // e (e = 8/nbits)."""
    out_features, in_features = q.shape
    if nbits == 8:
        return np.ascontiguousarray(q)
    if nbits == 1:
        packed = np.packbits(q, axis=1, bitorder="little")  # bit k % 8 of byte k // 8
    else:  # fields LSB-first within each byte (≤ 8 vectorized passes, not per group)
        per_byte = 8 // nbits
        fields = q.reshape(out_features, in_features // per_byte, per_byte)
        packed = fields[:, :, 0].copy()
        for slot in range(1, per_byte):
            packed |= fields[:, :, slot] << np.uint8(slot * nbits)
    return packed


def pack_words_reference(q: np.ndarray, nbits: int) -> np.ndarray:
    """`pack_words` (packing bitwidth 32) in plain numpy."""
    packed = _pack_bytes(q, nbits)
    # Four consecutive bytes, read little-endian, are one word: byte j holds bits 8j..8j+7 of it.
    words = np.ascontiguousarray(packed).view("<u4")
    return np.ascontiguousarray(words.T).view("<i4").astype(np.int32, copy=False)


def encode_affine(
    q: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray | int,
    nbits: int,
    group_size: int = GROUP_SIZE,
    packing_bitwidth: int = PACKING_BITWIDTH,
) -> dict[str, np.ndarray]:
    """GemLiteLinearTriton state after pack(q, scales, zeros), fp16 scales: W ≈ (q − zeros)·scales per group.

    q uint8 [N, K] < 2**nbits; scales fp16 [N, K/group_size]; zeros an fp16 array shaped like scales (stored
    fma-style as −zeros·scales, W_group_mode 4) or a Python int (stored as an int32 scalar, W_group_mode 3).
    When K == group_size gemlite treats the scales as per-channel: W_group_mode 1, channel_scale_mode 1 and
    zeros stored as given.
    """
    if nbits not in (1, 2, 4, 8):
        raise ValueError(f"gemlite packs 1, 2, 4 or 8-bit weights, not {nbits}")
    if packing_bitwidth not in PACKING_BITWIDTHS:
        raise ValueError(f"packing bitwidth {packing_bitwidth} is not one of {PACKING_BITWIDTHS}")
    if q.ndim != 2 or q.dtype != np.uint8:
        raise ValueError(f"q must be a 2-D uint8 array, got {q.dtype} {list(q.shape)}")
    out_features, in_features = q.shape
    if group_size < 16 or in_features % 32 or in_features % group_size:
        raise ValueError(f"in_features {in_features} must be divisible by 32 and the group size {group_size} (≥ 16)")
    groups = in_features // group_size
    if scales.dtype != np.float16 or scales.shape != (out_features, groups):
        raise ValueError(f"scales must be fp16 [{out_features}, {groups}], got {scales.dtype} {list(scales.shape)}")
    if q.size and int(q.max()) >= 2**nbits:
        raise ValueError(f"q holds {int(q.max())}, which does not fit in {nbits} bits")
    return _affine_state(pack_words(q, nbits, packing_bitwidth), scales, zeros, nbits, group_size, packing_bitwidth)


def _affine_state(
    words: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray | int,
    nbits: int,
    group_size: int,
    packing_bitwidth: int,
) -> dict[str, np.ndarray]:
    """The state `encode_affine` gives, from the already packed W_q words and checked scales/zeros."""
    out_features, groups = scales.shape
    in_features = groups * group_size
    channelwise = groups == 1  # gemlite: scales.numel() == out_features
    if isinstance(zeros, (int, np.integer)):
        stored_zeros = np.array(int(zeros), dtype=np.int32)
        group_mode = 3
    else:
        if zeros.dtype != np.float16 or zeros.shape != scales.shape:
            raise ValueError(f"zeros must be fp16 shaped like scales, got {zeros.dtype} {list(zeros.shape)}")
        if channelwise:
            stored_zeros = np.ascontiguousarray(zeros.T)
            group_mode = 3
        else:  # fma_mode: W = q·scales + (−zeros·scales), the product rounded once from fp32 to fp16
            stored = (-zeros.astype(np.float32) * scales.astype(np.float32)).astype(np.float16)
            stored_zeros = np.ascontiguousarray(stored.T)
            group_mode = 4
    channel_scale_mode = 0
    if channelwise:
        channel_scale_mode, group_mode = 1, 1
    return {
        "W_q": words,
        "scales": np.ascontiguousarray(scales.T),
        "zeros": stored_zeros,
        "metadata": _metadata(nbits, group_size, channel_scale_mode, group_mode, packing_bitwidth),
        "orig_shape": np.array([out_features, in_features], dtype=np.int32),
    }


def encode(
    codes: np.ndarray, scales: np.ndarray, variant: str, packing_bitwidth: int = PACKING_BITWIDTH
) -> dict[str, np.ndarray]:
    """Exact binary (A16W1) / ternary (A16W2) gemlite state of codes int8 [N, K] and fp16 scales [N, K/128].

    binary: q = (b+1)/2, scales 2s, zeros 0.5 (W = q·2s − s); ternary: q = t+1, scales s, zeros int 1.
    Rows are encoded in blocks (bounded temporaries); the transposed [*, N] tensors are joined along N. The
    compiled kernel (bonsai_convert.kernels) packs the codes in one pass with no temporaries; any code or scale
    it does not take goes the numpy way, which raises the error.
    """
    compiled = _encode_compiled(codes, scales, variant) if packing_bitwidth == PACKING_BITWIDTH else None
    if compiled is not None:
        return compiled
    parts = [_encode_rows(codes[rows], scales[rows], variant, packing_bitwidth) for rows in row_blocks(codes.shape[0])]
    if len(parts) == 1:
        return parts[0]
    state = dict(parts[0])
    for key in ("W_q", "scales") + (("zeros",) if parts[0]["zeros"].ndim == 2 else ()):
        state[key] = np.concatenate([part[key] for part in parts], axis=1)
    state["orig_shape"] = np.array(codes.shape, dtype=np.int32)
    return state


def _encode_compiled(codes: np.ndarray, scales: np.ndarray, variant: str) -> dict[str, np.ndarray] | None:
    """`encode` through `kernels.gemlite_words_from_codes` (int32 words), or None where the numpy path must run."""
    from .. import kernels

    nbits = VARIANT_BITS.get(variant)
    rows, cols = codes.shape if codes.ndim == 2 else (0, 0)
    if (
        not kernels.ENABLED
        or nbits is None
        or codes.dtype != np.int8
        or not cols
        or cols % GROUP_SIZE
        or scales.dtype != np.float16
        or scales.shape != (rows, cols // GROUP_SIZE)
    ):
        return None
    if variant == "binary":
        doubled = scales.astype(np.float32) * 2
        if not (np.abs(doubled) <= FP16_MAX).all():
            return None
        scales, zeros = doubled.astype(np.float16), np.full(scales.shape, 0.5, np.float16)
    else:
        zeros = 1
    words = np.empty((cols * nbits // PACKING_BITWIDTH, rows), dtype=np.uint32)
    if not kernels.gemlite_words_from_codes(np.ascontiguousarray(codes), nbits, words):
        return None
    return _affine_state(words.view(np.int32), scales, zeros, nbits, GROUP_SIZE, PACKING_BITWIDTH)


def _encode_rows(codes: np.ndarray, scales: np.ndarray, variant: str, packing_bitwidth: int) -> dict[str, np.ndarray]:
    """`encode` of one block of rows."""
    if variant not in VARIANT_BITS:
        raise ValueError(f"unknown variant {variant!r}")
    if codes.ndim != 2 or codes.dtype != np.int8 or codes.shape[1] % GROUP_SIZE:
        raise ValueError(f"codes must be int8 [N, K] with K % {GROUP_SIZE} == 0, got {codes.dtype} {list(codes.shape)}")
    if variant == "binary":
        if not ((codes == 1) | (codes == -1)).all():
            raise ValueError("binary codes must be -1 or +1")
        doubled = scales.astype(np.float32) * 2  # exact; representable in fp16 iff |2s| ≤ fp16 max
        if not (np.abs(doubled) <= FP16_MAX).all():
            worst = float(np.abs(scales.astype(np.float32)).max())
            raise InputError(f"binary scale {worst:g} cannot be stored as 2·s in fp16 (|s| must be ≤ {FP16_MAX / 2:g})")
        q = (codes > 0).astype(np.uint8)
        zeros = np.full(scales.shape, 0.5, np.float16)
        return encode_affine(q, doubled.astype(np.float16), zeros, 1, GROUP_SIZE, packing_bitwidth)
    if not ((codes >= -1) & (codes <= 1)).all():
        raise ValueError("ternary codes must be -1, 0 or +1")
    return encode_affine((codes + 1).astype(np.uint8), scales, 1, 2, GROUP_SIZE, packing_bitwidth)


def affine_tensor_specs(
    name_prefix: str,
    out_features: int,
    in_features: int,
    nbits: int,
    group_size: int,
    int_zero: bool,
    packing_bitwidth: int = PACKING_BITWIDTH,
) -> list[tuple[str, str, tuple]]:
    """(name, safetensors dtype, shape) of what `encode_affine` gives (int_zero: zeros passed as an int)."""
    groups = in_features // group_size
    shapes = {
        "W_q": ("U8" if packing_bitwidth == 8 else "I32", (in_features * nbits // packing_bitwidth, out_features)),
        "scales": ("F16", (groups, out_features)),
        "zeros": ("I32", ()) if int_zero else ("F16", (groups, out_features)),
        "metadata": ("I32", (len(METADATA_FIELDS),)),
        "orig_shape": ("I32", (2,)),
    }
    prefix = name_prefix.rstrip(".")
    return [(f"{prefix}.{key}", *shapes[key]) for key in STORED_LAYER_KEYS]


def tensor_specs(
    name_prefix: str, out_features: int, in_features: int, variant: str, packing_bitwidth: int = PACKING_BITWIDTH
) -> list[tuple[str, str, tuple]]:
    """(name, safetensors dtype, shape) of every tensor `encode` gives, named `<name_prefix>.<key>`."""
    nbits = VARIANT_BITS[variant]
    return affine_tensor_specs(
        name_prefix, out_features, in_features, nbits, GROUP_SIZE, variant == "ternary", packing_bitwidth
    )


# ----------------------------------------------------------------------------------------------------
# Decoding, from formats/gemlite.md.


def _fail(message: str) -> InputError:
    return InputError(f"gemlite layer: {message}")


def _checked(state: dict[str, np.ndarray], key: str, dtype: type, shape: tuple) -> np.ndarray:
    if key not in state:
        raise _fail(f"missing tensor {key}")
    value = np.asarray(state[key])
    if value.dtype != np.dtype(dtype) or value.shape != shape:
        raise _fail(f"{key} is {value.dtype} {list(value.shape)}, expected {np.dtype(dtype)} {list(shape)}")
    return value


def read_metadata(state: dict[str, np.ndarray]) -> dict[str, int]:
    """The 12 metadata fields by name, plus out_features/in_features from orig_shape."""
    metadata = _checked(state, "metadata", np.int32, (len(METADATA_FIELDS),))
    orig_shape = _checked(state, "orig_shape", np.int32, (2,))
    fields = {name: int(v) for name, v in zip(METADATA_FIELDS, metadata, strict=True)}
    fields["out_features"], fields["in_features"] = (int(v) for v in orig_shape)
    return fields


def unpack_words(words: np.ndarray, nbits: int, in_features: int) -> np.ndarray:
    """int32 words [K/e, N] (or uint8 bytes, packing bitwidth 8) → uint8 q [N, K]:
    q[n, k] = (words[k//e, n] >> (k % e)·nbits) & (2**nbits − 1). int32 words go through a compiled pass."""
    from .. import kernels

    if kernels.ENABLED and words.dtype == np.int32 and words.ndim == 2 and words.shape[0] * 32 == in_features * nbits:
        q = np.empty((words.shape[1], in_features), dtype=np.uint8)
        kernels.unpack_words_transposed(np.ascontiguousarray(words).view(np.uint32), nbits, q)
        return q
    return unpack_words_reference(words, nbits, in_features)


def unpack_words_reference(words: np.ndarray, nbits: int, in_features: int) -> np.ndarray:
    """`unpack_words` in plain numpy (the specification of its values)."""
    unsigned = words.view(np.uint32) if words.dtype == np.int32 else words
    per_word = unsigned.dtype.itemsize * 8 // nbits
    shifts = np.arange(per_word, dtype=unsigned.dtype) * unsigned.dtype.type(nbits)
    fields = (unsigned[:, None, :] >> shifts[None, :, None]) & unsigned.dtype.type(2**nbits - 1)
    return np.ascontiguousarray(fields.reshape(in_features, words.shape[1]).T).astype(np.uint8)


def _as_fp16(state: dict[str, np.ndarray], key: str, array: np.ndarray) -> np.ndarray:
    """fp32 scales/zeros (meta_dtype FP32, the released packs) as fp16, refused unless exact."""
    if array.dtype != np.float32:
        return array
    narrowed = array.astype(np.float16)
    if not np.array_equal(narrowed.astype(np.float32), array, equal_nan=False):
        raise _fail(f"{key} holds fp32 values that fp16 cannot hold exactly (not a Bonsai layer)")
    return narrowed


def _layer(state: dict[str, np.ndarray]) -> tuple[dict[str, int], np.ndarray, np.ndarray, np.ndarray]:
    """Validated metadata, q [N, K], scales [K/g, N] and zeros of a grouped gemlite layer, scales and float zeros
    as fp16 (fp32 ones, meta_dtype FP32 as PrismML's released packs store them, must be exact in fp16)."""
    meta = read_metadata(state)
    nbits, group_size = meta["W_nbits"], meta["group_size"]
    n, k = meta["out_features"], meta["in_features"]
    if nbits not in (1, 2, 4, 8) or group_size < 16 or n <= 0 or k <= 0 or k % 32 or k % group_size:
        raise _fail(f"unsupported W_nbits {nbits} / group_size {group_size} / shape [{n}, {k}]")
    packing_bitwidth = 8 if np.asarray(state.get("W_q", np.zeros(0, np.int32))).dtype == np.uint8 else PACKING_BITWIDTH
    expected = {
        "scaled_activations": 0,
        "unpack_mask": 2**nbits - 1,
        "elements_per_sample": packing_bitwidth // nbits,
        "input_dtype": DTYPE_FP16,
        "output_dtype": DTYPE_FP16,
        "data_contiguous": 1,
    }
    for name, value in expected.items():
        if meta[name] != value:
            raise _fail(f"metadata {name} is {meta[name]}, expected {value}")
    if meta["meta_dtype"] not in (DTYPE_FP16, DTYPE_FP32):
        raise _fail(f"metadata meta_dtype is {meta['meta_dtype']}, expected {DTYPE_FP16} (fp16) or {DTYPE_FP32}")
    meta_type = np.float16 if meta["meta_dtype"] == DTYPE_FP16 else np.float32
    if (meta["channel_scale_mode"], meta["W_group_mode"]) not in ((0, 2), (0, 3), (0, 4), (1, 1)):
        raise _fail(
            f"unsupported channel_scale_mode {meta['channel_scale_mode']} / W_group_mode {meta['W_group_mode']}"
        )
    if (meta["channel_scale_mode"] == 1) != (k == group_size):
        raise _fail("channel_scale_mode 1 is used exactly when in_features == group_size")
    word_type = np.uint8 if packing_bitwidth == 8 else np.int32
    words = _checked(state, "W_q", word_type, (k * nbits // packing_bitwidth, n))
    scales = _as_fp16(state, "scales", _checked(state, "scales", meta_type, (k // group_size, n)))
    if "meta_scale" in state:  # gemlite's state_dict has it; the released loader's layout does not
        _checked(state, "meta_scale", np.float32, ())
    zeros = np.asarray(state.get("zeros", np.zeros(0)))
    if meta["W_group_mode"] != 2 and not (
        (zeros.dtype == np.int32 and zeros.shape == ())
        or (zeros.dtype == meta_type and zeros.shape == (k // group_size, n))
    ):
        raise _fail(
            f"zeros is {zeros.dtype} {list(zeros.shape)}, expected an int32 scalar or {meta_type.__name__} like scales"
        )
    return meta, unpack_words(words, nbits, k), scales, _as_fp16(state, "zeros", zeros)


def dequantize(state: dict[str, np.ndarray]) -> np.ndarray:
    """The fp16 weight [N, K] a gemlite fp16 layer stands for (formats/gemlite.md; one fp16 rounding)."""
    meta, q, scales, zeros = _layer(state)
    group_size, mode = meta["group_size"], meta["W_group_mode"]
    s = np.repeat(scales.T.astype(np.float64), group_size, axis=1)
    z = zeros.astype(np.float64)
    z = z if z.ndim == 0 else np.repeat(z.T, group_size, axis=1)
    values = q.astype(np.float64)
    if mode == 4:
        weight = values * s + z  # exact in float64 for fp16 operands, then one rounding: equals an fp16 FMA
    elif mode == 2:
        weight = values * s
    else:  # 3: (q − z)·s; 1 (with channel_scale_mode 1): (q − z), the per-channel scale applied to the output
        weight = (values - z) * s
    return weight.astype(np.float16)


def decode(state: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [N, K], fp16 scales [N, K/128]) of an exact binary (1-bit) / ternary (2-bit) layer."""
    meta, q, stored_scales, zeros = _layer(state)
    nbits, mode = meta["W_nbits"], meta["W_group_mode"]
    if meta["group_size"] != GROUP_SIZE or nbits not in (1, 2):
        raise _fail(f"not a Bonsai layer (W_nbits {nbits}, group_size {meta['group_size']})")
    if nbits == 2:
        # (q − 1)·s: the integer zero point 1 (mode 3, ours) or fma zeros −s (mode 4, the released packs)
        fma = mode == 4 and zeros.dtype == np.float16
        if fma and not np.array_equal((-stored_scales).view(np.uint16), zeros.view(np.uint16)):
            raise _fail("ternary fma layers have zeros = −scales")
        if not fma and (mode == 2 or zeros.dtype != np.int32 or int(zeros) != 1):
            raise _fail("ternary layers have the integer zero point 1 (or fma zeros = −scales)")
        if (q == 3).any():
            row, col = (int(i) for i in np.argwhere(q == 3)[0])
            raise _fail(f"ternary code 3 (value +2) at row {row}, column {col}")
        return (q.astype(np.int8) - 1), np.ascontiguousarray(stored_scales.T)
    # binary: W = q·2s − s (mode 4, zeros hold −s) or (q − 0.5)·2s (mode 1, zeros hold 0.5).
    if zeros.dtype != np.float16 or mode == 2:
        raise _fail("binary layers have fp16 zeros")
    if mode == 4:
        scales = -zeros
    else:
        if not (zeros == np.float16(0.5)).all():
            raise _fail("binary per-channel layers have the zero point 0.5")
        scales = (stored_scales.astype(np.float32) / 2).astype(np.float16)
    doubled = (scales.astype(np.float32) * 2).astype(np.float16)
    if not np.array_equal(doubled.view(np.uint16), stored_scales.view(np.uint16)):
        raise _fail("binary scales are not 2·s for the stored zero points (not an exact binary layer)")
    return (q.astype(np.int8) * 2 - 1), np.ascontiguousarray(scales.T)
