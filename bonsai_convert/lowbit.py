"""Which transformer tensors go low-bit, and the exact split of their weights into codes and FP16 group scales.

Pure numpy, no I/O. The exactness rule (formats/exactness.md): the source weight is cast to fp16 (overflow is
an error); per group of 128 consecutive weights of a row, s_g = max |w|. The group is binary iff every |w| == s_g,
ternary iff every |w| is s_g or 0. Codes are sign(w) (binary: the sign bit, so ±0 keep their sign) and s_g·code
reproduces the fp16 weight bit for bit (ternary zeros decode as +0.0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

GROUP_SIZE = 128
FP16_MAX = float(np.finfo(np.float16).max)

# A block linear: a 2-D `.weight` inside transformer_blocks.N or single_transformer_blocks.N that is not a norm.
# This holds for any Flux2Transformer2DModel config (the rule is on names, not on widths or counts).
_BLOCK_WEIGHT = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.(?P<path>.+)\.weight$")


def is_low_bit_key(name: str) -> bool:
    """True for the block linears that the Bonsai release trains into binary/ternary weights."""
    match = _BLOCK_WEIGHT.match(name)
    if not match:
        return False
    return not any(part.startswith("norm") for part in match.group("path").split("."))


@dataclass(frozen=True)
class LowBitTensor:
    """A low-bit linear: codes in {-1,+1} or {-1,0,+1} (int8, [out, in]) and fp16 scales [out, in/128]."""

    name: str
    codes: np.ndarray
    scales: np.ndarray
    digest: str | None = field(default=None, compare=False, repr=False)  # sha256 of dense(), if known

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dense(self) -> np.ndarray:
        """The fp16 weight the codes and scales stand for."""
        return dense_from_codes(self.codes, self.scales)


def dense_from_codes(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """fp16 weight = scale of the group × code, exact, built on bit patterns (faster than float multiplies).

    code ±1 → the scale's bits, sign flipped for −1 (so 0·(−1) = −0.0 as in IEEE); code 0 → +0.0.
    """
    from . import kernels

    if kernels.ENABLED and codes.ndim == 2 and codes.dtype == np.int8 and codes.shape[1] % GROUP_SIZE == 0:
        from .kernels import decode_codes

        out = np.empty(codes.shape, dtype=np.uint16)
        scale_bits = np.ascontiguousarray(scales, dtype=np.float16).view(np.uint16)
        decode_codes(np.ascontiguousarray(codes), scale_bits, out)
        return out.view(np.float16)
    return dense_from_codes_reference(codes, scales)


def dense_from_codes_reference(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """`dense_from_codes` in plain numpy (the specification the compiled kernel is tested against)."""
    out_features, in_features = codes.shape
    grouped = codes.reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    scale_bits = np.ascontiguousarray(scales, dtype=np.float16).view(np.uint16)[:, :, None]
    magnitude = np.where(grouped != 0, scale_bits, np.uint16(0)).astype(np.uint16)
    bits = magnitude ^ ((grouped < 0).astype(np.uint16) << np.uint16(15))
    return bits.reshape(out_features, in_features).view(np.float16)


def to_fp16(name: str, values: np.ndarray) -> np.ndarray:
    """Cast to fp16, refusing NaN/Inf and values that overflow fp16."""
    if values.dtype == np.float16:
        result = values
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            result = values.astype(np.float16)
    if not np.isfinite(result).all():
        source_finite = np.isfinite(values).all()
        if not source_finite:
            index = np.unravel_index(int(np.argmin(np.isfinite(values))), values.shape)
            raise InputError(f"{name}: non-finite value {values[index]} at index {tuple(int(i) for i in index)}")
        largest = float(np.abs(values.astype(np.float32)).max())
        raise InputError(f"{name}: value {largest:g} overflows fp16 (max {FP16_MAX:g})")
    return result


def check_group_shape(name: str, shape: tuple[int, ...]) -> None:
    """Low-bit linears must be 2-D with in_features divisible by the group size."""
    if len(shape) != 2:
        raise InputError(f"{name}: low-bit linear must be 2-D, got shape {list(shape)}")
    if shape[1] % GROUP_SIZE:
        raise InputError(
            f"{name}: in_features {shape[1]} is not divisible by the group size {GROUP_SIZE} (shape {list(shape)})"
        )


def _first_bad_group(name: str, grouped: np.ndarray, bad: np.ndarray, variant: str) -> InputError:
    row, group = (int(i) for i in np.argwhere(bad)[0])
    values = np.unique(np.abs(grouped[row, group].astype(np.float32)))
    shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
    allowed = "±s" if variant == "binary" else "0 or ±s"
    first, last = group * GROUP_SIZE, (group + 1) * GROUP_SIZE - 1
    return InputError(
        f"{name}: not {variant}: row {row}, group {group} (weights {first}..{last})"
        f" has {len(values)} distinct magnitudes [{shown}], expected {allowed}"
    )


def needs_ternary(codes: np.ndarray) -> bool:
    """True if any code is 0 (a binary tensor never has zero codes)."""
    return bool((codes == 0).any())


def split_exact(name: str, weight: np.ndarray, variant: str) -> LowBitTensor:
    """Split an exactly binary/ternary weight into codes and fp16 scales, or raise naming the first bad group.

    variant 'auto' accepts both and returns ternary codes (0 where the weight is ±0 in a group with s > 0);
    `needs_ternary` then tells which variant the tensor is.
    """
    check_group_shape(name, weight.shape)
    fp16 = to_fp16(name, weight)
    out_features, in_features = fp16.shape
    # Integer work on the fp16 bit patterns (several times faster than float ops): for finite values the
    # magnitude bits (sign cleared) order like |w|, and ±0 is magnitude 0.
    bits = np.ascontiguousarray(fp16).view(np.uint16).reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    magnitude = bits & np.uint16(0x7FFF)
    scale_bits = magnitude.max(axis=-1)
    at_scale = magnitude == scale_bits[..., None]
    if variant == "binary":
        bad = ~at_scale.all(axis=-1)
    else:
        bad = ~(at_scale | (magnitude == 0)).all(axis=-1)
    if bad.any():
        grouped = fp16.reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        raise _first_bad_group(name, grouped, bad, "binary" if variant == "binary" else "ternary")
    # code = +1 − 2·sign; ternary: 0 where the weight is ±0 in a group whose scale is not 0 (else ±s == ±0 keeps
    # its sign, so decoding reproduces −0.0 bit for bit).
    codes = (1 - 2 * (bits >> np.uint16(15)).astype(np.int8)).astype(np.int8)
    if variant != "binary":
        codes[(magnitude == 0) & (scale_bits[..., None] != 0)] = 0
    scales = scale_bits.view(np.float16)
    return LowBitTensor(name, codes.reshape(out_features, in_features), scales)


def split_exact_stored(
    name: str, stored: np.ndarray, stored_dtype: str, variant: str, out: tuple[np.ndarray, ...] | None = None
) -> tuple[LowBitTensor, np.ndarray]:
    """`split_exact` of a weight given as stored (bf16 bit patterns as uint16, or f16/f32 values), in one fused
    compiled pass; also returns the decoded fp16 weight (what `dense_from_codes` gives) as uint16 bit patterns.

    Same codes, scales and errors as `split_exact` on the widened values: on any bad group the plain
    implementation is rerun to raise its message. `stored` may be a read-only memory map (it is only read).
    With BONSAI_CONVERT_REFERENCE=1 the plain implementation gives the same arrays.
    """
    from . import kernels

    check_group_shape(name, stored.shape)
    if not kernels.ENABLED:
        return _split_exact_stored_reference(name, stored, stored_dtype, variant, out)
    if stored_dtype == "BF16":
        source, use_table = np.ascontiguousarray(stored, dtype=np.uint16), True
    elif stored_dtype == "F16":
        source, use_table = np.ascontiguousarray(stored, dtype=np.float16).view(np.uint16), False
    else:
        source, use_table = np.ascontiguousarray(to_fp16(name, np.asarray(stored))).view(np.uint16), False
    rows, cols = source.shape
    if out is not None:  # (codes int8 [r, n], scale bits uint16 [r, n/128], decoded uint16 [r, n]) to fill
        codes, scale_bits, decoded = out
    else:
        codes = np.empty((rows, cols), dtype=np.int8)
        scale_bits = np.empty((rows, cols // GROUP_SIZE), dtype=np.uint16)
        decoded = np.empty((rows, cols), dtype=np.uint16)
    bad, _ = kernels.split_groups(
        source, kernels.BF16_TO_FP16, use_table, variant != "binary", codes, scale_bits, decoded
    )
    if bad >= 0:
        values = (source.astype(np.uint32) << 16).view(np.float32) if use_table else source.view(np.float16)
        split_exact(name, values, variant)  # raises the message of the first bad group
        raise AssertionError(f"{name}: compiled split and split_exact disagree")  # pragma: no cover
    return LowBitTensor(name, codes, scale_bits.view(np.float16)), decoded


def _split_exact_stored_reference(
    name: str, stored: np.ndarray, stored_dtype: str, variant: str, out: tuple[np.ndarray, ...] | None
) -> tuple[LowBitTensor, np.ndarray]:
    """`split_exact_stored` by `split_exact` of the widened values and `dense_from_codes_reference`."""
    if stored_dtype == "BF16":
        values = (np.asarray(stored, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.asarray(stored)
    part = split_exact(name, values, variant)
    decoded = dense_from_codes_reference(part.codes, part.scales).view(np.uint16)
    if out is None:
        return part, decoded
    codes, scale_bits, decoded_out = out
    codes[...], scale_bits[...], decoded_out[...] = part.codes, part.scales.view(np.uint16), decoded
    return LowBitTensor(name, codes, scale_bits.view(np.float16)), decoded_out


def quantize_absmean(name: str, weight: np.ndarray, variant: str) -> LowBitTensor:
    """Lossy projection of full-precision weights (opt-in `--quantize absmean`), per group of 128.

    ternary: BitNet b1.58 absmean, s = mean|w|, t = clip(round(w / s), -1, 1); binary: s = mean|w|, b = sign(w).
    """
    check_group_shape(name, weight.shape)
    values = to_fp16(name, weight).astype(np.float32)
    out_features, in_features = values.shape
    grouped = values.reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    scales = np.abs(grouped).mean(axis=-1).astype(np.float16)
    safe = np.where(scales == 0, np.float16(1), scales).astype(np.float32)[..., None]
    if variant == "binary":
        codes = np.where(np.signbit(grouped), -1, 1).astype(np.int8)
    else:
        codes = np.clip(np.round(grouped / safe), -1, 1).astype(np.int8)
    return LowBitTensor(name, codes.reshape(out_features, in_features), scales)
