"""plan predicts from shapes alone exactly what pack writes; Klein-4B figures meet the published targets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bonsai_convert.manifest import load_manifest
from bonsai_convert.plan import describe_source, klein_4b, plan


@pytest.mark.parametrize("variant", ["binary", "ternary"])
@pytest.mark.parametrize("target", ["packed", "iphone", "mac", "cuda"])
def test_plan_equals_pack_on_the_demo(demo_checkpoint, demo_bundle, variant, target):
    manifest = load_manifest(demo_bundle(variant, target))
    predicted = plan(describe_source(str(demo_checkpoint(variant))), target, variant, 64, 64)
    assert predicted["components"] == manifest["components"]
    assert predicted["total_bytes"] == manifest["total_bytes"]
    assert predicted["payload"] == manifest["payload"]
    assert predicted["low_bit_bits_per_weight"] == manifest["bits_per_weight"]["low_bit_linears"]


# Transformer tensor data for Klein 4B shapes (issue targets; PrismML's MLX packs are 965.2 / 1425.2 MB).
MLX_FLOOR = {"binary": 965_164_032, "ternary": 1_425_226_752}
LIMITS = {"packed": {"binary": 0.91e9, "ternary": 1.19e9}, "cuda": {"binary": 0.97e9, "ternary": 1.43e9}}


@pytest.fixture(scope="module")
def klein():
    return klein_4b()


@pytest.mark.parametrize("variant", ["binary", "ternary"])
def test_klein_4b_mlx_transformer_is_the_stock_floor_plus_headers(klein, variant):
    report = plan(klein, "iphone", variant, 512, 512)
    parts = report["components"]["transformer"]["parts"]
    tensor_bytes = sum(size for part, size in parts.items() if part != "headers_and_configs")
    assert tensor_bytes == MLX_FLOOR[variant]
    assert report["components"]["transformer"]["bytes"] - tensor_bytes < 200_000  # headers, index, config


@pytest.mark.parametrize("variant", ["binary", "ternary"])
@pytest.mark.parametrize("target", ["packed", "cuda"])
def test_klein_4b_packed_and_cuda_meet_their_limits(klein, target, variant):
    report = plan(klein, target, variant, 1024, 1024)
    assert report["components"]["transformer"]["bytes"] <= LIMITS[target][variant]
    assert report["components"]["transformer"]["fp16_bytes"] == 3_875_544_576 * 2


def test_plan_cli_json_has_inspect_shape_and_memory():
    result = subprocess.run([sys.executable, "-m", "bonsai_convert", "plan", "--target", "iphone", "--variant",
                             "binary", "--size", "512x512", "--json"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"components", "total_bytes", "memory", "fits"} <= set(report)
    assert report["memory"]["budget_bytes"] == 6_000_000_000 and report["fits"] is True


def test_plan_rejects_a_bad_size():
    result = subprocess.run([sys.executable, "-m", "bonsai_convert", "plan", "--target", "mac", "--variant",
                             "binary", "--size", "500x500"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: --size 500x500")
