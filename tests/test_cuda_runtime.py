"""The CUDA runtime on a Gemlite bundle of the demo model: exact CPU fallback, image equal to diffusers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bonsai_common.image import psnr
from bonsai_common.noise import initial_noise
from bonsai_cuda import GemliteDecodedLinear, dequantize_state, gemlite_available, generate, load_pipeline
from bonsai_cuda.pipeline import BundleError

from bonsai_convert.codecs import gemlite as codec
from bonsai_convert.demo import TEXT_ENCODER_CONFIG, TEXT_ENCODER_OUT_LAYERS, build_demo_pipeline
from bonsai_convert.lowbit import is_low_bit_key, split_exact
from bonsai_convert.safetensors_io import DTYPE_OF_NUMPY, SafetensorsWriter, TensorSpec

SIZE = 64
STEPS = 4
PROMPT = "a bonsai tree on a desk"


def _write_shards(folder: Path, tensors: dict[str, np.ndarray], shards: int) -> None:
    """model-0000i-of-0000N.safetensors in name order + model.safetensors.index.json, as formats/bundle.md."""
    names = sorted(tensors)
    weight_map = {}
    for index, chunk in enumerate(np.array_split(np.array(names, dtype=object), shards), start=1):
        file_name = f"model-{index:05d}-of-{shards:05d}.safetensors"
        specs = [TensorSpec(n, DTYPE_OF_NUMPY[tensors[n].dtype.str], tuple(tensors[n].shape)) for n in chunk]
        with SafetensorsWriter(folder / file_name, specs, {"format": "pt"}) as writer:
            for name in chunk:
                writer.write(name, tensors[name])
                weight_map[name] = file_name
    index = {
        "metadata": {"total_size": sum(int(t.nbytes) for t in tensors.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_cuda_bundle(out: Path, variant: str, reference) -> Path:
    """A CUDA-layout bundle of the demo pipeline: Gemlite low-bit linears (our encoder), the rest fp16."""
    transformer_dir = out / "transformer"
    transformer_dir.mkdir(parents=True)
    tensors: dict[str, np.ndarray] = {}
    low_bit = []
    for name, tensor in reference.transformer.state_dict().items():
        values = tensor.numpy()
        if is_low_bit_key(name):
            low = split_exact(name, values, variant)
            prefix = name[: -len(".weight")]
            tensors.update({f"{prefix}.{key}": v for key, v in codec.encode(low.codes, low.scales, variant).items()})
            low_bit.append(prefix)
        else:
            tensors[name] = values.astype(np.float16)
    _write_shards(transformer_dir, tensors, shards=2)
    reference.transformer.save_config(transformer_dir)
    config = json.loads((transformer_dir / "config.json").read_text())
    config["quantization"] = {"format": "gemlite", "variant": variant, "bits": codec.VARIANT_BITS[variant],
                              "group_size": codec.GROUP_SIZE, "modules": low_bit}  # fmt: skip
    (transformer_dir / "config.json").write_text(json.dumps(config, indent=2))
    copy.deepcopy(reference.text_encoder).to(torch.float16).save_pretrained(out / "text_encoder")
    copy.deepcopy(reference.vae).to(torch.float16).save_pretrained(out / "vae")
    reference.tokenizer.save_pretrained(out / "tokenizer")
    reference.scheduler.save_pretrained(out / "scheduler")
    settings = {
        "format_version": 1, "target": "cuda", "variant": variant, "transformer_only": False,
        "text_encoder_out_layers": list(TEXT_ENCODER_OUT_LAYERS),
        "text_encoder_num_hidden_layers": TEXT_ENCODER_CONFIG["num_hidden_layers"],
        "max_sequence_length": 512,
        "num_inference_steps": STEPS, "guidance_scale": 1.0, "width": SIZE, "height": SIZE, "vae_tile": None,
        "compute_dtype": "float16", "profile": {},
    }  # fmt: skip
    (out / "pipeline.json").write_text(json.dumps(settings, indent=2))
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """demo(variant) → (bundle path, fp32 diffusers reference pipeline on the same weights)."""
    made = {}

    def build(variant: str):
        if variant not in made:
            reference = build_demo_pipeline(variant, seed=0)
            reference.set_progress_bar_config(disable=True)
            bundle = write_cuda_bundle(tmp_path_factory.mktemp(f"cuda-{variant}") / "bundle", variant, reference)
            made[variant] = (bundle, reference)
        return made[variant]

    return build


def _reference_run(reference, noise: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """diffusers' own output image (float, H×W×3) and final packed latents (1, h·w, 128) for this noise."""
    captured = {}

    def keep(_pipe, _step, _timestep, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    with torch.no_grad():
        images = reference(
            prompt=PROMPT,
            latents=torch.from_numpy(noise),
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            text_encoder_out_layers=TEXT_ENCODER_OUT_LAYERS,
            output_type="np",
            callback_on_step_end=keep,
        ).images
    return images[0], captured["latents"]


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_fallback_decodes_every_low_bit_layer_exactly(demo, variant: str) -> None:
    bundle, reference = demo(variant)
    pipe = load_pipeline(bundle, device="cpu", dtype=torch.float32)
    assert pipe.bonsai_settings["backend"] == "decoded"
    source = dict(reference.transformer.named_parameters())
    loaded = dict(pipe.transformer.named_modules())
    low_bit = [name for name in source if is_low_bit_key(name)]
    assert len(low_bit) == 16
    for name in low_bit:
        module = loaded[name[: -len(".weight")]]
        assert isinstance(module, GemliteDecodedLinear)
        assert module.weight is None  # packed tensors resident; the dense weight is made per forward
        weight = module.dense_weight()
        assert weight.dtype == torch.float32 and torch.equal(weight, source[name].detach())
    for name, value in pipe.transformer.named_parameters():
        assert torch.equal(value, source[name].detach()), name  # the fp16-exact rest is unchanged too


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_fallback_image_matches_diffusers_reference(demo, variant: str) -> None:
    bundle, reference = demo(variant)
    pipe = load_pipeline(bundle, device="cpu", dtype=torch.float32)
    noise = initial_noise(7, SIZE, SIZE)
    ours = generate(pipe, PROMPT, seed=7, steps=STEPS, width=SIZE, height=SIZE)
    expected, packed = _reference_run(reference, noise)
    expected_image = np.clip(np.round(expected * 255.0), 0, 255).astype(np.uint8)
    assert ours.image.shape == (SIZE, SIZE, 3) and ours.image.dtype == np.uint8
    assert psnr(expected_image, ours.image) >= 40.0
    assert len(ours.step_seconds) == STEPS and all(t > 0 for t in ours.step_seconds)
    # The final latents in NCHW, unpacked by diffusers' own position-id scatter.
    side = SIZE // 16
    ids = reference._prepare_latent_ids(torch.from_numpy(noise))
    expected_latents = reference._unpack_latents_with_ids(packed, ids, side, side).numpy()
    assert ours.latents.shape == (1, 128, side, side) and ours.latents.dtype == np.float32
    np.testing.assert_allclose(ours.latents, expected_latents, atol=1e-5, rtol=1e-5)


def test_generate_uses_given_noise(demo) -> None:
    bundle, _ = demo("binary")
    pipe = load_pipeline(bundle, device="cpu", dtype=torch.float32)
    noise = initial_noise(3, SIZE, SIZE)
    first = generate(pipe, PROMPT, seed=99, steps=1, width=SIZE, height=SIZE, noise=noise)
    second = generate(pipe, PROMPT, seed=3, steps=1, width=SIZE, height=SIZE)
    assert np.array_equal(first.image, second.image) and np.array_equal(first.latents, second.latents)
    with pytest.raises(ValueError, match="noise must be"):
        generate(pipe, PROMPT, seed=3, steps=1, width=SIZE, height=SIZE, noise=noise[:, :, :2])


def test_torch_decoder_agrees_with_numpy_codec() -> None:
    """Two decoders written from formats/gemlite.md, torch (runtime) and numpy (converter), incl. 4-bit."""
    rng = np.random.default_rng(5)
    states = []
    for variant, shape in [
        ("binary", (5, 384)),
        ("ternary", (7, 128)),
        ("binary", (3, 128)),
        ("ternary", (4, 256)),
    ]:
        values = (-1, 1) if variant == "binary" else (-1, 0, 1)
        codes = rng.choice(np.array(values, np.int8), size=shape)
        scales = rng.uniform(1e-6, 3, (shape[0], shape[1] // 128)).astype(np.float16)
        states.append(codec.encode(codes, scales, variant))
    q = rng.integers(0, 16, (6, 256), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.1, (6, 4)).astype(np.float16)
    states.append(codec.encode_affine(q, scales, rng.uniform(0, 15, (6, 4)).astype(np.float16), 4, 64))
    states.append(codec.encode_affine(q, scales, 8, 4, 64))
    for state in states:
        torch_state = {key: torch.from_numpy(np.array(value)) for key, value in state.items()}
        ours = dequantize_state(torch_state).numpy()
        assert ours.tobytes() == codec.dequantize(state).tobytes()


def test_float32_decode_is_shown_exact_on_our_layouts_and_falls_back_otherwise() -> None:
    """The load-time shortcut (no float64 pass) says exact only where the float32 decode equals dequantize_state
    bit for bit; an fp16 zero that makes q·s + z inexact in float32 goes through the float64 comparison."""
    from bonsai_cuda.layers import check_layout, dequantize_fast, float32_decode_is_exact

    rng = np.random.default_rng(7)
    exact_states = []
    for variant in ("binary", "ternary"):
        codes = rng.choice(np.array((-1, 0, 1) if variant == "ternary" else (-1, 1), np.int8), size=(300, 256))
        exact_states.append(codec.encode(codes, rng.uniform(1e-6, 3, (300, 2)).astype(np.float16), variant))
    q = rng.integers(0, 16, (300, 256), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.1, (300, 4)).astype(np.float16)
    exact_states.append(codec.encode_affine(q, scales, rng.uniform(0, 15, (300, 4)).astype(np.float16), 4, 64))
    as_torch = lambda state: {key: torch.from_numpy(np.array(value)) for key, value in state.items()}  # noqa: E731
    for state in map(as_torch, exact_states):
        meta = check_layout(state)
        assert float32_decode_is_exact(state, meta, rows_per_pass=128)
        fast = dequantize_fast(state, meta, torch.float16)
        assert torch.equal(fast.view(torch.int16), dequantize_state(state).view(torch.int16))
    inexact = as_torch(exact_states[-1])
    inexact["scales"][:, 0] = 1024.0  # 15 · 1024 + 2⁻²⁴·k needs more than float32's 24 bits
    inexact["zeros"][:, 0] = torch.tensor(2.0**-24 * 3, dtype=torch.float16)
    inexact["W_q"][:] = -1  # every code 15
    meta = check_layout(inexact)
    assert not float32_decode_is_exact(inexact, meta, rows_per_pass=128)
    layer = GemliteDecodedLinear(inexact, torch.float32, "cpu", "inexact")
    assert torch.equal(layer.dense_weight(), dequantize_state(inexact).to(torch.float32))


def test_transformer_only_bundle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pipeline.json").write_text(json.dumps({"transformer_only": True}))
    with pytest.raises(BundleError, match="transformer-only"):
        load_pipeline(tmp_path, device="cpu")


def test_corrupt_low_bit_tensors_are_refused(demo, tmp_path: Path) -> None:
    bundle, _ = demo("ternary")
    import shutil

    broken = shutil.copytree(bundle, tmp_path / "broken")
    from safetensors.numpy import load_file

    folder = broken / "transformer"
    tensors = {}
    for path in sorted(folder.glob("model-*.safetensors")):
        tensors.update(load_file(str(path)))
        path.unlink()
    tensors["transformer_blocks.0.attn.to_q.metadata"][1] = 4  # claims 4-bit: W_q no longer fits
    (folder / "model.safetensors.index.json").unlink()
    _write_shards(folder, tensors, shards=1)
    with pytest.raises(BundleError, match="to_q"):
        load_pipeline(broken, device="cpu", dtype=torch.float32)


def _affine_4bit(weight: np.ndarray, group: int = 64) -> dict[str, np.ndarray]:
    """Min-max 4-bit affine quantization (as HQQ's layout: W ≈ (q − z)·s per group) in Gemlite tensors."""
    rows, cols = weight.shape
    grouped = weight.reshape(rows, cols // group, group).astype(np.float32)
    low, high = grouped.min(-1), grouped.max(-1)
    scales = np.maximum((high - low) / 15, 1e-4).astype(np.float16)
    zeros = (-low / scales.astype(np.float32)).astype(np.float16)
    q = np.rint(grouped / scales[..., None].astype(np.float32) + zeros[..., None].astype(np.float32))
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(rows, cols)
    return codec.encode_affine(q, scales, zeros, 4, group)


def test_quantized_text_encoder_loads_from_gemlite_tensors(demo, tmp_path: Path) -> None:
    """A 4-bit text encoder in Gemlite tensors goes through the same generic loader (tied lm_head kept)."""
    import re
    import shutil

    bundle, reference = demo("binary")
    copy_root = shutil.copytree(bundle, tmp_path / "bundle")
    folder = copy_root / "text_encoder"
    config = json.loads((folder / "config.json").read_text())
    shutil.rmtree(folder)
    folder.mkdir()
    tensors, states = {}, {}
    pattern = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
    for name, value in reference.text_encoder.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        if pattern.match(name) and value.shape[1] % 64 == 0:
            prefix = name[: -len(".weight")]
            states[prefix] = _affine_4bit(value.numpy())
            tensors.update({f"{prefix}.{key}": v for key, v in states[prefix].items()})
        else:
            tensors[name] = value.numpy().astype(np.float16)
    _write_shards(folder, tensors, shards=1)
    config["quantization"] = {"format": "gemlite", "bits": 4, "group_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    pipe = load_pipeline(copy_root, device="cpu", dtype=torch.float32)
    modules = dict(pipe.text_encoder.named_modules())
    assert len(states) == 7 * reference.text_encoder.config.num_hidden_layers
    for prefix, state in states.items():
        assert isinstance(modules[prefix], GemliteDecodedLinear)
        expected = torch.from_numpy(codec.dequantize(state).astype(np.float32))
        assert torch.equal(modules[prefix].dense_weight(), expected)
    text_encoder = pipe.text_encoder
    assert text_encoder.lm_head.weight is text_encoder.get_input_embeddings().weight
    result = generate(pipe, PROMPT, seed=1, steps=2, width=SIZE, height=SIZE)
    assert result.image.shape == (SIZE, SIZE, 3) and np.isfinite(result.latents).all()


gpu = pytest.mark.skipif(not gemlite_available(), reason="needs CUDA and gemlite")


@gpu
@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_gemlite_layers_on_gpu(demo, variant: str) -> None:  # pragma: no cover - GPU only
    from gemlite.core import GemLiteLinearTriton

    bundle, _ = demo(variant)
    fallback = generate(load_pipeline(bundle, device="cpu", dtype=torch.float32), PROMPT, 7, STEPS, SIZE, SIZE)
    pipe = load_pipeline(bundle, device="cuda", dtype=torch.float16)
    assert pipe.bonsai_settings["backend"] == "gemlite"
    assert any(isinstance(m, GemLiteLinearTriton) for m in pipe.transformer.modules())
    ours = generate(pipe, PROMPT, 7, STEPS, SIZE, SIZE)
    assert psnr(fallback.image, ours.image) >= 30.0
