"""The `gguf` target (formats/gguf.md): the transformer as one GGUF file for stable-diffusion.cpp / ggml.

Tensors carry BFL names (`double_blocks.N.img_attn.qkv.weight`, ...), the names stable-diffusion.cpp detects FLUX.2
klein by (it prepends `model.diffusion_model.` itself when loading `--diffusion-model`): q/k/v rows are fused as in
BFL's checkpoints, norm_out's two halves swapped back to BFL's (shift, scale) order. The 100 block linears are Q1_0
(binary) or Q2_0 (ternary, upstream's 64-weight blocks), exact; every dense tensor is BF16, the dtype of the
Bonsai-published weights (exact: nothing is rounded), or F16 with `--dtype float16`. Text encoder and VAE are
diffusers-layout safetensors in the same dense dtype (text encoder as one `model.safetensors`).
"""

from __future__ import annotations

import numpy as np

from ..codecs import gguf as codec
from ..gguf_io import TYPE_OF_DTYPE, GGUFLayout, GGUFTensor, Piece
from ..gguf_names import FUSED_PARTS, bfl_place, is_fused
from ..lowbit import GROUP_SIZE, LowBitTensor, is_low_bit_key
from ..safetensors_io import TensorSpec
from .base import Planned, Target

GGUF_FILE = "diffusion_model.gguf"
ARCHITECTURE = "flux2"


class GGUFTarget(Target):
    name = "gguf"
    dense_dtype = "BF16"
    transformer_file = GGUF_FILE
    transformer_container = "gguf"
    text_encoder_file = "model.safetensors"

    def low_bit_outputs(self, name: str, shape: tuple[int, int], variant: str) -> list[Planned]:
        out_features, in_features = shape
        spec = TensorSpec(name, "U8", (out_features, codec.row_bytes(in_features, variant)))
        return [Planned(spec, "low_bit_codes", name)]

    def encode_low_bit(self, tensor: LowBitTensor, variant: str) -> dict[str, np.ndarray]:
        return {tensor.name: codec.encode(tensor.name, tensor.codes, tensor.scales, variant)}

    def transformer_config(self, config: dict, variant: str, low_bit_names: list[str]) -> dict:
        result = dict(config)
        result["bonsai_gguf"] = {
            "file": GGUF_FILE,
            "variant": variant,
            "ggml_type": "Q1_0" if variant == "binary" else "Q2_0",
            "group_size": GROUP_SIZE,
            "tensor_names": "bfl",
        }
        return result

    def gguf_layout(self, planned: list[Planned], variant: str) -> GGUFLayout:
        """The GGUF file of the planned transformer outputs (diffusers names): BFL tensors in name order."""
        pieces: dict[str, Piece] = {}
        parts: dict[str, list[TensorSpec | None]] = {}
        for item in planned:
            target, part, swap = bfl_place(item.spec.name)
            slots = parts.setdefault(target, [None] * (FUSED_PARTS if is_fused(target) else 1))
            if slots[part] is not None:
                raise ValueError(f"{item.spec.name}: BFL tensor {target} part {part} is planned twice")
            slots[part] = item.spec
            pieces[item.spec.name] = Piece(target, 0, swap)
        tensors = []
        for target in sorted(parts):
            specs = parts[target]
            if any(spec is None for spec in specs) or len({s.shape[1:] for s in specs}) != 1:  # type: ignore[union-attr]
                raise ValueError(f"{target}: its q, k and v parts are not all planned with one width")
            rows = 0
            for spec in specs:
                assert spec is not None
                pieces[spec.name] = Piece(target, rows, pieces[spec.name].swap_halves)
                rows += spec.shape[0]
            first = specs[0]
            assert first is not None
            if is_low_bit_key(first.name):
                ggml_type = codec.TYPE_OF_VARIANT[variant]
                block = codec.QUANT_OF_TYPE[ggml_type]
                shape: tuple[int, ...] = (rows, first.shape[1] // block.type_size * block.block_size)
            else:
                ggml_type = TYPE_OF_DTYPE[first.dtype]
                shape = (rows, *first.shape[1:]) if len(first.shape) > 1 else first.shape
            tensors.append(GGUFTensor(target, ggml_type, shape))
        metadata = {
            "general.name": "FLUX.2 [klein] Bonsai " + variant,
            "bonsai.variant": variant,
            "bonsai.tensor_names": "bfl",
        }
        return GGUFLayout(ARCHITECTURE, tensors, pieces, metadata)
