"""pack → packed/MLX bundles from the demo: exact codes, bits per weight, manifest, and refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import bundle_folder

from bonsai_convert.codecs import mlx as mlx_codec
from bonsai_convert.codecs import packed as packed_codec
from bonsai_convert.files import sha256_file
from bonsai_convert.inspect import inspect_bundle
from bonsai_convert.lowbit import GROUP_SIZE, dense_from_codes, is_low_bit_key
from bonsai_convert.manifest import load_manifest
from bonsai_convert.safetensors_io import SafetensorsFile, TensorSpec, float32_to_bf16_bits
from bonsai_convert.sources import open_source


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bonsai_convert", *args], capture_output=True, text=True)


def bundle_tensors(bundle: Path, component: str = "transformer") -> dict[str, np.ndarray]:
    tensors = {}
    for path in sorted(bundle_folder(bundle, component).glob("*.safetensors")):
        handle = SafetensorsFile(path)
        for key in handle.keys():
            tensors[key] = handle.load(key)
    return tensors


def source_weights(checkpoint: Path) -> dict[str, np.ndarray]:
    source = open_source(str(checkpoint))
    return {t.name: t.load() for t in source.tensors}


@pytest.mark.parametrize("variant,bpw", [("binary", 1.125), ("ternary", 1.725)])
def test_packed_bundle_bits_per_weight_and_exact_codes(demo_bundle, demo_checkpoint, variant, bpw):
    bundle = demo_bundle(variant, "packed")
    report = inspect_bundle(bundle)
    assert report["target"] == "packed" and report["variant"] == variant
    assert report["low_bit_bits_per_weight"] == pytest.approx(bpw)
    assert report["components"]["transformer"]["bytes"] > 0
    stored = bundle_tensors(bundle)
    source = source_weights(demo_checkpoint(variant))
    low_bit = [name for name in source if is_low_bit_key(name)]
    assert len(low_bit) == 12 * 1 + 2 * 2  # 12 per double block, 2 per single block (Klein 4B: 5·12 + 20·2 = 100)
    for name, weight in source.items():
        if is_low_bit_key(name):
            scales = stored[name[: -len(".weight")] + ".scales"]
            codes = packed_codec.decode(stored[name], scales.shape[1] * GROUP_SIZE, variant)
            decoded = dense_from_codes(codes, scales)
            assert np.array_equal(decoded, weight.astype(np.float16)), name
        else:
            assert np.array_equal(stored[name], weight.astype(np.float16)), name


RELEASED_MLX_FILES = {
    "transformer-packed-mflux/config.json",
    "transformer-packed-mflux/quantization_config.json",
    "transformer-packed-mflux/diffusion_pytorch_model.safetensors",
    "text_encoder-mlx-4bit/config.json",
    "text_encoder-mlx-4bit/model.safetensors",
    "text_encoder-mlx-4bit/model.safetensors.index.json",
    "text_encoder-mlx-4bit/tokenizer.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer.json",
    "model_index.json",
}


@pytest.mark.parametrize("variant", ["binary", "ternary"])
@pytest.mark.parametrize("target", ["iphone", "mac"])
def test_mlx_bundle_is_the_released_layout_and_dequantizes_exactly(demo_bundle, demo_checkpoint, variant, target):
    """An independent decoder (MLX's own safetensors reader + plain mx.dequantize) gives the source weights."""
    import mlx.core as mx

    bundle = demo_bundle(variant, target)
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert RELEASED_MLX_FILES <= files, sorted(RELEASED_MLX_FILES - files)
    folder = bundle / "transformer-packed-mflux"
    config = json.loads((folder / "config.json").read_text())
    bits = mlx_codec.BITS[variant]
    assert config["quantization"] == {"group_size": 128, "bits": bits, "mode": "affine"}
    quantization = json.loads((folder / "quantization_config.json").read_text())
    assert (quantization["bits"], quantization["group_size"], quantization["solver"]) == (bits, 128, variant)
    assert "context_embedder" in quantization["skip_patterns"]
    stored = mx.load(str(folder / "diffusion_pytorch_model.safetensors"))
    source = source_weights(demo_checkpoint(variant))
    assert len(quantization["quantized_layers"]) == sum(is_low_bit_key(n) for n in source)
    for name, array in stored.items():
        assert array.dtype == (mx.uint32 if is_low_bit_key(name) else mx.bfloat16), name  # every float is BF16
    for name, weight in source.items():
        if is_low_bit_key(name):
            prefix = name[: -len(".weight")]
            scales, biases = stored[prefix + ".scales"], stored[prefix + ".biases"]
            # the loaders' exactness rule, bit for bit: ternary bias = −scale, binary bias = −scale/2
            relation = -scales if variant == "ternary" else -(scales.astype(mx.float32) / 2).astype(mx.bfloat16)
            assert np.array_equal(np.array(relation.view(mx.uint16)), np.array(biases.view(mx.uint16))), name
            dequantized = mx.dequantize(stored[name], scales, biases, group_size=128, bits=bits)
            assert np.array_equal(np.array(dequantized.astype(mx.float32)), weight), name
        else:
            assert np.array_equal(np.array(stored[name].astype(mx.float32)), weight), name
    text = bundle / "text_encoder-mlx-4bit"
    text_config = json.loads((text / "config.json").read_text())
    assert text_config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert text_config["num_hidden_layers"] == 27 and "rope_theta" in text_config  # hidden states 9/18/27 kept
    text_tensors = mx.load(str(text / "model.safetensors"))
    assert "model.norm.weight" in text_tensors and "model.layers.26.mlp.down_proj.scales" in text_tensors
    assert not any(name.startswith("model.layers.27.") for name in text_tensors)
    assert {a.dtype for a in text_tensors.values()} <= {mx.uint32, mx.bfloat16}
    vae = mx.load(str(bundle / "vae" / "diffusion_pytorch_model.safetensors"))
    assert {a.dtype for a in vae.values()} <= {mx.bfloat16, mx.int64}


def test_mlx_float16_bundle_is_declared_not_for_the_released_loaders(demo_checkpoint, tmp_path):
    from bonsai_convert.pack import PackOptions, pack

    manifest = pack(
        str(demo_checkpoint("binary")), tmp_path / "f16", PackOptions(target="iphone", golden=False, dtype="float16")
    )
    assert manifest["layout"]["dense_dtype"] == "F16" and manifest["layout"]["released_loaders"] is False
    header = SafetensorsFile(tmp_path / "f16/transformer-packed-mflux/diffusion_pytorch_model.safetensors")
    assert header.tensors["context_embedder.weight"].dtype == "F16"


def test_stock_mlx_lm_loads_the_text_encoder_strictly_and_runs_it(demo_bundle):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(demo_bundle("ternary", "iphone") / "text_encoder-mlx-4bit", strict=True)
    logits = model(mx.array([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, 512) and bool(mx.isfinite(logits).all())


def test_manifest_lists_every_file_with_true_size_and_sha256(demo_bundle):
    bundle = demo_bundle("binary", "iphone")
    manifest = load_manifest(bundle)
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert sorted([e["path"] for e in manifest["files"]] + ["manifest.json"]) == sorted(on_disk)
    for entry in manifest["files"]:
        assert (bundle / entry["path"]).stat().st_size == entry["bytes"]
        assert sha256_file(bundle / entry["path"]) == entry["sha256"]
    assert manifest["exact"] is True and manifest["golden"] == "golden/golden.json"
    assert sum(c["bytes"] for c in manifest["components"].values()) == manifest["total_bytes"]


def test_inspect_json_cli(demo_bundle):
    result = run_cli("inspect", str(demo_bundle("ternary", "packed")), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("target", "variant", "components", "low_bit_bits_per_weight", "transformer_bits_per_weight",
                "total_bytes"):  # fmt: skip
        assert key in report
    assert "transformer" in report["components"]


def _corrupt_one_weight(checkpoint: Path, out: Path) -> Path:
    """Copy a demo checkpoint with one low-bit weight nudged off the ternary grid."""
    import shutil

    from bonsai_convert.safetensors_io import SafetensorsWriter

    shutil.copytree(checkpoint, out)
    path = next((out / "transformer").glob("*.safetensors"))
    handle = SafetensorsFile(path)
    tensors = {key: handle.raw(key).copy() for key in handle.keys()}
    name = "transformer_blocks.0.attn.to_k.weight"
    values = handle.load(name).copy()
    values[3, 200] = values[3, 200] * 0.5 + 0.001
    tensors[name] = float32_to_bf16_bits(values)
    specs = [TensorSpec(key, handle.tensors[key].dtype, handle.tensors[key].shape) for key in tensors]
    del handle
    with SafetensorsWriter(path, specs, {"format": "pt"}) as writer:
        for key, value in tensors.items():
            writer.write(key, value)
    return out


def test_non_ternary_weight_is_refused_with_one_line_and_no_output(demo_checkpoint, tmp_path):
    broken = _corrupt_one_weight(demo_checkpoint("ternary"), tmp_path / "broken")
    out = tmp_path / "out"
    result = run_cli("pack", str(broken), "--target", "packed", "-o", str(out))
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "transformer_blocks.0.attn.to_k.weight" in lines[0] and "row 3, group 1" in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_existing_output_needs_force(demo_bundle, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    result = run_cli("pack", "demo:binary", "--target", "packed", "-o", str(out), "--no-golden")
    assert result.returncode == 4 and "already exists" in result.stderr
    assert list(out.iterdir()) == []


def test_packed_bundle_is_a_source_for_mlx(demo_bundle, tmp_path):
    from bonsai_convert.pack import PackOptions, pack

    packed = demo_bundle("ternary", "packed")
    direct = demo_bundle("ternary", "iphone")
    out = tmp_path / "from-packed"
    pack(str(packed), out, PackOptions(target="iphone"))
    for name in (
        "transformer-packed-mflux/diffusion_pytorch_model.safetensors",
        "text_encoder-mlx-4bit/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert sha256_file(out / name) == sha256_file(direct / name), name


def test_variant_auto_detects_and_explicit_mismatch_fails(demo_checkpoint, tmp_path):
    from bonsai_convert.errors import InputError
    from bonsai_convert.pack import PackOptions, pack

    manifest = pack(str(demo_checkpoint("binary")), tmp_path / "a", PackOptions(target="packed", golden=False))
    assert manifest["variant"] == "binary"
    with pytest.raises(InputError, match="not binary"):
        pack(str(demo_checkpoint("ternary")), tmp_path / "b",
             PackOptions(target="packed", variant="binary", golden=False))  # fmt: skip
    assert not (tmp_path / "b").exists()
