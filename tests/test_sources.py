"""Source kinds: the demo loads in diffusers as is; a BFL single file maps to the same bundle as diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bonsai_convert.files import sha256_file
from bonsai_convert.safetensors_io import SafetensorsFile, SafetensorsWriter, TensorSpec
from bonsai_convert.sources import open_source

# diffusers name part → BFL name part (the inverse of diffusers' convert_flux2_transformer_checkpoint_to_diffusers)
DOUBLE = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_add_out": "txt_attn.proj",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
SINGLE = {
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}


def to_bfl(diffusers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Diffusers-named tensors (bf16 bit patterns) → a BFL single-file state dict with the prefix."""
    out: dict[str, np.ndarray] = {}
    for name, value in diffusers.items():
        module, param = name.rsplit(".", 1)
        bfl_param = "scale" if "norm" in module and param == "weight" else param
        parts = module.split(".")
        if parts[0] == "transformer_blocks":
            index, inner = parts[1], ".".join(parts[2:])
            if inner in (
                "attn.to_q",
                "attn.to_k",
                "attn.to_v",
                "attn.add_q_proj",
                "attn.add_k_proj",
                "attn.add_v_proj",
            ):
                continue  # fused below
            out[f"double_blocks.{index}.{DOUBLE[inner]}.{bfl_param}"] = value
        elif parts[0] == "single_transformer_blocks":
            out[f"single_blocks.{parts[1]}.{SINGLE['.'.join(parts[2:])]}.{bfl_param}"] = value
        elif module == "norm_out.linear":
            scale, shift = np.split(value, 2)
            out[f"final_layer.adaLN_modulation.1.{param}"] = np.concatenate([shift, scale])
        else:
            out[f"{TOP[module]}.{param}"] = value
    blocks = {n.split(".")[1] for n in diffusers if n.startswith("transformer_blocks.")}
    for index in blocks:
        prefix = f"transformer_blocks.{index}.attn."
        out[f"double_blocks.{index}.img_attn.qkv.weight"] = np.concatenate(
            [diffusers[prefix + f"to_{x}.weight"] for x in "qkv"]
        )
        out[f"double_blocks.{index}.txt_attn.qkv.weight"] = np.concatenate(
            [diffusers[prefix + f"add_{x}_proj.weight"] for x in "qkv"]
        )
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


def test_demo_loads_with_diffusers_from_pretrained(demo_checkpoint):
    import torch
    from diffusers import Flux2KleinPipeline

    pipeline = Flux2KleinPipeline.from_pretrained(demo_checkpoint("binary"), torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        prompt="a bonsai tree",
        height=64,
        width=64,
        num_inference_steps=2,
        text_encoder_out_layers=(1, 2, 3),
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_bfl_single_file_packs_to_the_same_transformer(demo_checkpoint, demo_bundle, tmp_path, variant):
    from bonsai_convert.pack import PackOptions, pack

    weights = SafetensorsFile(next((demo_checkpoint(variant) / "transformer").glob("*.safetensors")))
    bfl = to_bfl({name: np.asarray(weights.raw(name)) for name in weights.keys()})
    path = tmp_path / "flux-2-klein-demo.safetensors"
    with SafetensorsWriter(path, [TensorSpec(k, "BF16", v.shape) for k, v in bfl.items()], {}) as writer:
        for name, value in bfl.items():
            writer.write(name, value)
    source = open_source(str(path))
    assert source.kind == "bfl" and source.transformer_config["num_attention_heads"] == 10
    pack(str(path), tmp_path / "bundle", PackOptions(target="packed"))
    direct = demo_bundle(variant, "packed")
    shard = Path("transformer/model-00001-of-00001.safetensors")
    assert sha256_file(tmp_path / "bundle" / shard) == sha256_file(direct / shard)


def test_shape_tables_are_cached_on_disk_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    """A second process reads a config's shapes from `<cache>/shapes/` without importing diffusers (7–8 s of a
    pack); a damaged entry is rebuilt."""
    import json
    import subprocess
    import sys

    from bonsai_convert import model_shapes

    monkeypatch.setenv("BONSAI_CONVERT_CACHE", str(tmp_path))
    config = dict(model_shapes.KLEIN_4B_TRANSFORMER, num_layers=1, num_single_layers=1)
    model_shapes._transformer_shapes.cache_clear()
    built = model_shapes.transformer_shapes(config)
    (entry,) = (tmp_path / "shapes").glob("*.json")
    probe = (
        "import json, sys\n"
        "from bonsai_convert.model_shapes import transformer_shapes\n"
        f"shapes = transformer_shapes(json.loads({json.dumps(json.dumps(config))}))\n"
        "print(json.dumps({'diffusers': 'diffusers' in sys.modules, 'shapes': shapes}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    assert report["diffusers"] is False
    assert {name: tuple(shape) for name, shape in report["shapes"].items()} == built
    entry.write_text("{not json")
    model_shapes._transformer_shapes.cache_clear()
    assert model_shapes.transformer_shapes(config) == built
    assert {name: tuple(shape) for name, shape in json.loads(entry.read_text()).items()} == built
    model_shapes._transformer_shapes.cache_clear()
