"""Low-bit linears of a CUDA (Gemlite) bundle: real GemLite layers on a GPU, a dense torch decode elsewhere.

The tensors of one linear `X` are `X.W_q`, `X.scales`, `X.zeros`, `X.metadata`, `X.orig_shape` and
`X.meta_scale`: exactly GemLiteLinearTriton.state_dict() (formats/gemlite.md). This module reads them
with torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKING_BITWIDTH = 32
GEMLITE_FP16 = 1  # gemlite.dtypes.DType.FP16
# (channel_scale_mode, W_group_mode) pairs a grouped fp16 layer can have.
GROUP_MODES = {(0, 2), (0, 3), (0, 4), (1, 1)}


class LayoutError(ValueError):
    """The tensors of a low-bit linear do not follow formats/gemlite.md."""


def _meta(state: dict[str, torch.Tensor], name: str) -> dict[str, int]:
    for key in ("W_q", "scales", "metadata", "orig_shape"):
        if key not in state:
            raise LayoutError(f"{name}: missing tensor {name}.{key}")
    metadata, orig_shape = state["metadata"], state["orig_shape"]
    if metadata.dtype != torch.int32 or tuple(metadata.shape) != (12,):
        raise LayoutError(f"{name}: metadata must be int32 [12], got {metadata.dtype} {list(metadata.shape)}")
    if orig_shape.dtype != torch.int32 or tuple(orig_shape.shape) != (2,):
        raise LayoutError(f"{name}: orig_shape must be int32 [2], got {orig_shape.dtype} {list(orig_shape.shape)}")
    fields = (
        "scaled_activations", "W_nbits", "group_size", "unpack_mask", "elements_per_sample", "input_dtype",
        "output_dtype", "acc_dtype", "meta_dtype", "channel_scale_mode", "W_group_mode", "data_contiguous",
    )  # fmt: skip
    meta = dict(zip(fields, (int(v) for v in metadata.tolist()), strict=True))
    meta["out_features"], meta["in_features"] = (int(v) for v in orig_shape.tolist())
    return meta


def check_layout(state: dict[str, torch.Tensor], name: str = "layer") -> dict[str, int]:
    """Validate one linear's tensors against formats/gemlite.md; return its metadata fields by name."""
    meta = _meta(state, name)
    nbits, group, n, k = meta["W_nbits"], meta["group_size"], meta["out_features"], meta["in_features"]
    if nbits not in (1, 2, 4, 8) or group < 16 or n <= 0 or k <= 0 or k % 32 or k % group:
        raise LayoutError(f"{name}: unsupported W_nbits {nbits}, group_size {group} or shape [{n}, {k}]")
    per_word = PACKING_BITWIDTH // nbits
    expected = {
        "scaled_activations": 0, "unpack_mask": 2**nbits - 1, "elements_per_sample": per_word,
        "input_dtype": GEMLITE_FP16, "output_dtype": GEMLITE_FP16, "meta_dtype": GEMLITE_FP16,
        "data_contiguous": 1,
    }  # fmt: skip
    for field, value in expected.items():
        if meta[field] != value:
            raise LayoutError(f"{name}: metadata {field} is {meta[field]}, expected {value}")
    if (meta["channel_scale_mode"], meta["W_group_mode"]) not in GROUP_MODES:
        raise LayoutError(f"{name}: unsupported channel_scale_mode/W_group_mode {meta['channel_scale_mode']}/"
                          f"{meta['W_group_mode']}")  # fmt: skip
    shapes = {"W_q": (torch.int32, (k // per_word, n)), "scales": (torch.float16, (k // group, n))}
    for key, (dtype, shape) in shapes.items():
        tensor = state[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise LayoutError(f"{name}: {key} is {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}")
    zeros = state.get("zeros")
    if meta["W_group_mode"] != 2:
        ok = zeros is not None and (
            (zeros.dtype == torch.int32 and zeros.dim() == 0)
            or (zeros.dtype == torch.float16 and tuple(zeros.shape) == (k // group, n))
        )
        if not ok:
            raise LayoutError(f"{name}: zeros must be an int32 scalar or fp16 [{k // group}, {n}]")
    return meta


def unpack_codes(words: torch.Tensor, nbits: int, in_features: int) -> torch.Tensor:
    """int32 [K/e, N] → int32 codes [N, K]: (n, k) = (words[k//e, n] >> (k % e)·nbits) & (2**nbits − 1)."""
    per_word = PACKING_BITWIDTH // nbits
    shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * nbits
    fields = (words[:, None, :] >> shifts[None, :, None]) & (2**nbits - 1)  # [K/e, e, N]
    return fields.reshape(in_features, words.shape[1]).t()


def dequantize_state(state: dict[str, torch.Tensor], name: str = "layer") -> torch.Tensor:
    """The fp16 weight [N, K] a layer's tensors stand for, computed in float64 and rounded once to fp16."""
    meta = check_layout(state, name)
    group, mode, k = meta["group_size"], meta["W_group_mode"], meta["in_features"]
    q = unpack_codes(state["W_q"], meta["W_nbits"], k).to(torch.float64)
    scales = state["scales"].to(torch.float64).t().repeat_interleave(group, dim=1)
    zeros = state.get("zeros")
    if zeros is not None and zeros.dim() > 0:
        zeros = zeros.to(torch.float64).t().repeat_interleave(group, dim=1)
    elif zeros is not None:
        zeros = zeros.to(torch.float64)
    if mode == 4:
        weight = q * scales + zeros  # = the kernel's fp16 fma: exact in float64, one rounding below
    elif mode == 2:
        weight = q * scales
    else:  # 3: (q − z)·s per group; 1: (q − z) with the per-channel scale s (channel_scale_mode 1)
        weight = (q - zeros) * scales
    return weight.to(torch.float16)


def _float32_terms(state: dict[str, torch.Tensor], meta: dict[str, int], rows: slice = slice(None)):
    """Codes (float32, transposed: [K/group, group, n]), scales and zeros ([K/group, 1, n] or a scalar) of
    output rows `rows`, in the words' own K-major order (no strided copy)."""
    group, k, nbits = meta["group_size"], meta["in_features"], meta["W_nbits"]
    words = state["W_q"][:, rows]
    shifts = torch.arange(PACKING_BITWIDTH // nbits, dtype=torch.int32, device=words.device) * nbits
    fields = (words[:, None, :] >> shifts[None, :, None]).bitwise_and_(2**nbits - 1)  # [K/e, e, n] = [K, n]
    q = fields.to(torch.float32).view(k // group, group, words.shape[1])
    scales = state["scales"][:, rows].to(torch.float32)[:, None, :]
    zeros = state.get("zeros")
    if zeros is not None and zeros.dim() > 0:
        zeros = zeros[:, rows].to(torch.float32)[:, None, :]
    elif zeros is not None:
        zeros = zeros.to(torch.float32)
    return q, scales, zeros


def dequantize_fast(state: dict[str, torch.Tensor], meta: dict[str, int], dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_state` in float32 on the layer's device (no float64 pass), rounded to fp16, cast to `dtype`:
    the [N, K] weight as a transposed view of a K-major matrix (F.linear takes it without a copy).

    Where every float32 product and sum is exact (`float32_decode_is_exact`: the binary, ternary and 4-bit
    layouts we write) this equals `dequantize_state` bit for bit; GemliteDecodedLinear checks that at load."""
    mode, k, n = meta["W_group_mode"], meta["in_features"], meta["out_features"]
    q, scales, zeros = _float32_terms(state, meta)
    if mode == 4:
        weight = q.mul_(scales).add_(zeros)
    elif mode == 2:
        weight = q.mul_(scales)
    else:
        weight = q.sub_(zeros).mul_(scales)
    return weight.view(k, n).to(torch.float16).to(dtype).t()


def float32_decode_is_exact(state: dict[str, torch.Tensor], meta: dict[str, int], rows_per_pass: int = 2048) -> bool:
    """Whether `dequantize_fast` computes every weight exactly before its one rounding to fp16 (so it equals the
    float64 `dequantize_state`), decided without the float64 pass. A code q < 2⁸ times an fp16 scale is exact in
    float32 (≤ 19 significant bits), and so is (q − z)·s for an integer zero point z (mode 3, a scalar int:
    ternary); mode 4 adds fp16 zeros, checked per weight with the error-free sum (TwoSum: the float32 sum's
    rounding error, computed exactly, must be 0). Other modes are not decided here (False). Rows are checked in
    passes of `rows_per_pass` to bound the temporaries."""
    mode, zeros = meta["W_group_mode"], state.get("zeros")
    if meta["W_nbits"] > 8:
        return False
    if mode == 2 or (mode == 3 and zeros is not None and zeros.dim() == 0 and not zeros.is_floating_point()):
        return bool(torch.isfinite(state["scales"]).all())
    if mode != 4 or zeros is None or zeros.dim() == 0:
        return False
    for start in range(0, meta["out_features"], rows_per_pass):
        q, scales, zeros_ = _float32_terms(state, meta, slice(start, start + rows_per_pass))
        product = q * scales
        total = product + zeros_
        product_part = total - zeros_
        error = (product - product_part) + (zeros_ - (total - product_part))
        if not bool((error == 0).all()):  # NaN and inf fail here too
            return False
    return True


class GemliteDecodedLinear(nn.Module):
    """A bias-free linear decoded from Gemlite tensors (CPU / no-gemlite fallback), one layer at a time.

    The packed tensors stay resident (1–2 bits per weight + scales) and the dense weight is made when the layer
    runs and dropped after, so a Klein-4B transformer needs ~1.4 GB of weights instead of 7.75 GB (fp16) or
    15.5 GB (fp32). At load, the fast float32 decode is shown exact (`float32_decode_is_exact`) or else compared
    once with the float64 `dequantize_state`; a layer where they differ keeps its decoded fp16 weight instead."""

    def __init__(self, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str, name: str = ""):
        super().__init__()
        cpu_state = {key: value.cpu() for key, value in state.items()}
        self.meta = check_layout(cpu_state, name or "layer")
        self.out_features, self.in_features = self.meta["out_features"], self.meta["in_features"]
        self.compute_dtype = dtype
        reference = None
        if not float32_decode_is_exact(cpu_state, self.meta):
            reference = dequantize_state(cpu_state, name or "layer")
            fast = dequantize_fast(cpu_state, self.meta, torch.float16)
            if torch.equal(fast.view(torch.int16), reference.view(torch.int16)):
                reference = None
        if reference is None:
            for key in ("W_q", "scales", "zeros"):
                if key in cpu_state:
                    self.register_buffer(key, cpu_state[key].to(device))
            self.weight = None
        else:
            self.weight = nn.Parameter(reference.to(device=device, dtype=dtype), requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight
        state = {key: getattr(self, key) for key in ("W_q", "scales", "zeros") if hasattr(self, key)}
        return dequantize_fast(state, self.meta, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight())

    def extra_repr(self) -> str:
        kept = "decoded per forward" if self.weight is None else "decoded once"
        return f"in_features={self.in_features}, out_features={self.out_features}, gemlite tensors {kept}"


class Fp16Activations(nn.Module):
    """Runs a GemLite fp16 layer inside a model of another dtype: activations in fp16, output cast back."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(torch.float16)).to(x.dtype)


def gemlite_available() -> bool:
    """True when CUDA is usable and `import gemlite` works (it queries the GPU at import)."""
    if not torch.cuda.is_available():
        return False
    try:
        import gemlite  # noqa: F401
    except Exception:  # gemlite raises various errors without a working GPU/triton
        return False
    return True


def gemlite_layer(state: dict[str, torch.Tensor], device: torch.device | str, name: str = "") -> nn.Module:
    """A GemLiteLinearTriton filled by load_state_dict from the stored tensors (no re-pack)."""
    from gemlite.core import DType, GemLiteLinearTriton

    meta = check_layout(state, name or "layer")
    layer = GemLiteLinearTriton(
        W_nbits=meta["W_nbits"],
        group_size=meta["group_size"],
        in_features=meta["in_features"],
        out_features=meta["out_features"],
        input_dtype=DType.FP16,
        output_dtype=DType.FP16,
    )
    layer.load_state_dict({key: value.to(device) for key, value in state.items()})
    return layer


def build_linear(
    state: dict[str, torch.Tensor],
    backend: str,
    device: torch.device | str,
    dtype: torch.dtype,
    name: str = "",
) -> nn.Module:
    """The module that replaces one low-bit nn.Linear: 'gemlite' (GPU kernels) or 'decoded' (dense torch)."""
    if backend == "gemlite":
        layer = gemlite_layer(state, device, name)
        return layer if dtype == torch.float16 else Fp16Activations(layer)
    if backend == "decoded":
        return GemliteDecodedLinear(state, dtype, device, name)
    if backend == "interpreter":  # gemlite's own kernels on CPU (bonsai_cuda.interpreter, a fresh process)
        from .interpreter import InterpretedGemliteLinear

        check_layout(state, name or "layer")
        return InterpretedGemliteLinear(state, name)
    raise ValueError(f"unknown backend {backend!r} (expected 'gemlite', 'decoded' or 'interpreter')")
