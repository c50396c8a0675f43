"""verify: untouched demo bundles of every target pass with a PSNR; every kind of damage is caught in one line."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from bonsai_convert.schemas import load_schema
from bonsai_convert.verify import VerifyOptions, verify_bundle


def run_verify(bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bonsai_convert", "verify", str(bundle), *extra], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "variant,target,kernels",
    [
        ("binary", "iphone", "auto"),
        ("ternary", "iphone", "auto"),
        ("binary", "mac", "auto"),
        ("ternary", "mac", "auto"),
        ("binary", "cuda", "auto"),  # gemlite's kernels in the interpreter on every layer (when installed)
        ("ternary", "cuda", "fallback"),  # its kernels: test_gemlite_interpreter.py, both variants
    ],
)
def test_untouched_bundle_passes_with_psnr(demo_bundle, variant, target, kernels):
    report = verify_bundle(demo_bundle(variant, target), VerifyOptions(kernels=kernels))
    jsonschema.validate(report, load_schema("verify_report"))
    assert report["passed"], report["checks"]
    assert report["psnr_db"] is not None and report["psnr_db"] >= 40.0
    assert report["generation_checked"] is True
    if target == "cuda" and kernels == "fallback":
        (check,) = [c for c in report["checks"] if c["name"] == "gemlite kernels"]
        assert check["status"] == "skipped"


def test_cli_report_and_comparison_image(demo_bundle, tmp_path):
    bundle = demo_bundle("ternary", "iphone")
    before = sorted((p.relative_to(bundle), p.stat().st_mtime_ns) for p in bundle.rglob("*"))
    result = run_verify(
        bundle, "--source", "demo:ternary", "--report", str(tmp_path / "r.json"), "--image", str(tmp_path / "cmp.png")
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(report, load_schema("verify_report"))
    assert report["passed"] and report["psnr_db"] >= 40
    assert any(c["name"] == "weights vs source" and c["passed"] for c in report["checks"])
    from PIL import Image

    assert Image.open(tmp_path / "cmp.png").size == (64 * 3, 64)
    assert sorted((p.relative_to(bundle), p.stat().st_mtime_ns) for p in bundle.rglob("*")) == before


def test_packed_bundle_passes_without_generation(demo_bundle):
    report = verify_bundle(demo_bundle("binary", "packed"), VerifyOptions())
    assert report["passed"] and report["psnr_db"] is None and not report["generation_checked"]
    generation = next(c for c in report["checks"] if c["name"] == "generation")
    assert generation["status"] == "skipped"  # never "pass" for a step that was not checked


def test_no_generate_reports_skipped_and_every_other_check_ran(demo_bundle):
    report = verify_bundle(demo_bundle("ternary", "iphone"), VerifyOptions(generate=False))
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses.pop("generation") == "skipped"
    assert {"sha256", "low-bit decode", "weights vs manifest digests"} <= set(statuses)
    assert set(statuses.values()) == {"pass"}
    from bonsai_convert.schemas import validate

    validate(report, "verify_report", "report")


def _flip_byte(bundle: Path) -> str:
    path = bundle / "transformer-packed-mflux" / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    return "transformer-packed-mflux/diffusion_pytorch_model.safetensors: sha256 differs"


def _truncate(bundle: Path) -> str:
    path = bundle / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    return "vae/diffusion_pytorch_model.safetensors: "


def _missing(bundle: Path) -> str:
    (bundle / "tokenizer" / "tokenizer.json").unlink()
    return "tokenizer/tokenizer.json: listed in the manifest but missing"


def _extra(bundle: Path) -> str:
    (bundle / "transformer-packed-mflux" / "notes.txt").write_text("hello")
    return "transformer-packed-mflux/notes.txt: not listed in the manifest"


def _edited_manifest(bundle: Path) -> str:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][0]["bytes"] += 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return f"{manifest['files'][0]['path']}: "


def _hostile_header(bundle: Path) -> str:
    """A header claiming 2 GB of JSON, with the manifest updated to match the file (so only the header fails)."""
    import hashlib

    path = bundle / "golden" / "noise.safetensors"
    data = struct.pack("<Q", 2_000_000_000) + path.read_bytes()[8:]
    path.write_bytes(data)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "golden/noise.safetensors":
            entry["sha256"] = hashlib.sha256(data).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return "noise.safetensors: safetensors header length 2000000000"


def _traversal(bundle: Path) -> str:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][0]["path"] = "../outside.txt"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return "manifest.json"


def _symlink(bundle: Path) -> str:
    target = bundle / "vae" / "config.json"
    target.unlink()
    target.symlink_to("/etc/hostname")
    return "vae/config.json: is a symbolic link"


@pytest.mark.parametrize(
    "damage",
    [_flip_byte, _truncate, _missing, _extra, _edited_manifest, _hostile_header, _traversal, _symlink],
    ids=lambda f: f.__name__.strip("_"),
)
def test_damage_is_caught_with_one_line(demo_bundle, tmp_path, damage):
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle("binary", "iphone"), bundle, symlinks=True)
    expected = damage(bundle)
    result = run_verify(bundle, "--report", str(tmp_path / "r.json"))
    assert result.returncode == 5
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(report, load_schema("verify_report"))
    assert report["passed"] is False and report["psnr_db"] is None


def test_publish_dry_run_of_a_verified_bundle_writes_the_card(demo_bundle, tmp_path):
    from huggingface_hub import ModelCard

    bundle = demo_bundle("binary", "mac")
    assert run_verify(bundle).returncode == 0
    card_path = tmp_path / "card.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bonsai_convert",
            "publish",
            str(bundle),
            "--repo-id",
            "my-org/bonsai-demo-mac",
            "--dry-run",
            "--card-out",
            str(card_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    data = ModelCard.load(card_path).data.to_dict()
    assert data["license"] == "apache-2.0" and data["base_model"] == "black-forest-labs/FLUX.2-klein-4B"
    assert data["base_model_relation"] == "quantized" and data["pipeline_tag"] == "text-to-image"
    assert data["library_name"] == "mlx" and {"bonsai", "binary", "mac"} <= set(data["tags"])


def test_publish_refuses_an_unverified_bundle(demo_bundle, tmp_path):
    bundle = tmp_path / "copy"
    shutil.copytree(demo_bundle("ternary", "packed"), bundle)
    (bundle / "pipeline.json").write_text((bundle / "pipeline.json").read_text() + " ")
    result = subprocess.run(
        [sys.executable, "-m", "bonsai_convert", "publish", str(bundle), "--repo-id", "a/b", "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 3
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_a_state_dict_pt_with_a_hostile_pickle_is_refused_unread(demo_bundle, tmp_path):
    """cuda: a state_dict.pt whose pickle calls os.system (manifest updated to match) fails verify with one line,
    before anything could run it: the pickle is walked, never loaded."""
    import hashlib
    import zipfile

    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle("binary", "cuda"), bundle, symlinks=True)
    relative = "transformer-gemlite-int1/state_dict.pt"
    marker = tmp_path / "ran"
    with zipfile.ZipFile(bundle / relative, "w") as archive:
        command = f"touch {marker}".encode()
        archive.writestr(
            "state_dict/data.pkl", b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R."
        )
        archive.writestr("state_dict/version", b"3\n")
    data = (bundle / relative).read_bytes()
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == relative:
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = run_verify(bundle, "--no-generate")
    assert result.returncode == 5
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pickle global os.system is not allowed" in lines[0], result.stderr
    assert relative in lines[0] and not marker.exists()
