"""The offline demo checkpoint: a tiny trained-looking FLUX.2 Klein pipeline in the full diffusers layout.

Every low-bit linear holds exact binary (±s) or ternary (−s, 0, +s) values with one scale per 128 weights,
stored in bf16 like the real release. All other weights are random but chosen to be exactly representable in
both bf16 and fp16, so the fp16 bundle and the fp32 reference see identical numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .lowbit import GROUP_SIZE, is_low_bit_key

DEMO_SOURCES = ("demo:binary", "demo:ternary")

# Tiny configs with FLUX.2 [klein]'s structure (model_shapes.KLEIN_4B_TRANSFORMER), but hidden 640 = 10 heads × 64:
# every low-bit in_features (640, 1920, 2560) is divisible by 128 (group size) and by 5 (ternary bytes), so no row
# needs padding.
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=128,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=64,
    num_attention_heads=10,
    joint_attention_dim=192,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(16, 16, 16, 16),
    rope_theta=2000,
    guidance_embeds=False,
)
# Qwen3-4B's structure where loaders hardcode it: 36 layers deep (narrow: hidden 64), hidden states 9/18/27, so
# packing cuts the encoder after layer 27 exactly as for the real model.
TEXT_ENCODER_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=36,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
# 128 prompt tokens instead of Klein's 512 (the byte-level demo tokenizer spends one token per character):
# the demo then generates in seconds on MLX's CPU backend.
MAX_SEQUENCE_LENGTH = 128
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)  # Klein's; joint_attention_dim = 3 layers × hidden 64 (4-bit group 64 applies)
# Klein's VAE where the loaders hardcode it (decoder conv_in / mid block at 512 channels, GroupNorm 32 groups,
# 32 latent channels); the outer blocks stay narrow and one layer deep so the demo stays small.
VAE_CONFIG = dict(block_out_channels=(32, 32, 32, 512), layers_per_block=1, latent_channels=32, norm_num_groups=32)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template (system / user / assistant turns, reasoning stripped from earlier assistant turns, and the
# enable_thinking switch the pipeline sets to False); tool calling is left out: the pipeline never uses it.
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}"
    "{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def demo_variant(source: str) -> str | None:
    """'binary'/'ternary' for a `demo:...` source string, else None."""
    if source in DEMO_SOURCES:
        return source.split(":", 1)[1]
    return None


def _fp16_and_bf16_exact(values: np.ndarray) -> np.ndarray:
    """Round to 7 mantissa bits and flush values below fp16's normal range, so bf16 and fp16 hold them exactly."""
    mantissa, exponent = np.frexp(values.astype(np.float64))
    rounded = np.ldexp(np.round(mantissa * 256) / 256, exponent)
    rounded[np.abs(rounded) < 2.0**-14] = 0.0
    return np.clip(rounded, -60000, 60000).astype(np.float32)


def exact_low_bit_weight(shape: tuple[int, int], variant: str, rng: np.random.Generator) -> np.ndarray:
    """Random codes × random group scales, exactly binary/ternary with scales exact in fp16 and bf16."""
    out_features, in_features = shape
    groups = in_features // GROUP_SIZE
    scales = _fp16_and_bf16_exact(rng.uniform(0.01, 0.06, size=(out_features, groups)))
    if variant == "binary":
        codes = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=shape)
    else:
        codes = rng.choice(np.array([-1.0, 0.0, 1.0], dtype=np.float32), size=shape)
    return codes * np.repeat(scales, GROUP_SIZE, axis=1)


def _build_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + alphabet)}
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], additional_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 512
    return tokenizer


def build_demo_pipeline(variant: str, seed: int = 0):
    """The tiny Flux2KleinPipeline (torch, fp32 in memory) with exact low-bit weights."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if variant not in ("binary", "ternary"):
        raise ValueError(f"unknown variant {variant!r}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    transformer = Flux2Transformer2DModel(**TRANSFORMER_CONFIG)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(**TEXT_ENCODER_CONFIG))
    vae = AutoencoderKLFlux2(**VAE_CONFIG)
    with torch.no_grad():
        for module in (text_encoder, vae):
            for tensor in module.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(torch.from_numpy(_fp16_and_bf16_exact(tensor.numpy())))
        # The random-init BatchNorm statistics are 0/1; give them plausible values.
        vae.bn.running_mean.copy_(torch.from_numpy(_fp16_and_bf16_exact(rng.normal(0, 0.1, 128))))
        vae.bn.running_var.copy_(torch.from_numpy(_fp16_and_bf16_exact(rng.uniform(0.5, 2.0, 128))))
        for name, tensor in transformer.state_dict().items():
            if is_low_bit_key(name):
                values = exact_low_bit_weight(tuple(tensor.shape), variant, rng)
            else:
                values = _fp16_and_bf16_exact(tensor.numpy() * 4.0 if name.endswith("weight") else tensor.numpy())
            tensor.copy_(torch.from_numpy(values))
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_build_tokenizer(),
        transformer=transformer,
        is_distilled=True,
    )


def write_demo(out: Path, variant: str, seed: int = 0) -> Path:
    """Write the demo checkpoint in the full diffusers layout (bf16 weights) to `out`."""
    import torch

    from .quiet import quiet_libraries

    quiet_libraries()
    pipeline = build_demo_pipeline(variant, seed)
    for component in (pipeline.transformer, pipeline.text_encoder, pipeline.vae):
        component.to(torch.bfloat16)
    pipeline.save_pretrained(out, safe_serialization=True)
    # Record what the demo is, and the pipeline settings the Bonsai release uses.
    info = {
        "variant": variant,
        "seed": seed,
        "text_encoder_out_layers": list(TEXT_ENCODER_OUT_LAYERS),
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
    }
    (out / "bonsai_demo.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
