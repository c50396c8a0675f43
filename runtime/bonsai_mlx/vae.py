"""The AutoencoderKLFlux2 decoder in MLX (NHWC), the pipeline's latent de-normalisation, and tiled decoding.

Ported from diffusers 0.42.1 (autoencoder_kl_flux2.py, vae.py Decoder, UNetMidBlock2D, UpDecoderBlock2D,
ResnetBlock2D, Upsample2D, AttnProcessor2_0). Weights keep the diffusers names; conv weights are stored OIHW and
transposed to MLX's OHWI at load. Only the decoder side is built (encoder tensors in the file are ignored).
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

from .cpu_math import attention as softmax_attention
from .cpu_math import silu
from .loading import BundleError, load_into, read_json, to_dtype
from .staging import staged

VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")
ATTENTION_QUERY_CHUNK = 4096


@dataclass(frozen=True)
class VAEConfig:
    """The AutoencoderKLFlux2 config fields the decoder needs (defaults: FLUX.2)."""

    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> VAEConfig:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        for key in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    @property
    def scale_factor(self) -> int:
        """Pixels per VAE latent pixel (before the 2×2 patchify): 2^(number of blocks − 1)."""
        return 2 ** (len(self.block_out_channels) - 1)


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True, pytorch_compatible=True)


class ResnetBlock2D(nn.Module):
    """norm1 → SiLU → conv1 → norm2 → SiLU → conv2, plus the (1×1 conv) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = staged(silu(self.norm1(x)))
        h = staged(self.conv1(h))
        h = staged(silu(self.norm2(h)))
        h = staged(self.conv2(h))
        if "conv_shortcut" in self:
            x = staged(self.conv_shortcut(x))
        return staged(x + h)


class AttentionBlock(nn.Module):
    """The mid-block self-attention: GroupNorm, one head over all channels, residual. Queries are processed in
    chunks of ATTENTION_QUERY_CHUNK so the score matrix stays small (16384 tokens at 1024², head dim 512)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, 1, height * width, channels)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        scale = channels**-0.5
        tokens = height * width
        if tokens <= ATTENTION_QUERY_CHUNK:
            out = softmax_attention(q, k, v, scale=scale)
        else:
            parts = []
            for start in range(0, tokens, ATTENTION_QUERY_CHUNK):
                part = softmax_attention(q[:, :, start : start + ATTENTION_QUERY_CHUNK], k, v, scale=scale)
                mx.eval(part)
                parts.append(part)
            out = mx.concatenate(parts, axis=2)
        out = self.to_out[0](out).reshape(batch, height, width, channels)
        return out + x


class MidBlock(nn.Module):
    """UNetMidBlock2D: resnet, (attention, resnet)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups) for _ in range(2)]
        self.attentions = [AttentionBlock(channels, groups)] if add_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if self.attentions:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def upsample_nearest(x: mx.array) -> mx.array:
    """2× nearest-neighbour upsampling of (B, H, W, C)."""
    batch, height, width, channels = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, height * 2, width * 2, channels)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return staged(self.conv(staged(upsample_nearest(x))))


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        ]
        if upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Module):
    """diffusers vae.Decoder (group norm variant), split into the latent-resolution part and the upsampling part."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.decoder_block_out_channels or config.block_out_channels
        groups = config.norm_num_groups
        reversed_channels = list(reversed(channels))
        self.conv_in = nn.Conv2d(config.latent_channels, reversed_channels[0], 3, padding=1)
        self.mid_block = MidBlock(reversed_channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = []
        previous = reversed_channels[0]
        for i, out in enumerate(reversed_channels):
            final = i == len(channels) - 1
            self.up_blocks.append(UpDecoderBlock2D(previous, out, config.layers_per_block + 1, groups, not final))
            previous = out
        self.conv_norm_out = group_norm(groups, channels[0])
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def middle(self, z: mx.array) -> mx.array:
        """conv_in and the mid block (with its global attention), at latent resolution."""
        return self.mid_block(self.conv_in(z))

    def upsample(self, x: mx.array) -> mx.array:
        """The up blocks and the output head: latent resolution → pixels."""
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(staged(silu(self.conv_norm_out(x))))

    def __call__(self, z: mx.array) -> mx.array:
        return self.upsample(self.middle(z))


class VAEDecoder(nn.Module):
    """post_quant_conv + decoder, and the pipeline's BatchNorm de-normalisation + 2×2 unpatchify of latents."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)
        patch = math.prod(config.patch_size)
        # Running statistics of the latent BatchNorm (bn.running_mean / bn.running_var), frozen.
        self.bn_mean = mx.zeros((patch * config.latent_channels,))
        self.bn_std = mx.ones((patch * config.latent_channels,))
        self.freeze(keys=["bn_mean", "bn_std"], recurse=False)

    def decode(self, z: mx.array) -> mx.array:
        """VAE latents (B, h, w, 32) NHWC → image (B, 8h, 8w, 3) in about [-1, 1]."""
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def latents_to_vae(self, latents: mx.array) -> mx.array:
        """Transformer latents (B, H, W, 128) NHWC → de-normalised, unpatchified VAE latents (B, 2H, 2W, 32)."""
        latents = latents * self.bn_std.astype(latents.dtype) + self.bn_mean.astype(latents.dtype)
        batch, height, width, channels = latents.shape
        py, px = self.config.patch_size
        x = latents.reshape(batch, height, width, channels // (py * px), py, px)
        x = x.transpose(0, 1, 4, 2, 5, 3)
        return x.reshape(batch, height * py, width * px, channels // (py * px))

    def decode_tiled(self, z: mx.array, tile: int, overlap: int) -> mx.array:
        """Decode with the upsampling path in overlapping tiles (formats/mlx.md, "VAE tiling").

        post_quant_conv, conv_in and the mid block (incl. its attention) run on the whole latent: at latent
        resolution they are small, and global attention/GroupNorm there keeps tiles consistent. The up blocks then
        run on `tile`×`tile` windows of the mid-block output (stride tile − overlap, last window moved back to the
        edge); each window's pixels are weighted by a linear ramp across the `overlap` band on every side shared
        with another window, and the weighted sum is divided by the summed weights.
        """
        batch, height, width, _ = z.shape
        if height <= tile and width <= tile:
            return self.decode(z)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        middle = self.decoder.middle(z)
        mx.eval(middle)
        scale = self.config.scale_factor
        out = np.zeros((batch, height * scale, width * scale, self.config.out_channels), dtype=np.float32)
        total = np.zeros((1, height * scale, width * scale, 1), dtype=np.float32)
        for y0 in tile_starts(height, tile, overlap):
            for x0 in tile_starts(width, tile, overlap):
                y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
                decoded = self.decoder.upsample(middle[:, y0:y1, x0:x1, :])
                mx.eval(decoded)
                weight_y = blend_ramp(y1 - y0, overlap * scale, y0 > 0, y1 < height, scale)
                weight_x = blend_ramp(x1 - x0, overlap * scale, x0 > 0, x1 < width, scale)
                weight = (weight_y[:, None] * weight_x[None, :])[None, :, :, None]
                ys, xs = slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale)
                out[:, ys, xs] += np.array(decoded.astype(mx.float32)) * weight
                total[:, ys, xs] += weight
                del decoded
        return mx.array(out / total)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: stride tile − overlap, the last tile moved back to end at `size`."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def blend_ramp(length: int, band: int, rise: bool, fall: bool, scale: int) -> np.ndarray:
    """Per-pixel weights along one tile axis: (i + 1)/(band + 1) over the first `band` pixels if `rise`, the
    mirror over the last `band` pixels if `fall`, else 1 (always > 0)."""
    pixels = length * scale
    weight = np.ones(pixels, dtype=np.float32)
    ramp = (np.arange(band, dtype=np.float32) + 1) / (band + 1)
    band = min(band, pixels)
    if rise:
        weight[:band] = np.minimum(weight[:band], ramp[:band])
    if fall:
        weight[pixels - band :] = np.minimum(weight[pixels - band :], ramp[:band][::-1])
    return weight


def load_vae(directory: str | Path, dtype: str | mx.Dtype = "float32") -> VAEDecoder:
    """The decoder from a bundle's `vae/` (config.json + diffusion_pytorch_model.safetensors, diffusers names)."""
    directory = Path(directory)
    config = VAEConfig.from_dict(read_json(directory / "config.json"))
    path = directory / VAE_WEIGHTS
    if not path.is_file():
        raise BundleError(f"{path}: missing")
    raw = mx.load(str(path))
    assert isinstance(raw, dict)
    weights: dict[str, mx.array] = {}
    for name, value in raw.items():
        if not name.startswith(DECODER_PREFIXES):
            continue
        if value.ndim == 4:  # conv OIHW → OHWI
            value = value.transpose(0, 2, 3, 1)
        weights[name] = value
    for key in ("bn.running_mean", "bn.running_var"):
        if key not in raw:
            raise BundleError(f"{path}: missing {key}")
    weights["bn_mean"] = raw["bn.running_mean"].astype(mx.float32)
    weights["bn_std"] = mx.sqrt(raw["bn.running_var"].astype(mx.float32) + config.batch_norm_eps)
    model = VAEDecoder(config)
    load_into(model, weights, to_dtype(dtype), directory)
    # The statistics stay float32 (cast at use), like the pipeline's fp32 BatchNorm buffers.
    model.bn_mean, model.bn_std = weights["bn_mean"], weights["bn_std"]
    return model


def to_uint8(image: mx.array | np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1] → uint8 as diffusers postprocesses: clamp(x/2 + 0.5, 0, 1)·255, rounded."""
    if isinstance(image, mx.array):
        image = image.astype(mx.float32)
    pixels = np.clip(np.array(image, dtype=np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.round(pixels * 255.0).astype(np.uint8)
