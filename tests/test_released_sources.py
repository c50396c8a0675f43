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

from bonsai_convert.manifest import load_manifest
from bonsai_convert.pack import PackOptions, pack
from bonsai_convert.source import sha256_file

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
    report = verify_bundle(tmp_path / "cuda", VerifyOptions())
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
