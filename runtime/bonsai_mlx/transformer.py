"""Flux2Transformer2DModel (FLUX.2 [klein]) in mlx.nn, ported from diffusers 0.42.1 transformer_flux2.py.

Parameter names equal the diffusers state_dict names, so a bundle's `transformer/` safetensors load directly.
Every linear of Klein has bias=False. The low-bit block linears become `nn.QuantizedLinear` (affine, 1- or 2-bit,
group 128) following the mlx-lm "quantization" entry of transformer/config.json (formats/mlx.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .blas import fit_blas_threads_to_machine
from .cpu_layers import keep_dense_weights, use_dense_kernels
from .cpu_math import attention_and_swiglu, layer_norm_modulate, rope_attention, silu, silu_multiply
from .loading import apply_quantization, load_into, load_weights, read_json, to_dtype
from .staging import staged

FP16_MAX = 65504.0


@dataclass(frozen=True)
class Flux2Config:
    """The diffusers Flux2Transformer2DModel config fields the runtime needs (defaults: Klein 4B)."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 5
    num_single_layers: int = 20
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 7680
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: int = 2000
    eps: float = 1e-6
    guidance_embeds: bool = False

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> Flux2Config:
        """Pick the known keys of a diffusers config.json (others, like "quantization", are ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        return cls(**values)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def timestep_embedding(timesteps: mx.array, dim: int, max_period: int = 10000) -> mx.array:
    """diffusers get_timestep_embedding (flip_sin_to_cos=True, downscale_freq_shift=0) → float32 (B, dim).

    Computed on the host: the angles reach ~1000 rad, where a few ulps of sin/cos or exp error show in the
    output. The float32 products are the same IEEE operations as torch's; exp, sin and cos are correctly rounded.
    """
    half = dim // 2
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    angles = (np.array(timesteps.astype(mx.float32), dtype=np.float32)[:, None] * freqs[None, :]).astype(np.float64)
    return mx.array(np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32))


def rope_frequencies(ids: np.ndarray, axes_dim: tuple[int, ...], theta: float) -> tuple[mx.array, mx.array]:
    """Flux2PosEmbed: per-axis 1-D RoPE (float64 angles, repeat-interleaved) concatenated → float32 (S, sum(axes))."""
    pos = np.asarray(ids, dtype=np.float32).astype(np.float64)
    cos_out, sin_out = [], []
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        angles = np.outer(pos[:, axis], freqs)
        cos_out.append(np.repeat(np.cos(angles), 2, axis=1).astype(np.float32))
        sin_out.append(np.repeat(np.sin(angles), 2, axis=1).astype(np.float32))
    return mx.array(np.concatenate(cos_out, axis=-1)), mx.array(np.concatenate(sin_out, axis=-1))


@mx.compile
def gated_add(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    """x + gate·y (a gated residual), fused into one pass."""
    return x + gate * y


def split_heads(x: mx.array, head_dim: int) -> mx.array:
    """(B, S, H·D) → (B, S, H, D)."""
    return x.reshape(*x.shape[:-1], -1, head_dim)


class TimestepEmbedding(nn.Module):
    """diffusers TimestepEmbedding: linear_1 → SiLU → linear_2."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(silu(self.linear_1(x)))


class TimestepGuidanceEmbeddings(nn.Module):
    """Flux2TimestepGuidanceEmbeddings: sinusoidal projection (256 ch) + MLP, plus guidance if configured."""

    def __init__(self, in_channels: int, dim: int, guidance_embeds: bool):
        super().__init__()
        self.in_channels = in_channels
        self.timestep_embedder = TimestepEmbedding(in_channels, dim)
        if guidance_embeds:
            self.guidance_embedder = TimestepEmbedding(in_channels, dim)

    def __call__(self, timestep: mx.array, guidance: mx.array | None) -> mx.array:
        proj = timestep_embedding(timestep, self.in_channels).astype(timestep.dtype)
        emb = self.timestep_embedder(proj)
        if guidance is not None and "guidance_embedder" in self:
            guidance_proj = timestep_embedding(guidance, self.in_channels).astype(guidance.dtype)
            emb = emb + self.guidance_embedder(guidance_proj)
        return emb


class Modulation(nn.Module):
    """Flux2Modulation: SiLU → linear to 3·sets (shift, scale, gate) vectors."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.linear = nn.Linear(dim, dim * 3 * sets, bias=False)

    def __call__(self, temb: mx.array) -> list[tuple[mx.array, mx.array, mx.array]]:
        mod = self.linear(silu(temb))[:, None, :]
        chunks = mx.split(mod, 3 * self.sets, axis=-1)
        return [tuple(chunks[3 * i : 3 * i + 3]) for i in range(self.sets)]  # type: ignore[misc]


class FeedForward(nn.Module):
    """Flux2FeedForward: linear_in (2·inner) → SwiGLU (silu(first half) · second half) → linear_out."""

    def __init__(self, dim: int, mult: float):
        super().__init__()
        inner = int(dim * mult)
        self.linear_in = nn.Linear(dim, inner * 2, bias=False)
        self.linear_out = nn.Linear(inner, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.linear_in(x), 2, axis=-1)
        return self.linear_out(silu_multiply(gate, up))


class JointAttention(nn.Module):
    """Flux2Attention of the double-stream blocks: separate image/text projections, one joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.eps = eps
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = [nn.Linear(inner, dim, bias=False)]
        self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
        self.add_q_proj = nn.Linear(dim, inner, bias=False)
        self.add_k_proj = nn.Linear(dim, inner, bias=False)
        self.add_v_proj = nn.Linear(dim, inner, bias=False)
        self.to_add_out = nn.Linear(inner, dim, bias=False)

    def __call__(self, x: mx.array, context: mx.array, rope: tuple[mx.array, mx.array]) -> tuple[mx.array, mx.array]:
        d = self.head_dim
        q, k, v = (split_heads(layer(x), d) for layer in (self.to_q, self.to_k, self.to_v))
        cq, ck, cv = (split_heads(layer(context), d) for layer in (self.add_q_proj, self.add_k_proj, self.add_v_proj))
        queries = [(cq, self.norm_added_q.weight), (q, self.norm_q.weight)]  # text tokens first, then image tokens
        keys = [(ck, self.norm_added_k.weight), (k, self.norm_k.weight)]
        out = rope_attention(queries, keys, [cv, v], rope, self.eps)
        text_len = context.shape[1]
        return self.to_out[0](out[:, text_len:]), self.to_add_out(out[:, :text_len])


class ParallelSelfAttention(nn.Module):
    """Flux2ParallelSelfAttention: one fused QKV+MLP input projection, one fused output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.eps = eps
        self.inner = heads * head_dim
        self.mlp_hidden = int(dim * mlp_ratio)
        self.to_qkv_mlp_proj = nn.Linear(dim, self.inner * 3 + self.mlp_hidden * 2, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.Linear(self.inner + self.mlp_hidden, dim, bias=False)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array]) -> mx.array:
        d = self.head_dim
        projected = self.to_qkv_mlp_proj(x)
        q, k, v, mlp = mx.split(projected, [self.inner, 2 * self.inner, 3 * self.inner], axis=-1)
        q, k, v = split_heads(q, d), split_heads(k, d), split_heads(v, d)
        gate, up = mx.split(mlp, 2, axis=-1)
        queries, keys = [(q, self.norm_q.weight)], [(k, self.norm_k.weight)]
        return self.to_out(attention_and_swiglu(queries, keys, [v], rope, self.eps, gate, up))


def _clip_fp16(x: mx.array) -> mx.array:
    return mx.clip(x, -FP16_MAX, FP16_MAX) if x.dtype == mx.float16 else x


class TransformerBlock(nn.Module):
    """Flux2TransformerBlock (double stream): image and text streams with their own norms, FFs and modulation."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = JointAttention(dim, heads, head_dim, eps)
        self.ff = FeedForward(dim, mlp_ratio)
        self.ff_context = FeedForward(dim, mlp_ratio)

    def __call__(
        self,
        x: mx.array,
        context: mx.array,
        mod_img: list[tuple[mx.array, mx.array, mx.array]],
        mod_txt: list[tuple[mx.array, mx.array, mx.array]],
        rope: tuple[mx.array, mx.array],
    ) -> tuple[mx.array, mx.array]:
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = mod_img
        (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = mod_txt
        eps = self.eps
        norm_x = layer_norm_modulate(x, scale_msa, shift_msa, eps)
        norm_c = layer_norm_modulate(context, c_scale_msa, c_shift_msa, eps)
        attn_out, context_attn_out = self.attn(norm_x, norm_c, rope)
        x = gated_add(x, gate_msa, attn_out)
        x = gated_add(x, gate_mlp, self.ff(layer_norm_modulate(x, scale_mlp, shift_mlp, eps)))
        context = gated_add(context, c_gate_msa, context_attn_out)
        context = gated_add(
            context, c_gate_mlp, self.ff_context(layer_norm_modulate(context, c_scale_mlp, c_shift_mlp, eps))
        )
        return _clip_fp16(context), x


class SingleTransformerBlock(nn.Module):
    """Flux2SingleTransformerBlock: parallel attention + MLP over the joint [text, image] sequence."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = ParallelSelfAttention(dim, heads, head_dim, mlp_ratio, eps)

    def __call__(
        self, x: mx.array, mod: list[tuple[mx.array, mx.array, mx.array]], rope: tuple[mx.array, mx.array]
    ) -> mx.array:
        shift, scale, gate = mod[0]
        norm_x = layer_norm_modulate(x, scale, shift, self.eps)
        return _clip_fp16(gated_add(x, gate, self.attn(norm_x, rope)))


class AdaLayerNormContinuous(nn.Module):
    """diffusers AdaLayerNormContinuous (layer_norm, no affine): linear(silu(temb)) → (scale, shift)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, dim * 2, bias=False)

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        scale, shift = mx.split(self.linear(silu(temb).astype(x.dtype)), 2, axis=1)
        return layer_norm_modulate(x, scale[:, None, :], shift[:, None, :], self.eps)


class Flux2Transformer(nn.Module):
    """Flux2Transformer2DModel forward (no KV cache / reference images): predicts the flow velocity."""

    def __init__(self, config: Flux2Config):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        out_channels = config.out_channels or config.in_channels
        self.time_guidance_embed = TimestepGuidanceEmbeddings(
            config.timestep_guidance_channels, dim, config.guidance_embeds
        )
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        self.x_embedder = nn.Linear(config.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim, bias=False)
        self.transformer_blocks = [
            TransformerBlock(dim, heads, head_dim, config.mlp_ratio, config.eps) for _ in range(config.num_layers)
        ]
        self.single_transformer_blocks = [
            SingleTransformerBlock(dim, heads, head_dim, config.mlp_ratio, config.eps)
            for _ in range(config.num_single_layers)
        ]
        self.norm_out = AdaLayerNormContinuous(dim, config.eps)
        self.proj_out = nn.Linear(dim, config.patch_size * config.patch_size * out_channels, bias=False)

    def rope(self, txt_ids: np.ndarray, img_ids: np.ndarray) -> tuple[mx.array, mx.array]:
        """RoPE cos/sin for the joint [text, image] sequence; ids are (L, 4) / (N, 4) integer coordinates."""
        ids = np.concatenate([np.asarray(txt_ids).reshape(-1, 4), np.asarray(img_ids).reshape(-1, 4)], axis=0)
        return rope_frequencies(ids, self.config.axes_dims_rope, self.config.rope_theta)

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        timestep: mx.array,
        img_ids: np.ndarray | None = None,
        txt_ids: np.ndarray | None = None,
        guidance: mx.array | None = None,
        rope: tuple[mx.array, mx.array] | None = None,
    ) -> mx.array:
        """hidden_states (B, N, in_ch), encoder_hidden_states (B, L, joint_dim), timestep (B,) = t/1000 → (B, N, out).

        Pass `rope` (from `self.rope(txt_ids, img_ids)`) to reuse it across steps instead of the ids.
        """
        dtype = hidden_states.dtype
        timestep = timestep.astype(dtype) * 1000
        if guidance is not None:
            guidance = guidance.astype(dtype) * 1000
        temb = self.time_guidance_embed(timestep, guidance)
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        mod_single = self.single_stream_modulation(temb)

        x = self.x_embedder(hidden_states)
        context = self.context_embedder(encoder_hidden_states)
        if rope is None:
            if img_ids is None or txt_ids is None:
                raise ValueError("pass either rope or both img_ids and txt_ids")
            rope = self.rope(txt_ids, img_ids)

        on_cpu = mx.default_device() == mx.cpu
        for block in self.transformer_blocks:  # block by block: bonsai_mlx.staging
            if on_cpu:  # the BLAS's threads, to the cores free right now (bonsai_mlx.blas)
                fit_blas_threads_to_machine()
            context, x = block(x, context, mod_img, mod_txt, rope)
            staged(context, x)
        text_len = context.shape[1]
        x = mx.concatenate([context, x], axis=1)
        for block in self.single_transformer_blocks:
            if on_cpu:
                fit_blas_threads_to_machine()
            x = staged(block(x, mod_single, rope))
        x = self.norm_out(x[:, text_len:], temb)
        return self.proj_out(x)


def load_transformer(
    directory: str | Path, dtype: str | mx.Dtype = "float16", dense_cache_bytes: int = 0
) -> Flux2Transformer:
    """Build the transformer from a bundle's `transformer/` folder (config.json + safetensors).

    On the CPU device, `dense_cache_bytes` > 0 keeps up to that many bytes of fp32 dequantized low-bit weights
    (bonsai_mlx.cpu_layers.keep_dense_weights) instead of dequantizing them at every step."""
    directory = Path(directory)
    config = read_json(directory / "config.json")
    weights = load_weights(directory)
    model = Flux2Transformer(Flux2Config.from_dict(config))
    apply_quantization(model, config.get("quantization"), weights)
    load_into(model, weights, to_dtype(dtype), directory)
    use_dense_kernels(model)
    if dense_cache_bytes > 0:
        keep_dense_weights(model, dense_cache_bytes)
    return model
