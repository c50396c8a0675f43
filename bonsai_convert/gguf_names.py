"""Diffusers ↔ BFL tensor names of a FLUX.2 transformer, as the GGUF target writes them (formats/gguf.md).

The inverse of diffusers' convert_flux2_transformer_checkpoint_to_diffusers: q/k/v of a double block are the three
row thirds of one BFL `qkv` tensor, QK-norm weights are BFL `.scale`, and norm_out.linear's two row halves are
swapped (diffusers' (scale, shift) vs BFL's (shift, scale)).
"""

from __future__ import annotations

import re

_TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0),
    "attn.to_add_out": ("txt_attn.proj", 0),
    "ff.linear_in": ("img_mlp.0", 0),
    "ff.linear_out": ("img_mlp.2", 0),
    "ff_context.linear_in": ("txt_mlp.0", 0),
    "ff_context.linear_out": ("txt_mlp.2", 0),
    "attn.norm_q": ("img_attn.norm.query_norm", 0),
    "attn.norm_k": ("img_attn.norm.key_norm", 0),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", 0),
    "attn.norm_added_k": ("txt_attn.norm.key_norm", 0),
}
_SINGLE_BLOCK = {
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)$")
FUSED_PARTS = 3  # q, k, v


def bfl_place(name: str) -> tuple[str, int, bool]:
    """(BFL tensor name, which third of a fused qkv it fills (0 if not fused), halves swapped) of a diffusers name.

    The inverse of diffusers' convert_flux2_transformer_checkpoint_to_diffusers; QK-norm weights are BFL `.scale`.
    """
    match = _BLOCK.match(name)
    if match:
        kind, index, module, param = match.groups()
        if kind == "transformer_blocks" and module in _DOUBLE_BLOCK:
            target, part = _DOUBLE_BLOCK[module]
            param = "scale" if ".norm." in f".{target}." else param
            return f"double_blocks.{index}.{target}.{param}", part, False
        if kind == "single_transformer_blocks" and module in _SINGLE_BLOCK:
            target = _SINGLE_BLOCK[module]
            param = "scale" if target.startswith("norm.") else param
            return f"single_blocks.{index}.{target}.{param}", 0, False
        raise ValueError(f"{name}: no BFL name for this FLUX.2 tensor")
    module, _, param = name.rpartition(".")
    if module not in _TOP_LEVEL:
        raise ValueError(f"{name}: no BFL name for this FLUX.2 tensor")
    return f"{_TOP_LEVEL[module]}.{param}", 0, module == "norm_out.linear"


def is_fused(bfl_name: str) -> bool:
    return ".qkv." in bfl_name


_DOUBLE_BFL = re.compile(r"^double_blocks\.(\d+)\.(.+)\.(weight|bias|scale)$")
_SINGLE_BFL = re.compile(r"^single_blocks\.(\d+)\.(.+)\.(weight|bias|scale)$")


def diffusers_parts(bfl_name: str, rows: int) -> list[tuple[str, int, int, bool]]:
    """The diffusers tensors a BFL tensor of `rows` rows holds: (name, first row, stop row, halves swapped)."""
    param_of = {"scale": "weight"}
    match = _DOUBLE_BFL.match(bfl_name)
    if match:
        index, module, param = match.groups()
        names = [(part, name) for name, (target, part) in _DOUBLE_BLOCK.items() if target == module]
        if not names:
            raise ValueError(f"{bfl_name}: not a FLUX.2 tensor name")
        count = len(names)
        if rows % count:
            raise ValueError(f"{bfl_name}: {rows} rows do not split into {count} parts")
        step = rows // count
        return [
            (f"transformer_blocks.{index}.{name}.{param_of.get(param, param)}", part * step, (part + 1) * step, False)
            for part, name in sorted(names)
        ]
    match = _SINGLE_BFL.match(bfl_name)
    if match:
        index, module, param = match.groups()
        names = [name for name, target in _SINGLE_BLOCK.items() if target == module]
        if not names:
            raise ValueError(f"{bfl_name}: not a FLUX.2 tensor name")
        return [(f"single_transformer_blocks.{index}.{names[0]}.{param_of.get(param, param)}", 0, rows, False)]
    module, _, param = bfl_name.rpartition(".")
    names = [name for name, target in _TOP_LEVEL.items() if target == module]
    if not names or param not in ("weight", "bias"):
        raise ValueError(f"{bfl_name}: not a FLUX.2 tensor name")
    return [(f"{names[0]}.{param}", 0, rows, names[0] == "norm_out.linear")]
