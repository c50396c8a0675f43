"""The reference: diffusers' Flux2KleinPipeline on the source weights (any source kind), run with shared noise.

Two ways to run it, with the same numbers (tests/test_reference.py checks them bit for bit on the demo):
- `reference_pipeline` + `run_reference`: the whole pipeline in memory at once (text encoder + dense transformer:
  ~16 GB in half precision for Klein 4B);
- `run_reference_phased`: the deployment order, within a 16 GB laptop (Klein 4B, fp32 at 256²: `pack --target
  iphone` peaks at 6.3 GB RSS, 5.9 GB anonymous, scripts/results/full-chain.json):
  (1) the text encoder, cut after the deepest layer whose hidden states are used, is loaded, encodes the prompt and
  is freed; (2) the transformer is built with each low-bit linear held as int8 codes + scales (`CodesLinear`): its
  dense weight — the same values as the whole-model path's — exists only while that layer runs; then the VAE
  decodes. Runs on CUDA, else Apple MPS, else CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lowbit import LowBitTensor
from .quiet import quiet_libraries  # noqa: F401 - re-exported
from .sources import Source


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


def _codes_linear_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class _CodesLinear(nn.Module):
        """A bias-free low-bit linear kept as int8 codes [out, in] + fp16 scales [out, in/128]; forward builds the
        dense weight in the compute dtype (exactly LowBitTensor.dense() cast to it), multiplies, and drops it."""

        def __init__(self, codes: np.ndarray, scales: np.ndarray, dtype, device):
            super().__init__()
            self.out_features, self.in_features = codes.shape
            self.register_buffer("codes", torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int8)).to(device))
            scales16 = torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float16))
            self.register_buffer("scales", scales16.to(dtype).to(device))
            self.compute_dtype = dtype
            # code·scale is the same weight, bit for bit, when no scale is negative or −0.0 (code 0 → +0.0):
            # two passes instead of five
            self.multiply = bool(torch.isfinite(scales16).all()) and not bool(torch.signbit(scales16).any())

        def dense_weight(self):
            groups = self.in_features // 128
            codes = self.codes.view(self.out_features, groups, 128)
            if self.multiply:
                weight = codes.to(self.compute_dtype).mul_(self.scales[:, :, None])
                return weight.view(self.out_features, self.in_features)
            magnitude = torch.where(codes != 0, self.scales[:, :, None], torch.zeros((), dtype=self.scales.dtype))
            weight = torch.where(codes < 0, -magnitude, magnitude)  # code 0 → +0.0, as dense_from_codes
            return weight.view(self.out_features, self.in_features)

        def forward(self, x):
            return F.linear(x, self.dense_weight())

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8 codes"

    return _CodesLinear


def _replace_module(model, name: str, module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def exact_codes(tensor) -> LowBitTensor | None:
    """A dense source's low-bit weight split into codes + scales (row chunks, the compiled split where it can), or
    None when it is not exactly binary/ternary (then the reference keeps it dense)."""
    from .errors import InputError
    from .lowbit import GROUP_SIZE, split_exact, split_exact_stored

    rows, cols = tensor.shape
    codes = np.empty((rows, cols), dtype=np.int8)
    scales = np.empty((rows, cols // GROUP_SIZE), dtype=np.float16)
    stored_dtype = tensor.file.tensors[tensor.key].dtype
    compiled = tensor.rows is None and stored_dtype in ("BF16", "F16", "F32")
    try:
        for start in range(0, rows, 2048):
            stop = min(rows, start + 2048)
            if compiled:
                part, _ = split_exact_stored(
                    tensor.name, tensor.file.raw(tensor.key)[start:stop], stored_dtype, "ternary"
                )
            else:
                part = split_exact(tensor.name, tensor.load_rows(start, stop), "ternary")
            codes[start:stop], scales[start:stop] = part.codes, part.scales
    except InputError:
        return None
    return LowBitTensor(tensor.name, codes, scales)


def codes_transformer(source: Source, dtype, device="cpu"):
    """Flux2Transformer2DModel on the source weights with every low-bit linear as a CodesLinear (1 byte per weight
    resident instead of 2–4; the dense weight of one layer at a time)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    from .model_shapes import _config_kwargs

    codes_linear = _codes_linear_class()
    with init_empty_weights():
        model = Flux2Transformer2DModel(**_config_kwargs(source.transformer_config, Flux2Transformer2DModel))
    state = {}
    for tensor in source.tensors:
        value = source.read_low_bit(tensor) if tensor.low_bit else None
        if tensor.low_bit and not isinstance(value, LowBitTensor):  # a dense source: split here (1 byte a weight)
            value = exact_codes(tensor)
        if value is None:
            value = tensor.load()
        if isinstance(value, LowBitTensor) and value.codes.shape[1] % 128 == 0:
            prefix = tensor.name[: -len(".weight")]
            _replace_module(model, prefix, codes_linear(value.codes, value.scales, dtype, device))
            continue
        if isinstance(value, LowBitTensor):
            value = value.dense()
        state[tensor.name] = torch.from_numpy(np.ascontiguousarray(value)).to(dtype).to(device)
        del value
    model.load_state_dict(state, assign=True, strict=False)
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"transformer tensors missing from the source: {missing[:3]}")
    return model.eval()


SHIPPED_ROWS = 4096  # text-encoder tensors are turned into their shipped values this many rows at a time


def reference_device():
    """CUDA if present, else Apple MPS, else CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cut_text_encoder_config(folder, out_layers):
    """The text encoder's config cut after its deepest used layer (hidden states of layers ≤ that one unchanged:
    the last entry is then the raw layer output, not the final-norm output, as in the uncut model)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    deepest = max(out_layers)
    if deepest < config.num_hidden_layers:
        config.num_hidden_layers = deepest
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types[:deepest])
        config.tie_last_hidden_states = False
    return config


def _shipped_tensor(name: str, tensor, dtype, shipped):
    """A source tensor in `dtype`, turned into its shipped values in row chunks (the 4-bit groups lie along rows)."""
    import torch

    tensor = tensor.to(dtype)
    if shipped is None:
        return tensor
    rows = tensor.shape[0] if tensor.dim() == 2 else 0
    step = SHIPPED_ROWS if rows > SHIPPED_ROWS else max(rows, 1)
    for start in range(0, max(rows, 1), step):
        part = tensor[start : start + step] if rows else tensor
        values = shipped(name, part.float().numpy())
        part.copy_(torch.from_numpy(np.asarray(values, dtype=np.float32)))
        del values
    return tensor


def _tensor_files(folder) -> dict[str, str]:
    """name → shard path of a component folder (its safetensors index, else its one model.safetensors)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: str(folder / file) for name, file in weight_map.items()}
    from safetensors import safe_open

    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        return {name: str(path) for name in handle.keys()}


def layerwise_text_encoder(folder, config, dtype, shipped=None, prequantized: bool = False):
    """Qwen3ForCausalLM (cut `config`) whose decoder layers are read from the source when they run and dropped
    right after (forward hooks): resident are the embedding (tied lm_head), the final norm and one layer, so the
    reference text encoder fits in fp32 (~2.5 GB for Qwen3-4B instead of 12.4 GB)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import Qwen3ForCausalLM

    if prequantized:  # a released MLX pack's 4-bit encoder: its tensors dequantized (scale·q + bias) on read
        from pathlib import Path as PathType

        import torch

        from .sources import quantized_text_encoder

        reader = quantized_text_encoder(PathType(folder))

        def read(name: str):
            return _shipped_tensor(name, torch.from_numpy(reader.load(name)), dtype, shipped)

        for key in ("quantization", "quantization_config"):
            if hasattr(config, key):
                delattr(config, key)
    else:
        files = _tensor_files(folder)

        def read(name: str):
            with safe_open(files[name], framework="pt") as handle:
                return _shipped_tensor(name, handle.get_tensor(name), dtype, shipped)

    with init_empty_weights():
        model = Qwen3ForCausalLM._from_config(config, torch_dtype=dtype)
    layer_names = {}
    for name, _ in model.named_parameters():
        if name.startswith("model.layers."):
            layer_names.setdefault(int(name.split(".")[2]), []).append(name)
        elif not (name == "lm_head.weight" and config.tie_word_embeddings):
            set_module_tensor_to_device(model, name, "cpu", value=read(name))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight

    def load_layer(index: int):
        def hook(_module, _args):
            for name in layer_names[index]:
                set_module_tensor_to_device(model, name, "cpu", value=read(name))

        return hook

    def drop_layer(index: int):
        def hook(_module, _args, _output):
            for name in layer_names[index]:
                set_module_tensor_to_device(model, name, "meta")

        return hook

    for index, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(load_layer(index))
        layer.register_forward_hook(drop_layer(index))
    return model.eval()


def encode_prompt_phase(
    source: Source, dtype, prompt: str, out_layers, max_sequence_length: int, shipped=None, device="cpu"
):
    """Phase 1: the cut text encoder (weights as shipped when `shipped(name, float32 array)` is given) encodes the
    prompt with diffusers' own code, one decoder layer resident at a time (on CPU), and is freed; returns
    prompt_embeds on `device`."""
    import gc

    import torch
    from diffusers import Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    quiet_libraries()
    folders = source.components
    config = cut_text_encoder_config(folders["text_encoder"], out_layers)
    if torch.device(device).type == "cpu" or source.text_encoder_prequantized:
        prequantized = source.text_encoder_prequantized
        encoder = layerwise_text_encoder(folders["text_encoder"], config, dtype, shipped, prequantized)
    else:  # an accelerator: the whole cut encoder on it
        encoder = Qwen3ForCausalLM.from_pretrained(
            folders["text_encoder"], config=config, torch_dtype=dtype, use_safetensors=True
        ).eval()
        if shipped is not None:
            with torch.no_grad():
                for name, parameter in encoder.named_parameters():
                    if not (name == "lm_head.weight" and encoder.config.tie_word_embeddings):
                        parameter.copy_(_shipped_tensor(name, parameter.detach().clone(), dtype, shipped))
        encoder.to(device)
    pipe = Flux2KleinPipeline(
        scheduler=None,
        vae=None,
        text_encoder=encoder,
        tokenizer=AutoTokenizer.from_pretrained(folders["tokenizer"]),
        transformer=None,
        is_distilled=True,
    )
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            prompt=prompt,
            device=torch.device(device),
            max_sequence_length=max_sequence_length,
            text_encoder_out_layers=tuple(out_layers),
        )
    del pipe, encoder
    gc.collect()
    return embeds


def run_reference_phased(
    source: Source,
    dtype,
    prompt: str,
    noise: np.ndarray,
    steps: int,
    out_layers: tuple[int, ...],
    max_sequence_length: int = 512,
    shipped=None,
    device=None,
) -> ReferenceOutput:
    """The reference in deployment order (module docstring); the same outputs as `run_reference`."""
    import gc

    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    device = device or reference_device()
    embeds = encode_prompt_phase(source, dtype, prompt, out_layers, max_sequence_length, shipped, device)
    folders = source.components
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folders["scheduler"]),
        vae=AutoencoderKLFlux2.from_pretrained(folders["vae"], torch_dtype=dtype, use_safetensors=True).eval(),
        text_encoder=None,
        tokenizer=None,
        transformer=codes_transformer(source, dtype, device),
        is_distilled=True,
    ).to(device)
    output = run_reference(pipe, None, noise, steps, out_layers, max_sequence_length, prompt_embeds=embeds)
    del pipe, embeds
    gc.collect()
    return output


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
    prompt_embeds=None,
) -> ReferenceOutput:
    """Generate with diffusers from the given initial noise (NCHW), capturing the final latents (from `prompt`,
    or from `prompt_embeds` computed beforehand by `encode_prompt_phase`)."""
    import torch

    _, _, latent_h, latent_w = noise.shape
    captured = {}

    def keep_latents(pipe, step, timestep, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    dtype = pipeline.transformer.dtype
    device = pipeline.transformer.device if hasattr(pipeline.transformer, "device") else torch.device("cpu")
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipeline(
            prompt=prompt if prompt_embeds is None else None,
            prompt_embeds=prompt_embeds,
            latents=torch.from_numpy(noise).to(dtype).to(device),
            height=latent_h * 16,
            width=latent_w * 16,
            num_inference_steps=steps,
            guidance_scale=1.0,
            text_encoder_out_layers=tuple(out_layers),
            max_sequence_length=max_sequence_length,
            output_type="np",
            callback_on_step_end=keep_latents,
        ).images
    packed = captured["latents"].float().cpu().numpy()  # (1, H*W, 128), row-major over (h, w)
    latents = packed.reshape(1, latent_h, latent_w, -1).transpose(0, 3, 1, 2)
    image = np.clip(np.round(images[0] * 255.0), 0, 255).astype(np.uint8)
    return ReferenceOutput(image=image, latents=np.ascontiguousarray(latents, dtype=np.float32))
