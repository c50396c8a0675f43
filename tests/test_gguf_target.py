"""The gguf target (formats/gguf.md): BFL naming checked by diffusers' own converter, plan = pack, gguf-py and real
ggml read the file, exact repack to iphone, hostile files refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bonsai_convert.errors import InputError
from bonsai_convert.gguf_io import GGUFFile
from bonsai_convert.gguf_names import bfl_place, diffusers_parts
from bonsai_convert.layout import make_target, transformer_layout
from bonsai_convert.manifest import load_manifest
from bonsai_convert.pack import PackOptions, pack
from bonsai_convert.plan import describe_source, plan
from bonsai_convert.sources.gguf import GGUF_FILE

VARIANTS = ["binary", "ternary"]


def _gguf_layout(checkpoint: Path, variant: str):
    model = describe_source(str(checkpoint))
    layout = transformer_layout(make_target("gguf"), model.transformer, variant, 5_000_000_000, "transformer")
    return model, layout.shards[0].gguf


def test_bfl_names_convert_back_with_diffusers_own_converter(demo_checkpoint):
    import torch
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    model, gguf_layout = _gguf_layout(demo_checkpoint("ternary"), "ternary")
    rng = np.random.default_rng(0)
    originals = {name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _) in model.transformer.items()}
    bfl = {t.name: np.zeros(t.shape, dtype=np.float32) for t in gguf_layout.tensors}
    for name, values in originals.items():
        piece = gguf_layout.pieces[name]
        if piece.swap_halves:
            half = values.shape[0] // 2
            values = np.concatenate([values[half:], values[:half]])
        bfl[piece.tensor][piece.row : piece.row + values.shape[0]] = values
    converted = convert_flux2_transformer_checkpoint_to_diffusers({k: torch.from_numpy(v) for k, v in bfl.items()})
    assert set(converted) == set(originals)
    for name, values in originals.items():
        assert np.array_equal(converted[name].numpy(), values), name


def test_diffusers_parts_inverts_bfl_place(demo_checkpoint):
    model, gguf_layout = _gguf_layout(demo_checkpoint("binary"), "binary")
    found = {}
    for tensor in gguf_layout.tensors:
        for name, start, _stop, swapped in diffusers_parts(tensor.name, tensor.shape[0]):
            found[name] = (tensor.name, start, swapped)
    assert found == {name: (p.tensor, p.row, p.swap_halves) for name, p in gguf_layout.pieces.items()}
    assert bfl_place("transformer_blocks.3.attn.to_v.weight") == ("double_blocks.3.img_attn.qkv.weight", 2, False)
    assert bfl_place("single_transformer_blocks.0.attn.norm_k.weight")[0] == "single_blocks.0.norm.key_norm.scale"
    with pytest.raises(ValueError, match="no BFL name"):
        bfl_place("transformer_blocks.0.attn.to_qkv.weight")


@pytest.mark.parametrize("variant", VARIANTS)
def test_plan_equals_pack_on_the_demo(demo_checkpoint, demo_bundle, variant):
    manifest = load_manifest(demo_bundle(variant, "gguf"))
    predicted = plan(describe_source(str(demo_checkpoint(variant))), "gguf", variant, 64, 64)
    assert predicted["components"] == manifest["components"]
    assert predicted["total_bytes"] == manifest["total_bytes"]
    bpw = {"binary": 1.125, "ternary": 2.25}[variant]
    assert manifest["bits_per_weight"]["low_bit_linears"] == predicted["low_bit_bits_per_weight"] == bpw


def test_gguf_py_reads_the_binary_file_as_we_wrote_it(demo_bundle):
    import gguf

    path = demo_bundle("binary", "gguf") / "transformer" / GGUF_FILE
    theirs = gguf.GGUFReader(path)  # gguf-py knows type 41 (not 42): an independent parse of the binary file
    ours = GGUFFile(path)
    assert {t.name for t in theirs.tensors} == set(ours.tensors)
    for tensor in theirs.tensors:
        mine = ours.tensors[tensor.name]
        assert int(tensor.tensor_type) == mine.ggml_type
        assert tuple(int(d) for d in reversed(tensor.shape.tolist())) == mine.shape
        assert tensor.data_offset == mine.offset
        assert np.array_equal(
            np.asarray(tensor.data).view(np.uint8).reshape(-1), ours.raw(tensor.name).view(np.uint8).reshape(-1)
        )
    assert theirs.fields["general.architecture"].contents() == "flux2"
    assert "double_stream_modulation_img.lin.weight" in ours.tensors  # what stable-diffusion.cpp detects FLUX.2 by


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_bundle_repacks_to_the_same_iphone_transformer(demo_bundle, tmp_path, variant):
    repacked = tmp_path / "iphone"
    pack(str(demo_bundle(variant, "gguf")), repacked, PackOptions(target="iphone", golden=False))
    name = "transformer-packed-mflux/diffusion_pytorch_model.safetensors"
    assert (repacked / name).read_bytes() == (demo_bundle(variant, "iphone") / name).read_bytes()


def test_verify_passes_and_says_why_generation_is_skipped(demo_bundle):
    from bonsai_convert.verify import GGUF_GENERATION_SKIPPED, VerifyOptions, verify_bundle

    report = verify_bundle(demo_bundle("ternary", "gguf"), VerifyOptions())
    checks = {c["name"]: c for c in report["checks"]}
    assert report["passed"], checks
    assert checks["low-bit decode"]["status"] == "pass"
    assert checks["generation"]["status"] == "skipped"
    assert checks["generation"]["detail"] == GGUF_GENERATION_SKIPPED
    assert "lacks ggml types 41/42" in GGUF_GENERATION_SKIPPED


@pytest.mark.parametrize("variant", VARIANTS)
def test_real_ggml_parses_and_dequantizes_exactly(demo_bundle, tmp_path, variant):
    from bonsai_convert.ggml_check import GGML, check_file, find_library

    library = find_library()
    if library is None:
        pytest.skip(
            "no libggml-base with types 41/42 (llama-cpp-python 0.3.36 not installed, BONSAI_GGML_LIBRARY unset)"
        )
    bundle = demo_bundle(variant, "gguf")
    digests = load_manifest(bundle)["weight_digests"]
    ggml = GGML(library)
    passed, detail = check_file(ggml, bundle / "transformer" / GGUF_FILE, digests)
    assert passed, detail
    if ggml.cpu is not None:  # ggml's CPU backend multiplied with a low-bit tensor, within its activation rounding
        assert "ggml mul_mat on" in detail
    # The same check fails on a copy with one code bit flipped in a low-bit tensor.
    copy = tmp_path / GGUF_FILE
    shutil.copyfile(bundle / "transformer" / GGUF_FILE, copy)
    tensor = GGUFFile(copy).tensors["double_blocks.0.img_mlp.0.weight"]
    with copy.open("r+b") as handle:
        handle.seek(tensor.offset + 5)
        byte = handle.read(1)[0]
        handle.seek(tensor.offset + 5)
        handle.write(bytes([byte ^ 0x01]))
    passed, detail = check_file(ggml, copy, digests)
    assert not passed and "differs from the source weights" in detail


def _tampered_bundle(demo_bundle, tmp_path: Path, edit) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle("ternary", "gguf"), bundle)
    path = bundle / "transformer" / GGUF_FILE
    data = bytearray(path.read_bytes())
    edit(data, GGUFFile(path))
    path.write_bytes(bytes(data))
    return bundle


def test_a_q2_0_block_pair_with_two_scales_is_refused_as_a_source(demo_bundle, tmp_path):
    def second_half_scale(data: bytearray, file: GGUFFile) -> None:
        data[file.tensors["single_blocks.1.linear2.weight"].offset + 18] ^= 0x01  # d of the second 64-block

    bundle = _tampered_bundle(demo_bundle, tmp_path, second_half_scale)
    with pytest.raises(InputError, match=r"single_blocks\.1\.linear2\.weight: row 0, group 0: .*different scales"):
        pack(str(bundle), tmp_path / "out", PackOptions(target="iphone", golden=False))
    assert not (tmp_path / "out").exists()


def test_a_truncated_gguf_is_refused_in_one_line(demo_bundle, tmp_path):
    bundle = _tampered_bundle(demo_bundle, tmp_path, lambda data, file: data.__delitem__(slice(len(data) // 2, None)))
    with pytest.raises(InputError, match="past the end|not a readable GGUF"):
        pack(str(bundle), tmp_path / "out", PackOptions(target="iphone", golden=False))


def test_corrupted_headers_give_input_errors_only(demo_bundle, tmp_path):
    """Random byte flips and truncations inside the header: GGUFFile opens the file or raises InputError."""
    original = (demo_bundle("binary", "gguf") / "transformer" / GGUF_FILE).read_bytes()
    tensors = GGUFFile(demo_bundle("binary", "gguf") / "transformer" / GGUF_FILE).tensors
    data_start = min(t.offset for t in tensors.values())
    rng = np.random.default_rng(7)
    path = tmp_path / "fuzzed.gguf"
    for trial in range(300):
        data = bytearray(original[: data_start + 4096] if trial % 3 else original)
        for _ in range(int(rng.integers(1, 4))):
            position = int(rng.integers(0, data_start))
            data[position] = int(rng.integers(0, 256))
        if trial % 5 == 0:
            del data[int(rng.integers(0, data_start)) :]
        path.write_bytes(bytes(data))
        try:
            opened = GGUFFile(path)
        except InputError:
            continue
        for name in opened.tensors:  # every tensor the reader accepts lies inside the file
            opened.raw(name)
