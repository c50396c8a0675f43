"""A BFL single-file FLUX.2 checkpoint (`model.diffusion_model.*` keys, fused qkv) as a source, mapped to diffusers
names by diffusers' own conversion function, streaming."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..model_shapes import KLEIN_4B_TRANSFORMER
from ..safetensors_io import SafetensorsFile
from .base import Source, SourceTensor, check_klein

BFL_PREFIX = "model.diffusion_model."
MAX_BFL_ROWS = 1 << 20  # far above any FLUX.2 tensor (27648 rows); bounds the row-index tensors built below


def _bfl_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Infer the Flux2 config of a BFL single file from its tensor shapes (KeyError/ValueError if odd)."""
    hidden, in_channels = shapes["img_in.weight"]
    double = {int(k.split(".")[1]) for k in shapes if k.startswith("double_blocks.")}
    single = {int(k.split(".")[1]) for k in shapes if k.startswith("single_blocks.")}
    for kind, blocks in (("double_blocks", double), ("single_blocks", single)):
        if blocks != set(range(len(blocks))):
            raise ValueError(f"{kind} indices {sorted(blocks)[:8]} are not 0..{len(blocks) - 1}")
    # The head dim is the length of a QK-norm scale (Klein 4B: 128); RoPE splits it over 4 equal axes.
    norm_key = "double_blocks.0.img_attn.norm.query_norm.scale" if double else "single_blocks.0.norm.query_norm.scale"
    head_dim = shapes[norm_key][0] if len(shapes.get(norm_key, ())) == 1 else KLEIN_4B_TRANSFORMER["attention_head_dim"]
    if hidden <= 0 or head_dim <= 0 or hidden % head_dim or head_dim % 4:
        raise ValueError(f"img_in.weight has {hidden} rows, not a multiple of the head dim {head_dim}")
    mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0] // 2 if double else hidden * 3
    config = dict(KLEIN_4B_TRANSFORMER)
    config.update(
        in_channels=in_channels,
        num_layers=len(double),
        num_single_layers=len(single),
        attention_head_dim=head_dim,
        axes_dims_rope=[head_dim // 4] * 4,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=shapes["txt_in.weight"][1],
        mlp_ratio=mlp_hidden / hidden,
        guidance_embeds=any(k.startswith("guidance_in.") for k in shapes),
    )
    return config


def open_bfl_file(path: Path, label: str) -> Source:
    """Map a BFL single file to diffusers names with diffusers' own conversion function, streaming.

    The conversion only renames keys and splits/swaps rows along dim 0 (qkv chunking, shift/scale swap), so we run
    it on tensors holding each row's index and read the selected rows from the memory-mapped file afterwards.
    """
    handle = SafetensorsFile(path)  # the header is validated before torch/diffusers are even imported
    keys = {key: key[len(BFL_PREFIX) :] if key.startswith(BFL_PREFIX) else key for key in handle.tensors}
    if len(set(keys.values())) != len(keys):
        raise InputError(f"{path}: the same tensor appears with and without the {BFL_PREFIX} prefix")
    shapes = {short: handle.tensors[full].shape for full, short in keys.items()}
    if "img_in.weight" not in shapes or "txt_in.weight" not in shapes:
        raise InputError(f"{path}: not a FLUX.2 BFL checkpoint (no img_in.weight / txt_in.weight)")
    for full, short in keys.items():
        if shapes[short] and shapes[short][0] > MAX_BFL_ROWS:
            raise InputError(f"{path}: tensor {full}: {shapes[short][0]} rows is not a FLUX.2 tensor")
    try:
        config = _bfl_config(shapes)
    except (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError) as error:
        raise InputError(f"{path}: not a FLUX.2 BFL checkpoint (cannot infer a config: {error!r})") from error

    import torch
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    row_ids = {short: torch.arange(shape[0] if shape else 1) for short, shape in shapes.items()}
    origin = {id(t): short for short, t in row_ids.items()}
    full_name = {short: full for full, short in keys.items()}
    mapped: dict[str, SourceTensor] = {}
    try:
        converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(row_ids))
        for name, rows in converted.items():
            source_key = origin.get(id(rows))
            if source_key is None:
                # A chunk/cat result: find the source tensor whose row count this selection came from.
                source_key = _find_source_of(name, rows, shapes)
            full = full_name[source_key]
            source_shape = shapes[source_key]
            row_list = tuple(int(r) for r in rows.reshape(-1).tolist())
            identity = row_list == tuple(range(source_shape[0] if source_shape else 1))
            shape = (len(row_list), *source_shape[1:]) if source_shape else source_shape
            mapped[name] = SourceTensor(name, shape, handle, full, None if identity else row_list)
    except InputError as error:
        raise InputError(f"{path}: {error}") from error
    except Exception as error:  # noqa: BLE001 - diffusers raises KeyError/ValueError/RuntimeError on odd keys
        raise InputError(f"{path}: cannot map BFL keys to diffusers names ({error!r})") from error
    check_klein(str(path), config, {name: t.shape for name, t in mapped.items()})
    return Source(
        label=label,
        kind="bfl",
        transformer_config=config,
        tensors=[mapped[name] for name in sorted(mapped)],
        files=[path],
    )


def _find_source_of(name: str, rows, shapes: dict[str, tuple[int, ...]]) -> str:
    """The BFL key a split/swapped diffusers tensor came from (the only renames that change rows)."""
    parts = name.split(".")
    if name.startswith("norm_out.linear"):
        return "final_layer.adaLN_modulation.1." + parts[-1]
    if name.startswith("transformer_blocks."):
        stream = "img" if parts[3] in ("to_q", "to_k", "to_v") else "txt"
        return f"double_blocks.{parts[1]}.{stream}_attn.qkv.{parts[-1]}"
    raise InputError(f"cannot trace diffusers tensor {name} back to a BFL tensor")
