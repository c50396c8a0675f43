"""Expected tensor names and shapes of each component, from its config alone (models built on the meta device)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from functools import lru_cache
from importlib import metadata

from .files import cache_dir

# FLUX.2 [klein] 4B: the transformer config of black-forest-labs/FLUX.2-klein-4B (diffusers 0.42.1).
KLEIN_4B_TRANSFORMER = dict(
    _class_name="Flux2Transformer2DModel",
    patch_size=1,
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=[32, 32, 32, 32],
    rope_theta=2000,
    guidance_embeds=False,
)
# Qwen3-4B (hidden 2560, 36 layers), the Klein 4B text encoder.
QWEN3_4B = dict(
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000,
    tie_word_embeddings=True,
)
KLEIN_TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
# AutoencoderKLFlux2 defaults (the released VAE config).
FLUX2_VAE = dict(_class_name="AutoencoderKLFlux2")


def _config_kwargs(config: dict, cls) -> dict:
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)
    kwargs = {k: v for k, v in config.items() if k in accepted}
    for key in ("axes_dims_rope", "block_out_channels", "down_block_types", "up_block_types", "patch_size"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return kwargs


def _shapes_of(module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def _freeze(config: dict) -> tuple:
    return (json.dumps(config, sort_keys=True, default=list),)


def _disk_cached(kind: str, frozen: tuple, build: Callable[[], dict[str, tuple[int, ...]]]) -> dict:
    """`build()`'s shapes, kept in `<cache>/shapes/` under the config and the library versions that built them.

    Building a model on the meta device needs diffusers or transformers imported (7–8 s here, a sixth of a Klein
    pack); every later pack of the same architecture reads a small JSON instead. A missing, unreadable or
    malformed entry is rebuilt; a cache that cannot be written is skipped.
    """
    versions = {package: _version(package) for package in ("diffusers", "transformers", "accelerate", "torch")}
    key = hashlib.sha256(json.dumps([kind, versions, frozen[0]], sort_keys=True).encode()).hexdigest()
    path = cache_dir() / "shapes" / f"{key}.json"
    try:
        stored = json.loads(path.read_text())
        if isinstance(stored, dict) and all(isinstance(v, list) for v in stored.values()):
            return {name: tuple(int(d) for d in shape) for name, shape in stored.items()}
    except (OSError, ValueError, TypeError):
        pass
    shapes = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            json.dump({name: list(shape) for name, shape in shapes.items()}, handle)
        os.replace(handle.name, path)
    except OSError:
        pass
    return shapes


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


@lru_cache(maxsize=8)
def _transformer_shapes(frozen: tuple) -> dict[str, tuple[int, ...]]:
    def build() -> dict[str, tuple[int, ...]]:
        from accelerate import init_empty_weights
        from diffusers import Flux2Transformer2DModel

        config = json.loads(frozen[0])
        with init_empty_weights():
            model = Flux2Transformer2DModel(**_config_kwargs(config, Flux2Transformer2DModel))
        return _shapes_of(model)

    return _disk_cached("Flux2Transformer2DModel", frozen, build)


def transformer_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of Flux2Transformer2DModel(config)'s state dict."""
    return _transformer_shapes(_freeze(config))


@lru_cache(maxsize=8)
def _text_encoder_shapes(frozen: tuple) -> dict[str, tuple[int, ...]]:
    def build() -> dict[str, tuple[int, ...]]:
        from accelerate import init_empty_weights
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = json.loads(frozen[0])
        with init_empty_weights():
            model = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in config.items() if not k.startswith("_")}))
        shapes = _shapes_of(model)
        if config.get("tie_word_embeddings", False):
            shapes.pop("lm_head.weight", None)
        return shapes

    return _disk_cached("Qwen3ForCausalLM", frozen, build)


def text_encoder_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the Qwen3ForCausalLM text encoder's saved state dict (tied lm_head not saved)."""
    return _text_encoder_shapes(_freeze(config))


@lru_cache(maxsize=8)
def _vae_shapes(frozen: tuple) -> dict[str, tuple[int, ...]]:
    def build() -> dict[str, tuple[int, ...]]:
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKLFlux2

        config = json.loads(frozen[0])
        with init_empty_weights():
            model = AutoencoderKLFlux2(**_config_kwargs(config, AutoencoderKLFlux2))
        return _shapes_of(model)

    return _disk_cached("AutoencoderKLFlux2", frozen, build)


def vae_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of AutoencoderKLFlux2(config)'s state dict."""
    return _vae_shapes(_freeze(config))
