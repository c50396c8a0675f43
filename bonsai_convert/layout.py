"""The files of a bundle and every tensor in them, from tensor shapes alone (shared by `plan` and `pack`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .lowbit import is_low_bit_key
from .safetensors_io import build_header
from .targets.base import Planned, Target, dense_output
from .targets.mlx import MLXTarget
from .targets.packed import PackedTarget


def make_target(name: str) -> Target:
    """The writer of a target name."""
    if name == "packed":
        return PackedTarget()
    if name in ("iphone", "ipad", "mac"):
        return MLXTarget(name)
    if name == "cuda":
        from .targets.cuda import CudaTarget

        return CudaTarget()
    raise ValueError(name)


@dataclass
class ShardFile:
    """One safetensors file of a component."""

    path: str
    tensors: list[Planned]
    metadata: dict[str, str]

    def header(self) -> bytes:
        return build_header([p.spec for p in self.tensors], self.metadata)

    @property
    def nbytes(self) -> int:
        return len(self.header()) + sum(p.spec.nbytes for p in self.tensors)


@dataclass
class ComponentLayout:
    """The safetensors files of one component and its index (None for a single unindexed file)."""

    name: str
    shards: list[ShardFile]
    index_path: str | None
    outputs_of: dict[str, list[Planned]] = field(default_factory=dict)  # source tensor → its outputs

    def index_bytes(self) -> bytes | None:
        if self.index_path is None:
            return None
        weight_map = {p.spec.name: s.path.rsplit("/", 1)[-1] for s in self.shards for p in s.tensors}
        total = sum(p.spec.nbytes for s in self.shards for p in s.tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        return (json.dumps(index, indent=2) + "\n").encode()


def shard(planned: list[Planned], shard_bytes: int) -> list[list[Planned]]:
    """Fill shards in name order up to shard_bytes; a tensor is never split."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for item in sorted(planned, key=lambda p: p.spec.name):
        if shards[-1] and size + item.spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.spec.nbytes
    return shards


def sharded_component(
    name: str, planned: list[Planned], shard_bytes: int, metadata: dict[str, str], stem: str = "model"
) -> ComponentLayout:
    groups = shard(planned, shard_bytes)
    count = len(groups)
    shards = [
        ShardFile(f"{name}/{stem}-{i + 1:05d}-of-{count:05d}.safetensors", group, metadata)
        for i, group in enumerate(groups)
    ]
    outputs_of: dict[str, list[Planned]] = {}
    for item in planned:
        outputs_of.setdefault(item.source, []).append(item)
    return ComponentLayout(name, shards, f"{name}/{stem}.safetensors.index.json", outputs_of)


def transformer_layout(
    target: Target, tensors: dict[str, tuple[tuple[int, ...], str]], variant: str, shard_bytes: int
) -> ComponentLayout:
    """tensors: diffusers name → (shape, source dtype)."""
    planned: list[Planned] = []
    for name, (shape, dtype) in sorted(tensors.items()):
        if is_low_bit_key(name):
            planned.extend(target.low_bit_outputs(name, shape, variant))  # type: ignore[arg-type]
        else:
            planned.append(dense_output(name, shape, dtype))
    return sharded_component("transformer", planned, shard_bytes, {"format": target.safetensors_format})


def kept_text_encoder_tensors(
    tensors: dict[str, tuple[tuple[int, ...], str]], config: dict, out_layers: tuple[int, ...], truncate: bool
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Drop what the prompt embedding never uses: the tied lm_head, and (if truncating) layers after max(out_layers).

    The final norm is kept only when the last used hidden state is the encoder's last (HF applies it there).
    """
    num_layers = int(config.get("num_hidden_layers", 0))
    last_used = max(out_layers)
    kept = {}
    for name, value in tensors.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings", False):
            continue
        if truncate:
            if name == "lm_head.weight":
                continue
            if name.startswith("model.layers."):
                if int(name.split(".")[2]) >= last_used:
                    continue
            if name == "model.norm.weight" and last_used < num_layers:
                continue
        kept[name] = value
    return kept


def text_encoder_layout(
    target: Target, tensors: dict[str, tuple[tuple[int, ...], str]], shard_bytes: int
) -> ComponentLayout:
    planned: list[Planned] = []
    for name, (shape, dtype) in sorted(tensors.items()):
        planned.extend(target.text_encoder_outputs(name, shape, dtype))
    return sharded_component("text_encoder", planned, shard_bytes, {"format": target.safetensors_format})


def vae_layout(tensors: dict[str, tuple[tuple[int, ...], str]]) -> ComponentLayout:
    """The VAE as one fp16 file under diffusers' file name (small: ~0.17 GB for Klein)."""
    planned = [dense_output(name, shape, dtype) for name, (shape, dtype) in sorted(tensors.items())]
    shard_file = ShardFile("vae/diffusion_pytorch_model.safetensors", planned, {"format": "pt"})
    return ComponentLayout("vae", [shard_file], None, {p.source: [p] for p in planned})


def json_bytes(value: dict) -> bytes:
    """How every JSON file of a bundle is written (deterministic)."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
