"""Refactors move code, not bytes: every demo bundle, manifest and golden record included, is byte-identical to the
one recorded before the package was reorganised (tests/demo_bundle_digests.json, written by the converter at commit
4dd5be7 from `demo:binary` / `demo:ternary`, seed 0, default options, one pack per target).

The packs run in fresh processes, as `bonsai-convert pack` does: a test process may have enabled the MLX runtime's
CPU speed-ups (a process-wide BLAS), under which the golden image's last bits can differ.
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

from bonsai_convert.vocabulary import TARGETS

RECORDED = json.loads((Path(__file__).parent / "demo_bundle_digests.json").read_text())
REFERENCE_CASES = ["binary/iphone", "ternary/cuda", "ternary/packed"]


def file_digests(bundle: Path) -> dict[str, str]:
    """sha256 of every file below bundle, by relative path."""
    return {
        path.relative_to(bundle).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(bundle.rglob("*"))
        if path.is_file()
    }


def pack_in_a_fresh_process(cases: list[str], out: Path, reference: bool = False) -> dict[str, Path]:
    """Pack every `variant/target` case from the demo in one new interpreter; reference: BONSAI_CONVERT_REFERENCE=1."""
    bundles = {case: out / case.replace("/", "-") for case in cases}
    code = (
        "import sys\nfrom bonsai_convert.pack import PackOptions, pack\n"
        "for case, path in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    variant, target = case.split('/')\n"
        "    pack(f'demo:{variant}', path, PackOptions(target=target))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "BONSAI_CONVERT_REFERENCE"}
    if reference:
        env["BONSAI_CONVERT_REFERENCE"] = "1"
    arguments = [item for case, path in bundles.items() for item in (case, str(path))]
    result = subprocess.run(
        [sys.executable, "-c", code, *arguments], env=env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return bundles


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict[str, Path]:
    return pack_in_a_fresh_process(sorted(RECORDED), tmp_path_factory.mktemp("bundles"))


def test_every_target_is_recorded():
    assert {key.split("/")[1] for key in RECORDED} == set(TARGETS)


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_demo_bundle_bytes_are_unchanged(case: str, packed: dict[str, Path]):
    digests = file_digests(packed[case])
    assert sorted(digests) == sorted(RECORDED[case]), "the bundle's file list changed"
    changed = [path for path, digest in digests.items() if RECORDED[case][path] != digest]
    assert not changed, f"{case}: bytes changed in {changed}"


def test_the_reference_implementation_writes_the_same_bytes(tmp_path: Path):
    """BONSAI_CONVERT_REFERENCE=1 (plain numpy everywhere instead of the compiled passes) packs the same bundles."""
    for case, bundle in pack_in_a_fresh_process(REFERENCE_CASES, tmp_path, reference=True).items():
        assert file_digests(bundle) == RECORDED[case], case
