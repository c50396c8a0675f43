"""The release gate's whole chain at Klein widths, reduced depth: the CI version of scripts/bench_full_chain.py.

`make_synthetic_checkpoint.py --full --scale 0.01` (the smallest depths the script makes: 1 double + 1 single
block, 3 text-encoder layers, out layers (1, 2, 3); every tensor keeps Klein's shape: 2.68 GB of bf16), then
through the command line, each in its own process as the benchmark runs them: `bonsai-convert pack --target
iphone` and `--target cuda` with the golden record, and `bonsai-convert verify` of both with generation (the cuda
one with `--kernels fallback`: gemlite's kernels in the Triton interpreter took 213 s of it at these widths, one
layer per shape, and run on the demo bundles in tests/test_gemlite_interpreter.py). Every stage must pass and the
golden image regenerate at ≥ 40 dB.

To stay within a few minutes on 2 cores the prompt length is recorded as MAX_SEQUENCE_LENGTH tokens at synthesis
(`--max-sequence-length`; Klein's 512 dominate the text encoder's and the transformer's cost) and the golden image
is GOLDEN_SIZE² (`--golden-size`; full-size default 256²). The full-scale run is the script, by hand
(scripts/results/full-chain.json).

181 s in a clean-clone `.ci/run` on 2 cores (the other xdist worker running the rest of the suite), synthesis
included (the largest process of that whole run peaked at 5.7 GB RSS). pyproject has no marker that deselects
slow tests, so it runs with the suite.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import load_script

SCALE = 0.01
MAX_SEQUENCE_LENGTH = 64
GOLDEN_SIZE = 64


@pytest.fixture(scope="module")
def chain_report(tmp_path_factory):
    work = tmp_path_factory.mktemp("full-chain")
    source = work / "source"
    make = load_script("make_synthetic_checkpoint")
    arguments = [str(source), "--variant", "ternary", "--full", "--scale", str(SCALE)]
    assert make.main([*arguments, "--max-sequence-length", str(MAX_SEQUENCE_LENGTH)]) == 0
    bench = load_script("bench_full_chain")
    report_path = work / "full-chain.json"
    arguments = [str(source), "--targets", "iphone,cuda", "--workdir", str(work / "bench"), "--no-copy"]
    arguments += ["--kernels", "fallback"]  # gemlite's kernels: tests/test_gemlite_interpreter.py (213 s here)
    code = bench.main([*arguments, "--golden-size", str(GOLDEN_SIZE), "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    report["exit_code"] = code
    yield report
    shutil.rmtree(work, ignore_errors=True)  # 2.7 GB of source: pytest keeps its last three temporary folders


def test_synthetic_source_is_reduced_depth_klein(chain_report: dict) -> None:
    settings = chain_report["source_settings"]
    assert settings["text_encoder_out_layers"] == [1, 2, 3]
    assert settings["max_sequence_length"] == MAX_SEQUENCE_LENGTH
    assert chain_report["source_bytes"] > 2.5e9  # Klein widths: the text encoder's embedding alone is 0.78 GB


@pytest.mark.parametrize("target", ["iphone", "cuda"])
def test_pack_and_verify_pass(chain_report: dict, target: str) -> None:
    entry = next(e for e in chain_report["targets"] if e["target"] == target)
    assert entry["pack"]["passed"], entry["pack"]["output"][-10:]
    assert entry["sha256sum"]["exit_code"] == 0
    assert entry["golden"]["width"] == GOLDEN_SIZE and entry["golden"]["compute_dtype"] == "float32"
    failed = [c for c in entry.get("verify_checks", []) if not c["passed"]]
    assert entry["verify"]["passed"], failed or entry["verify"]["output"][-10:]
    assert entry["verify_passed"] and entry["generation_checked"]
    assert entry["psnr_db"] >= 40
    for stage in ("pack", "verify"):
        assert entry[stage]["peak_rss_bytes"] > 0
    names = {c["name"]: c for c in entry["verify_checks"]}
    assert names["golden image PSNR"]["status"] == "pass"
    if target == "cuda":  # not run here, and said so (a skipped step, never a pass)
        kernels = names["gemlite kernels"]
        assert kernels["status"] == "skipped" and "--kernels fallback" in kernels["detail"], kernels


def test_chain_exit_code(chain_report: dict) -> None:
    assert chain_report["exit_code"] == 0 and chain_report["passed"]
