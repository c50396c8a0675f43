"""The canonical `packed` target: codes at information size (formats/packed.md)."""

from __future__ import annotations

import numpy as np

from ..codecs import packed as codec
from ..lowbit import GROUP_SIZE, LowBitTensor
from ..safetensors_io import TensorSpec
from .base import Planned, Target


class PackedTarget(Target):
    name = "packed"

    def low_bit_outputs(self, name: str, shape: tuple[int, int], variant: str) -> list[Planned]:
        out_features, in_features = shape
        prefix = name[: -len(".weight")]
        return [
            Planned(
                TensorSpec(name, "U8", (out_features, codec.code_bytes_per_row(in_features, variant))),
                "low_bit_codes",
                name,
            ),
            Planned(TensorSpec(f"{prefix}.scales", "F16", (out_features, in_features // GROUP_SIZE)), "scales", name),
        ]

    def encode_low_bit(self, tensor: LowBitTensor, variant: str) -> dict[str, np.ndarray]:
        prefix = tensor.name[: -len(".weight")]
        return {tensor.name: codec.encode(tensor.codes, variant), f"{prefix}.scales": tensor.scales}

    def transformer_config(self, config: dict, variant: str, low_bit_names: list[str]) -> dict:
        result = dict(config)
        result["bonsai_packed"] = {"format": "packed", "variant": variant, "group_size": GROUP_SIZE}
        return result
