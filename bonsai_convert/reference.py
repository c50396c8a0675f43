"""The reference: diffusers' Flux2KleinPipeline on the source weights (any source kind), run with shared noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lowbit import LowBitTensor
from .source import Source


def source_transformer(source: Source, dtype):
    """Flux2Transformer2DModel holding the source weights (low-bit linears as their exact dense values)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    from .model_shapes import _config_kwargs

    with init_empty_weights():
        model = Flux2Transformer2DModel(**_config_kwargs(source.transformer_config, Flux2Transformer2DModel))
    state = {}
    for tensor in source.tensors:
        value = source.read_low_bit(tensor) if tensor.low_bit else tensor.load()
        if isinstance(value, LowBitTensor):
            value = value.dense()
        state[tensor.name] = torch.from_numpy(np.ascontiguousarray(value)).to(dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def quiet_libraries() -> None:
    """diffusers/transformers progress bars and load reports would garble our own rich output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def reference_pipeline(source: Source, dtype):
    """The full diffusers pipeline on the source's weights (safetensors only, never pickles)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    quiet_libraries()

    folders = source.components
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folders["scheduler"]),
        vae=AutoencoderKLFlux2.from_pretrained(folders["vae"], torch_dtype=dtype, use_safetensors=True).eval(),
        text_encoder=Qwen3ForCausalLM.from_pretrained(
            folders["text_encoder"], torch_dtype=dtype, use_safetensors=True
        ).eval(),
        tokenizer=AutoTokenizer.from_pretrained(folders["tokenizer"]),
        transformer=source_transformer(source, dtype),
        is_distilled=True,
    )


@dataclass
class ReferenceOutput:
    image: np.ndarray  # uint8 (H, W, 3)
    latents: np.ndarray  # float32 (1, 128, H/16, W/16), final latents before the VAE


def run_reference(
    pipeline,
    prompt: str,
    noise: np.ndarray,
    steps: int,
    out_layers: tuple[int, ...],
    max_sequence_length: int = 512,
) -> ReferenceOutput:
    """Generate with diffusers from the given initial noise (NCHW), capturing the final latents."""
    import torch

    _, _, latent_h, latent_w = noise.shape
    captured = {}

    def keep_latents(pipe, step, timestep, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    dtype = pipeline.transformer.dtype
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipeline(
            prompt=prompt,
            latents=torch.from_numpy(noise).to(dtype),
            height=latent_h * 16,
            width=latent_w * 16,
            num_inference_steps=steps,
            guidance_scale=1.0,
            text_encoder_out_layers=tuple(out_layers),
            max_sequence_length=max_sequence_length,
            output_type="np",
            callback_on_step_end=keep_latents,
        ).images
    packed = captured["latents"].float().numpy()  # (1, H*W, 128), row-major over (h, w)
    latents = packed.reshape(1, latent_h, latent_w, -1).transpose(0, 3, 1, 2)
    image = np.clip(np.round(images[0] * 255.0), 0, 255).astype(np.uint8)
    return ReferenceOutput(image=image, latents=np.ascontiguousarray(latents, dtype=np.float32))
