"""state_dict.pt, the released Gemlite container: our deterministic writer, torch's own loader, our pickle-free
reader, and the released CUDA loader's rules (files and keys) on a packed cuda bundle."""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bundle_folder

from bonsai_convert.errors import InputError
from bonsai_convert.safetensors_io import TensorSpec
from bonsai_convert.torch_zip import TorchZipFile, TorchZipWriter, file_size

VALUES = {
    "b.W_q": np.arange(-6, 6, dtype=np.int32).reshape(4, 3),
    "a.weight": np.linspace(-1, 1, 35).astype(np.float16).reshape(5, 7),
    "c.zeros": np.array(1, dtype=np.int32),
    "d.bf16": np.arange(6000, dtype=np.uint16).reshape(3000, 2),  # bf16 given as bit patterns
    "e.empty": np.zeros((0, 4), dtype=np.uint8),
    "f.scales": np.array([[0.5, -2.0]], dtype=np.float32),
}
DTYPES = {"b.W_q": "I32", "a.weight": "F16", "c.zeros": "I32", "d.bf16": "BF16", "e.empty": "U8", "f.scales": "F32"}


def write(path: Path, order: list[str], chunked: bool = False) -> TorchZipWriter:
    specs = [TensorSpec(name, DTYPES[name], VALUES[name].shape) for name in VALUES]
    writer = TorchZipWriter(path, specs)
    for name in order:
        if chunked and name == "d.bf16":  # rows out of order: the record's CRC is then read back
            writer.write_rows(name, VALUES[name][1000:], 1000)
            writer.write_rows(name, VALUES[name][:1000], 0)
        else:
            writer.write(name, VALUES[name])
    writer.close()
    return writer


def test_written_file_loads_in_torch_and_zipfile_and_has_its_planned_size(tmp_path):
    path = tmp_path / "state_dict.pt"
    writer = write(path, sorted(VALUES))
    specs = [TensorSpec(name, DTYPES[name], VALUES[name].shape) for name in VALUES]
    assert path.stat().st_size == file_size(specs, "state_dict")
    assert writer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every CRC-32 is right
        names = archive.namelist()
        assert names[0] == "state_dict/data.pkl" and names[-1] == "state_dict/version"
        for info in archive.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert sorted(loaded) == sorted(VALUES)
        for name, expected in VALUES.items():
            tensor = loaded[name]
            if DTYPES[name] == "BF16":
                assert tensor.dtype == torch.bfloat16
                tensor = tensor.view(torch.int16)
                expected = expected.view(np.int16)
            assert tuple(tensor.shape) == expected.shape and tensor.is_contiguous()
            assert np.array_equal(tensor.numpy(), expected)


def test_data_is_64_byte_aligned_for_mmap(tmp_path):
    path = tmp_path / "state_dict.pt"
    write(path, sorted(VALUES))
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0, info.filename


def test_bytes_do_not_depend_on_write_order_or_chunking(tmp_path):
    first, second = tmp_path / "a" / "state_dict.pt", tmp_path / "b" / "state_dict.pt"
    first.parent.mkdir()
    second.parent.mkdir()
    write(first, sorted(VALUES))
    write(second, sorted(VALUES, reverse=True), chunked=True)
    assert first.read_bytes() == second.read_bytes()


def test_our_reader_matches_torch_save(tmp_path):
    """torch.save's own files (a module state dict with `_metadata`, a tensor viewing part of its storage)."""
    path = tmp_path / "torch_saved.pt"
    linear = torch.nn.Linear(4, 3)
    state = linear.state_dict()
    state["part"] = torch.arange(10, dtype=torch.int64)[2:5]
    state["half"] = torch.ones(2, 3, dtype=torch.float16)
    state["brain"] = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    torch.save(state, path)
    read = TorchZipFile(path)
    assert read.keys() == sorted(state)
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            assert np.array_equal(read.load(name), tensor.float().numpy())
        else:
            assert np.array_equal(read.raw(name), tensor.numpy()), name


def _zip_with_pickle(path: Path, pickled: bytes, extra: dict[str, bytes] | None = None, compress: bool = False) -> None:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", b"3\n")
        for name, data in (extra or {}).items():
            archive.writestr(f"archive/{name}", data)


def _one_tensor_pickle(storage: bytes = b"HalfStorage", numel: int = 4, stride: bytes = b"K\x02K\x01\x86") -> bytes:
    """{'w': a 2x2 tensor on storage '0'} as torch.save writes it (without memo)."""
    key = b"X\x01\x00\x00\x00w"
    persistent = b"(X\x07\x00\x00\x00storagectorch\n" + storage + b"\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK"
    persistent += bytes([numel]) + b"tQ"
    arguments = persistent + b"K\x00K\x02K\x02\x86" + stride + b"\x89ccollections\nOrderedDict\n)R"
    return b"\x80\x02}(" + key + b"ctorch._utils\n_rebuild_tensor_v2\n(" + arguments + b"tRu."


def test_the_hand_made_pickle_is_what_torch_reads(tmp_path):
    path = tmp_path / "hand.pt"
    _zip_with_pickle(path, _one_tensor_pickle(), {"data/0": np.arange(4, dtype=np.float16).tobytes()})
    assert torch.load(path, weights_only=True)["w"].tolist() == [[0, 1], [2, 3]]
    assert TorchZipFile(path).raw("w").tolist() == [[0, 1], [2, 3]]


@pytest.mark.parametrize(
    "pickled, extra, compress, reason",
    [
        (b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R.", {}, False, "pickle global os.system is not allowed"),
        (b"\x80\x02cbuiltins\neval\n.", {}, False, "pickle global builtins.eval is not allowed"),
        (b"\x80\x02]q\x00.", {}, False, "pickle opcode EMPTY_LIST"),
        (_one_tensor_pickle(), {"data/0": b"\x00" * 8, "evil.py": b"x"}, False, "zip entry archive/evil.py"),
        (_one_tensor_pickle(), {"data/0": b"\x00" * 8}, True, "is compressed"),
        (_one_tensor_pickle(), {"data/0": b"\x00" * 6}, False, "holds 6 bytes, not 4 × 2"),
        (_one_tensor_pickle(), {}, False, "storage 0 has no data record"),
        (_one_tensor_pickle(stride=b"K\x01K\x02\x86"), {"data/0": b"\x00" * 8}, False, "is not contiguous"),
        (_one_tensor_pickle(numel=3), {"data/0": b"\x00" * 6}, False, "runs past the end of its storage"),
        (b"\x80\x02}(X\x01\x00\x00\x00wK\x01u.", {}, False, "not a dict of tensors"),
        (b"\x80\x02}(X\x01\x00\x00\x00w", {}, False, "not a readable state-dict pickle"),
    ],
)
def test_hostile_containers_are_refused_without_unpickling(tmp_path, pickled, extra, compress, reason):
    path = tmp_path / "state_dict.pt"
    _zip_with_pickle(path, pickled, extra, compress)
    with pytest.raises(InputError) as error:
        TorchZipFile(path)
    assert str(path) in str(error.value) and reason in str(error.value)


def test_not_a_zip_is_refused(tmp_path):
    path = tmp_path / "state_dict.pt"
    path.write_bytes(b"\x80\x04\x95 a bare pickle, not torch's zip")
    with pytest.raises(InputError, match="not a torch zip file"):
        TorchZipFile(path)


# --- a packed cuda bundle against the released loader's rules -------------------------------------------------------

RELEASED_LAYER_KEYS = {"W_q", "bias", "scales", "zeros", "metadata", "orig_shape"}  # what image-studio takes per layer


def released_loader_leftovers(state: dict[str, torch.Tensor], quantized: list[str], dense: set[str]) -> list[str]:
    """image-studio's rule (formats/gemlite.md, 'The transformer folder'): per quantized module exactly its keys are
    taken, the rest must be the dense model's own tensors; anything left over is an error there."""
    taken = {f"{fqn}.{key}" for fqn in quantized for key in RELEASED_LAYER_KEYS}
    return sorted(name for name in state if name not in taken and name not in dense)


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_cuda_bundle_has_the_released_files_and_keys(demo_bundle, variant):
    from diffusers import Flux2Transformer2DModel

    bundle = demo_bundle(variant, "cuda")
    folder = bundle_folder(bundle, "transformer")
    bits = {"binary": 1, "ternary": 2}[variant]
    assert folder.name == f"transformer-gemlite-int{bits}"
    files = {"state_dict.pt", "config.json", "quantization_config.json", "gemlite_autotune.json"}
    assert {p.name for p in folder.iterdir()} == files
    assert json.loads((folder / "gemlite_autotune.json").read_text()) == {}
    quantization = json.loads((folder / "quantization_config.json").read_text())
    assert quantization["format"] == f"gemlite-int{bits}-{variant}-g128"
    assert (quantization["bits"], quantization["group_size"], quantization["solver"]) == (bits, 128, variant)
    assert quantization["packing_bitwidth"] in (8, 32) and quantization["skip_patterns"]
    state = torch.load(folder / "state_dict.pt", weights_only=True, mmap=True)
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(config)
    quantized = quantization["quantized_fqns"]
    modules = dict(model.named_modules())
    assert quantized and all(isinstance(modules[fqn], torch.nn.Linear) for fqn in quantized)
    dense = {name for name in model.state_dict() if name.rsplit(".", 1)[0] not in quantized}
    assert released_loader_leftovers(state, quantized, dense) == []
    assert dense <= set(state)  # nothing the model needs is missing
    for fqn in quantized:
        assert {name[len(fqn) + 1 :] for name in state if name.startswith(fqn + ".")} == RELEASED_LAYER_KEYS - {"bias"}
        assert state[f"{fqn}.orig_shape"].tolist() == list(modules[fqn].weight.shape)
        assert state[f"{fqn}.scales"].dtype == torch.float16  # meta_dtype FP16 (formats/gemlite.md)
    source = TorchZipFile(folder / "state_dict.pt")  # our pickle-free reader sees the same tensors
    assert source.keys() == sorted(state)
    name = f"{quantized[0]}.W_q"
    assert np.array_equal(source.raw(name), state[name].numpy())


def test_a_leftover_key_is_what_the_released_loader_refuses():
    state = {"x.W_q": torch.zeros(1), "x.meta_scale": torch.zeros(()), "norm.weight": torch.zeros(1)}
    assert released_loader_leftovers(state, ["x"], {"norm.weight"}) == ["x.meta_scale"]
