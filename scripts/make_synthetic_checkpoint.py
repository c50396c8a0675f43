"""Write a trained-looking FLUX.2 Klein checkpoint (real key names and widths) without any weights.

    python scripts/make_synthetic_checkpoint.py OUT --variant binary|ternary [--num-layers N]
        [--num-single-layers M] [--seed S]                       # transformer only (7.75 GB)
    python scripts/make_synthetic_checkpoint.py OUT --variant binary|ternary --full [--scale F]
        [--max-sequence-length L] [--seed S]                     # the whole pipeline (15.96 GB)

Low-bit linears hold exact random binary/ternary codes × random group scales that are exact in both bf16 and
fp16; everything else is random bf16. Stored bf16, sharded like the released diffusers checkpoint
(`diffusion_pytorch_model-0000i-of-0000N.safetensors` + index), with config.json.

`--full` writes a complete diffusers `Flux2KleinPipeline` folder: the transformer above, a Qwen3-4B-shaped text
encoder (`text_encoder/model-0000i-of-0000N.safetensors` + index, 36 layers, hidden 2560, vocab 151936), the Klein
VAE (AutoencoderKLFlux2 defaults), the offline byte-level Qwen2 tokenizer of the demo, the FlowMatch scheduler and
model_index.json. `--scale F` (0 < F ≤ 1) multiplies the depths (transformer double/single blocks, text-encoder
layers; the three prompt-embedding layers move with it and are recorded in bonsai_demo.json) and never the
widths, so every tensor keeps Klein's shape. `--max-sequence-length` records a prompt length other than Klein's
512 in bonsai_demo.json.

Streams tensor by tensor in row chunks (memory stays flat), deterministic from the seed (each tensor has its own
generator), and checks free disk space for everything first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from bonsai_convert.layout import shard
from bonsai_convert.lowbit import GROUP_SIZE, is_low_bit_key
from bonsai_convert.model_shapes import (
    FLUX2_VAE,
    KLEIN_4B_TRANSFORMER,
    KLEIN_TEXT_ENCODER_OUT_LAYERS,
    QWEN3_4B,
    text_encoder_shapes,
    transformer_shapes,
    vae_shapes,
)
from bonsai_convert.safetensors_io import SafetensorsWriter, TensorSpec, float32_to_bf16_bits
from bonsai_convert.targets.base import Planned

SHARD_BYTES = 5_000_000_000
ROWS_PER_CHUNK = 4096


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """A generator per tensor: output does not depend on write order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def exact_scale_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """bf16 bit patterns of positive scales in [2^-8, 2^-4): 7 mantissa bits, so exact in fp16 as well."""
    exponent = rng.integers(127 - 8, 127 - 4, size=shape, dtype=np.uint16)
    mantissa = rng.integers(0, 128, size=shape, dtype=np.uint16)
    return (exponent << 7) | mantissa


def low_bit_rows(rng: np.random.Generator, rows: int, cols: int, variant: str) -> np.ndarray:
    """bf16 bits of `rows` rows of an exact low-bit weight: ±s (binary) or −s/0/+s (ternary)."""
    scale_bits = np.repeat(exact_scale_bits(rng, (rows, cols // GROUP_SIZE)), GROUP_SIZE, axis=1)
    if variant == "binary":
        signs = rng.integers(0, 2, size=(rows, cols), dtype=np.uint16) << 15
        return scale_bits | signs
    trits = rng.integers(0, 3, size=(rows, cols), dtype=np.uint8)
    bits = scale_bits | ((trits == 0).astype(np.uint16) << 15)
    bits[trits == 1] = 0
    return bits


def dense_rows(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 1:
        return float32_to_bf16_bits(1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32))
    return float32_to_bf16_bits(0.02 * rng.standard_normal(shape, dtype=np.float32))


def write_tensor(writer: SafetensorsWriter, name: str, shape: tuple[int, ...], variant: str, seed: int) -> None:
    rng = tensor_rng(seed, name)
    if is_low_bit_key(name):
        rows, cols = shape
        for start in range(0, rows, ROWS_PER_CHUNK):
            writer.write_rows(name, low_bit_rows(rng, min(ROWS_PER_CHUNK, rows - start), cols, variant), start)
    else:
        writer.write(name, dense_rows(rng, name, shape))


def text_encoder_rows(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Qwen3 tensors: RMSNorm weights near 1, matrices N(0, 0.02²) (the HF initializer range)."""
    if len(shape) == 1:
        return float32_to_bf16_bits(1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32))
    return float32_to_bf16_bits(0.02 * rng.standard_normal(shape, dtype=np.float32))


def vae_rows(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """VAE tensors: convs/linears with variance 1/fan_in (activations keep their scale through the decoder, so the
    image is not flat), norm weights near 1, biases near 0, BatchNorm statistics with a positive variance."""
    if name == "bn.running_var":
        return float32_to_bf16_bits(rng.uniform(0.5, 2.0, size=shape).astype(np.float32))
    if len(shape) == 1:
        centre = 0.0 if name.endswith("bias") or name == "bn.running_mean" else 1.0
        return float32_to_bf16_bits(centre + 0.05 * rng.standard_normal(shape, dtype=np.float32))
    fan_in = int(np.prod(shape[1:]))
    return float32_to_bf16_bits(rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in)))


def write_component_tensor(writer: SafetensorsWriter, spec: TensorSpec, rows_of, seed: int, component: str) -> None:
    """One tensor of a dense component, 2-D ones in row chunks (the 151936×2560 embedding is never whole)."""
    rng = tensor_rng(seed, f"{component}/{spec.name}")
    if spec.dtype == "I64":
        writer.write(spec.name, np.zeros(spec.shape, dtype=np.int64))
    elif len(spec.shape) == 2:
        rows = spec.shape[0]
        for start in range(0, rows, ROWS_PER_CHUNK):
            count = min(ROWS_PER_CHUNK, rows - start)
            writer.write_rows(spec.name, rows_of(rng, spec.name, (count, spec.shape[1])), start)
    else:
        writer.write(spec.name, rows_of(rng, spec.name, spec.shape))


def scaled_depths(scale: float) -> dict:
    """Depths at `scale` (widths never change): transformer blocks, text-encoder layers, prompt-embedding layers."""
    if not 0 < scale <= 1:
        raise ValueError("--scale must be in (0, 1]")
    if scale == 1:
        return {
            "num_layers": KLEIN_4B_TRANSFORMER["num_layers"],
            "num_single_layers": KLEIN_4B_TRANSFORMER["num_single_layers"],
            "text_layers": QWEN3_4B["num_hidden_layers"],
            "out_layers": tuple(KLEIN_TEXT_ENCODER_OUT_LAYERS),
        }
    text_layers = max(3, round(QWEN3_4B["num_hidden_layers"] * scale))
    deepest = max(KLEIN_TEXT_ENCODER_OUT_LAYERS)
    out_layers = tuple(max(1, round(k * text_layers / QWEN3_4B["num_hidden_layers"])) for k in (9, 18, deepest))
    if len(set(out_layers)) < 3:
        out_layers = (1, 2, 3)
    return {
        "num_layers": max(1, round(KLEIN_4B_TRANSFORMER["num_layers"] * scale)),
        "num_single_layers": max(1, round(KLEIN_4B_TRANSFORMER["num_single_layers"] * scale)),
        "text_layers": text_layers,
        "out_layers": out_layers,
    }


def write_sharded(folder: Path, specs: list[TensorSpec], stem: str, index_name: str, write_one) -> int:
    """Write `specs` into 5 GB shards `stem-0000i-of-0000N.safetensors` (+ index when more than one)."""
    planned = [Planned(spec, "", spec.name) for spec in specs]
    groups = shard(planned, SHARD_BYTES)
    weight_map = {}
    for index, group in enumerate(groups):
        filename = f"{stem}-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        with SafetensorsWriter(folder / filename, [p.spec for p in group], {"format": "pt"}) as writer:
            for item in group:
                write_one(writer, item.spec)
                weight_map[item.spec.name] = filename
    total = sum(spec.nbytes for spec in specs)
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / index_name).write_text(json.dumps(index_json, indent=2) + "\n")
    return len(groups)


def full_configs(depths: dict) -> tuple[dict, dict, dict]:
    """(transformer, text encoder, VAE) configs of the full pipeline, as the libraries write them."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2
    from transformers import Qwen3Config

    transformer = dict(
        KLEIN_4B_TRANSFORMER, num_layers=depths["num_layers"], num_single_layers=depths["num_single_layers"]
    )
    text = {k: v for k, v in QWEN3_4B.items() if not k.startswith("_") and k != "model_type"}
    text_config = Qwen3Config(**dict(text, num_hidden_layers=depths["text_layers"]))
    text_config.dtype = "bfloat16"
    text_encoder = text_config.to_dict()
    with init_empty_weights():
        vae_model = AutoencoderKLFlux2(**{k: v for k, v in FLUX2_VAE.items() if not k.startswith("_")})
    vae = dict(vae_model.config)
    vae = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vae.items() if not k.startswith("_")}
    vae = {"_class_name": "AutoencoderKLFlux2", **vae}
    return transformer, text_encoder, vae


MODEL_INDEX = {
    "_class_name": "Flux2KleinPipeline",
    "_diffusers_version": "0.42.1",
    "is_distilled": True,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}


def write_full(out: Path, variant: str, seed: int, scale: float, max_sequence_length: int | None) -> int:
    """The whole Flux2KleinPipeline folder (see the module docstring); returns an exit code."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from bonsai_convert.demo import SCHEDULER_CONFIG, _build_tokenizer
    from bonsai_convert.reference import quiet_libraries

    quiet_libraries()
    depths = scaled_depths(scale)
    transformer_config, text_config, vae_config = full_configs(depths)
    components = {
        "transformer": [TensorSpec(n, "BF16", s) for n, s in sorted(transformer_shapes(transformer_config).items())],
        "text_encoder": [TensorSpec(n, "BF16", s) for n, s in sorted(text_encoder_shapes(text_config).items())],
        "vae": [
            TensorSpec(n, "I64" if n.endswith("num_batches_tracked") else "BF16", s)
            for n, s in sorted(vae_shapes(vae_config).items())
        ],
    }
    total = sum(spec.nbytes for specs in components.values() for spec in specs)
    if out.exists():
        print(f"error: {out}: already exists", file=sys.stderr)
        return 4
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if free < total * 1.05:
        print(f"error: {out}: needs {total / 1e9:.2f} GB of free disk, only {free / 1e9:.2f} GB free", file=sys.stderr)
        return 4
    for name in ("transformer", "text_encoder", "vae"):
        (out / name).mkdir(parents=True)
    transformer_shards = write_sharded(
        out / "transformer",
        components["transformer"],
        "diffusion_pytorch_model",
        "diffusion_pytorch_model.safetensors.index.json",
        lambda writer, spec: write_tensor(writer, spec.name, spec.shape, variant, seed),
    )
    (out / "transformer" / "config.json").write_text(json.dumps(transformer_config, indent=2) + "\n")
    text_shards = write_sharded(
        out / "text_encoder",
        components["text_encoder"],
        "model",
        "model.safetensors.index.json",
        lambda writer, spec: write_component_tensor(writer, spec, text_encoder_rows, seed, "text_encoder"),
    )
    (out / "text_encoder" / "config.json").write_text(json.dumps(text_config, indent=2, sort_keys=True) + "\n")
    vae_specs = components["vae"]
    with SafetensorsWriter(out / "vae" / "diffusion_pytorch_model.safetensors", vae_specs, {"format": "pt"}) as w:
        for spec in vae_specs:
            write_component_tensor(w, spec, vae_rows, seed, "vae")
    (out / "vae" / "config.json").write_text(json.dumps(vae_config, indent=2) + "\n")
    _build_tokenizer().save_pretrained(out / "tokenizer")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    settings = {}
    if depths["out_layers"] != tuple(KLEIN_TEXT_ENCODER_OUT_LAYERS):
        settings["text_encoder_out_layers"] = list(depths["out_layers"])
    if max_sequence_length is not None:
        settings["max_sequence_length"] = int(max_sequence_length)
    if settings:
        (out / "bonsai_demo.json").write_text(json.dumps(dict(variant=variant, seed=seed, **settings), indent=2) + "\n")
    print(
        f"wrote {out}: full {variant} pipeline at scale {scale:g} ({depths['num_layers']}+{depths['num_single_layers']}"
        f" blocks, {depths['text_layers']} text layers, out layers {list(depths['out_layers'])}), {total:,} bytes"
        f" (transformer {transformer_shards} shards, text encoder {text_shards})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", choices=["binary", "ternary"], required=True)
    parser.add_argument("--full", action="store_true", help="the whole pipeline, not only the transformer")
    parser.add_argument("--scale", type=float, default=1.0, help="--full: depth multiplier in (0, 1], widths kept")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="--full: prompt length to record")
    parser.add_argument("--num-layers", type=int, default=KLEIN_4B_TRANSFORMER["num_layers"])
    parser.add_argument("--num-single-layers", type=int, default=KLEIN_4B_TRANSFORMER["num_single_layers"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-attention-heads",
        type=int,
        default=KLEIN_4B_TRANSFORMER["num_attention_heads"],
        help="width = heads x 128 (default 24: the real 3072; tests use fewer)",
    )
    args = parser.parse_args(argv)
    if args.full:
        if not 0 < args.scale <= 1:
            parser.error("--scale must be in (0, 1]")
        return write_full(args.out, args.variant, args.seed, args.scale, args.max_sequence_length)
    config = dict(
        KLEIN_4B_TRANSFORMER,
        num_layers=args.num_layers,
        num_single_layers=args.num_single_layers,
        num_attention_heads=args.num_attention_heads,
    )
    shapes = transformer_shapes(config)
    planned = [Planned(TensorSpec(n, "BF16", s), "", n) for n, s in sorted(shapes.items())]
    total = sum(p.spec.nbytes for p in planned)
    folder = args.out / "transformer"
    if args.out.exists():
        print(f"error: {args.out}: already exists", file=sys.stderr)
        return 4
    free = shutil.disk_usage(args.out.parent if args.out.parent.exists() else Path.cwd()).free
    if free < total * 1.05:
        needed, available = total / 1e9, free / 1e9
        print(f"error: {args.out}: needs {needed:.2f} GB of free disk, only {available:.2f} GB free", file=sys.stderr)
        return 4
    folder.mkdir(parents=True)
    groups = shard(planned, SHARD_BYTES)
    weight_map = {}
    for index, group in enumerate(groups):
        filename = f"diffusion_pytorch_model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        with SafetensorsWriter(folder / filename, [p.spec for p in group], {"format": "pt"}) as writer:
            for item in group:
                write_tensor(writer, item.spec.name, item.spec.shape, args.variant, args.seed)
                weight_map[item.spec.name] = filename
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    parameters = sum(int(np.prod(s)) for s in shapes.values())
    print(f"wrote {args.out}: {args.variant}, {parameters:,} parameters, {total:,} bytes in {len(groups)} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
