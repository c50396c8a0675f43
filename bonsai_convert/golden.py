"""The golden record stored in every bundle: prompt, seed, noise, and the reference output on the source weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .layout import GOLDEN_DIR, GoldenPlan, golden_file_specs, golden_settings  # noqa: F401 - re-exported
from .safetensors_io import SafetensorsWriter, TensorSpec
from .sources import Source


def write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8"}
    specs = [TensorSpec(name, dtypes[array.dtype], tuple(array.shape)) for name, array in tensors.items()]
    with SafetensorsWriter(path, specs, {"format": "pt"}) as writer:
        for name, array in tensors.items():
            writer.write(name, array)


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


def carried_unchanged(source: Source, target) -> bool:
    """Whether the bundle ships the source's own 4-bit text encoder tensors (MLX pack → MLX target, cuda bundle →
    cuda target)."""
    return source.text_encoder_prequantized and target.carries_quantized_text_encoder == source.text_encoder_format


def write_golden(root: Path, source: Source, target, golden: GoldenPlan, prompt: str, seed: int) -> str:
    """Run the reference pipeline with shared numpy noise and store the record; return golden.json's path.

    golden.json itself (the planned record) is written by pack with the layout's other JSON files.
    """
    import torch
    from bonsai_common.noise import initial_noise

    from .reference import run_reference_phased

    noise = initial_noise(seed, golden.size, golden.size)
    # Deployment order (text encoder freed before the transformer; low-bit weights made per layer from codes):
    # bit for bit the whole-model reference's outputs, in ≤ 8 GB for Klein 4B (tests/test_reference.py).
    output = run_reference_phased(
        source,
        getattr(torch, golden.dtype),
        prompt,
        noise,
        4,
        source.text_encoder_out_layers,
        source.max_sequence_length,
        # An MLX pack's 4-bit encoder carried unchanged is already as shipped; any other target re-encodes it.
        shipped=None if carried_unchanged(source, target) else target.text_encoder_as_shipped,
    )
    folder = root / GOLDEN_DIR
    folder.mkdir(exist_ok=True)
    write_tensors(folder / "noise.safetensors", {"noise": noise})
    write_tensors(folder / "reference.safetensors", {"image": output.image, "latents": output.latents})
    return f"{GOLDEN_DIR}/golden.json"
