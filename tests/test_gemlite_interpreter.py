"""Gemlite's own kernels (Triton interpreter, CPU) on the demo's cuda bundles; gemlite's pack() equals ours.

Needs gemlite 0.6.0.post2 and triton (installed with the project on Linux x86-64, else `.[cuda-sim]`): the module
skips, saying why, only when they cannot be imported. Each check runs in a fresh Python (`run_child`): the
interpreter must be on before triton is first imported, and the CUDA stand-ins stay out of this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bonsai_common.image import psnr
from bonsai_cuda import interpreter
from conftest import bundle_folder

from bonsai_convert.lowbit import is_low_bit_key

REASON = interpreter.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"Gemlite CPU harness unavailable: {REASON}")
VARIANTS = ("binary", "ternary")
# fp16 outputs and fp32 accumulation in another order than the float64 reference: relative to max(1, max |ref|).
TOLERANCE = 4e-3
EVERY_KERNEL_MAX = 2_000_000  # weights; larger layers run only the production kernels


@pytest.mark.parametrize("variant", VARIANTS)
def test_gemlite_kernels_on_every_bundle_layer(demo_bundle, demo_checkpoint, variant: str, tmp_path: Path) -> None:
    """Every low-bit linear, loaded with load_state_dict (no re-pack): gemlite's production kernel at M = 1
    (GEMV_REVSPLITK) and M = 64 (GEMM), and every other kernel on the first layer of each shape up to
    EVERY_KERNEL_MAX weights (interpreted time), against a dense matmul of the source checkpoint's weights."""
    bundle = demo_bundle(variant, "cuda")
    source = demo_checkpoint(variant) / "transformer"
    report = tmp_path / "layers.json"
    folder = bundle_folder(bundle, "transformer")
    interpreter.run_child(
        ["layers", str(folder), "--reference", str(source), "--every-kernel-max-weights", str(EVERY_KERNEL_MAX),
         "--json", str(report)]
    )  # fmt: skip
    results = json.loads(report.read_text())["results"]
    from safetensors import safe_open

    with safe_open(str(next(source.glob("*.safetensors"))), framework="np") as handle:
        low_bit = sorted(name[: -len(".weight")] for name in handle.keys() if is_low_bit_key(name))
    assert sorted({r["layer"] for r in results}) == low_bit
    for name in low_bit:
        ran = {(r["rows"], r["kernel"]) for r in results if r["layer"] == name}
        assert {(1, "GEMV_REVSPLITK"), (64, "GEMM")} <= ran, name
    assert {r["kernel"] for r in results} == set(interpreter.ALL_KERNELS)
    for r in results:
        assert r["finite"] and r["max_error"] <= TOLERANCE * r["scale"], r


def test_gemlite_pack_writes_our_bytes(tmp_path: Path) -> None:
    """gemlite's own pack() (its torch packer on CPU) on the codes of the demo layers gives our encoder's tensors
    byte for byte: both variants, packing bitwidths 8 and 32, per-channel (K = 128) and grouped layers."""
    child = Path(__file__).with_name("gemlite_pack_child.py")
    report = tmp_path / "pack.json"
    done = subprocess.run(
        [sys.executable, str(child), str(report)],
        env=dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cases = json.loads(report.read_text())
    assert {(c["variant"], c["packing_bitwidth"]) for c in cases} == {(v, b) for v in VARIANTS for b in (8, 32)}
    assert any(c["shape"][1] == 128 for c in cases) and any(c["shape"][1] > 128 for c in cases)
    for case in cases:
        assert case["equal"], case


def test_gemlite_kernels_on_the_4bit_text_encoder_layers(demo_bundle, tmp_path: Path) -> None:
    """The cuda bundle's 4-bit (A16W4, group 64) text-encoder linears (the same in both variants' bundles):
    gemlite's production kernels at M = 1 and M = 64 on the first layer of each shape, against our decoder's dense
    weight (the 4-bit codes are lossy, so there is no source weight to compare with; our decoder equals the
    converter's numpy codec, test_cuda_runtime)."""
    folder = bundle_folder(demo_bundle("binary", "cuda"), "text_encoder")
    report = tmp_path / "text.json"
    interpreter.run_child(
        ["layers", str(folder), "--layers", "one-per-shape", "--every-kernel", "none", "--json", str(report)]
    )
    results = json.loads(report.read_text())["results"]
    assert len({r["layer"] for r in results}) >= 3  # q/k/v/o and MLP shapes of Qwen3
    assert {(r["rows"], r["kernel"]) for r in results} == {(1, "GEMV_REVSPLITK"), (64, "GEMM")}
    for r in results:
        assert r["finite"] and r["max_error"] <= TOLERANCE * r["scale"], r


# The interpreted pipeline takes ~1.5–3 min per variant on 2 cores with the text encoder interpreted too (mostly
# GEMM on its 4-bit layers, which the test above checks per layer): CI runs binary with the text encoder decoded;
# BONSAI_INTERPRETER_FULL=1 runs both variants with every low-bit linear interpreted.
FULL = os.environ.get("BONSAI_INTERPRETER_FULL") == "1"
GOLDEN_VARIANTS = VARIANTS if FULL else ("binary",)


@pytest.mark.parametrize("variant", GOLDEN_VARIANTS)
def test_cuda_runtime_with_gemlite_kernels_reproduces_golden_image(demo_bundle, variant: str, tmp_path: Path) -> None:
    """The whole CUDA runtime on the demo bundle, every low-bit linear of the transformer (and with
    BONSAI_INTERPRETER_FULL=1 of the 4-bit text encoder) run by gemlite's kernels in the interpreter (fp16
    activations), against the golden record (fp32 reference)."""
    from bonsai_convert.safetensors_io import SafetensorsFile

    bundle = demo_bundle(variant, "cuda")
    manifest = json.loads((bundle / "manifest.json").read_text())
    record = json.loads((bundle / manifest["golden"]).read_text())
    noise = np.array(SafetensorsFile(bundle / record["noise"]).load("noise"))
    reference = SafetensorsFile(bundle / record["outputs"]).load("image")
    np.save(tmp_path / "noise.npy", noise)
    out = tmp_path / "run.npz"
    size = [str(record["width"]), "--height", str(record["height"])]
    interpreter.run_child(
        ["generate", str(bundle), "--prompt", record["prompt"], "--seed", str(record["seed"]),
         "--steps", str(record["steps"]), "--width", *size, "--noise", str(tmp_path / "noise.npy"),
         "--text-encoder", "interpreter" if FULL else "decoded", "--npz", str(out)]
    )  # fmt: skip
    result = np.load(out)
    calls = json.loads(str(result["calls"]))
    assert calls and sum(calls.values()) > 0, calls
    value = psnr(reference, result["image"])
    print(f"{variant}: {value:.2f} dB, kernels {calls}, {float(result['seconds']):.1f} s")
    assert value >= 40.0


def test_verify_kernels_fallback_is_reported_skipped(demo_bundle) -> None:
    """`verify --kernels fallback` never runs the harness and says so (a skipped step, not a pass)."""
    from bonsai_convert.verify import Checks, VerifyOptions, check_gemlite_kernels

    checks = Checks()
    check_gemlite_kernels(demo_bundle("binary", "cuda"), VerifyOptions(kernels="fallback"), checks)
    assert [(c.name, c.status) for c in checks] == [("gemlite kernels", "skipped")]
    assert "--kernels fallback" in checks[0].detail


def test_verify_samples_one_layer_per_shape_on_a_full_size_transformer(demo_bundle, monkeypatch) -> None:
    """Above KERNEL_ALL_LAYERS_MAX_WEIGHTS (Klein 4B: 3.68 G low-bit weights) verify runs the M = 1 production
    kernel on the first layer of each distinct shape instead of on all layers; the threshold is lowered here."""
    import bonsai_convert.verify as verify

    monkeypatch.setattr(verify, "KERNEL_ALL_LAYERS_MAX_WEIGHTS", 0)
    checks = verify.Checks()
    verify.check_gemlite_kernels(demo_bundle("binary", "cuda"), verify.VerifyOptions(kernels="interpreter"), checks)
    (check,) = checks
    folder = bundle_folder(demo_bundle("binary", "cuda"), "transformer")
    config = json.loads((folder / "quantization_config.json").read_text())
    from bonsai_convert.torch_zip import TorchZipFile

    state = TorchZipFile(folder / "state_dict.pt")
    shapes = {tuple(state.raw(f"{fqn}.orig_shape").tolist()) for fqn in config["quantized_fqns"]}
    assert check.status == "pass", check.detail
    assert f"{len(shapes)} layers (one per shape" in check.detail and "GEMV_REVSPLITK (M=1)" in check.detail
    assert len(shapes) < len(config["quantized_fqns"])
