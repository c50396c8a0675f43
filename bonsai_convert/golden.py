"""The golden record stored in every bundle: prompt, seed, noise, and the reference output on the source weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .layout import json_bytes
from .safetensors_io import SafetensorsWriter, TensorSpec
from .source import Source

SMALL_MODEL_PARAMETERS = 100_000_000
GOLDEN_DIR = "golden"


def golden_settings(parameters: int, size: int | None) -> tuple[int, str]:
    """Size and dtype: fp32 at 64² for small models; half precision at 256² for full-size (fits a laptop)."""
    if parameters < SMALL_MODEL_PARAMETERS:
        return size or 64, "float32"
    return size or 256, "bfloat16"


def write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8"}
    specs = [TensorSpec(name, dtypes[array.dtype], tuple(array.shape)) for name, array in tensors.items()]
    with SafetensorsWriter(path, specs, {"format": "pt"}) as writer:
        for name, array in tensors.items():
            writer.write(name, array)


def golden_record(options, size: int, dtype_name: str, out_layers, target) -> dict:
    """golden.json's content (deterministic: no timestamps, no measured values)."""
    return {
        "prompt": options.golden_prompt,
        "seed": options.golden_seed,
        "steps": 4,
        "width": size,
        "height": size,
        "guidance_scale": 1.0,
        "compute_dtype": dtype_name,
        "text_encoder_out_layers": list(out_layers),
        "reference": "diffusers Flux2KleinPipeline on the source weights",
        "text_encoder": "as shipped" + (" (4-bit, dequantized)" if target.quantizes_text_encoder else " (fp16)"),
        "noise": f"{GOLDEN_DIR}/noise.safetensors",
        "outputs": f"{GOLDEN_DIR}/reference.safetensors",
    }


def use_shipped_text_encoder(pipeline, target) -> None:
    """Give the reference the text-encoder weights as the bundle ships them (4-bit targets: dequantized).

    The transformer is exact; the text encoder's 4-bit step is a declared lossy part of some targets, so the golden
    image checks the runtime against the reference on the same weights.
    """
    import torch

    with torch.no_grad():
        for name, parameter in pipeline.text_encoder.named_parameters():
            if name == "lm_head.weight" and pipeline.text_encoder.config.tie_word_embeddings:
                continue
            shipped = target.text_encoder_as_shipped(name, parameter.detach().float().numpy())
            parameter.copy_(torch.from_numpy(np.asarray(shipped, dtype=np.float32)))


def write_golden(root: Path, source: Source, options, target) -> str:
    """Run the reference pipeline with shared numpy noise and store the record; return golden.json's path."""
    import torch
    from bonsai_common.noise import initial_noise

    from .reference import reference_pipeline, run_reference

    size, dtype_name = golden_settings(sum(int(np.prod(t.shape)) for t in source.tensors), options.golden_size)
    noise = initial_noise(options.golden_seed, size, size)
    pipeline = reference_pipeline(source, getattr(torch, dtype_name))
    use_shipped_text_encoder(pipeline, target)
    output = run_reference(
        pipeline, options.golden_prompt, noise, 4, source.text_encoder_out_layers, source.max_sequence_length
    )
    del pipeline
    folder = root / GOLDEN_DIR
    folder.mkdir()
    write_tensors(folder / "noise.safetensors", {"noise": noise})
    write_tensors(folder / "reference.safetensors", {"image": output.image, "latents": output.latents})
    record = golden_record(options, size, dtype_name, source.text_encoder_out_layers, target)
    (folder / "golden.json").write_bytes(json_bytes(record))
    return f"{GOLDEN_DIR}/golden.json"


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
