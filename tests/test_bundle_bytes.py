"""Refactors move code, not bytes: every demo bundle, manifest and golden record included, is byte-identical to the
one recorded before the package was reorganised (tests/demo_bundle_digests.json, written by the converter
at commit 4dd5be7 from `demo:binary` / `demo:ternary`, seed 0, default options, one pack per target).

A change that alters a bundle on purpose (a new manifest field, a new layout) must re-record the file and say why
in its commit; any other difference is a regression.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bonsai_convert.pack import PackOptions, pack
from bonsai_convert.vocabulary import TARGETS

RECORDED = json.loads((Path(__file__).parent / "demo_bundle_digests.json").read_text())


def file_digests(bundle: Path) -> dict[str, str]:
    """sha256 of every file below bundle, by relative path."""
    return {
        path.relative_to(bundle).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(bundle.rglob("*"))
        if path.is_file()
    }


def test_every_target_is_recorded():
    assert {key.split("/")[1] for key in RECORDED} == set(TARGETS)


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_demo_bundle_bytes_are_unchanged(case: str, tmp_path: Path):
    variant, target = case.split("/")
    bundle = tmp_path / "bundle"
    pack(f"demo:{variant}", bundle, PackOptions(target=target))
    digests = file_digests(bundle)
    assert sorted(digests) == sorted(RECORDED[case]), "the bundle's file list changed"
    changed = [path for path, digest in digests.items() if RECORDED[case][path] != digest]
    assert not changed, f"{case}: bytes changed in {changed}"


@pytest.mark.parametrize("case", ["binary/iphone", "ternary/cuda", "ternary/packed"])
def test_the_reference_implementation_writes_the_same_bytes(case: str, tmp_path: Path):
    """BONSAI_CONVERT_REFERENCE=1 (plain numpy everywhere instead of the compiled passes) packs the same bundle."""
    variant, target = case.split("/")
    bundle = tmp_path / "bundle"
    env = {**os.environ, "BONSAI_CONVERT_REFERENCE": "1"}
    command = [sys.executable, "-m", "bonsai_convert", "pack", f"demo:{variant}", "--target", target, "-o", str(bundle)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert file_digests(bundle) == RECORDED[case]
