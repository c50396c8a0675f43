"""The HQQ 4-bit text encoder of a CUDA bundle (`text_encoder-hqq-4bit/{config.json, qmodel.pt}`, formats/hqq.md).

qmodel.pt is read without unpickling (bonsai_common.torch_zip). Each HQQ layer runs as HQQ's own loader would make
it: decoded with HQQ's dequantization in fp16 (`HQQDecodedLinear`, CPU / no gemlite), or, with gemlite, packed by
gemlite itself from the unpacked codes, scales and zeros, as `hqq`'s `prepare_for_inference(backend="gemlite")`
does (gemlite's `A16Wn.from_hqqlinear`). hqq itself is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "qmodel.pt"
LAYER_TENSORS = ("W_q", "scale", "zero")


class HqqError(ValueError):
    """qmodel.pt is not an HQQ 4-bit text encoder this runtime reads (the message names the module)."""


@dataclass
class HqqLayer:
    """One HQQ 4-bit layer: W_q uint8 [G/2, g], scale/zero [G, 1] (as stored), weight shape [N, K], group g."""

    W_q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    shape: tuple[int, int]
    group_size: int


def _tensor(path: Path, stored) -> torch.Tensor:
    from bonsai_common.torch_zip import stored_array

    tensor = torch.from_numpy(np.array(stored_array(path, stored)))
    return tensor.view(torch.bfloat16) if stored.dtype == "BF16" else tensor


def read_qmodel(path: Path) -> tuple[dict[str, HqqLayer], dict[str, torch.Tensor], dict[str, str]]:
    """HQQ layers by module, dense tensors by `module.key`, and tied aliases (name → the tensor it shares)."""
    from bonsai_common.torch_zip import ContainerError, StoredTensor, TorchSize, read_module_container

    try:
        container = read_module_container(path)
    except ContainerError as error:
        raise HqqError(str(error)) from error
    layers, dense = {}, {}
    for module, entries in container.modules.items():
        if "W_q" not in entries:
            for key, value in entries.items():
                if not isinstance(value, StoredTensor):
                    raise HqqError(f"{path}: {module}.{key}: metadata in a module that is not an HQQ layer")
                if f"{module}.{key}" not in container.aliases:
                    dense[f"{module}.{key}"] = _tensor(path, value)
            continue
        expected = {"nbits": 4, "packing": "4bit_u8", "axis": 1, "view_as_float": False}
        for key, value in expected.items():
            if entries.get(key) != value:
                raise HqqError(f"{path}: {module}: HQQ {key} {entries.get(key)!r}, this runtime reads {value!r}")
        if entries.get("quant_scale") or entries.get("quant_zero") or entries.get("offload_meta") or "bias" in entries:
            raise HqqError(f"{path}: {module}: quantized/offloaded scale or zero, or a bias: not read")
        shape, group = entries.get("shape"), entries.get("group_size")
        if not isinstance(shape, TorchSize) or len(shape.dims) != 2 or not isinstance(group, int) or group <= 0:
            raise HqqError(f"{path}: {module}: HQQ shape/group_size {shape!r}/{group!r} not a 2-D size and an int")
        tensors = {key: entries.get(key) for key in LAYER_TENSORS}
        if not all(isinstance(t, StoredTensor) for t in tensors.values()):
            raise HqqError(f"{path}: {module}: an HQQ layer needs W_q, scale and zero tensors")
        rows, cols = shape.dims
        count = rows * cols // group
        if rows * cols != count * group or count % 2 or tensors["W_q"].shape != (count // 2, group):
            raise HqqError(f"{path}: {module}.W_q: shape {list(tensors['W_q'].shape)} does not fit {rows}×{cols}")
        for key in ("scale", "zero"):
            if int(np.prod(tensors[key].shape)) != count or tensors[key].dtype not in ("F16", "BF16", "F32"):
                raise HqqError(f"{path}: {module}.{key}: {tensors[key].dtype} {list(tensors[key].shape)}")
        if tensors["W_q"].dtype != "U8":
            raise HqqError(f"{path}: {module}.W_q: {tensors['W_q'].dtype}, expected U8")
        values = {key: _tensor(path, tensors[key]) for key in LAYER_TENSORS}
        layers[module] = HqqLayer(values["W_q"], values["scale"], values["zero"], (rows, cols), group)
    return layers, dense, dict(container.aliases)


def unpack(W_q: torch.Tensor) -> torch.Tensor:
    """hqq's `BitPack.unpack_4bit_u8`: [G/2, g] → [G, g], high nibbles then low nibbles."""
    return torch.cat([(W_q & 0xF0) >> 4, W_q & 0x0F])


def dequantize(layer: HqqLayer) -> torch.Tensor:
    """hqq's `Quantizer.dequantize` with compute dtype fp16: ((q − zero)·scale).reshape(shape), fp16 throughout."""
    q = unpack(layer.W_q).to(torch.float16)
    count = q.shape[0]
    zero = layer.zero.reshape(count, 1).to(torch.float16)
    scale = layer.scale.reshape(count, 1).to(torch.float16)
    return ((q - zero) * scale).reshape(layer.shape)


class HQQDecodedLinear(nn.Module):
    """A bias-free linear whose weight is HQQ's fp16 dequantization (cast to the compute dtype)."""

    def __init__(self, layer: HqqLayer, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.out_features, self.in_features = layer.shape
        self.weight = nn.Parameter(dequantize(layer).to(device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, HQQ 4-bit decoded"


def gemlite_packable(layer: HqqLayer) -> bool:
    """gemlite groups along rows: each HQQ group must lie inside one row (K a multiple of the group size)."""
    return layer.shape[1] % layer.group_size == 0


def gemlite_state(layer: HqqLayer, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The GemLiteLinearTriton state dict gemlite's own `pack()` makes from the layer (A16W4, fp16), as gemlite's
    `A16Wn.from_hqqlinear` calls it: codes [N, K] uint8, scales and zeros [N, K/g]."""
    from gemlite.core import DType, GemLiteLinearTriton

    rows, cols = layer.shape
    groups = cols // layer.group_size
    codes = unpack(layer.W_q).reshape(rows, cols).to(device)
    scales = layer.scale.reshape(rows, groups).to(device=device, dtype=torch.float16)
    zeros = layer.zero.reshape(rows, groups).to(device=device, dtype=torch.float16)
    linear = GemLiteLinearTriton(
        4, group_size=layer.group_size, in_features=cols, out_features=rows, input_dtype=DType.FP16,
        output_dtype=DType.FP16, scaled_activations=False,
    )  # fmt: skip
    linear.pack(codes, scales, zeros, bias=None)
    return {key: value for key, value in linear.state_dict().items() if value is not None}


def build_layer(layer: HqqLayer, backend: str, device: torch.device | str, dtype: torch.dtype, name: str) -> nn.Module:
    """'decoded' (or a layer gemlite cannot group): HQQDecodedLinear; 'gemlite' / 'interpreter': gemlite's kernels on
    gemlite's own packing of the layer."""
    if backend == "decoded" or not gemlite_packable(layer):
        return HQQDecodedLinear(layer, dtype, device)
    from .layers import build_linear

    return build_linear(gemlite_state(layer, device), backend, device, dtype, name)


def load_text_encoder(folder: Path, backend: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Qwen3ForCausalLM from folder/config.json and folder/qmodel.pt (every module as hqq's `from_quantized`
    fills it: HQQ layers, and every other module's tensors cast to the compute dtype)."""
    import json

    from accelerate import init_empty_weights
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = json.loads((folder / "config.json").read_text())
    for key in ("bonsai_quantization", "quantization_config"):
        config.pop(key, None)
    with init_empty_weights(include_buffers=False):
        model = Qwen3ForCausalLM(Qwen3Config.from_dict(config))
    path = folder / WEIGHTS_FILE
    layers, dense, aliases = read_qmodel(path)
    for module, layer in layers.items():
        try:
            target = model.get_submodule(module)
        except AttributeError as error:
            raise HqqError(f"{path}: {module}: an HQQ layer the model does not have") from error
        if not isinstance(target, nn.Linear) or [target.out_features, target.in_features] != list(layer.shape):
            raise HqqError(f"{path}: {module}: HQQ shape {list(layer.shape)} does not fit {target}")
        parent, _, child = module.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model, child, build_layer(layer, backend, device, dtype, module)
        )
    state = {name: (t.to(dtype) if t.is_floating_point() else t).to(device) for name, t in dense.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise HqqError(f"{path}: tensors the model does not have: {sorted(result.unexpected_keys)[:5]}")
    if "lm_head.weight" in aliases or getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.get_input_embeddings().weight
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise HqqError(f"{path}: missing tensors: {missing[:5]}")
    return model.to(device).eval()
