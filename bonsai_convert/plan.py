"""`plan`: a bundle's bytes per component and its memory during generation, from tensor shapes alone.

The file list is the bundle layout `pack` executes (layout.bundle_layout), so on a real source the prediction
equals the packed bundle byte for byte. The memory model is documented in formats/memory.md.
"""

from __future__ import annotations

from .description import ModelDescription, describe, describe_source, fp16_sizes, klein_4b  # noqa: F401
from .errors import UsageError
from .layout import DEFAULT_GOLDEN_PROMPT, bundle_layout, make_target
from .lowbit import is_low_bit_key
from .profiles import profile_for
from .summary import FileEntry, numel, summarize


def plan_entries(
    model: ModelDescription, target_name: str, variant: str, golden: bool = True, dense_dtype: str | None = None
) -> list[FileEntry]:
    """Every file `pack` would write (manifest excluded), with sizes, from shapes alone."""
    layout = bundle_layout(
        model,
        make_target(target_name, dense_dtype),
        variant,
        profile_for(target_name),
        golden=golden,
        golden_prompt=DEFAULT_GOLDEN_PROMPT,
    )
    return layout.entries()


def plan(
    model: ModelDescription,
    target_name: str,
    variant: str,
    width: int,
    height: int,
    golden: bool = True,
    dtype: str | None = None,
    dense_dtype: str | None = None,
    device: str = "gpu",
) -> dict:
    """The plan report: the same JSON shape as `inspect --json`, plus memory and device fit (`device`: see
    memory.estimate_memory)."""
    from .memory import estimate_memory

    if variant not in ("binary", "ternary"):
        raise UsageError(f"--variant {variant}: choose binary or ternary")
    entries = plan_entries(model, target_name, variant, golden, dense_dtype)
    low_bit_weights = sum(numel(shape) for name, (shape, _) in model.transformer.items() if is_low_bit_key(name))
    transformer_weights = sum(numel(shape) for shape, _ in model.transformer.values())
    summary = summarize(entries, fp16_sizes(model), low_bit_weights, transformer_weights)
    for name in model.estimated:
        if name in summary["components"]:
            summary["components"][name]["estimated"] = True
    profile = profile_for(target_name)
    memory = estimate_memory(model, summary["components"], profile, width, height, dtype, device)
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
