"""Sources as PrismML publishes them: the unpacked diffusers repos, a Hub repo id (and its cache), their traits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import bundle_folder
from hub_server import FakeHub

from bonsai_convert.files import sha256_file
from bonsai_convert.manifest import load_manifest
from bonsai_convert.pack import PackOptions, pack

REPO_ID = "prism-ml/bonsai-image-ternary-4B-unpacked"
PRISM_MANIFEST = {"model_version": "ternary g128 (bf16 master)", "sha256": "0" * 64}
EXTRA_CONFIG = {"enable_time_sign_embed": False, "musubi_block_swap_device": "cpu", "musubi_blocks_to_swap": 0}


@pytest.fixture(scope="module")
def unpacked(demo_checkpoint, tmp_path_factory) -> Path:
    """A tiny stand-in of `prism-ml/bonsai-image-ternary-4B-unpacked` with every trait of the release."""
    root = tmp_path_factory.mktemp("unpacked") / "repo"
    shutil.copytree(demo_checkpoint("ternary"), root)
    (root / "bonsai_demo.json").unlink()  # ours: the release has no such file (Klein's 512 tokens then apply)
    config_path = root / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **EXTRA_CONFIG}, indent=2))
    (root / "manifest.json").write_text(json.dumps(PRISM_MANIFEST))
    (root / "LICENSE").write_text("FLUX.2 [klein] Non-Commercial License (stand-in)\n")
    (root / "NOTICE.md").write_text("# Notice\nBonsai Image weights by PrismML (stand-in).\n")
    assert [p.name for p in (root / "transformer").glob("*.safetensors")] == ["diffusion_pytorch_model.safetensors"]
    return root


@pytest.mark.parametrize("target", ["packed", "iphone", "cuda"])
def test_unpacked_release_packs_like_the_demo(unpacked, demo_bundle, tmp_path, target):
    """Foreign manifest ignored, extra config keys accepted, LICENSE/NOTICE carried: the weights are bit-exact."""
    out = tmp_path / "bundle"
    manifest = pack(str(unpacked), out, PackOptions(target=target, golden=False))
    reference = demo_bundle("ternary", target)
    folder = bundle_folder(out, "transformer")
    for path in sorted(folder.glob("*.safetensors")):
        assert sha256_file(path) == sha256_file(bundle_folder(reference, "transformer") / path.name), path.name
    listed = {entry["path"] for entry in manifest["files"]}
    assert {"LICENSE", "NOTICE.md"} <= listed
    assert (out / "LICENSE").read_text() == (unpacked / "LICENSE").read_text()
    config = json.loads((folder / "config.json").read_text())
    assert all(config[key] == value for key, value in EXTRA_CONFIG.items())
    assert load_manifest(out)["tool"]["name"] == "bonsai-convert"  # ours replaces theirs, theirs is not copied


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bonsai_convert", *args], capture_output=True, text=True, env=env, timeout=600
    )


def hub_env(tmp_path: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1")
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def snapshot_of(tmp_path: Path) -> Path:
    (snapshot,) = (tmp_path / "hf-home" / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots").iterdir()
    return snapshot


def test_hub_repo_id_packs_from_the_hub_then_from_its_cache_offline(unpacked, tmp_path):
    files = {p.relative_to(unpacked).as_posix(): p.read_bytes() for p in unpacked.rglob("*") if p.is_file()}
    files["transformer/diffusion_pytorch_model.bin"] = b"a pickle the pack never needs"
    with FakeHub(lifetime_s=300) as hub:
        commit = hub.seed_repo(REPO_ID, files)
        result = run_cli("pack", f"{REPO_ID}@main", "--target", "iphone", "-o", str(tmp_path / "a"),
                         "--no-golden", env=hub_env(tmp_path, hub.url))  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert hub.unknown_requests == []
    snapshot = snapshot_of(tmp_path)
    assert snapshot.name == commit and not (snapshot / "transformer" / "diffusion_pytorch_model.bin").exists()
    assert (snapshot / "transformer" / "diffusion_pytorch_model.safetensors").is_symlink()  # read in place
    manifest = load_manifest(tmp_path / "a")
    assert (tmp_path / "a" / "LICENSE").read_bytes() == files["LICENSE"]  # read through the cache's blob link
    assert manifest["source"]["repo"] == {"repo_id": REPO_ID, "requested_revision": "main", "commit": commit}
    # The Hub is gone: the same command works from the cache alone.
    offline = run_cli("pack", REPO_ID, "--target", "iphone", "-o", str(tmp_path / "b"), "--no-golden",
                      env=hub_env(tmp_path, "http://127.0.0.1:9", offline=True))  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    for name in (
        "transformer-packed-mflux/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name)


def test_a_cache_link_leaving_the_repo_blobs_is_refused(unpacked, tmp_path):
    files = {p.relative_to(unpacked).as_posix(): p.read_bytes() for p in unpacked.rglob("*") if p.is_file()}
    with FakeHub(lifetime_s=300) as hub:
        hub.seed_repo(REPO_ID, files)
        assert run_cli("pack", REPO_ID, "--target", "packed", "-o", str(tmp_path / "a"), "--no-golden",
                       env=hub_env(tmp_path, hub.url)).returncode == 0  # fmt: skip
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"_class_name": "AutoencoderKLFlux2"}))
    link = snapshot_of(tmp_path) / "vae" / "config.json"
    link.unlink()
    link.symlink_to(outside)
    result = run_cli("pack", REPO_ID, "--target", "packed", "-o", str(tmp_path / "b"), "--no-golden",
                     env=hub_env(tmp_path, "http://127.0.0.1:9", offline=True))  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "vae/config.json: is a symbolic link (refused" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists()


def test_unknown_repo_is_one_line(tmp_path):
    with FakeHub(lifetime_s=60) as hub:
        result = run_cli("pack", "nobody/nothing", "--target", "packed", "-o", str(tmp_path / "x"),
                         env=hub_env(tmp_path, hub.url))  # fmt: skip
    assert result.returncode == 3 and result.stderr.count("\n") == 1, result.stderr
    assert "nobody/nothing: no such repository" in result.stderr


# ------------------------------------------------------------------------------------ released MLX packs


@pytest.fixture(scope="module")
def mlx_release(demo_bundle, tmp_path_factory) -> Path:
    """A stand-in of `prism-ml/bonsai-image-ternary-4B-mlx-2bit`: the released layout, their manifest, no ours."""
    root = tmp_path_factory.mktemp("mlx-release") / "repo"
    shutil.copytree(demo_bundle("ternary", "iphone"), root)
    shutil.rmtree(root / "golden")
    (root / "pipeline.json").unlink()
    (root / "manifest.json").write_text(json.dumps({"model_version": "ternary g128 mlx 2-bit", "files": 11}))
    (root / "LICENSE").write_text("FLUX.2 [klein] Non-Commercial License (stand-in)\n")
    return root


@pytest.mark.parametrize("target", ["packed", "cuda", "mac"])
def test_released_mlx_pack_repacks_bit_exactly(mlx_release, demo_bundle, tmp_path, target):
    out = tmp_path / "bundle"
    manifest = pack(str(mlx_release), out, PackOptions(target=target, golden=False))
    assert manifest["source"]["kind"] == "mlx" and manifest["variant"] == "ternary" and manifest["exact"]
    reference = demo_bundle("ternary", target)
    for path in sorted(bundle_folder(out, "transformer").glob("*.safetensors")):
        assert sha256_file(path) == sha256_file(bundle_folder(reference, "transformer") / path.name), path.name
    assert manifest["weight_digests"] == load_manifest(reference)["weight_digests"]
    if target == "mac":  # the 4-bit text encoder travels unchanged between MLX profiles
        name = "text_encoder-mlx-4bit/model.safetensors"
        assert sha256_file(out / name) == sha256_file(mlx_release / name)


def test_released_mlx_pack_to_cuda_regenerates_its_golden_image(mlx_release, tmp_path):
    from bonsai_convert.verify import VerifyOptions, verify_bundle

    pack(str(mlx_release), tmp_path / "cuda", PackOptions(target="cuda"))
    # the image through the CPU fallback; gemlite's kernels on these layers: test_gemlite_interpreter.py (~35 s)
    report = verify_bundle(tmp_path / "cuda", VerifyOptions(kernels="fallback"))
    assert report["passed"] and report["psnr_db"] > 40, report


def _tamper(root: Path, edit) -> None:
    """Rewrite the released transformer file with one tensor changed by edit(tensors)."""
    from bonsai_convert.safetensors_io import SafetensorsFile, SafetensorsWriter, TensorSpec

    path = root / "transformer-packed-mflux" / "diffusion_pytorch_model.safetensors"
    handle = SafetensorsFile(path)
    tensors = {key: np.array(handle.raw(key)) for key in handle.keys()}
    dtypes = {key: handle.tensors[key].dtype for key in tensors}
    edit(tensors)
    specs = [TensorSpec(key, dtypes[key], tuple(value.shape)) for key, value in tensors.items()]
    path.unlink()
    with SafetensorsWriter(path, specs, {"format": "mlx"}) as writer:
        for key, value in tensors.items():
            writer.write(key, value)


LAYER = "transformer_blocks.0.attn.to_k"


def _code_three(tensors):
    tensors[f"{LAYER}.weight"][0, 0] |= np.uint32(3)  # 2-bit code 3 in the first weight


def _biases_off(tensors):
    tensors[f"{LAYER}.biases"][0, 0] ^= np.uint16(1)  # one bf16 ulp: bias is no longer −scale


@pytest.mark.parametrize("edit,reason", [(_code_three, "code 3"), (_biases_off, "not −scales bit for bit")])
def test_released_mlx_pack_that_is_not_exact_bonsai_is_refused_naming_the_tensor(mlx_release, tmp_path, edit, reason):
    broken = tmp_path / "broken"
    shutil.copytree(mlx_release, broken)
    _tamper(broken, edit)
    result = subprocess.run([sys.executable, "-m", "bonsai_convert", "pack", str(broken), "--target", "packed",
                             "-o", str(tmp_path / "out"), "--no-golden"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert f"tensor {LAYER}.weight" in result.stderr and reason in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["pack", "demo:ternary", "--target", "watch", "-o", "x"],
        ["pack", "demo:ternary", "--target", "iphone", "--variant", "quaternary", "-o", "x"],
        ["pack", "demo:ternary", "--target", "iphone", "--dtype", "float64", "-o", "x"],
        ["pack", "demo:ternary", "--target", "iphone", "--quantize", "gptq", "-o", "x"],
        ["plan", "--target", "watch", "--variant", "binary"],
        ["demo", "x", "--variant", "quaternary"],
        ["verify", "x", "--dtype", "int8"],
    ],
    ids=lambda args: " ".join(args[:4]),
)
def test_every_cli_choice_is_a_usage_error_listing_the_choices(args, tmp_path):
    result = subprocess.run([sys.executable, "-m", "bonsai_convert", *args], capture_output=True, text=True,
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "is not one of" in result.stderr and "internal error" not in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("target", ["iphone", "cuda"])
def test_plan_predicts_the_bundle_of_a_released_mlx_pack_byte_for_byte(mlx_release, tmp_path, target):
    from bonsai_convert.plan import describe_source, plan

    manifest = pack(str(mlx_release), tmp_path / "b", PackOptions(target=target))
    predicted = plan(describe_source(str(mlx_release)), target, "ternary", 64, 64)
    assert predicted["components"] == manifest["components"]
    assert predicted["total_bytes"] == manifest["total_bytes"]


# --- Gemlite packs (the released CUDA layout) as sources ------------------------------------------------------------


def _rewrite_state_dict(folder: Path, edit) -> None:
    """Rewrite state_dict.pt with edit(tensors) applied (our deterministic writer, dtypes from the arrays)."""
    from bonsai_convert.safetensors_io import DTYPE_OF_NUMPY, TensorSpec
    from bonsai_convert.torch_zip import TorchZipFile, TorchZipWriter

    path = folder / "state_dict.pt"
    handle = TorchZipFile(path)
    dtypes = {key: handle.tensors[key].dtype for key in handle.keys()}
    tensors = {key: np.array(handle.raw(key)) for key in handle.keys()}
    edit(tensors)
    specs = []
    for key, value in tensors.items():
        dtype = "BF16" if dtypes.get(key) == "BF16" else DTYPE_OF_NUMPY[value.dtype.str]
        specs.append(TensorSpec(key, dtype, tuple(value.shape)))
    path.unlink()
    with TorchZipWriter(path, specs) as writer:
        for key, value in tensors.items():
            writer.write(key, value)


def _as_released(tensors) -> None:
    """What PrismML's released Gemlite packs store (formats/gemlite.md): W_q uint8 (8-bit packing), scales, zeros fp32,
    ternary in fma form (zeros = −scales); metadata to match (meta_dtype FP32, elements_per_sample 8 / bits, mode 4)."""
    from bonsai_convert.codecs import gemlite as codec

    for name in [key for key in tensors if key.endswith(".W_q")]:
        prefix = name[: -len(".W_q")]
        state = {key: tensors[f"{prefix}.{key}"] for key in codec.STORED_LAYER_KEYS}
        codes, scales = codec.decode(state)
        variant = "binary" if int(state["metadata"][1]) == 1 else "ternary"
        state = codec.encode(codes, scales, variant, packing_bitwidth=8)
        if variant == "ternary" and int(state["metadata"][10]) == 3:
            state["zeros"] = -state["scales"]
            state["metadata"][10] = 4
        state["metadata"][8] = codec.DTYPE_FP32
        for key in ("scales", "zeros"):
            if state[key].dtype == np.float16:
                state[key] = state[key].astype(np.float32)
        for key, value in state.items():
            tensors[f"{prefix}.{key}"] = value


@pytest.fixture(scope="module")
def gemlite_release(demo_bundle, tmp_path_factory):
    """gemlite_release(variant): a stand-in of `…-gemlite-{1,2}bit`'s transformer folder alone (its HQQ text
    encoder is covered by tests/test_hqq.py), with the release's tensor forms."""
    made = {}

    def build(variant: str) -> Path:
        if variant not in made:
            root = tmp_path_factory.mktemp(f"gemlite-release-{variant}") / "repo"
            folder = bundle_folder(demo_bundle(variant, "cuda"), "transformer")
            shutil.copytree(folder, root / folder.name)
            _rewrite_state_dict(root / folder.name, _as_released)
            made[variant] = root
        return made[variant]

    return build


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_our_cuda_bundle_repacks_byte_identically(demo_bundle, tmp_path, variant):
    """cuda → cuda: every file the same (the 4-bit text encoder carried, golden regenerated to the same bytes);
    cuda → iphone: the transformer file equals packing the original checkpoint."""
    source = demo_bundle(variant, "cuda")
    manifest = pack(str(source), tmp_path / "cuda", PackOptions(target="cuda"))
    assert manifest["source"]["kind"] == "gemlite" and manifest["variant"] == variant and manifest["exact"]
    original = {entry["path"]: entry["sha256"] for entry in load_manifest(source)["files"]}
    assert {entry["path"]: entry["sha256"] for entry in manifest["files"]} == original
    pack(str(source), tmp_path / "iphone", PackOptions(target="iphone", golden=False))
    name = "transformer-packed-mflux/diffusion_pytorch_model.safetensors"
    assert sha256_file(tmp_path / "iphone" / name) == sha256_file(demo_bundle(variant, "iphone") / name)


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_released_gemlite_forms_decode_to_the_same_codes(gemlite_release, demo_bundle, tmp_path, variant):
    """8-bit packing, fp32 scales/zeros and ternary fma zeros decode exactly: a transformer-only repack to MLX
    gives the bytes of packing the original checkpoint."""
    manifest = pack(str(gemlite_release(variant)), tmp_path / "out", PackOptions(target="iphone"))
    assert manifest["source"]["kind"] == "gemlite" and manifest["exact"]
    name = "transformer-packed-mflux/diffusion_pytorch_model.safetensors"
    assert sha256_file(tmp_path / "out" / name) == sha256_file(demo_bundle(variant, "iphone") / name)
    assert manifest["weight_digests"] == load_manifest(demo_bundle(variant, "iphone"))["weight_digests"]


GEMLITE_LAYER = "transformer_blocks.0.attn.to_k"


def _gemlite_code_three(tensors):
    tensors[f"{GEMLITE_LAYER}.W_q"][0, 0] |= np.uint8(3)  # the first 2-bit code becomes 3


def _gemlite_zeros_off(tensors):
    tensors[f"{GEMLITE_LAYER}.zeros"][0, 0] *= np.float32(1.5)  # no longer −scales


def _gemlite_inexact_scale(tensors):
    tensors[f"{GEMLITE_LAYER}.scales"][0, 0] = np.float32(0.1)  # not an fp16 value
    tensors[f"{GEMLITE_LAYER}.zeros"][0, 0] = np.float32(-0.1)


def _gemlite_hqq_folder(root: Path) -> None:
    (root / "text_encoder-hqq-4bit").mkdir()
    (root / "text_encoder-hqq-4bit" / "qmodel.pt").write_bytes(b"not a zip")  # read (never unpickled), refused


@pytest.mark.parametrize(
    "edit,reason",
    [
        (_gemlite_code_three, "ternary code 3"),
        (_gemlite_zeros_off, "zeros = −scales"),
        (_gemlite_inexact_scale, "fp16 cannot hold exactly"),
        (_gemlite_hqq_folder, "qmodel.pt: not a torch zip file"),
    ],
)
def test_a_gemlite_pack_that_is_not_exact_bonsai_is_refused_naming_the_tensor(gemlite_release, tmp_path, edit, reason):
    broken = tmp_path / "broken"
    shutil.copytree(gemlite_release("ternary"), broken)
    if edit is _gemlite_hqq_folder:
        edit(broken)
    else:
        _rewrite_state_dict(broken / "transformer-gemlite-int2", edit)
    result = subprocess.run([sys.executable, "-m", "bonsai_convert", "pack", str(broken), "--target", "packed",
                             "-o", str(tmp_path / "out"), "--no-golden"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert reason in result.stderr, result.stderr
    if edit is not _gemlite_hqq_folder:
        assert f"tensor {GEMLITE_LAYER}.W_q" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_plan_predicts_the_bundle_of_a_cuda_bundle_source_byte_for_byte(demo_bundle, tmp_path):
    from bonsai_convert.plan import describe_source, plan

    source = str(demo_bundle("binary", "cuda"))
    manifest = pack(source, tmp_path / "b", PackOptions(target="iphone"))
    predicted = plan(describe_source(source), "iphone", "binary", 64, 64)
    assert predicted["components"] == manifest["components"] and predicted["total_bytes"] == manifest["total_bytes"]
