"""The layout of a bundle: every file, every tensor in it, every config, from a model description alone.

This is the one place a bundle's layout is decided. `plan` sizes it, `pack` executes it (fills the planned files at
their planned offsets), and the manifest summarizes what was written. Nothing here reads a weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from . import torch_zip
from .description import CopiedFile, ModelDescription
from .gguf_io import GGUFLayout
from .lowbit import is_low_bit_key
from .safetensors_io import TensorSpec, file_size
from .summary import FileEntry, numel
from .targets.base import Planned, Target, dense_output
from .targets.mlx import MLXTarget
from .targets.packed import PackedTarget
from .vocabulary import DENSE_DTYPES, GGUF_TARGET, MLX_TARGETS, PACKED_TARGET, TARGETS

GOLDEN_DIR = "golden"
DEFAULT_GOLDEN_PROMPT = "a bonsai tree on a wooden table, studio light"
SMALL_MODEL_PARAMETERS = 100_000_000
PIPELINE_CLASSES = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}


def make_target(name: str, dense_dtype: str | None = None) -> Target:
    """The writer of a target name; dense_dtype (bfloat16/float16) overrides the target's default float dtype."""
    if name not in TARGETS:
        raise ValueError(name)
    if name == PACKED_TARGET:
        target: Target = PackedTarget()
    elif name in MLX_TARGETS:
        target = MLXTarget(name)
    elif name == GGUF_TARGET:
        from .targets.gguf import GGUFTarget

        target = GGUFTarget()
    else:
        from .targets.cuda import CudaTarget

        target = CudaTarget()
    if dense_dtype is not None:
        target.dense_dtype = DENSE_DTYPES[dense_dtype]
    return target


def json_bytes(value: dict) -> bytes:
    """How every JSON file of a bundle is written (deterministic)."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


@dataclass
class ShardFile:
    """One tensor file of a component: safetensors, torch.save's zip (`torch-zip`, formats/gemlite.md), or GGUF
    (`gguf`, formats/gguf.md: `gguf` is then its file layout)."""

    path: str
    tensors: list[Planned]
    metadata: dict[str, str]
    container: str = "safetensors"
    gguf: GGUFLayout | None = None
    modules: dict[str, dict[str, object]] | None = None  # torch-zip: a dict of module state dicts (HQQ's qmodel.pt)

    @property
    def nbytes(self) -> int:
        if self.gguf is not None:
            return self.gguf.nbytes
        specs = [p.spec for p in self.tensors]
        if self.container == "torch-zip":
            return torch_zip.file_size(specs, torch_zip.archive_name(self.path), self.modules)
        return file_size(specs, self.metadata)


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

    def entries(self) -> list[FileEntry]:
        result = [
            FileEntry(s.path, s.nbytes, tuple(sorted((p.spec.name, p.spec.nbytes) for p in s.tensors)))
            for s in self.shards
        ]
        index = self.index_bytes()
        if index is not None and self.index_path:
            result.append(FileEntry(self.index_path, len(index)))
        return result


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


def _outputs_of(planned: list[Planned]) -> dict[str, list[Planned]]:
    outputs_of: dict[str, list[Planned]] = {}
    for item in planned:
        outputs_of.setdefault(item.source, []).append(item)
    return outputs_of


def component_files(
    name: str,
    folder: str,
    planned: list[Planned],
    metadata: dict[str, str],
    shard_bytes: int,
    single_file: str | None,
    indexed: bool = True,
    container: str = "safetensors",
) -> ComponentLayout:
    """One named file (indexed or not), or shards `model-0000i-of-0000N.safetensors` plus an index."""
    if single_file is not None:
        ordered = sorted(planned, key=lambda p: p.spec.name)
        index = f"{folder}/{single_file}.index.json" if indexed else None
        files = [ShardFile(f"{folder}/{single_file}", ordered, metadata, container)]
        return ComponentLayout(name, files, index, _outputs_of(planned))
    groups = shard(planned, shard_bytes)
    count = len(groups)
    shards = [
        ShardFile(f"{folder}/model-{i + 1:05d}-of-{count:05d}.safetensors", group, metadata)
        for i, group in enumerate(groups)
    ]
    return ComponentLayout(name, shards, f"{folder}/model.safetensors.index.json", _outputs_of(planned))


def transformer_layout(
    target: Target, tensors: dict[str, tuple[tuple[int, ...], str]], variant: str, shard_bytes: int, folder: str
) -> ComponentLayout:
    """tensors: diffusers name → (shape, source dtype)."""
    planned: list[Planned] = []
    for name, (shape, dtype) in sorted(tensors.items()):
        if is_low_bit_key(name):
            planned.extend(target.low_bit_outputs(name, shape, variant))  # type: ignore[arg-type]
        else:
            planned.append(dense_output(name, shape, dtype, target.dense_dtype))
    metadata = {"format": target.safetensors_format}
    container = target.transformer_container
    layout = component_files(
        "transformer", folder, planned, metadata, shard_bytes, target.transformer_file, False, container
    )
    if container == "gguf":
        layout.shards[0].gguf = target.gguf_layout(layout.shards[0].tensors, variant)  # type: ignore[attr-defined]
    return layout


def kept_text_encoder_tensors(
    tensors: dict[str, tuple[tuple[int, ...], str]], config: dict, out_layers: tuple[int, ...], truncate: bool
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Drop what the prompt embedding never uses: the tied lm_head, and (if truncating) layers ≥ max(out_layers).

    HF's hidden state i is the output of layer i−1, so hidden states (9, 18, 27) need layers 0–26. The final norm
    (2560 values) is kept: stock mlx-lm loads strictly and its Qwen3 model owns one; nothing applies it.
    """
    last_used = max(out_layers)
    kept = {}
    for name, value in tensors.items():
        if name == "lm_head.weight" and (config.get("tie_word_embeddings", False) or truncate):
            continue
        if truncate and name.startswith("model.layers.") and int(name.split(".")[2]) >= last_used:
            continue
        kept[name] = value
    return kept


def text_encoder_layout(
    target: Target,
    tensors: dict[str, tuple[tuple[int, ...], str]],
    shard_bytes: int,
    folder: str,
    config: dict | None = None,
) -> ComponentLayout:
    planned: list[Planned] = []
    for name, (shape, dtype) in sorted(tensors.items()):
        planned.extend(target.text_encoder_outputs(name, shape, dtype))
    if target.text_encoder_container == "torch-zip":  # one qmodel.pt, no index (HQQ)
        modules = target.text_encoder_modules(tensors, config or {})
        ordered = sorted(planned, key=lambda p: p.spec.name)
        shard_file = ShardFile(f"{folder}/{target.text_encoder_file}", ordered, {}, "torch-zip", modules=modules)
        return ComponentLayout("text_encoder", [shard_file], None, _outputs_of(planned))
    metadata = {"format": target.safetensors_format}
    return component_files("text_encoder", folder, planned, metadata, shard_bytes, target.text_encoder_file)


def vae_layout(target: Target, tensors: dict[str, tuple[tuple[int, ...], str]], folder: str) -> ComponentLayout:
    """The VAE as one file under diffusers' file name (small: ~0.17 GB for Klein), in the target's dense dtype."""
    planned = [dense_output(n, shape, dtype, target.dense_dtype) for n, (shape, dtype) in sorted(tensors.items())]
    shard_file = ShardFile(f"{folder}/diffusion_pytorch_model.safetensors", planned, {"format": "pt"})
    return ComponentLayout("vae", [shard_file], None, {p.source: [p] for p in planned})


def bundle_text_encoder_config(config: dict, target: Target, out_layers: tuple[int, ...]) -> dict:
    result = target.text_encoder_config(config)
    if target.truncates_text_encoder:
        result["num_hidden_layers"] = min(int(config.get("num_hidden_layers", 0)), max(out_layers))
        if isinstance(result.get("layer_types"), list):  # transformers 5 checks it against num_hidden_layers
            result["layer_types"] = result["layer_types"][: result["num_hidden_layers"]]
    return result


def pipeline_settings(
    target_name: str,
    variant: str,
    profile: dict,
    transformer_only: bool,
    out_layers,
    te_config: dict | None,
    max_sequence_length: int,
    folders: dict[str, str],
    dense_dtype: str,
) -> dict:
    """pipeline.json (formats/bundle.md): what a runtime needs to run the bundle, folders included."""
    return {
        "format_version": 2,
        "target": target_name,
        "variant": variant,
        "transformer_only": transformer_only,
        "folders": dict(folders),
        "dense_dtype": dense_dtype,
        "text_encoder_out_layers": list(out_layers),
        "text_encoder_num_hidden_layers": int(te_config["num_hidden_layers"]) if te_config else None,
        "max_sequence_length": max_sequence_length,
        "num_inference_steps": 4,
        "guidance_scale": 1.0,
        "width": profile["default_width"],
        "height": profile["default_height"],
        "vae_tile": profile["vae_tile"],
        "compute_dtype": profile["compute_dtype"],
        "profile": profile,
    }


def model_index(source_index: dict | None, folders: dict[str, str], components: list[str]) -> dict:
    """model_index.json: the source's (if any) with each component's entry, plus the bundle's folder names."""
    index = dict(source_index or {"_class_name": "Flux2KleinPipeline", "is_distilled": True})
    for name in components:
        index[name] = index.get(name) if isinstance(index.get(name), list) else PIPELINE_CLASSES[name]
    if any(folders[name] != name for name in components):
        index["bonsai_folders"] = {name: folders[name] for name in components}
    return index


def golden_settings(parameters: int, size: int | None) -> tuple[int, str]:
    """Size and dtype: fp32 at 64² for small models, fp32 at 256² for full-size ones.

    fp32 at full size too: the MLX/CPU runtimes that verify regenerates the image with compute in fp32, and a bf16
    reference differs from them by more than the 35 dB threshold on a Klein-width model (measured: 32.4 dB). The
    phased reference keeps it within a laptop: one text-encoder layer resident, low-bit linears as int8 codes.
    The prompt length is the source's (Klein: 512 tokens, which dominate the transformer's cost at 256²)."""
    if parameters < SMALL_MODEL_PARAMETERS:
        return size or 64, "float32"
    return size or 256, "float32"


def golden_record(
    prompt: str, seed: int, size: int, dtype_name: str, out_layers, target: Target, max_sequence_length: int
) -> dict:
    """golden.json's content (deterministic: no timestamps, no measured values)."""
    return {
        "prompt": prompt,
        "seed": seed,
        "steps": 4,
        "width": size,
        "height": size,
        "guidance_scale": 1.0,
        "compute_dtype": dtype_name,
        "max_sequence_length": max_sequence_length,
        "text_encoder_out_layers": list(out_layers),
        "reference": "diffusers Flux2KleinPipeline on the source weights",
        "text_encoder": "as shipped" + (" (4-bit, dequantized)" if target.quantizes_text_encoder else " (dense)"),
        "noise": f"{GOLDEN_DIR}/noise.safetensors",
        "outputs": f"{GOLDEN_DIR}/reference.safetensors",
    }


def golden_file_specs(size: int) -> dict[str, list[TensorSpec]]:
    """The tensors of the two golden safetensors files (for size prediction)."""
    latent = (1, 128, size // 16, size // 16)
    return {
        f"{GOLDEN_DIR}/noise.safetensors": [TensorSpec("noise", "F32", latent)],
        f"{GOLDEN_DIR}/reference.safetensors": [
            TensorSpec("image", "U8", (size, size, 3)),
            TensorSpec("latents", "F32", latent),
        ],
    }


@dataclass
class GoldenPlan:
    size: int
    dtype: str
    record: dict


@dataclass
class BundleLayout:
    """Every file of a bundle: tensor files (by component), JSON files, files copied as they are, golden record."""

    target: Target
    variant: str
    folders: dict[str, str]
    components: dict[str, ComponentLayout]
    json_files: dict[str, dict]
    copies: list[tuple[str, CopiedFile]]  # (bundle path, source file)
    golden: GoldenPlan | None

    def folder(self, component: str) -> str:
        return self.folders[component]

    def entries(self) -> list[FileEntry]:
        """Every file `pack` writes (manifest excluded), with sizes, from shapes alone."""
        entries: list[FileEntry] = []
        for component in self.components.values():
            entries += component.entries()
        entries += [FileEntry(path, len(json_bytes(value))) for path, value in self.json_files.items()]
        entries += [FileEntry(path, copied.bytes) for path, copied in self.copies]
        if self.golden is not None:
            for path, specs in golden_file_specs(self.golden.size).items():
                metadata = {"format": "pt"}
                entries.append(FileEntry(path, file_size(specs, metadata), tuple((s.name, s.nbytes) for s in specs)))
        return sorted(entries, key=lambda e: e.path)


def bundle_layout(
    model: ModelDescription,
    target: Target,
    variant: str,
    profile: dict,
    golden: bool = True,
    golden_prompt: str = "",
    golden_seed: int = 0,
    golden_size: int | None = None,
) -> BundleLayout:
    """Lay the whole bundle out from the description: the single source of truth for `plan` and `pack`."""
    folders = target.folders(variant)
    shard_bytes = profile["shard_bytes"]
    components = {
        "transformer": transformer_layout(target, model.transformer, variant, shard_bytes, folders["transformer"])
    }
    json_files: dict[str, dict] = {}
    low_bit_names = [name for name in model.transformer if is_low_bit_key(name)]
    dense_names = [name for name in model.transformer if not is_low_bit_key(name)]
    json_files[f"{folders['transformer']}/config.json"] = target.transformer_config(
        model.transformer_config, variant, low_bit_names
    )
    quantization = target.quantization_config(variant, low_bit_names, dense_names)
    if quantization is not None:
        json_files[f"{folders['transformer']}/quantization_config.json"] = quantization
    json_files.update(target.extra_json_files(folders, variant))
    copies: list[tuple[str, CopiedFile]] = []
    te_config = None
    if model.text_encoder is not None and model.text_encoder_config is not None:
        te_config = bundle_text_encoder_config(model.text_encoder_config, target, model.out_layers)
        kept = kept_text_encoder_tensors(
            model.text_encoder, model.text_encoder_config, model.out_layers, target.truncates_text_encoder
        )
        components["text_encoder"] = text_encoder_layout(
            target, kept, shard_bytes, folders["text_encoder"], model.text_encoder_config
        )
        json_files[f"{folders['text_encoder']}/config.json"] = te_config
        if target.tokenizer_in_text_encoder:
            copies += [(f"{folders['text_encoder']}/{f.relative}", f) for f in model.copied_files.get("tokenizer", [])]
    if model.vae is not None and model.vae_config is not None:
        components["vae"] = vae_layout(target, model.vae, folders["vae"])
        json_files[f"{folders['vae']}/config.json"] = dict(model.vae_config)
    for name in ("tokenizer", "scheduler"):
        copies += [(f"{folders[name]}/{f.relative}", f) for f in model.copied_files.get(name, [])]
    copies += [(f.relative, f) for f in model.root_files]
    present = [name for name in PIPELINE_CLASSES if name in components or model.copied_files.get(name)]
    if not model.transformer_only:
        json_files["model_index.json"] = model_index(model.model_index, folders, present)
    json_files["pipeline.json"] = pipeline_settings(
        target.name,
        variant,
        profile,
        model.transformer_only,
        model.out_layers,
        model.text_encoder_config,  # the source's depth: the runtime knows which hidden state is the final one
        model.max_sequence_length,
        folders,
        target.dense_dtype,
    )
    golden_plan = None
    if golden and not model.transformer_only:
        parameters = sum(numel(shape) for shape, _ in model.transformer.values())
        size, dtype_name = golden_settings(parameters, golden_size)
        record = golden_record(
            golden_prompt, golden_seed, size, dtype_name, model.out_layers, target, model.max_sequence_length
        )
        json_files[f"{GOLDEN_DIR}/golden.json"] = record
        golden_plan = GoldenPlan(size, dtype_name, record)
    return BundleLayout(target, variant, folders, components, json_files, copies, golden_plan)
