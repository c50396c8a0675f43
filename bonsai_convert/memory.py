"""Memory model of generation (formats/memory.md): resident weights + activations + VAE decode, per phase.

Phases follow the deployment (and the MLX runtime) for a first image: (1) text encoding: the text encoder, freed
right after; (2) denoising: the transformer, loaded after the prompt is encoded; (3) VAE decode (tiled when the
profile says so): the VAE, whose weights MLX reads on first use, with the transformer still resident.
Tensors stored fp16 are held in the compute dtype (fp32 doubles them). Peak = the largest phase; mean active = the
denoising phase with half of its peak activations (activations rise and fall inside each block), since denoising
is almost all of the wall time.
"""

from __future__ import annotations

from .vocabulary import MEMORY_DEVICES

TEXT_TOKENS = 512
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
# bonsai_mlx.cpu_layers.DENSE_CHUNK_VALUES (the runtime is not imported here; tests/test_memory_model.py compares)
DENSE_CHUNK_VALUES = 1 << 24
# mlx-lm 4-bit, group 64: 32 bytes of codes and a bf16 scale and bias per group; the codes are not widened
MLX_TEXT_CODE_SHARE = 32 / 36


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


GROUP_NORM_TEMPORARIES = 5  # GroupNorm + SiLU of a feature map: 5 maps of temporaries (measured on MLX)


def conv_stage(c_in: int, c_out: int, pixels: int, unfold: bool, kept: int = 0) -> int:
    """Values live while one 3×3 convolution runs: its input, the padded input, the unfolded input (9·C_in per
    pixel, where the backend convolves by explicit GEMM: MLX's CPU), the output, plus `kept` held meanwhile."""
    return kept + pixels * ((2 + (9 if unfold else 0)) * c_in + c_out)


def vae_decode_activations(
    vae_config: dict | None, width: int, height: int, tile: int | None, dtype_bytes: int, unfold: bool = False
) -> int:
    """The largest stage of the decoder, evaluated stage by stage as the runtime does (per tile): every resnet
    GroupNorm and 3×3 convolution (the block input kept for the residual) and every upsampler (nearest 2× then a
    3×3 convolution) at its resolution, and the mid-block attention at latent resolution."""
    if not vae_config:
        return 0
    tile_w = min(width, tile) if tile else width
    tile_h = min(height, tile) if tile else height
    channels = list(vae_config.get("block_out_channels", [128, 256, 512, 512]))
    resnets = int(vae_config.get("layers_per_block", 2)) + 1
    pixels = (tile_w // 8) * (tile_h // 8)  # latent resolution
    widest = 3 * channels[-1] * pixels + 2 * pixels * pixels  # mid-block attention (scores + probabilities)
    previous = channels[-1]
    for index, c_out in enumerate(reversed(channels)):
        for r in range(resnets):
            c_in = previous if r == 0 else c_out
            widest = max(
                widest,
                pixels * c_in * (1 + GROUP_NORM_TEMPORARIES),
                conv_stage(c_in, c_out, pixels, unfold, kept=pixels * c_in),
                conv_stage(c_out, c_out, pixels, unfold, kept=pixels * c_in),
            )
        previous = c_out
        if index < len(channels) - 1:  # upsampler: the input kept while its 4× larger copy is convolved
            pixels *= 4
            widest = max(widest, conv_stage(c_out, c_out, pixels, unfold, kept=pixels * c_out // 4))
    out_channels = int(vae_config.get("out_channels", 3))
    widest = max(widest, conv_stage(channels[0], out_channels, pixels, unfold))
    return widest * dtype_bytes


def cpu_dequantized_bytes(out_features: int, in_features: int, tokens: int, dtype_bytes: int, bits: int = 4) -> int:
    """What one low-bit linear adds on MLX's CPU device (bonsai_mlx.cpu_layers.DequantizedLinear): a block of at
    most DENSE_CHUNK_VALUES weights dequantized to fp32 at a time (the product runs in fp32 whatever the compute
    dtype), plus, when the layer ran in blocks, the concatenated output. Per weight of a block (measured): 1-/2-bit
    layers (unpacked in one fused pass) hold just the fp32 block, 4 bytes; 4-bit ones (`mx.dequantize`, which peaks
    at twice its output) 8. A 16-bit compute dtype adds the widened input and one block's fp32 product."""
    block_rows = min(out_features, max(1, DENSE_CHUNK_VALUES // in_features))
    per_value = 4 if bits in (1, 2) else 8
    widened = 4 * tokens * (in_features + block_rows) if dtype_bytes < 4 else 0
    concatenated = tokens * out_features * dtype_bytes if out_features > block_rows else 0
    return block_rows * in_features * per_value + widened + concatenated


def linear_shapes(tensors: dict | None, is_linear) -> list[tuple[int, int]]:
    """The distinct (out, in) shapes of the tensors (name → (shape, dtype)) whose name `is_linear` accepts."""
    return sorted({(int(s[0]), int(s[1])) for name, (s, _) in (tensors or {}).items() if is_linear(name)})


def transformer_linear_shapes(model) -> list[tuple[int, int]]:
    """(out, in) of every low-bit linear of the transformer."""
    from .lowbit import is_low_bit_key

    return linear_shapes(model.transformer, is_low_bit_key)


def text_linear_shapes(model) -> list[tuple[int, int]]:
    """(out, in) of the Qwen3 linears, every `*_proj.weight` (all 4-bit in the MLX bundles)."""
    return linear_shapes(model.text_encoder, lambda name: name.endswith("_proj.weight"))


def cpu_linear_term(shapes: list[tuple[int, int]], tokens: int, dtype_bytes: int, bits: int) -> int:
    return max((cpu_dequantized_bytes(o, i, tokens, dtype_bytes, bits) for o, i in shapes), default=0)


def estimate_memory(
    model,
    components: dict,
    profile: dict,
    width: int,
    height: int,
    dtype: str | None = None,
    device: str = "gpu",
) -> dict:
    """Peak and mean-active bytes at width×height, the profile's budget, and whether it fits (with margin).

    device "gpu" is the profile's (Apple GPU: quantized Metal kernels, implicit-GEMM convolutions); "cpu" is MLX's
    CPU backend as the runtime uses it: each low-bit linear dequantized to dense compute-dtype weights in blocks
    while it runs (`cpu_dequantized_bytes` of the widest), convolutions by explicit GEMM on an unfolded input."""
    if device not in MEMORY_DEVICES:
        raise ValueError(f"device {device!r} is not one of {MEMORY_DEVICES}")
    cpu = device == "cpu"
    compute_dtype = dtype or profile["compute_dtype"]
    dtype_bytes = DTYPE_BYTES[compute_dtype]
    widen = dtype_bytes / 2  # fp16-stored tensors are held in the compute dtype (fp32 doubles them)
    parts = components["transformer"].get("parts", {})
    packed_codes = parts.get("low_bit_codes", 0) + parts.get("metadata", 0)
    transformer_weights = int(packed_codes + (components["transformer"]["bytes"] - packed_codes) * widen)
    vae_weights = int(components.get("vae", {}).get("bytes", 0) * widen)
    text_bytes = components.get("text_encoder", {}).get("bytes", 0)
    text_codes = text_bytes * MLX_TEXT_CODE_SHARE if profile.get("runtime") == "mlx" else 0
    text_weights = int(text_codes + (text_bytes - text_codes) * widen)
    image_tokens = (width // 16) * (height // 16)
    text_tokens = model.max_sequence_length
    text_act = text_encoder_activations(model.text_encoder_config, len(model.out_layers), dtype_bytes, text_tokens)
    denoise_act = transformer_activations(model.transformer_config, image_tokens, dtype_bytes, text_tokens)
    if cpu:
        # Bonsai's transformer linears are 1- or 2-bit (the same per-weight cost), the text encoder's 4-bit
        denoise_act += cpu_linear_term(transformer_linear_shapes(model), image_tokens + text_tokens, dtype_bytes, 2)
        text_act += cpu_linear_term(text_linear_shapes(model), text_tokens, dtype_bytes, 4)
    decode_act = vae_decode_activations(model.vae_config, width, height, profile["vae_tile"], dtype_bytes, cpu)
    # The first image, in the runtime's order: MLX reads weights on first use (mx.load is lazy), so the VAE's
    # arrive at the decode; the transformer is loaded after the prompt is encoded and the text encoder freed.
    phases = {
        "text_encoding": text_weights + text_act,
        "denoising": transformer_weights + denoise_act,
        "vae_decode": transformer_weights + vae_weights + decode_act,
    }
    peak = max(phases.values())
    mean_active = transformer_weights + denoise_act // 2
    budget = int(profile["memory_budget_bytes"])
    return {
        "width": width,
        "height": height,
        "compute_dtype": compute_dtype,
        "device": device,
        "vae_tile": profile["vae_tile"],
        "phases": phases,
        "peak_bytes": peak,
        "mean_active_bytes": mean_active,
        "budget_bytes": budget,
        "margin_bytes": budget - peak,
        "fits": budget == 0 or peak <= budget,
        "assumptions": "first image: text encoder loaded for encoding and freed before the transformer is loaded; "
        "VAE weights read at the decode; attention scores materialized (upper bound); "
        + ("MLX CPU backend (dequantized blocks, unfolded convolutions)" if cpu else "Apple GPU kernels"),
    }
