"""What a bundle is planned from: configs, tensor shapes/dtypes and the files copied as they are (no weights read).

`describe(source)` reads an opened Source through its headers and configs; `klein_4b()` is the built-in FLUX.2
[klein] 4B description. `plan` and `pack` both lay a bundle out from this description alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .files import read_json, refused_link, safe_files_under
from .model_shapes import (
    KLEIN_4B_TRANSFORMER,
    KLEIN_TEXT_ENCODER_OUT_LAYERS,
    QWEN3_4B,
    text_encoder_shapes,
    transformer_shapes,
    vae_shapes,
)
from .sources import Source, component_tensors, quantized_text_encoder

Shapes = dict[str, tuple[tuple[int, ...], str]]
# Files that travel from a source's root into the bundle unchanged (licence terms of the weights).
ROOT_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "NOTICE", "NOTICE.md", "NOTICE.txt")


@dataclass(frozen=True)
class CopiedFile:
    """A file copied unchanged: its path inside its component folder (or the root), size, and source path."""

    relative: str
    bytes: int
    path: Path | None = None  # None for the built-in description (sizes only)


# Klein 4B files we cannot read here (no weights can be downloaded): sizes of the released Qwen3 tokenizer and
# scheduler config, rounded. Components built from them are flagged "estimated" in the plan.
KLEIN_4B_FIXED_FILES = {
    "tokenizer": [
        CopiedFile("tokenizer.json", 11_422_654),
        CopiedFile("tokenizer_config.json", 9_706),
        CopiedFile("vocab.json", 2_776_833),
        CopiedFile("merges.txt", 1_671_853),
    ],
    "scheduler": [CopiedFile("scheduler_config.json", 486)],
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
    """What plan and pack need of a model: configs, tensor shapes/dtypes, and the files copied as they are."""

    label: str
    transformer_config: dict
    transformer: Shapes
    text_encoder_config: dict | None = None
    text_encoder: Shapes | None = None
    vae_config: dict | None = None
    vae: Shapes | None = None
    copied_files: dict[str, list[CopiedFile]] = field(default_factory=dict)  # tokenizer, scheduler
    root_files: list[CopiedFile] = field(default_factory=list)  # LICENSE / NOTICE
    model_index: dict | None = None
    out_layers: tuple[int, ...] = KLEIN_TEXT_ENCODER_OUT_LAYERS
    max_sequence_length: int = 512
    estimated: tuple[str, ...] = ()
    text_encoder_prequantized: bool = False  # an MLX-pack source: the text encoder is already 4-bit

    @property
    def transformer_only(self) -> bool:
        return self.text_encoder is None or self.vae is None or not self.copied_files.get("tokenizer")


def transformer_shapes_of(source: Source) -> Shapes:
    """Diffusers name → (logical shape, source dtype) of every transformer tensor."""
    return {t.name: (t.shape, t.file.tensors[t.key].dtype) for t in source.tensors}


def klein_4b() -> ModelDescription:
    """The built-in FLUX.2 [klein] 4B description (bf16 source, as released)."""
    transformer = {name: (shape, "BF16") for name, shape in transformer_shapes(KLEIN_4B_TRANSFORMER).items()}
    text_encoder = {name: (shape, "BF16") for name, shape in text_encoder_shapes(QWEN3_4B).items()}
    vae = {
        name: (shape, "I64" if name.endswith("num_batches_tracked") else "BF16")
        for name, shape in vae_shapes(KLEIN_4B_VAE_CONFIG).items()
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


def copied_files_of(folder: Path) -> list[CopiedFile]:
    """Every file of a folder copied as it is (tokenizer, scheduler), with its size."""
    return [
        CopiedFile(path.relative_to(folder).as_posix(), path.stat().st_size, path) for path in safe_files_under(folder)
    ]


def describe(source: Source) -> ModelDescription:
    """The description of an opened Source (headers and configs only)."""
    description = ModelDescription(
        label=source.label,
        transformer_config=source.transformer_config,
        transformer=transformer_shapes_of(source),
        out_layers=source.text_encoder_out_layers,
        max_sequence_length=source.max_sequence_length,
        text_encoder_prequantized=source.text_encoder_prequantized,
    )
    if "text_encoder" in source.components:
        folder = source.components["text_encoder"]
        description.text_encoder_config = read_json(folder / "config.json")
        if source.text_encoder_prequantized:  # planned from the dequantized shapes, as any text encoder
            description.text_encoder = quantized_text_encoder(folder).logical_shapes()
        else:
            description.text_encoder = component_tensors(folder)[0]
    if "vae" in source.components:
        description.vae_config = read_json(source.components["vae"] / "config.json")
        description.vae = component_tensors(source.components["vae"])[0]
    for name in ("tokenizer", "scheduler"):
        if name in source.components:
            description.copied_files[name] = copied_files_of(source.components[name])
    if source.root is not None:  # a folder source (a single BFL file has none)
        for name in ROOT_FILES:
            path = source.root / name
            if path.is_file() and not refused_link(path):  # a Hub cache's blob link is the file itself
                description.root_files.append(CopiedFile(name, path.stat().st_size, path))
        if (source.root / "model_index.json").is_file():
            description.model_index = read_json(source.root / "model_index.json")
    return description


def describe_source(spec: str) -> ModelDescription:
    """A source folder/file read through its headers and configs only (no tensor is loaded)."""
    from .sources import open_source

    return describe(open_source(spec))


def fp16_sizes(model: ModelDescription) -> dict[str, int]:
    """FP16 size of each component (the baseline the reductions are measured against)."""
    sizes = {"transformer": sum(_numel(shape) * 2 for shape, _ in model.transformer.values())}
    if model.text_encoder is not None:
        sizes["text_encoder"] = sum(_numel(shape) * 2 for shape, _ in model.text_encoder.values())
    if model.vae is not None:
        sizes["vae"] = sum(_numel(shape) * 2 for shape, _ in model.vae.values())
    return sizes


def _numel(shape) -> int:
    result = 1
    for dim in shape:
        result *= int(dim)
    return result
