"""An HQQ 4-bit text encoder as a source (`text_encoder-hqq-4bit/{config.json, qmodel.pt}`: PrismML's Gemlite
release and our cuda bundles), read without unpickling and decoded exactly as hqq's `from_quantized(...,
compute_dtype=torch.float16)` decodes it (formats/hqq.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from bonsai_common.torch_zip import ContainerError, StoredTensor, read_module_container, stored_array

from ..codecs import hqq
from ..dtypes import widen
from ..errors import InputError
from ..files import read_json

HQQ_TEXT_ENCODER = "text_encoder-hqq-4bit"  # the Gemlite release's and our cuda bundles' HQQ text encoder


class HqqTextEncoder:
    """An HQQ text encoder: its logical tensors (an HQQ layer `X` is the fp16 weight `X.weight` [N, K] it decodes
    to) and the tensors as stored. A tied weight (qmodel.pt's `lm_head.weight` sharing the embedding's storage)
    reads as the tensor it shares."""

    format = "hqq"

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / hqq.WEIGHTS_FILE
        try:
            container = read_module_container(self.path)
        except ContainerError as error:
            raise InputError(str(error)) from error
        self.config = read_json(folder / "config.json")
        self.layers: dict[str, tuple[tuple[int, int], dict[str, StoredTensor]]] = {}
        self.dense: dict[str, StoredTensor] = {}
        for module, entries in container.modules.items():
            label = f"{self.path}: {module}"
            if "W_q" in entries:
                shape, _ = hqq.read_layer(entries, label)
                self.layers[module] = (shape, {key: entries[key] for key in hqq.TENSOR_KEYS})
                continue
            for key, value in entries.items():
                if not isinstance(value, StoredTensor):
                    raise InputError(f"{label}.{key}: metadata in a module that is not an HQQ layer")
                self.dense[f"{module}.{key}"] = value

    def quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self.layers

    def logical_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name → (shape, dtype): an HQQ layer's weight [N, K] as F16 (what it decodes to), the rest as stored."""
        shapes = {f"{module}.weight": (shape, "F16") for module, (shape, _) in self.layers.items()}
        shapes |= {name: (tensor.shape, tensor.dtype) for name, tensor in self.dense.items()}
        return dict(sorted(shapes.items()))

    def stored(self, name: str) -> dict[str, np.ndarray]:
        """The tensors as stored (bf16 as bit patterns): an HQQ layer's W_q, and its scale and zero in fp16 [G, 1]
        (cast as hqq's loader casts them to the fp16 compute dtype: the decode is unchanged), else the tensor."""
        if not self.quantized(name):
            return {name: np.asarray(stored_array(self.path, self.dense[name]))}
        prefix = name[: -len(".weight")]
        _, tensors = self.layers[prefix]
        result = {f"{prefix}.W_q": np.asarray(stored_array(self.path, tensors["W_q"]))}
        for key in ("scale", "zero"):
            values = widen(stored_array(self.path, tensors[key]), tensors[key].dtype)
            result[f"{prefix}.{key}"] = np.asarray(values).astype(np.float16).reshape(-1, 1)
        return result

    def load(self, name: str) -> np.ndarray:
        """float32 values: an HQQ layer's fp16 decode (hqq's, bit for bit), else the stored values widened."""
        if not self.quantized(name):
            tensor = self.dense[name]
            return np.asarray(widen(stored_array(self.path, tensor), tensor.dtype), dtype=np.float32)
        prefix = name[: -len(".weight")]
        shape, tensors = self.layers[prefix]
        arrays = {key.rsplit(".", 1)[1]: value for key, value in self.stored(name).items()}
        return hqq.dequantize(arrays["W_q"], arrays["scale"], arrays["zero"], shape).astype(np.float32)


def is_hqq_folder(folder: Path) -> bool:
    return (folder / hqq.WEIGHTS_FILE).is_file()
