"""Text-to-image with a Bonsai MLX bundle: prompt encoding, FlowMatch-Euler denoising, VAE decode.

Mirrors diffusers `Flux2KleinPipeline.__call__` (guidance ≤ 1, distilled: no CFG) step for step. The initial noise
is `bonsai_common.initial_noise` unless given, so a run is comparable with the bundle's golden record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import numpy as np
from bonsai_common import flow_match_schedule, initial_noise

from .loading import BundleError, component_dir, read_json, to_dtype
from .text_encoder import PromptTokenizer, load_text_encoder
from .transformer import Flux2Transformer, load_transformer
from .vae import VAEDecoder, load_vae, to_uint8

LATENT_PIXELS = 16  # pixels per transformer latent token (VAE 8× and the 2×2 patchify)
TILE_OVERLAP_FRACTION = 4  # tiled decode: overlap = tile // 4 (in VAE latent pixels)

StepCallback = Callable[[int, int, float], None]


@dataclass
class GenerationResult:
    """One generated image and what it cost."""

    image: np.ndarray  # uint8 (H, W, 3)
    latents: np.ndarray  # float32 (1, 128, H/16, W/16): final latents before BatchNorm de-normalisation and VAE
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    truncated: bool = False
    # mx.get_peak_memory() of each phase (reset before it): text_encoding, denoising (includes loading the
    # transformer the first time), vae_decode.
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)


def text_ids(length: int) -> np.ndarray:
    """_prepare_text_ids: (L, 4) coordinates (t=0, h=0, w=0, l)."""
    ids = np.zeros((length, 4), dtype=np.int64)
    ids[:, 3] = np.arange(length)
    return ids


def latent_ids(height: int, width: int) -> np.ndarray:
    """_prepare_latent_ids: (H·W, 4) coordinates (t=0, h, w, l=0), row-major over (h, w)."""
    h, w = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ids = np.zeros((height * width, 4), dtype=np.int64)
    ids[:, 1], ids[:, 2] = h.reshape(-1), w.reshape(-1)
    return ids


class MLXPipeline:
    """A loaded bundle, in the deployment's memory order: the text encoder is loaded for each `encode_prompt` and
    freed right after; the transformer is loaded when first used (after the first prompt was encoded, so the two
    are never resident together for a first image) and kept for later images."""

    def __init__(
        self,
        bundle_dir: Path,
        settings: dict[str, Any],
        transformer: Flux2Transformer | Callable[[], Flux2Transformer],
        vae: VAEDecoder | None,
        tokenizer: PromptTokenizer | None,
        scheduler_config: dict[str, Any],
        dtype: mx.Dtype,
        text_encoder_dtype: mx.Dtype,
        vae_dtype: mx.Dtype,
    ):
        self.bundle_dir = bundle_dir
        self.settings = settings
        self._transformer = transformer
        self.vae = vae
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.dtype = dtype
        self.text_encoder_dtype = text_encoder_dtype
        self.vae_dtype = vae_dtype

    @property
    def transformer(self) -> Flux2Transformer:
        """The transformer, loaded from the bundle on first use."""
        if not isinstance(self._transformer, Flux2Transformer):
            self._transformer = self._transformer()
        return self._transformer

    @property
    def transformer_loaded(self) -> bool:
        return isinstance(self._transformer, Flux2Transformer)

    def _require_full_bundle(self) -> None:
        if self.settings.get("transformer_only") or self.vae is None or self.tokenizer is None:
            raise BundleError(f"{self.bundle_dir}: a transformer-only bundle cannot generate images")

    def encode_prompt(self, prompt: str) -> tuple[mx.array, bool]:
        """Prompt embeddings (1, max_sequence_length, n·hidden) in the compute dtype, and whether it was truncated."""
        self._require_full_bundle()
        assert self.tokenizer is not None
        tokens = self.tokenizer([prompt], int(self.settings.get("max_sequence_length", 512)))
        encoder = load_text_encoder(
            component_dir(self.bundle_dir, self.settings, "text_encoder"),
            self.settings.get("text_encoder_num_hidden_layers"),
            self.text_encoder_dtype,
        )
        layers = tuple(int(k) for k in self.settings["text_encoder_out_layers"])
        embeds = encoder.hidden_states(tokens.input_ids, tokens.attention_mask, layers).astype(self.dtype)
        mx.eval(embeds)
        del encoder
        mx.clear_cache()
        return embeds, tokens.truncated[0]

    def denoise(
        self,
        prompt_embeds: mx.array,
        noise: np.ndarray,
        steps: int | None = None,
        on_step: StepCallback | None = None,
    ) -> tuple[np.ndarray, list[float]]:
        """FlowMatch-Euler from `noise` (1, 128, h, w) NCHW; returns the final latents (same layout) and the
        seconds of each step. `on_step(step_index, steps, seconds)` is called after every step."""
        steps = int(steps or self.settings.get("num_inference_steps", 4))
        batch, channels, height, width = noise.shape
        sigmas, timesteps = flow_match_schedule(steps, height * width, self.scheduler_config)
        x = mx.array(np.ascontiguousarray(noise, dtype=np.float32).reshape(batch, channels, -1).transpose(0, 2, 1))
        rope = self.transformer.rope(text_ids(prompt_embeds.shape[1]), latent_ids(height, width))
        seconds: list[float] = []
        for i, t in enumerate(timesteps):
            start = time.perf_counter()
            # diffusers: timestep = t.to(latents dtype) / 1000; the model multiplies by 1000 again.
            timestep = mx.array(np.array([t], dtype=np.float32)).astype(self.dtype) / 1000
            velocity = self.transformer(x.astype(self.dtype), prompt_embeds, timestep, rope=rope)
            dt = np.float32(sigmas[i + 1]) - np.float32(sigmas[i])
            x = x + mx.array(dt) * velocity.astype(mx.float32)
            mx.eval(x)
            seconds.append(time.perf_counter() - start)
            if on_step is not None:
                on_step(i, steps, seconds[-1])
        latents = np.array(x).transpose(0, 2, 1).reshape(batch, channels, height, width)
        return np.ascontiguousarray(latents, dtype=np.float32), seconds

    def decode(self, latents: np.ndarray, vae_tile: int | None | Literal["bundle"] = "bundle") -> np.ndarray:
        """Final latents (1, 128, h, w) NCHW → uint8 image (16h, 16w, 3). `vae_tile` (pixels) defaults to the
        bundle's setting; None decodes in one piece."""
        self._require_full_bundle()
        assert self.vae is not None
        tile_pixels = self.settings.get("vae_tile") if vae_tile == "bundle" else vae_tile
        nhwc = mx.array(np.ascontiguousarray(latents, dtype=np.float32).transpose(0, 2, 3, 1))
        z = self.vae.latents_to_vae(nhwc).astype(self.vae_dtype)
        if tile_pixels:
            tile = max(1, int(tile_pixels) // self.vae.config.scale_factor)
            image = self.vae.decode_tiled(z, tile, tile // TILE_OVERLAP_FRACTION)
        else:
            image = self.vae.decode(z)
        return to_uint8(image[0].astype(mx.float32))

    def generate(
        self,
        prompt: str,
        seed: int = 0,
        steps: int | None = None,
        width: int | None = None,
        height: int | None = None,
        noise: np.ndarray | None = None,
        on_step: StepCallback | None = None,
    ) -> GenerationResult:
        """Prompt → image. Size and steps default to pipeline.json; noise defaults to initial_noise(seed, ...)."""
        self._require_full_bundle()
        width = int(width or self.settings["width"])
        height = int(height or self.settings["height"])
        if noise is None:
            if width % LATENT_PIXELS or height % LATENT_PIXELS:
                raise ValueError(f"width and height must be multiples of {LATENT_PIXELS}, got {width}x{height}")
            noise = initial_noise(seed, height, width)
        elif noise.ndim != 4 or noise.shape[0] != 1:
            raise ValueError(f"noise must be (1, 128, H/16, W/16), got {noise.shape}")
        phases: dict[str, int] = {}
        mx.reset_peak_memory()
        embeds, truncated = self.encode_prompt(prompt)
        phases["text_encoding"] = int(mx.get_peak_memory())
        mx.reset_peak_memory()
        latents, seconds = self.denoise(embeds, noise, steps, on_step)
        del embeds
        mx.clear_cache()
        phases["denoising"] = int(mx.get_peak_memory())
        mx.reset_peak_memory()
        image = self.decode(latents)
        phases["vae_decode"] = int(mx.get_peak_memory())
        return GenerationResult(
            image=image,
            latents=latents,
            step_seconds=seconds,
            peak_memory_bytes=max(phases.values()),
            truncated=truncated,
            phase_peak_bytes=phases,
        )


def load_pipeline(
    bundle_dir: str | Path,
    dtype: str | None = None,
    text_encoder_dtype: str | None = None,
    max_sequence_length: int | None = None,
    vae_dtype: str | None = None,
    dense_cache_bytes: int = 0,
) -> MLXPipeline:
    """Load a bundle (formats/bundle.md).

    `dtype` ("float32" / "float16", default pipeline.json's compute_dtype) is the transformer's compute dtype.
    The text encoder and the VAE run in float32 when dtype is float32, else in bfloat16 unless told otherwise
    (Qwen3's residual stream and VAE decoder activations can overflow fp16). `max_sequence_length` overrides
    pipeline.json's 512 (as diffusers' argument of that name does; tests use it to stay fast on CPU).
    `dense_cache_bytes` (CPU device only; default 0: none) keeps up to that many bytes of the transformer's low-bit
    weights dequantized to fp32 across steps (bonsai_mlx.cpu_layers.keep_dense_weights): faster steps, more memory
    than formats/memory.md models."""
    bundle_dir = Path(bundle_dir)
    settings = read_json(bundle_dir / "pipeline.json")
    if max_sequence_length is not None:
        settings["max_sequence_length"] = int(max_sequence_length)
    compute = to_dtype(dtype or settings.get("compute_dtype", "float16"))
    wide = "float32" if compute == mx.float32 else "bfloat16"
    te_dtype = to_dtype(text_encoder_dtype or wide)
    decoder_dtype = to_dtype(vae_dtype or wide)
    transformer_dir = component_dir(bundle_dir, settings, "transformer")
    if not (transformer_dir / "config.json").is_file():
        raise BundleError(f"{transformer_dir / 'config.json'}: missing")

    def transformer() -> Flux2Transformer:  # loaded on first use: after the prompt is encoded (class docstring)
        return load_transformer(transformer_dir, compute, dense_cache_bytes)

    if settings.get("transformer_only"):
        return MLXPipeline(bundle_dir, settings, transformer, None, None, {}, compute, te_dtype, decoder_dtype)
    scheduler_config = read_json(component_dir(bundle_dir, settings, "scheduler") / "scheduler_config.json")
    return MLXPipeline(
        bundle_dir,
        settings,
        transformer,
        load_vae(component_dir(bundle_dir, settings, "vae"), decoder_dtype),
        PromptTokenizer(component_dir(bundle_dir, settings, "tokenizer")),
        scheduler_config,
        compute,
        te_dtype,
        decoder_dtype,
    )
