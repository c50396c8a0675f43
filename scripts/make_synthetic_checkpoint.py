"""Write a trained-looking FLUX.2 Klein transformer checkpoint (real key names and widths) without any weights.

    python scripts/make_synthetic_checkpoint.py OUT --variant binary|ternary [--num-layers N]
        [--num-single-layers M] [--seed S]

Low-bit linears hold exact random binary/ternary codes × random group scales that are exact in both bf16 and
fp16; everything else is random bf16. Stored bf16, sharded like the released diffusers checkpoint
(`diffusion_pytorch_model-0000i-of-0000N.safetensors` + index), with config.json: a transformer-only source.
Streams tensor by tensor (memory stays flat), deterministic from the seed (each tensor has its own generator),
and checks free disk space first.
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
from bonsai_convert.model_shapes import KLEIN_4B_TRANSFORMER, transformer_shapes
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", choices=["binary", "ternary"], required=True)
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
