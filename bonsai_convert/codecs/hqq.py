"""HQQ's 4-bit layer (hqq 0.2.8.post1 `HQQLinear`, as `save_quantized` writes it into qmodel.pt), byte for byte.

Pure numpy, no I/O, no torch. A layer W [N, K] is quantized in groups of 64 consecutive weights of W in C order
(HQQ's `axis=1`: `W.reshape(-1, 64)`, G = N·K/64 groups), W ≈ (q − zero)·scale with q ∈ 0..15, and stored as
`W_q` uint8 [G/2, 64] (`BitPack.pack_4bit_u8`: row r holds q[r] in its high nibble and q[r + G/2] in its low one),
`scale` and `zero` fp16 [G, 1], plus HQQ's metadata (formats/hqq.md). `dequantize` is HQQ's `Quantizer.dequantize`
in fp16, the compute dtype its loader is given (`from_quantized(..., compute_dtype=torch.float16)`).
"""

from __future__ import annotations

import numpy as np
from bonsai_common.torch_zip import StoredTensor, TensorRef, TorchDtype, TorchSize

from ..errors import InputError

NBITS = 4
GROUP_SIZE = 64
PACKING = "4bit_u8"
COMPUTE_DTYPE = "float16"
TENSOR_KEYS = ("W_q", "scale", "zero")
FOLDER = "text_encoder-hqq-4bit"
WEIGHTS_FILE = "qmodel.pt"
# The order HQQLinear.state_dict() gives (W_q, the quantizer's meta, the flags `cuda()` and `state_dict()` add, the
# weight_quant_params not already there); `from_quantized` accepts exactly these keys (+ an optional bias).
LAYER_KEYS = (
    "W_q",
    "nbits",
    "group_size",
    "shape",
    "scale",
    "zero",
    "axis",
    "packing",
    "unpack_view_dtype",
    "view_as_float",
    "quant_scale",
    "quant_zero",
    "compute_dtype",
    "offload_meta",
    "stores_quant_config",
    "channel_wise",
    "optimize",
    "round_zero",
)


def quantizable(shape: tuple[int, ...], group_size: int = GROUP_SIZE) -> bool:
    """Whether HQQ's 4-bit packing can hold a weight of this shape: 2-D, an even number of whole groups."""
    return len(shape) == 2 and shape[0] * shape[1] > 0 and (shape[0] * shape[1]) % (2 * group_size) == 0


def groups(rows: int, cols: int, group_size: int = GROUP_SIZE) -> int:
    return rows * cols // group_size


def tensor_specs(prefix: str, rows: int, cols: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of the three tensors of the layer `prefix`."""
    count = groups(rows, cols)
    return [
        (f"{prefix}.W_q", "U8", (count // 2, GROUP_SIZE)),
        (f"{prefix}.scale", "F16", (count, 1)),
        (f"{prefix}.zero", "F16", (count, 1)),
    ]


def layer_entries(prefix: str, rows: int, cols: int) -> dict[str, object]:
    """The layer's state dict as qmodel.pt holds it: tensors as references, HQQ's metadata as plain values.

    `optimize` and `round_zero` record how the codes were found; ours are min/max round-to-nearest with an
    unrounded zero (not HQQ's proximal optimizer), so both are False. Nothing reads them when loading."""
    values: dict[str, object] = {
        "W_q": TensorRef(f"{prefix}.W_q", parameter=True),
        "nbits": NBITS,
        "group_size": GROUP_SIZE,
        "shape": TorchSize((rows, cols)),
        "scale": TensorRef(f"{prefix}.scale"),
        "zero": TensorRef(f"{prefix}.zero"),
        "axis": 1,
        "packing": PACKING,
        "unpack_view_dtype": TorchDtype("uint8"),
        "view_as_float": False,
        "quant_scale": False,
        "quant_zero": False,
        "compute_dtype": TorchDtype(COMPUTE_DTYPE),
        "offload_meta": False,
        "stores_quant_config": True,
        "channel_wise": True,
        "optimize": False,
        "round_zero": False,
    }
    return {key: values[key] for key in LAYER_KEYS}


def grouped(values: np.ndarray, group_size: int = GROUP_SIZE) -> np.ndarray:
    """W [N, K] as HQQ groups it (axis=1): [N·K/group_size, group_size], consecutive weights in C order."""
    return np.ascontiguousarray(values).reshape(-1, group_size)


def pack(q: np.ndarray) -> np.ndarray:
    """`BitPack.pack_4bit_u8`: q uint8 [G, g] (values 0..15, G even) → [G/2, g], (q[:G/2] << 4) | q[G/2:]."""
    half = q.shape[0] // 2
    return ((q[:half] << 4) | q[half:]).astype(np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
    """`BitPack.unpack_4bit_u8`: [G/2, g] → q uint8 [G, g] (high nibbles first, then low nibbles)."""
    return np.concatenate([packed >> 4, packed & 0x0F]).astype(np.uint8)


def encode(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> dict[str, np.ndarray]:
    """The layer's tensors from grouped codes q [G, 64] (0..15), fp16 scales and zeros [G, 1] (or [G])."""
    count = q.shape[0]
    if q.ndim != 2 or q.shape[1] != GROUP_SIZE or count % 2:
        raise ValueError(f"codes of shape {q.shape}: expected [G, {GROUP_SIZE}] with G even")
    if q.max(initial=0) > 15:
        raise ValueError("a 4-bit code above 15")
    return {
        "W_q": pack(q.astype(np.uint8)),
        "scale": np.ascontiguousarray(scales, dtype=np.float16).reshape(count, 1),
        "zero": np.ascontiguousarray(zeros, dtype=np.float16).reshape(count, 1),
    }


def dequantize(packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """HQQ's `Quantizer.dequantize` in fp16: ((unpack(W_q) − zero)·scale).reshape(shape), each step rounded to fp16.

    Any group size (the width of W_q). scale/zero ([G, 1] or [G]; bf16 given widened to float32) are first cast to
    fp16, as HQQ's loader casts them to the compute dtype."""
    q = unpack(packed).astype(np.float16)
    count = q.shape[0]
    values = (q - zero.reshape(count, 1).astype(np.float16)) * scale.reshape(count, 1).astype(np.float16)
    return values.astype(np.float16).reshape(shape)


# --- reading a released layer ---------------------------------------------------------------------------------------

_EXPECTED = {
    "nbits": NBITS,
    "packing": PACKING,
    "axis": 1,
    "view_as_float": False,
    "quant_scale": False,
    "quant_zero": False,
    "unpack_view_dtype": TorchDtype("uint8"),
}
_FLOATS = ("F16", "BF16", "F32")
_OPTIONAL = {"compute_dtype", "offload_meta", "stores_quant_config", "channel_wise", "optimize", "round_zero", "bias"}


def read_layer(entries: dict[str, object], label: str) -> tuple[tuple[int, int], int]:
    """Check an HQQ layer's entries (tensors as StoredTensor) against the 4-bit layout this codec decodes:
    its weight shape [N, K] and group size, or an InputError naming the layer and the entry."""
    for key in set(entries) - set(LAYER_KEYS) - _OPTIONAL:
        raise InputError(f"{label}: HQQ layer entry {key!r} is not one hqq 0.2.8.post1 loads")
    for key, expected in _EXPECTED.items():
        if key in entries and entries[key] != expected:
            raise InputError(f"{label}: HQQ {key} is {entries[key]!r}; only {expected!r} (4-bit, axis 1) is read")
    if entries.get("offload_meta"):
        raise InputError(f"{label}: HQQ offload_meta layers (zero_scale) are not read")
    if "bias" in entries:
        raise InputError(f"{label}: an HQQ layer with a bias (Qwen3's linears have none)")
    shape, group_size = entries.get("shape"), entries.get("group_size")
    if not isinstance(shape, TorchSize) or len(shape.dims) != 2:
        raise InputError(f"{label}: HQQ shape {shape!r} is not a 2-D torch.Size")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise InputError(f"{label}: HQQ group_size {group_size!r} is not a positive int")
    rows, cols = shape.dims
    if not quantizable((rows, cols), group_size):
        raise InputError(f"{label}: {rows}×{cols} weights are not an even number of groups of {group_size}")
    count = groups(rows, cols, group_size)
    expected_shapes = {"W_q": (("U8",), (count // 2, group_size)), "scale": (_FLOATS, (count, 1))}
    expected_shapes["zero"] = (_FLOATS, (count, 1))
    for key, (dtypes, tensor_shape) in expected_shapes.items():
        tensor = entries.get(key)
        if not isinstance(tensor, StoredTensor):
            raise InputError(f"{label}: HQQ layer has no {key} tensor")
        if tensor.dtype not in dtypes or tensor.shape not in (tensor_shape, (count,)):
            raise InputError(f"{label}.{key}: {tensor.dtype} {list(tensor.shape)}, expected {list(tensor_shape)}")
    if entries["W_q"].shape != (count // 2, group_size):
        raise InputError(f"{label}.W_q: shape {list(entries['W_q'].shape)}, expected {[count // 2, group_size]}")
    return (rows, cols), group_size
