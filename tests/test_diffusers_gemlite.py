"""A cuda bundle's transformer against diffusers' GemLite backend's loading rules (formats/gemlite.md, "diffusers").

That backend is not in a diffusers release: it is huggingface/diffusers PR #14286 (open), read at its last revision
in the code index: `src/diffusers/quantizers/gemlite/gemlite_quantizer.py` (`GEMLITE_STATE_NAMES`,
`_GemLiteDiffusersProcessor.from_linear`, `GemLiteQuantizer`) and its tests (`GemLiteConfig` fields). It needs CUDA
and gemlite >= 0.6.0 at load time, so its rules are applied here as written, on CPU, with diffusers 0.42.1's own
`load_state_dict` and `load_model_dict_into_meta` shape rule.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import bundle_folder

from bonsai_convert.torch_zip import TorchZipFile

# The PR's GEMLITE_STATE_NAMES: what the quantizer takes per GemLiteLinearTriton module.
GEMLITE_STATE_NAMES = ("W_q", "bias", "scales", "zeros", "metadata", "orig_shape", "meta_scale")
# gemlite.dtypes.PACKING_BITWIDTH_TO_TORCH_DTYPE (0.6.0.post2) and the PR's serialized-dtype names.
PACKED_DTYPES = {8: "U8", 16: "I16", 32: "I32", 64: "I64"}
LAYOUT_DTYPES = {"fp16": "F16", "float16": "F16", "bf16": "BF16", "bfloat16": "BF16", "fp32": "F32", "float32": "F32"}
REQUIRED_FIELDS = (
    "bits",
    "group_size",
    "packing_bitwidth",
    "input_dtype",
    "output_dtype",
    "scales_dtype",
    "zeros_dtype",
)
DATA_CONTIGUOUS = 11  # metadata field the PR's processor sets True and its save hook forces to 1


def diffusers_quantization_config(quantization: dict) -> dict:
    """The GemLiteConfig (as `config.json["quantization_config"]`) that describes a bundle's layout, from its
    quantization_config.json: every field the PR requires, with the bundle's own values."""
    return {
        "quant_method": "gemlite",
        "format": quantization["format"],
        "bits": quantization["bits"],
        "group_size": quantization["group_size"],
        "packing_bitwidth": quantization["packing_bitwidth"],
        "solver": quantization["solver"],
        "input_dtype": "fp16",
        "output_dtype": "fp16",
        "scales_dtype": "fp16" if quantization["scales_dtype"] == "float16" else quantization["scales_dtype"],
        "zeros_dtype": "fp16",
        "compute_dtype": "float16",
        "quantized_fqns": quantization["quantized_fqns"],
    }


def placeholders(config: dict, in_features: int, out_features: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`_GemLiteDiffusersProcessor.from_linear`: the tensors it creates before loading (dtype, shape)."""
    elements = config["packing_bitwidth"] // config["bits"]
    groups = in_features // config["group_size"]
    return {
        "W_q": (PACKED_DTYPES[config["packing_bitwidth"]], (in_features // elements, out_features)),
        "scales": (LAYOUT_DTYPES[config["scales_dtype"]], (groups, out_features)),
        "zeros": (LAYOUT_DTYPES[config["zeros_dtype"]], (groups, out_features)),
    }


def skipped(name: str, modules_to_not_convert: list[str]) -> bool:
    """The PR's `_is_in_skip_modules`."""
    return any((key + "." in name) or (key == name) for key in modules_to_not_convert)


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_cuda_transformer_follows_the_diffusers_gemlite_loading_rules(demo_bundle, variant, tmp_path):
    from diffusers import Flux2Transformer2DModel
    from diffusers.models.model_loading_utils import load_state_dict
    from safetensors.numpy import save_file

    folder = bundle_folder(demo_bundle(variant, "cuda"), "transformer")
    quantization = json.loads((folder / "quantization_config.json").read_text())
    config = diffusers_quantization_config(quantization)
    assert all(config[field] is not None for field in REQUIRED_FIELDS)
    model_config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(model_config)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # Which linears the processor replaces: those in quantized_fqns and not in modules_to_not_convert (none here).
    replaced = {name for name in linears if name in set(config["quantized_fqns"]) and not skipped(name, [])}
    assert replaced == set(quantization["quantized_fqns"])

    stored = TorchZipFile(folder / "state_dict.pt")
    model_state = model.state_dict()
    for fqn in sorted(replaced):
        linear = linears[fqn]
        keys = {name[len(fqn) + 1 :] for name in stored.keys() if name.startswith(fqn + ".")}
        assert keys <= set(GEMLITE_STATE_NAMES), (fqn, keys)  # the quantizer takes exactly these
        for key, (dtype, shape) in placeholders(config, linear.in_features, linear.out_features).items():
            info = stored.tensors[f"{fqn}.{key}"]
            if variant == "ternary" and key == "zeros":
                # gemlite's own pack() for ternary (fma mode 3) keeps an int zero scalar: diffusers' shape rule
                # then hands the stored tensor to create_quantized_param as it is (placeholder shape differs).
                assert (info.dtype, info.shape) == ("I32", ())
                continue
            assert (info.dtype, info.shape) == (dtype, shape), (fqn, key)
        metadata = np.asarray(stored.raw(f"{fqn}.metadata"))
        assert metadata[DATA_CONTIGUOUS] == 1 and metadata[1] == config["bits"] and metadata[2] == config["group_size"]
    for name in stored.keys():  # everything else is a dense tensor the model has, with its shape (diffusers raises)
        module = name.rsplit(".", 1)[0]
        if module in replaced:
            continue
        assert name in model_state, name
        assert tuple(model_state[name].shape) == stored.tensors[name].shape, name
    dense_needed = {name for name in model_state if name.rsplit(".", 1)[0] not in replaced}
    assert dense_needed <= set(stored.keys())

    # The same tensors as diffusers' weight file, with the config the backend reads: diffusers 0.42.1's own
    # load_state_dict reads them back byte for byte (the backend then loads them as above).
    diffusers_folder = tmp_path / "transformer"
    diffusers_folder.mkdir()
    (diffusers_folder / "config.json").write_text(json.dumps(dict(model_config, quantization_config=config)))
    arrays = {name: np.ascontiguousarray(stored.raw(name)) for name in stored.keys()}
    save_file(arrays, str(diffusers_folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    loaded = load_state_dict(str(diffusers_folder / "diffusion_pytorch_model.safetensors"))
    assert sorted(loaded) == sorted(arrays)
    for name, array in arrays.items():
        tensor = loaded[name]
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        assert np.array_equal(raw.numpy().view(array.dtype), array), name


def test_the_rules_refuse_a_layout_that_does_not_fit():
    """The placeholder rule can fail: 8-bit packing declared for a 32-bit W_q gives another dtype and shape."""
    config = {"bits": 2, "group_size": 128, "packing_bitwidth": 8, "scales_dtype": "fp16", "zeros_dtype": "fp16"}
    assert placeholders(config, 256, 4)["W_q"] == ("U8", (64, 4))
    config["packing_bitwidth"] = 32
    assert placeholders(config, 256, 4)["W_q"] == ("I32", (16, 4))
    assert skipped("proj_out", ["proj_out"]) and not skipped("proj_output", ["proj_out"])
