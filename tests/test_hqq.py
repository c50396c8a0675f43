"""HQQ 4-bit text encoders (formats/hqq.md): our codec and qmodel.pt writer, torch's loader, our pickle-free
reader, the CUDA runtime, and hqq 0.2.8.post1's own `from_quantized` / `save_quantized` on CPU.

The hqq checks run hqq in a child Python (`tests/hqq_child.py`): this one if it has hqq, else the one named by
BONSAI_HQQ_PYTHON (hqq is best kept in its own venv: `python3 -m venv V && V/bin/pip install torch==2.13.0
hqq==0.2.8.post1`); they skip, saying so, when neither has it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from bonsai_common.torch_zip import (
    ContainerError,
    TensorRef,
    TorchDtype,
    TorchSize,
    read_container,
    read_module_container,
    stored_array,
)
from conftest import bundle_folder

from bonsai_convert.codecs import hqq
from bonsai_convert.safetensors_io import TensorSpec
from bonsai_convert.torch_zip import TorchZipWriter, file_size

CHILD = Path(__file__).with_name("hqq_child.py")


def _hqq_python() -> str | None:
    if importlib.util.find_spec("hqq") is not None:
        return sys.executable
    named = os.environ.get("BONSAI_HQQ_PYTHON")
    if named and Path(named).is_file():
        check = subprocess.run([named, "-c", "import hqq"], capture_output=True, timeout=120)
        return named if check.returncode == 0 else None
    return None


HQQ_PYTHON = _hqq_python()
needs_hqq = pytest.mark.skipif(
    HQQ_PYTHON is None, reason="hqq is not importable here and BONSAI_HQQ_PYTHON names no Python that has it"
)


def run_hqq(*arguments: str) -> None:
    done = subprocess.run([HQQ_PYTHON, str(CHILD), *arguments], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def our_layers(path: Path) -> dict[str, np.ndarray]:
    """Each HQQ layer of a qmodel.pt decoded by our codec (fp16 bit patterns as int16), read without unpickling."""
    container = read_module_container(path)
    decoded = {}
    for module, entries in container.modules.items():
        if "W_q" not in entries:
            continue
        shape, _ = hqq.read_layer(entries, module)
        arrays = {key: np.asarray(stored_array(path, entries[key])) for key in hqq.TENSOR_KEYS}
        if entries["scale"].dtype == "BF16":
            raise AssertionError("bf16 scales are not produced by these tests")
        decoded[module] = hqq.dequantize(arrays["W_q"], arrays["scale"], arrays["zero"], shape).view(np.int16)
    return decoded


# --- the codec ------------------------------------------------------------------------------------------------------


def test_pack_puts_the_first_half_of_the_groups_in_the_high_nibbles():
    q = np.arange(4 * 64, dtype=np.uint8).reshape(4, 64) % 16  # G = 4 groups of 64
    packed = hqq.pack(q)
    assert packed.shape == (2, 64) and packed.dtype == np.uint8
    assert packed[0, 0] == (q[0, 0] << 4) | q[2, 0] and packed[1, 5] == (q[1, 5] << 4) | q[3, 5]
    assert np.array_equal(hqq.unpack(packed), q)


def test_dequantize_is_fp16_arithmetic_on_groups_of_consecutive_weights():
    """W [2, 64]: two groups (one per row here); (q − zero)·scale, each step rounded to fp16."""
    q = np.tile(np.arange(16, dtype=np.uint8), 8).reshape(2, 64)
    scale = np.array([[0.1], [2.0]], dtype=np.float16)
    zero = np.array([[7.5], [0.0]], dtype=np.float16)
    state = hqq.encode(q, scale, zero)
    weight = hqq.dequantize(state["W_q"], state["scale"], state["zero"], (2, 64))
    expected = ((q.astype(np.float16) - zero) * scale).astype(np.float16)
    assert weight.dtype == np.float16 and np.array_equal(weight.view(np.int16), expected.view(np.int16))
    assert weight[0, 0] == np.float16(np.float16(-7.5) * np.float16(0.1)) and weight[1, 15] == 30.0


def test_groups_run_across_rows_when_a_row_is_shorter_than_a_group():
    """HQQ groups the flattened weight (axis=1): a [8, 16] weight is 2 groups of 4 rows each."""
    assert hqq.quantizable((8, 16)) and not hqq.quantizable((4, 16)) and not hqq.quantizable((3, 64))
    assert hqq.grouped(np.arange(128).reshape(8, 16))[1, 0] == 64


# --- the writer and torch's loader ------------------------------------------------------------------------------------


def test_module_dict_file_loads_in_torch_with_hqq_types(tmp_path):
    specs = [
        TensorSpec("emb.weight", "F16", (4, 2)),
        TensorSpec("lin.W_q", "U8", (1, 64)),
        TensorSpec("lin.scale", "F16", (2, 1)),
        TensorSpec("lin.zero", "F16", (2, 1)),
    ]
    modules = {
        "emb": {"weight": TensorRef("emb.weight")},
        "lin": hqq.layer_entries("lin", 2, 64),
        "head": {"weight": TensorRef("emb.weight")},  # tied: the same storage
    }
    path = tmp_path / "qmodel.pt"
    writer = TorchZipWriter(path, specs, modules=modules)
    values = {
        "emb.weight": np.arange(8, dtype=np.float16).reshape(4, 2),
        "lin.W_q": np.full((1, 64), 0x3C, np.uint8),
        "lin.scale": np.array([[0.5], [1.0]], np.float16),
        "lin.zero": np.array([[1.0], [2.0]], np.float16),
    }
    for name, value in values.items():
        writer.write(name, value)
    writer.close()
    assert path.stat().st_size == file_size(specs, "qmodel", modules)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == ["emb", "lin", "head"]
    layer = loaded["lin"]
    assert list(layer) == list(hqq.LAYER_KEYS)
    assert isinstance(layer["W_q"], torch.nn.Parameter) and not layer["W_q"].requires_grad
    assert layer["shape"] == torch.Size([2, 64]) and isinstance(layer["shape"], torch.Size)
    assert layer["compute_dtype"] is torch.float16 and layer["unpack_view_dtype"] is torch.uint8
    assert (layer["nbits"], layer["group_size"], layer["axis"], layer["packing"]) == (4, 64, 1, "4bit_u8")
    assert layer["stores_quant_config"] is True and layer["offload_meta"] is False
    assert loaded["head"]["weight"].untyped_storage().data_ptr() == loaded["emb"]["weight"].untyped_storage().data_ptr()
    assert np.array_equal(layer["zero"].numpy(), values["lin.zero"])
    read = read_module_container(path)
    assert read.aliases == {"head.weight": "emb.weight"} and sorted(read.tensors) == sorted(values)
    assert read.modules["lin"]["shape"] == TorchSize((2, 64)) and read.modules["lin"]["compute_dtype"] == TorchDtype(
        "float16"
    )
    assert sorted(read_container(path)) == sorted(values)  # flattened, the alias left out


def test_hostile_module_dicts_are_refused(tmp_path):
    def zipped(pickled: bytes) -> Path:
        path = tmp_path / "qmodel.pt"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("qmodel/data.pkl", pickled)
            archive.writestr("qmodel/version", b"3\n")
        return path

    device = b"\x80\x02}(X\x01\x00\x00\x00m}(X\x01\x00\x00\x00dctorch\ndevice\nuu."
    with pytest.raises(ContainerError, match="global torch.device is not allowed"):
        read_module_container(zipped(device))
    size = b"\x80\x02}(X\x01\x00\x00\x00m}(X\x01\x00\x00\x00sctorch\nSize\nX\x01\x00\x00\x00a\x85\x85Ruu."
    with pytest.raises(ContainerError, match="does not build a tensor"):
        read_module_container(zipped(size))
    nested = b"\x80\x02}(X\x01\x00\x00\x00m}(X\x01\x00\x00\x00d}uu."
    with pytest.raises(ContainerError, match="m.d is a dict"):
        read_module_container(zipped(nested))


# --- a packed cuda bundle ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_cuda_bundle_text_encoder_is_hqq_layout_torch_loads_and_runtime_decodes_exactly(demo_bundle, variant):
    from bonsai_cuda.hqq import dequantize as runtime_dequantize
    from bonsai_cuda.hqq import read_qmodel

    bundle = demo_bundle(variant, "cuda")
    folder = bundle_folder(bundle, "text_encoder")
    assert folder.name == "text_encoder-hqq-4bit"
    layout = json.loads((bundle / "manifest.json").read_text())["layout"]
    assert layout["released_loaders"] is True and layout["folders"]["text_encoder"] == "text_encoder-hqq-4bit"
    assert {p.name for p in folder.iterdir()} == {"config.json", "qmodel.pt"}
    loaded = torch.load(folder / "qmodel.pt", weights_only=True, mmap=True)
    ours = our_layers(folder / "qmodel.pt")
    assert ours and set(ours) == {name for name, state in loaded.items() if "W_q" in state}
    for name in ours:
        assert list(loaded[name]) == list(hqq.LAYER_KEYS)
        assert isinstance(loaded[name]["W_q"], torch.nn.Parameter)
    layers, _, _ = read_qmodel(folder / "qmodel.pt")
    for name, layer in layers.items():  # the runtime's torch decode is the codec's numpy decode, bit for bit
        assert np.array_equal(runtime_dequantize(layer).view(torch.int16).numpy(), ours[name]), name


@needs_hqq
@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_hqq_from_quantized_loads_our_qmodel_and_decodes_our_weights(demo_bundle, variant, tmp_path):
    folder = bundle_folder(demo_bundle(variant, "cuda"), "text_encoder")
    out = tmp_path / "hqq.npz"
    run_hqq("load", str(folder), str(out))
    result = np.load(out)
    theirs = {key[len("layer:") :]: result[key] for key in result.files if key.startswith("layer:")}
    ours = our_layers(folder / "qmodel.pt")
    assert sorted(theirs) == sorted(ours)
    for name, decoded in ours.items():
        assert np.array_equal(theirs[name], decoded), name
    assert np.isfinite(result["logits"]).all()


@needs_hqq
def test_our_reader_decodes_a_qmodel_written_by_hqq_itself(tmp_path):
    folder = tmp_path / "hqq-saved"
    run_hqq("save", str(folder))
    theirs = dict(np.load(folder / "hqq_dequantized.npz"))
    ours = our_layers(folder / "qmodel.pt")
    assert sorted(ours) == sorted(theirs) and len(ours) == 14
    for name, decoded in ours.items():
        assert np.array_equal(decoded, theirs[name]), name
    assert read_module_container(folder / "qmodel.pt").aliases == {"lm_head.weight": "model.embed_tokens.weight"}


@needs_hqq
def test_a_gemlite_pack_with_an_hqq_saved_text_encoder_repacks_to_cuda_decoding_the_same(
    demo_bundle, demo_checkpoint, tmp_path
):
    """A release-shaped Gemlite pack (our ternary cuda bundle without our records, its text encoder replaced by
    hqq's own `save_quantized` of the demo's text encoder) as a source: the cuda bundle carries every HQQ layer,
    and its qmodel.pt decodes to hqq's weights bit for bit."""
    import shutil

    from bonsai_convert.pack import PackOptions, pack
    from bonsai_convert.sources import open_source

    release = tmp_path / "release"
    shutil.copytree(demo_bundle("ternary", "cuda"), release)
    for name in ("manifest.json", "pipeline.json", "golden"):
        path = release / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    folder = release / "text_encoder-hqq-4bit"
    shutil.rmtree(folder)
    saved = tmp_path / "hqq-saved"
    run_hqq("quantize", str(demo_checkpoint("ternary") / "text_encoder"), str(saved))
    folder.mkdir()
    for name in ("config.json", "qmodel.pt"):
        shutil.copy(saved / name, folder / name)
    source = open_source(str(release))
    assert (source.kind, source.text_encoder_prequantized, source.text_encoder_format) == ("gemlite", True, "hqq")
    out = tmp_path / "bundle"
    pack(str(release), out, PackOptions(target="cuda", golden=False))
    theirs = dict(np.load(saved / "hqq_dequantized.npz"))
    ours = our_layers(bundle_folder(out, "text_encoder") / "qmodel.pt")
    assert sorted(ours) == sorted(theirs)
    for name, decoded in ours.items():
        assert np.array_equal(decoded, theirs[name]), name
