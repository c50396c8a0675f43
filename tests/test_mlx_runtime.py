"""The MLX runtime (runtime/bonsai_mlx) on MLX bundles of the demo model, component by component against diffusers.

The references run diffusers/transformers in fp32 on the weights the bundle holds: the transformer's exact low-bit
weights and the text encoder's 4-bit weights dequantized in fp32 (scale·q + bias). Prompts are padded to
MAX_LENGTH tokens instead of 512 in the generation tests (both sides): MLX's Linux CPU build uses the reference
BLAS, and the full length would make the file take minutes. The text-encoder tests use the full 512.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from bonsai_common import compute_empirical_mu, flow_match_schedule, initial_noise, is_sane, psnr
from bonsai_mlx import load_pipeline
from bonsai_mlx import vae as vae_module
from bonsai_mlx.loading import load_weights
from bonsai_mlx.pipeline import latent_ids, text_ids
from bonsai_mlx.text_encoder import PromptTokenizer, PromptTruncatedWarning, load_text_encoder
from bonsai_mlx.transformer import load_transformer
from bonsai_mlx.vae import load_vae, to_uint8
from conftest import bundle_folder  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu as diffusers_mu
from mlx.utils import tree_flatten

from bonsai_convert.codecs import mlx as mlx_codec
from bonsai_convert.demo import SCHEDULER_CONFIG, TEXT_ENCODER_OUT_LAYERS, build_demo_pipeline
from bonsai_convert.lowbit import is_low_bit_key
from bonsai_convert.reference import run_reference as reference_run

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("binary", "ternary")
TARGET = "iphone"
PROMPT = "a bonsai tree"  # byte-level demo tokenizer: 38 tokens with the chat template
SIZE = 64
STEPS = 4
MAX_LENGTH = 48
OUT_LAYERS = tuple(TEXT_ENCODER_OUT_LAYERS)


# ---------------------------------------------------------------------------------------------- references


def dequantized_state(folder: Path) -> dict[str, torch.Tensor]:
    """A bundle component's tensors as fp32 torch tensors, quantized layers dequantized in fp32."""
    config = json.loads((folder / "config.json").read_text())
    quantization = config.get("quantization") or {}
    weights = load_weights(folder)
    state = {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        prefix = name.removesuffix(".weight")
        if f"{prefix}.scales" in weights:
            override = quantization.get(prefix) if isinstance(quantization.get(prefix), dict) else {}
            params = {**quantization, **override}
            value = mx.dequantize(
                value,
                weights[f"{prefix}.scales"].astype(mx.float32),
                weights[f"{prefix}.biases"].astype(mx.float32),
                group_size=params["group_size"],
                bits=params["bits"],
            )
        state[name] = torch.from_numpy(np.array(value.astype(mx.float32)))
    return state


@pytest.fixture(scope="module")
def bundle(demo_bundle):
    """bundle(variant) → an MLX bundle of the demo model."""
    return lambda variant: demo_bundle(variant, TARGET)


@pytest.fixture(scope="module")
def reference(bundle):
    """reference(variant) → the diffusers pipeline (fp32) holding exactly the bundle's weights."""
    made: dict[str, Flux2KleinPipeline] = {}

    def build(variant: str) -> Flux2KleinPipeline:
        if variant not in made:
            pipeline = build_demo_pipeline(variant, seed=0)
            folder = bundle(variant)
            transformer_state = dequantized_state(bundle_folder(folder, "transformer"))
            text_state = dequantized_state(bundle_folder(folder, "text_encoder"))
            text_state["lm_head.weight"] = text_state["model.embed_tokens.weight"]
            with torch.no_grad():
                # The demo's transformer weights are exact in fp16: the bundle must hold them bit for bit.
                for name, tensor in pipeline.transformer.state_dict().items():
                    assert torch.equal(tensor, transformer_state[name]), name
                pipeline.transformer.load_state_dict(transformer_state, strict=True)
                # The bundle stops after the last layer whose hidden state is used (Klein: 27 of 36).
                result = pipeline.text_encoder.load_state_dict(text_state, strict=False)
                assert not result.unexpected_keys
                assert all(int(k.split(".")[2]) >= max(OUT_LAYERS) for k in result.missing_keys), result.missing_keys
            pipeline.set_progress_bar_config(disable=True)
            made[variant] = pipeline
        return made[variant]

    return build


def run_reference(pipeline: Flux2KleinPipeline, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image, final latents NCHW) from diffusers with the given noise (the converter's golden helper)."""
    output = reference_run(pipeline, PROMPT, noise, STEPS, OUT_LAYERS, MAX_LENGTH)
    return output.image, output.latents


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


# ---------------------------------------------------------------------------------------------- bonsai_common


@pytest.mark.parametrize("steps", [1, 2, 4, 28])
@pytest.mark.parametrize("seq_len", [16, 1024, 4096, 6000])
@pytest.mark.parametrize(
    "config",
    [
        SCHEDULER_CONFIG,
        {**SCHEDULER_CONFIG, "shift_terminal": 0.1},
        {**SCHEDULER_CONFIG, "use_dynamic_shifting": False},
    ],
    ids=["klein", "shift_terminal", "static_shift"],
)
def test_schedule_equals_diffusers(config: dict, seq_len: int, steps: int) -> None:
    if steps == 1 and config.get("shift_terminal"):
        pytest.skip("one step with shift_terminal is 0/0 (NaN) in diffusers too")
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = diffusers_mu(image_seq_len=seq_len, num_steps=steps)
    assert compute_empirical_mu(seq_len, steps) == mu
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas, timesteps = flow_match_schedule(steps, seq_len, config)
    assert sigmas.dtype == np.float32 and timesteps.dtype == np.float32
    assert np.array_equal(sigmas, scheduler.sigmas.numpy())
    assert np.array_equal(timesteps, scheduler.timesteps.numpy())


def test_initial_noise_and_image_checks() -> None:
    noise = initial_noise(3, 512, 256)
    assert noise.shape == (1, 128, 32, 16) and noise.dtype == np.float32
    expected = np.random.default_rng(3).standard_normal((1, 128, 32, 16), dtype=np.float32)
    assert np.array_equal(noise, expected)
    reference = np.array([0.0, 2.0, -4.0])
    assert psnr(reference, reference) == pytest.approx(20 * np.log10((4 + 1e-5) / 1e-10))
    assert psnr(reference, reference + 1.0) == pytest.approx(20 * np.log10(4 + 1e-5), rel=1e-9)
    assert not is_sane(np.zeros((8, 8, 3), np.uint8))
    assert not is_sane(np.full((8, 8, 3), 128, np.uint8))
    assert is_sane(np.tile(np.array([0, 255], np.uint8), (8, 4, 3)).reshape(8, 8, 3))


# ---------------------------------------------------------------------------------------------- formats/mlx.md


def test_worked_vectors_of_the_spec() -> None:
    """formats/mlx.md §Worked example: one 128-weight row, s = 0.03125."""
    k = np.arange(128)
    binary = np.where(k % 3 == 0, 1, -1).astype(np.int8)
    ternary = (1 - k % 3).astype(np.int8)
    s = np.float16(0.03125)
    words = {
        "binary": [0x49249249, 0x92492492, 0x24924924, 0x49249249],
        "ternary": [0x86186186, 0x61861861, 0x18618618] * 2 + [0x86186186, 0x61861861],
    }
    for variant, codes, bits, scale in (("binary", binary, 1, 2 * s), ("ternary", ternary, 2, s)):
        expected = np.array([words[variant]], dtype=np.uint32)
        weight, scales, biases = mlx_codec.encode("w", codes[None], np.array([[s]], np.float16), variant)
        assert np.array_equal(weight, expected)
        assert scales.view(np.uint16)[0, 0] == np.float16(scale).view(np.uint16)
        assert biases.view(np.uint16)[0, 0] == 0xA800  # -0.03125
        dense = mx.dequantize(
            mx.array(expected), mx.array(scales), mx.array(biases), group_size=128, bits=bits, mode="affine"
        )
        assert np.array_equal(np.array(dense.astype(mx.float32))[0], codes * 0.03125)


# ---------------------------------------------------------------------------------------------- components


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformer_forward_matches_diffusers(variant: str, bundle, reference) -> None:
    folder = bundle_folder(bundle(variant), "transformer")
    model = load_transformer(folder, "float32")
    bits = {"binary": 1, "ternary": 2}[variant]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert not is_low_bit_key(f"{name}.weight"), name
        if isinstance(module, nn.QuantizedLinear):
            assert is_low_bit_key(f"{name}.weight") and (module.bits, module.group_size) == (bits, 128), name
    torch_model = reference(variant).transformer
    rng = np.random.default_rng(1)
    side, length = 4, MAX_LENGTH
    x = rng.standard_normal((1, side * side, 128), dtype=np.float32)
    context = rng.standard_normal((1, length, torch_model.config.joint_attention_dim), dtype=np.float32)
    t = np.array([0.8749241], dtype=np.float32)
    with torch.no_grad():
        expected = torch_model(
            hidden_states=torch.from_numpy(x),
            encoder_hidden_states=torch.from_numpy(context),
            timestep=torch.from_numpy(t),
            img_ids=torch.from_numpy(latent_ids(side, side))[None],
            txt_ids=torch.from_numpy(text_ids(length))[None],
            return_dict=False,
        )[0].numpy()
    actual = model(
        mx.array(x), mx.array(context), mx.array(t), img_ids=latent_ids(side, side), txt_ids=text_ids(length)
    )
    assert relative_error(np.array(actual), expected) < 1e-4

    # float16 (the device dtype) loads with fp16 scales/biases; not run here: MLX's Linux CPU build computes
    # fp16 quantized matmuls ~40x slower than fp32.
    model16 = load_transformer(folder, "float16")
    parameters = dict(tree_flatten(model16.parameters()))
    assert {v.dtype for k, v in parameters.items() if k.endswith((".scales", ".biases"))} == {mx.float16}
    assert parameters["proj_out.weight"].dtype == mx.float16
    assert parameters["single_transformer_blocks.0.attn.to_out.weight"].dtype == mx.uint32


def test_tokenizer_and_text_encoder_match_transformers(bundle, tmp_path) -> None:
    """Unquantized text encoder (fp32) at the full 512 tokens: chat template, padding, truncation, hidden states."""
    pipeline = build_demo_pipeline("binary", seed=0)
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    state = {k: mx.array(v.numpy()) for k, v in pipeline.text_encoder.state_dict().items()}
    mx.save_safetensors(str(folder / "model.safetensors"), state, metadata={"format": "mlx"})
    (folder / "config.json").write_text(pipeline.text_encoder.config.to_json_string())
    tokenizer = PromptTokenizer(bundle("binary") / "tokenizer")
    encoder = load_text_encoder(folder, None, "float32")
    for prompt in (PROMPT, "", "word " * 600):
        text = pipeline.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert tokenizer.apply_chat_template(prompt) == text
        expected_tokens = pipeline.tokenizer(text, padding="max_length", truncation=True, max_length=512)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens = tokenizer([prompt], 512)
        assert tokens.input_ids[0].tolist() == expected_tokens["input_ids"]
        assert tokens.attention_mask[0].tolist() == expected_tokens["attention_mask"]
        long = len(pipeline.tokenizer(text)["input_ids"]) > 512
        assert tokens.truncated == [long] and long == (prompt.startswith("word"))
        assert any(issubclass(w.category, PromptTruncatedWarning) for w in caught) == long
        with torch.no_grad():
            expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(
                pipeline.text_encoder, pipeline.tokenizer, prompt, hidden_states_layers=OUT_LAYERS
            ).numpy()
        actual = encoder.hidden_states(tokens.input_ids, tokens.attention_mask, OUT_LAYERS)
        assert actual.shape == expected.shape
        assert relative_error(np.array(actual), expected) < 1e-5


def test_4bit_text_encoder(bundle, reference) -> None:
    """The bundle's 4-bit encoder: equal to transformers on the dequantized weights, near the original ones."""
    folder = bundle("binary")
    config = json.loads((bundle_folder(folder, "text_encoder") / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    settings = json.loads((folder / "pipeline.json").read_text())
    encoder = load_text_encoder(
        bundle_folder(folder, "text_encoder"), settings["text_encoder_num_hidden_layers"], "float32"
    )
    quantized = [name for name, m in encoder.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(quantized) == 7 * len(encoder.model.model.layers)
    assert isinstance(encoder.model.model.embed_tokens, nn.QuantizedEmbedding)
    tokens = PromptTokenizer(folder / "tokenizer")([PROMPT], 512)
    actual = np.array(encoder.hidden_states(tokens.input_ids, tokens.attention_mask, OUT_LAYERS))
    tokenizer = reference("binary").tokenizer
    with torch.no_grad():
        on_shipped = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            reference("binary").text_encoder, tokenizer, PROMPT, hidden_states_layers=OUT_LAYERS
        ).numpy()
        original = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            build_demo_pipeline("binary", seed=0).text_encoder, tokenizer, PROMPT, hidden_states_layers=OUT_LAYERS
        ).numpy()
    assert relative_error(actual, on_shipped) < 1e-5
    # 4-bit error of the tiny random encoder (one 64-weight group per row) after 27 of its 36 layers: measured
    # 32 % RMS; the check above (bundle == transformers on the shipped weights) is the exact one.
    assert np.linalg.norm(actual - original) / np.linalg.norm(original) < 0.45
    assert (actual * original).sum() / (np.linalg.norm(actual) * np.linalg.norm(original)) > 0.9


def test_vae_decode_matches_diffusers(bundle, reference) -> None:
    vae = load_vae(bundle_folder(bundle("binary"), "vae"), "float32")
    torch_vae = reference("binary").vae
    latents = np.random.default_rng(2).standard_normal((1, 128, 4, 6), dtype=np.float32)
    with torch.no_grad():
        bn = torch_vae.bn
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + torch_vae.config.batch_norm_eps)
        z = Flux2KleinPipeline._unpatchify_latents(torch.from_numpy(latents) * std + bn.running_mean.view(1, -1, 1, 1))
        expected = torch_vae.decode(z, return_dict=False)[0].numpy().transpose(0, 2, 3, 1)
    z_mlx = vae.latents_to_vae(mx.array(latents.transpose(0, 2, 3, 1)))
    assert np.abs(np.array(z_mlx) - z.numpy().transpose(0, 2, 3, 1)).max() < 1e-5
    actual = np.array(vae.decode(z_mlx))
    assert actual.shape == (1, 64, 96, 3)
    assert relative_error(actual, expected) < 1e-5
    expected_uint8 = np.round(np.clip(expected[0] / 2 + 0.5, 0, 1) * 255).astype(np.int16)
    difference = np.abs(to_uint8(actual[0]).astype(np.int16) - expected_uint8)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # float rounding at a .5 boundary only


def test_tiled_decode_is_close_to_untiled(bundle, monkeypatch) -> None:
    """256² image, 128 px tiles (16 VAE-latent px, overlap 4): per-tile GroupNorm in the up blocks makes it
    inexact (28.7 dB on the demo's random VAE with its 512-channel decoder start)."""
    vae = load_vae(bundle_folder(bundle("binary"), "vae"), "float32")
    latents = np.random.default_rng(4).standard_normal((1, 16, 16, 128), dtype=np.float32)
    z = vae.latents_to_vae(mx.array(latents))
    whole = np.array(vae.decode(z))
    assert np.array_equal(np.array(vae.decode_tiled(z, 32, 8)), whole)  # one tile covers the image
    tiled = np.array(vae.decode_tiled(z, 16, 4))
    assert tiled.shape == whole.shape
    assert psnr(to_uint8(whole[0]), to_uint8(tiled[0])) > 27
    # The mid-block attention in query chunks is the same maths; the BLAS blocks a 100-row product differently
    # from the whole one, so fp32 sums may differ in the last bits (measured up to 8.9e-6 on values of ~1).
    monkeypatch.setattr(vae_module, "ATTENTION_QUERY_CHUNK", 100)
    assert np.abs(np.array(vae.decode(z)) - whole).max() < 3e-5


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_matches_diffusers(variant: str, bundle, reference) -> None:
    seed = 5
    noise = initial_noise(seed, SIZE, SIZE)
    expected_image, expected_latents = run_reference(reference(variant), noise)
    pipeline = load_pipeline(bundle(variant), "float32", max_sequence_length=MAX_LENGTH)
    assert pipeline.settings["vae_tile"] == 256  # the iphone profile; a 64² image is a single tile
    steps_seen = []
    result = pipeline.generate(PROMPT, seed=seed, width=SIZE, height=SIZE, on_step=lambda i, n, s: steps_seen.append(i))
    assert result.image.shape == (SIZE, SIZE, 3) and result.image.dtype == np.uint8
    assert result.latents.shape == (1, 128, SIZE // 16, SIZE // 16) and result.latents.dtype == np.float32
    assert len(result.step_seconds) == STEPS and steps_seen == list(range(STEPS))
    assert result.peak_memory_bytes > 0 and result.truncated is False
    assert relative_error(result.latents, expected_latents) < 1e-4
    assert psnr(expected_image, result.image) >= 40
    assert is_sane(result.image)


def test_runtime_imports_neither_torch_nor_converter(bundle) -> None:
    """bonsai_mlx generates with torch and bonsai_convert made unimportable."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['bonsai_convert'] = None\n"
        "import bonsai_mlx\n"
        "bonsai_mlx.enable_cpu_speedups()\n"
        "from bonsai_mlx import load_pipeline\n"
        f"p = load_pipeline({str(bundle('ternary'))!r}, 'float32', max_sequence_length=24)\n"
        "r = p.generate('a cat', seed=1, steps=1, width=32, height=32)\n"
        "assert r.image.shape == (32, 32, 3)\n"
        "loaded = [m for m, v in sys.modules.items() if v is not None]\n"
        "assert not [m for m in loaded if m.startswith(('torch', 'bonsai_convert', 'diffusers'))], loaded\n"
        "print('ok')\n"
    )
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")]),
    }
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environment, cwd="/"
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().endswith("ok")
