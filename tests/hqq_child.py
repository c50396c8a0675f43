"""Run by tests/test_hqq.py in a Python that has hqq 0.2.8.post1 (and torch): hqq's own code on CPU.

`load FOLDER OUT.npz`: `AutoHQQHFModel.from_quantized(FOLDER, compute_dtype=torch.float16, device="cpu")`, then every
HQQLinear's `dequantize()` (hqq's fp16 decode) and the logits of a few tokens, saved to OUT.npz.
`quantize SOURCE FOLDER`: the Qwen3ForCausalLM in SOURCE (a diffusers text_encoder folder) quantized by hqq the same
way and saved to FOLDER (what PrismML's release ships), with the decode in FOLDER/hqq_dequantized.npz.
`save FOLDER`: a small Qwen3ForCausalLM (tied embeddings) quantized by hqq on CPU (`BaseQuantizeConfig(nbits=4,
group_size=64)`) and written with `save_quantized` (a real hqq qmodel.pt), with each HQQ layer's decode in
FOLDER/hqq_dequantized.npz.
"""

from __future__ import annotations

import sys

import numpy as np
import torch


def _decoded(model) -> dict[str, np.ndarray]:
    from hqq.core.quantize import HQQLinear

    return {
        name: module.dequantize().cpu().view(torch.int16).numpy()
        for name, module in model.named_modules()
        if isinstance(module, HQQLinear)
    }


def load(folder: str, out: str) -> None:
    from hqq.models.hf.base import AutoHQQHFModel

    model = AutoHQQHFModel.from_quantized(folder, compute_dtype=torch.float16, device="cpu")
    decoded = _decoded(model)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits.float().numpy()
    np.savez(out, logits=logits, **{f"layer:{name}": value for name, value in decoded.items()})


def save(folder: str) -> None:
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config).to(torch.float16)
    quant_config = BaseQuantizeConfig(nbits=4, group_size=64)
    AutoHQQHFModel.quantize_model(model, quant_config=quant_config, compute_dtype=torch.float16, device="cpu")
    AutoHQQHFModel.save_quantized(model, folder)
    np.savez(f"{folder}/hqq_dequantized.npz", **_decoded(model))


def quantize(source: str, folder: str) -> None:
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(source, dtype=torch.float16)
    quant_config = BaseQuantizeConfig(nbits=4, group_size=64)
    AutoHQQHFModel.quantize_model(model, quant_config=quant_config, compute_dtype=torch.float16, device="cpu")
    AutoHQQHFModel.save_quantized(model, folder)
    np.savez(f"{folder}/hqq_dequantized.npz", **_decoded(model))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"load": load, "save": save, "quantize": quantize}[command](*arguments)
