"""Load a CUDA (Gemlite) bundle into diffusers' Flux2KleinPipeline and generate from the shared numpy noise.

Bundle layout: formats/bundle.md; low-bit linears: formats/gemlite.md. Everything is read from safetensors or, for
the transformer, Gemlite's released `state_dict.pt` and, for the text encoder, HQQ's `qmodel.pt` (formats/hqq.md),
both read without unpickling (bonsai_common.torch_zip). The
converter package is not imported here: a runtime needs only torch, diffusers, transformers, safetensors and, on a
GPU, gemlite.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from bonsai_common.gemlite_keys import LAYER_KEYS
from torch import nn

from . import hqq
from .layers import LayoutError, build_linear, gemlite_available

INDEX_NAME = "model.safetensors.index.json"
STATE_DICT = "state_dict.pt"  # the released Gemlite container (transformer-gemlite-int{1,2}/)
AUTOTUNE_FILE = "gemlite_autotune.json"
DEFAULT_FOLDERS = {name: name for name in ("transformer", "text_encoder", "vae", "tokenizer", "scheduler")}


class BundleError(ValueError):
    """The bundle cannot be loaded (missing files, transformer-only, tensors that do not fit the model)."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise BundleError(f"{path}: missing") from error
    except json.JSONDecodeError as error:
        raise BundleError(f"{path}: not valid JSON ({error})") from error


def shard_paths(folder: Path) -> list[Path]:
    """The safetensors shards of a component: from model.safetensors.index.json, else model*.safetensors."""
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = _read_json(index).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        for name in names:
            if "/" in name or "\\" in name or name.startswith("."):
                raise BundleError(f"{index}: shard name {name!r} is not a plain file name")
        paths = [folder / name for name in names]
    else:
        paths = sorted(folder.glob("model*.safetensors"))
    if not paths:
        raise BundleError(f"{folder}: no safetensors shards")
    return paths


def _state_dict_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict.pt's tensors (CPU copies), its zip and pickle checked without unpickling."""
    from bonsai_common.torch_zip import ContainerError, read_container, stored_array

    try:
        stored = read_container(path)
    except ContainerError as error:
        raise BundleError(str(error)) from error
    tensors = {}
    for name, entry in stored.items():
        tensor = torch.from_numpy(np.array(stored_array(path, entry)))
        tensors[name] = tensor.view(torch.bfloat16) if entry.dtype == "BF16" else tensor
    return tensors


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a component: its safetensors shards (safetensors.torch.load_file, CPU) or its state_dict.pt."""
    from safetensors.torch import load_file

    if (folder / STATE_DICT).is_file() and not (folder / INDEX_NAME).exists():
        return _state_dict_tensors(folder / STATE_DICT)
    tensors: dict[str, torch.Tensor] = {}
    for path in shard_paths(folder):
        if not path.exists():
            raise BundleError(f"{path}: missing shard")
        for name, tensor in load_file(str(path)).items():
            if name in tensors:
                raise BundleError(f"{path}: tensor {name} appears in two shards")
            tensors[name] = tensor
    return tensors


def low_bit_prefixes(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module names that carry Gemlite tensors (`X.W_q` present)."""
    return sorted(name[: -len(".W_q")] for name in tensors if name.endswith(".W_q"))


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model` (works for ModuleList indices too)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def install_low_bit(
    model: nn.Module, tensors: dict[str, torch.Tensor], backend: str, device: torch.device, dtype: torch.dtype
) -> list[str]:
    """Replace every nn.Linear that has Gemlite tensors; those tensors are removed from `tensors`."""
    prefixes = low_bit_prefixes(tensors)
    for prefix in prefixes:
        state = {key: tensors.pop(f"{prefix}.{key}") for key in LAYER_KEYS if f"{prefix}.{key}" in tensors}
        try:
            target = model.get_submodule(prefix)
        except AttributeError as error:
            raise BundleError(f"{prefix}: low-bit tensors for a module the model does not have") from error
        if not isinstance(target, nn.Linear) or target.bias is not None:
            raise BundleError(f"{prefix}: low-bit tensors for a {type(target).__name__}, expected a bias-free Linear")
        if "bias" in state:
            raise BundleError(f"{prefix}.bias: a bias for a bias-free Linear")
        expected = [target.out_features, target.in_features]
        if "orig_shape" in state and state["orig_shape"].tolist() != expected:
            raise BundleError(f"{prefix}: orig_shape {state['orig_shape'].tolist()} but the model has {expected}")
        try:
            replace_module(model, prefix, build_linear(state, backend, device, dtype, prefix))
        except LayoutError as error:
            raise BundleError(str(error)) from error
    return prefixes


def load_component(model_class, folder: Path, backend: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Build `model_class` from folder/config.json without allocating weights; fill it from the shards."""
    from accelerate import init_empty_weights

    config = _read_json(folder / "config.json")
    for key in ("quantization", "bonsai_quantization"):  # informational (formats/gemlite.md)
        config.pop(key, None)
    with init_empty_weights(include_buffers=False):
        if hasattr(model_class, "from_config"):  # diffusers ModelMixin
            model = model_class.from_config(config)
        else:  # transformers PreTrainedModel
            model = model_class(model_class.config_class.from_dict(config))
    tensors = load_tensors(folder)
    install_low_bit(model, tensors, backend, device, dtype)
    state = {name: (t.to(dtype) if t.is_floating_point() else t).to(device) for name, t in tensors.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise BundleError(f"{folder}: tensors the model does not have: {sorted(result.unexpected_keys)[:5]}")
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and hasattr(model, "lm_head") and hasattr(model, "get_input_embeddings"):
        model.lm_head.weight = model.get_input_embeddings().weight
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise BundleError(f"{folder}: missing tensors: {missing[:5]}")
    return model.to(device).eval()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(
    bundle_dir: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    text_encoder_backend: str | None = None,
):
    """Flux2KleinPipeline from a CUDA bundle; backend 'auto' = GemLite on CUDA with gemlite, else decoded.
    `text_encoder_backend` (default: the same) runs the 4-bit text encoder's layers another way, e.g. decoded
    while the transformer's run in gemlite's interpreted kernels.

    dtype: compute dtype of everything but the GemLite kernels (which take fp16 activations); default
    pipeline.json's compute_dtype on CUDA, float32 on CPU. The bundle's settings (and the backend) are kept in
    `pipe.bonsai_settings`.
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    root = Path(bundle_dir)
    settings = _read_json(root / "pipeline.json")
    if settings.get("transformer_only"):
        raise BundleError(f"{root}: transformer-only bundle (no text encoder / VAE): it cannot generate")
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = getattr(torch, settings.get("compute_dtype", "float16")) if device.type == "cuda" else torch.float32
    if backend == "auto":
        backend = "gemlite" if device.type == "cuda" and gemlite_available() else "decoded"
    if backend == "gemlite" and device.type != "cuda":
        raise BundleError("the gemlite backend needs a CUDA device")
    if backend == "interpreter" and device.type != "cpu":
        raise BundleError("the interpreter backend runs gemlite's kernels on CPU tensors")

    folders = dict(DEFAULT_FOLDERS, **settings.get("folders", {}))
    transformer_folder = root / folders["transformer"]
    transformer = load_component(Flux2Transformer2DModel, transformer_folder, backend, device, dtype)
    te_folder = root / folders["text_encoder"]
    if (te_folder / hqq.WEIGHTS_FILE).is_file():  # text_encoder-hqq-4bit/ (formats/hqq.md)
        try:
            text_encoder = hqq.load_text_encoder(te_folder, text_encoder_backend or backend, device, dtype)
        except hqq.HqqError as error:
            raise BundleError(str(error)) from error
    elif low_bit_prefixes_in(te_folder):
        text_backend = text_encoder_backend or backend
        text_encoder = load_component(Qwen3ForCausalLM, te_folder, text_backend, device, dtype)
    else:
        text_encoder = Qwen3ForCausalLM.from_pretrained(te_folder, dtype=dtype, use_safetensors=True).to(device).eval()
    vae_folder = root / folders["vae"]
    vae = AutoencoderKLFlux2.from_pretrained(vae_folder, torch_dtype=dtype, use_safetensors=True).to(device).eval()
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / folders["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=AutoTokenizer.from_pretrained(root / folders["tokenizer"]),
        transformer=transformer,
        is_distilled=True,
    )
    pipe.set_progress_bar_config(disable=True)
    tuned = load_autotune_cache(transformer_folder) if backend == "gemlite" else None
    pipe.bonsai_settings = dict(settings, backend=backend, autotune_cache=str(tuned) if tuned else None)
    names = {"gemlite": f"gemlite ({device})", "interpreter": "gemlite kernels (Triton interpreter, cpu)"}
    pipe.bonsai_backend = names.get(backend, f"decoded torch ({device})")
    return pipe


def autotune_cache_path(transformer_folder: Path) -> Path:
    """The transformer's `gemlite_autotune.json` (the released layout): `{}` until `bonsai-convert tune` fills it."""
    return transformer_folder / AUTOTUNE_FILE


def load_autotune_cache(transformer_folder: Path) -> Path | None:
    """Load the bundle's Gemlite autotune cache when it holds any configs (warm start), else None."""
    import gemlite

    path = autotune_cache_path(transformer_folder)
    if not path.is_file() or path.is_symlink() or not json.loads(path.read_text() or "{}"):
        return None
    return path if gemlite.load_config(str(path), print_error=True) else None


def low_bit_prefixes_in(folder: Path) -> list[str]:
    """Low-bit module names of a component, read from the shard headers only ([] when it has no shards)."""
    from safetensors import safe_open

    if (folder / STATE_DICT).is_file() and not (folder / INDEX_NAME).exists():
        from bonsai_common.torch_zip import read_container

        return sorted(key[: -len(".W_q")] for key in read_container(folder / STATE_DICT) if key.endswith(".W_q"))
    try:
        paths = shard_paths(folder)
    except BundleError:
        return []
    names: list[str] = []
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            names += [key[: -len(".W_q")] for key in handle.keys() if key.endswith(".W_q")]
    return sorted(names)


@dataclass
class Generation:
    """One generated image, the final latents before BN-denormalization and the VAE, per-step seconds."""

    image: np.ndarray  # uint8 (H, W, 3)
    latents: np.ndarray  # float32 (1, 128, H/16, W/16)
    step_seconds: list[float] = field(default_factory=list)  # transformer forward + scheduler step


def _initial_noise(seed: int, height: int, width: int) -> np.ndarray:
    from bonsai_common.noise import initial_noise

    return initial_noise(seed, height, width)


def generate(
    pipe,
    prompt: str,
    seed: int,
    steps: int,
    width: int,
    height: int,
    noise: np.ndarray | None = None,
) -> Generation:
    """Generate from the shared numpy noise (bonsai_common.noise); return the image and final latents."""
    settings = getattr(pipe, "bonsai_settings", {})
    latent_h, latent_w = height // 16, width // 16
    if noise is None:
        noise = _initial_noise(seed, height, width)
    if tuple(noise.shape) != (1, 128, latent_h, latent_w):
        raise ValueError(f"noise must be (1, 128, {latent_h}, {latent_w}), got {tuple(noise.shape)}")
    captured: dict[str, torch.Tensor] = {}
    on_cuda = pipe.transformer.device.type == "cuda"
    starts: list[float] = []
    step_seconds: list[float] = []

    def now() -> float:
        if on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def keep_latents(_pipe, _step, _timestep, kwargs):
        step_seconds.append(now() - starts[-1])  # transformer forward + scheduler step
        captured["latents"] = kwargs["latents"]
        return kwargs

    hook = pipe.transformer.register_forward_pre_hook(lambda *_: starts.append(now()))
    try:
        with torch.no_grad():
            images = pipe(
                prompt=prompt,
                latents=torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32)),
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=float(settings.get("guidance_scale", 1.0)),
                generator=torch.Generator("cpu").manual_seed(seed),
                max_sequence_length=int(settings.get("max_sequence_length", 512)),
                text_encoder_out_layers=tuple(settings.get("text_encoder_out_layers", (9, 18, 27))),
                output_type="np",
                callback_on_step_end=keep_latents,
            ).images
    finally:
        hook.remove()
    packed = captured["latents"].float().cpu().numpy()  # (1, H*W, 128), tokens row-major over (h, w)
    latents = packed.reshape(1, latent_h, latent_w, -1).transpose(0, 3, 1, 2)
    image = np.clip(np.round(images[0] * 255.0), 0, 255).astype(np.uint8)
    return Generation(image, np.ascontiguousarray(latents, dtype=np.float32), step_seconds)
