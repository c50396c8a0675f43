"""Memory model of generation (formats/memory.md): resident weights + activations + VAE decode, per phase.

Phases follow the deployment (and the MLX runtime): (1) text encoding: the VAE (loaded when the bundle is opened)
and the text encoder, which is evicted right after; (2) denoising: the transformer, loaded after the prompt is
encoded, plus the VAE; (3) VAE decode (tiled when the profile says so), with the transformer still resident.
Tensors stored fp16 are held in the compute dtype (fp32 doubles them). Peak = the largest phase; mean active = the
denoising phase with half of its peak activations (activations rise and fall inside each block), since denoising
is almost all of the wall time.
"""

from __future__ import annotations

TEXT_TOKENS = 512
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def _transformer_dims(config: dict) -> tuple[int, int, int]:
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    mlp = int(hidden * float(config.get("mlp_ratio", 3.0)))
    return hidden, mlp, int(config["num_attention_heads"])


def text_encoder_activations(config: dict | None, out_layers: int, dtype_bytes: int, tokens: int = TEXT_TOKENS) -> int:
    """One layer's working set at the prompt length + the stacked hidden states kept for the prompt embedding."""
    if not config:
        return 0
    hidden = int(config["hidden_size"])
    intermediate = int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    per_layer = tokens * (4 * hidden + 3 * intermediate) + 2 * heads * tokens * tokens
    return (per_layer + tokens * hidden * (out_layers + 1)) * dtype_bytes


def transformer_activations(config: dict, image_tokens: int, dtype_bytes: int, text_tokens: int = TEXT_TOKENS) -> int:
    """The widest single-stream block: fused projection, MLP, attention scores (materialized: an upper bound)."""
    hidden, mlp, heads = _transformer_dims(config)
    tokens = image_tokens + text_tokens
    fused = 3 * hidden + 2 * mlp  # to_qkv_mlp_proj output width
    per_token = 4 * hidden + fused + mlp + hidden  # residual, norm, q/k/v after RoPE, fused out, act, to_out
    attention = 2 * heads * tokens * tokens  # scores + probabilities
    embeddings = text_tokens * int(config["joint_attention_dim"]) + 3 * image_tokens * int(config["in_channels"])
    return (tokens * per_token + attention + embeddings) * dtype_bytes


def vae_decode_activations(vae_config: dict | None, width: int, height: int, tile: int | None, dtype_bytes: int) -> int:
    """Full-resolution feature maps (3 live tensors of the last up block) + mid-block attention, per tile."""
    if not vae_config:
        return 0
    tile_w = min(width, tile) if tile else width
    tile_h = min(height, tile) if tile else height
    channels = list(vae_config.get("block_out_channels", [128, 256, 512, 512]))
    full_res = 3 * channels[0] * tile_w * tile_h
    latent_tokens = (tile_w // 8) * (tile_h // 8)
    mid_attention = 2 * latent_tokens * latent_tokens + 3 * channels[-1] * latent_tokens
    return (full_res + mid_attention) * dtype_bytes


def estimate_memory(model, components: dict, profile: dict, width: int, height: int, dtype: str | None = None) -> dict:
    """Peak and mean-active bytes at width×height, the profile's budget, and whether it fits (with margin)."""
    compute_dtype = dtype or profile["compute_dtype"]
    dtype_bytes = DTYPE_BYTES[compute_dtype]
    widen = dtype_bytes / 2  # fp16-stored tensors are held in the compute dtype (fp32 doubles them)
    parts = components["transformer"].get("parts", {})
    packed_codes = parts.get("low_bit_codes", 0) + parts.get("metadata", 0)
    transformer_weights = int(packed_codes + (components["transformer"]["bytes"] - packed_codes) * widen)
    vae_weights = int(components.get("vae", {}).get("bytes", 0) * widen)
    text_weights = int(components.get("text_encoder", {}).get("bytes", 0) * widen)
    image_tokens = (width // 16) * (height // 16)
    text_tokens = model.max_sequence_length
    text_act = text_encoder_activations(model.text_encoder_config, len(model.out_layers), dtype_bytes, text_tokens)
    denoise_act = transformer_activations(model.transformer_config, image_tokens, dtype_bytes, text_tokens)
    decode_act = vae_decode_activations(model.vae_config, width, height, profile["vae_tile"], dtype_bytes)
    resident = transformer_weights + vae_weights  # after the first prompt: kept between images
    phases = {
        "text_encoding": vae_weights + text_weights + text_act,  # the transformer is loaded after encoding
        "denoising": resident + denoise_act,
        "vae_decode": resident + decode_act,
    }
    peak = max(phases.values())
    mean_active = resident + denoise_act // 2
    budget = int(profile["memory_budget_bytes"])
    return {
        "width": width,
        "height": height,
        "compute_dtype": compute_dtype,
        "vae_tile": profile["vae_tile"],
        "phases": phases,
        "peak_bytes": peak,
        "mean_active_bytes": mean_active,
        "budget_bytes": budget,
        "margin_bytes": budget - peak,
        "fits": budget == 0 or peak <= budget,
        "assumptions": "text encoder loaded for encoding and evicted before the transformer is loaded; VAE resident "
        "throughout; attention scores materialized (upper bound)",
    }
