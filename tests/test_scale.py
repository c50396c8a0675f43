"""Full-size behaviour on small shapes: the synthetic checkpoint is deterministic, packs are byte-identical,
and pack's peak memory does not grow with the model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SCRIPTS, load_script, tree_digest

SCRIPT = SCRIPTS / "make_synthetic_checkpoint.py"


def synthetic(out: Path, variant: str, singles: int, heads: int = 5, seed: int = 0) -> Path:
    subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(out),
            "--variant",
            variant,
            "--num-layers",
            "1",
            "--num-single-layers",
            str(singles),
            "--num-attention-heads",
            str(heads),
            "--seed",
            str(seed),
        ],
        check=True,
        capture_output=True,
    )
    return out


# Peak RSS of the pack process itself: VmHWM of its own address space, read at exit. (The rusage of a child from
# wait4 is no good here: Linux keeps the pre-exec high-water mark, i.e. the size of the forking pytest process.)
MEASURED_PACK = load_script("bench_pack").MEASURED_PACK


def pack_measured(source: Path, target: str, out: Path) -> int:
    """Run pack in a subprocess and return its peak RSS in bytes."""
    report = out.with_suffix(".hwm")
    result = subprocess.run(
        [sys.executable, "-c", MEASURED_PACK, str(report), "pack", str(source), "--target", target, "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return int(report.read_text()) * 1024


@pytest.fixture(scope="module")
def small_ternary(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("syn") / "ternary", "ternary", singles=1)


def test_synthetic_checkpoint_is_deterministic_and_exact(small_ternary, tmp_path):
    again = synthetic(tmp_path / "again", "ternary", singles=1)
    assert tree_digest(again / "transformer") == tree_digest(small_ternary / "transformer")
    other_seed = synthetic(tmp_path / "other", "ternary", singles=1, seed=1)
    assert tree_digest(other_seed / "transformer") != tree_digest(small_ternary / "transformer")


@pytest.mark.parametrize("target", ["packed", "iphone", "cuda"])
def test_two_packs_are_byte_identical(small_ternary, tmp_path, target):
    from bonsai_convert.pack import PackOptions, pack

    first = pack(str(small_ternary), tmp_path / "a", PackOptions(target=target))
    second = pack(str(small_ternary), tmp_path / "b", PackOptions(target=target))
    assert first == second
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert first["variant"] == "ternary" and first["transformer_only"] is True


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    small = synthetic(tmp_path / "small", "binary", singles=1, heads=10)
    large = synthetic(tmp_path / "large", "binary", singles=15, heads=10)
    grown = sum(p.stat().st_size for p in (large / "transformer").glob("*.safetensors")) - sum(
        p.stat().st_size for p in (small / "transformer").glob("*.safetensors")
    )
    assert grown > 550e6  # fourteen more 1280-wide single blocks: ~43 MB of bf16 each
    # The least of two runs each: thread timing decides which two tensors are in flight together.
    rss_small = min(pack_measured(small, "iphone", tmp_path / f"out-small-{i}") for i in range(2))
    rss_large = min(pack_measured(large, "iphone", tmp_path / f"out-large-{i}") for i in range(2))
    assert rss_large - rss_small < 0.25 * grown, (rss_small, rss_large, grown)
    assert rss_large < 1e9


@pytest.mark.parametrize("target", ["packed", "iphone", "cuda"])
def test_plan_equals_pack_on_a_klein_shaped_checkpoint(small_ternary, tmp_path, target):
    from bonsai_convert.manifest import load_manifest
    from bonsai_convert.pack import PackOptions, pack
    from bonsai_convert.plan import describe_source, plan

    pack(str(small_ternary), tmp_path / "bundle", PackOptions(target=target))
    manifest = load_manifest(tmp_path / "bundle")
    predicted = plan(describe_source(str(small_ternary)), target, "ternary", 512, 512)
    assert predicted["components"] == manifest["components"]
    assert predicted["total_bytes"] == manifest["total_bytes"]


@pytest.mark.parametrize("target", ["iphone", "cuda"])
def test_row_chunked_conversion_writes_the_same_bytes(demo_checkpoint, demo_bundle, tmp_path, monkeypatch, target):
    """Row chunks (used for big tensors such as Qwen3-4B's embedding) must not change a single byte."""
    import bonsai_convert.pack as pack_module
    from bonsai_convert.pack import PackOptions, pack

    monkeypatch.setattr(pack_module, "ROWS_PER_CHUNK", 96)
    pack(str(demo_checkpoint("binary")), tmp_path / "chunked", PackOptions(target=target))
    reference = demo_bundle("binary", target)
    assert tree_digest(tmp_path / "chunked") == tree_digest(reference)
