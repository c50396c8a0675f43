"""`plan`: a bundle's bytes per component and its memory during generation, from tensor shapes alone.

The file list is computed with the same layout code `pack` writes with (layout.py), so on a real source the
prediction equals the packed bundle byte for byte. The memory model is documented in formats/memory.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError
from .golden import GOLDEN_DIR, golden_file_specs, golden_record, golden_settings
from .layout import (
    ComponentLayout,
    json_bytes,
    kept_text_encoder_tensors,
    make_target,
    text_encoder_layout,
    transformer_layout,
    vae_layout,
)
from .lowbit import is_low_bit_key
from .manifest import FileEntry, numel, summarize
from .model_shapes import (
    KLEIN_4B_TRANSFORMER,
    KLEIN_TEXT_ENCODER_OUT_LAYERS,
    QWEN3_4B,
    text_encoder_shapes,
    transformer_shapes,
    vae_shapes,
)
from .pack import PackOptions, bundle_text_encoder_config, pipeline_settings, transformer_shapes_of
from .profiles import profile_for
from .safetensors_io import file_size

Shapes = dict[str, tuple[tuple[int, ...], str]]

# Klein 4B files we cannot read here (no weights can be downloaded): sizes of the released Qwen3 tokenizer and
# scheduler/VAE configs, rounded. Components built from them are flagged "estimated" in the plan.
KLEIN_4B_FIXED_FILES = {
    "tokenizer": [
        ("tokenizer/tokenizer.json", 11_422_654),
        ("tokenizer/tokenizer_config.json", 9_706),
        ("tokenizer/vocab.json", 2_776_833),
        ("tokenizer/merges.txt", 1_671_853),
    ],
    "scheduler": [("scheduler/scheduler_config.json", 486)],
}
KLEIN_4B_VAE_CONFIG = {
    "_class_name": "AutoencoderKLFlux2",
    "act_fn": "silu",
    "batch_norm_eps": 0.0001,
    "batch_norm_momentum": 0.1,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 32,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "patch_size": [2, 2],
    "sample_size": 1024,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": True,
    "use_quant_conv": True,
}


@dataclass
class ModelDescription:
    """What plan needs of a model: configs, tensor shapes/dtypes, and the sizes of files copied as they are."""

    label: str
    transformer_config: dict
    transformer: Shapes
    text_encoder_config: dict | None = None
    text_encoder: Shapes | None = None
    vae_config: dict | None = None
    vae: Shapes | None = None
    copied_files: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    out_layers: tuple[int, ...] = KLEIN_TEXT_ENCODER_OUT_LAYERS
    max_sequence_length: int = 512
    estimated: tuple[str, ...] = ()

    @property
    def transformer_only(self) -> bool:
        return self.text_encoder is None or self.vae is None or not self.copied_files.get("tokenizer")


def klein_4b() -> ModelDescription:
    """The built-in FLUX.2 [klein] 4B description (bf16 source, as released)."""
    transformer = {name: (shape, "BF16") for name, shape in transformer_shapes(KLEIN_4B_TRANSFORMER).items()}
    text_encoder = {name: (shape, "BF16") for name, shape in text_encoder_shapes(QWEN3_4B).items()}
    vae = {
        name: (shape, "F32" if name.endswith(("running_mean", "running_var")) else "BF16")
        for name, shape in vae_shapes(KLEIN_4B_VAE_CONFIG).items()
    }
    vae = {
        name: ((shape, "I64") if name.endswith("num_batches_tracked") else (shape, dtype))
        for name, (shape, dtype) in vae.items()
    }
    return ModelDescription(
        label="klein-4b",
        transformer_config=dict(KLEIN_4B_TRANSFORMER),
        transformer=transformer,
        text_encoder_config=dict(QWEN3_4B),
        text_encoder=text_encoder,
        vae_config=KLEIN_4B_VAE_CONFIG,
        vae=vae,
        copied_files=KLEIN_4B_FIXED_FILES,
        estimated=("tokenizer", "scheduler", "configs"),
    )


def describe_source(spec: str) -> ModelDescription:
    """A source folder/file read through its headers and configs only (no tensor is loaded)."""
    from .source import open_source

    return describe(open_source(spec))


def describe(source) -> ModelDescription:
    """The description of an opened Source (headers and configs only)."""
    from .source import component_tensors, read_json, safe_files_under

    description = ModelDescription(
        label=source.label,
        transformer_config=source.transformer_config,
        transformer=transformer_shapes_of(source),
        out_layers=source.text_encoder_out_layers,
        max_sequence_length=source.max_sequence_length,
    )
    if "text_encoder" in source.components:
        description.text_encoder_config = read_json(source.components["text_encoder"] / "config.json")
        description.text_encoder = component_tensors(source.components["text_encoder"])[0]
    if "vae" in source.components:
        description.vae_config = read_json(source.components["vae"] / "config.json")
        description.vae = component_tensors(source.components["vae"])[0]
    for name in ("tokenizer", "scheduler"):
        if name in source.components:
            folder = source.components[name]
            description.copied_files[name] = [
                (f"{name}/{path.relative_to(folder).as_posix()}", path.stat().st_size)
                for path in safe_files_under(folder)
            ]
    return description


def _layout_entries(layout: ComponentLayout) -> list[FileEntry]:
    entries = [
        FileEntry(
            s.path,
            file_size([p.spec for p in s.tensors], s.metadata),
            tuple(sorted((p.spec.name, p.spec.nbytes) for p in s.tensors)),
        )
        for s in layout.shards
    ]
    index = layout.index_bytes()
    if index is not None and layout.index_path:
        entries.append(FileEntry(layout.index_path, len(index)))
    return entries


def plan_entries(model: ModelDescription, target_name: str, variant: str, golden: bool = True) -> list[FileEntry]:
    """Every file `pack` would write (manifest excluded), with sizes, from shapes alone."""
    target = make_target(target_name)
    profile = profile_for(target_name)
    shard_bytes = profile["shard_bytes"]
    entries: list[FileEntry] = []
    transformer = transformer_layout(target, model.transformer, variant, shard_bytes)
    entries += _layout_entries(transformer)
    low_bit_names = [name for name in model.transformer if is_low_bit_key(name)]
    config = target.transformer_config(model.transformer_config, variant, low_bit_names)
    entries.append(FileEntry("transformer/config.json", len(json_bytes(config))))
    te_config = None
    if model.text_encoder is not None and model.text_encoder_config is not None:
        te_config = model.text_encoder_config
        kept = kept_text_encoder_tensors(model.text_encoder, te_config, model.out_layers, target.truncates_text_encoder)
        entries += _layout_entries(text_encoder_layout(target, kept, shard_bytes))
        bundle_config = bundle_text_encoder_config(te_config, target, kept, model.out_layers)
        entries.append(FileEntry("text_encoder/config.json", len(json_bytes(bundle_config))))
    if model.vae is not None and model.vae_config is not None:
        entries += _layout_entries(vae_layout(model.vae))
        entries.append(FileEntry("vae/config.json", len(json_bytes(model.vae_config))))
    for files in model.copied_files.values():
        entries += [FileEntry(path, size) for path, size in files]
    settings = pipeline_settings(
        target_name, variant, profile, model.transformer_only, model.out_layers, te_config, model.max_sequence_length
    )
    entries.append(FileEntry("pipeline.json", len(json_bytes(settings))))
    if golden and not model.transformer_only:
        parameters = sum(numel(shape) for shape, _ in model.transformer.values())
        size, dtype_name = golden_settings(parameters, None)
        for path, specs in golden_file_specs(size).items():
            entries.append(
                FileEntry(path, file_size(specs, {"format": "pt"}), tuple((s.name, s.nbytes) for s in specs))
            )
        record = golden_record(PackOptions(target=target_name), size, dtype_name, model.out_layers, target)
        entries.append(FileEntry(f"{GOLDEN_DIR}/golden.json", len(json_bytes(record))))
    return sorted(entries, key=lambda e: e.path)


def fp16_sizes(model: ModelDescription) -> dict[str, int]:
    """FP16 size of each component (the baseline the reductions are measured against)."""
    sizes = {"transformer": sum(numel(shape) * 2 for shape, _ in model.transformer.values())}
    if model.text_encoder is not None:
        sizes["text_encoder"] = sum(numel(shape) * 2 for shape, _ in model.text_encoder.values())
    if model.vae is not None:
        sizes["vae"] = sum(numel(shape) * 2 for shape, _ in model.vae.values())
    return sizes


def plan(
    model: ModelDescription,
    target_name: str,
    variant: str,
    width: int,
    height: int,
    golden: bool = True,
    dtype: str | None = None,
) -> dict:
    """The plan report: the same JSON shape as `inspect --json`, plus memory and device fit."""
    from .memory import estimate_memory

    if variant not in ("binary", "ternary"):
        raise UsageError(f"--variant {variant}: choose binary or ternary")
    entries = plan_entries(model, target_name, variant, golden)
    low_bit_weights = sum(numel(shape) for name, (shape, _) in model.transformer.items() if is_low_bit_key(name))
    transformer_weights = sum(numel(shape) for shape, _ in model.transformer.values())
    summary = summarize(entries, fp16_sizes(model), low_bit_weights, transformer_weights)
    for name in model.estimated:
        if name in summary["components"]:
            summary["components"][name]["estimated"] = True
    profile = profile_for(target_name)
    memory = estimate_memory(model, summary["components"], profile, width, height, dtype)
    return {
        "model": model.label,
        "target": target_name,
        "variant": variant,
        "exact": True,
        "profile": profile["name"],
        "components": summary["components"],
        "payload": summary["payload"],
        "low_bit_bits_per_weight": summary["bits_per_weight"]["low_bit_linears"],
        "transformer_bits_per_weight": summary["bits_per_weight"]["transformer"],
        "total_bytes": summary["total_bytes"],
        "files": len(entries),
        "memory": memory,
        "fits": memory["fits"],
    }


def parse_size(text: str | None, profile: dict) -> tuple[int, int]:
    """WxH (multiples of 16) or the profile's default size."""
    if text is None:
        return profile["default_width"], profile["default_height"]
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise UsageError(f"--size {text}: expected WxH, e.g. 512x512") from error
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise UsageError(f"--size {text}: width and height must be positive multiples of 16")
    return width, height
