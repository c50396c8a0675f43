"""Time `verify --no-generate` (integrity + weights) beside `sha256sum` of the same files, in the same run.

    python scripts/bench_verify.py BUNDLE [--repeats 3] [--json bench-verify.json]

Every file of BUNDLE is read once first (page cache warm for both sides), then, `repeats` times and alternating,
`sha256sum` of every file (one process, as a user would run it) and `bonsai-convert verify BUNDLE --no-generate`
(the manifest, files, sizes, headers, containers, sha256 of every file and every low-bit weight decoded and checked
against its digest; generation is reported "skipped"; for a cuda bundle `--kernels fallback`: gemlite's kernels in
the Triton interpreter are a check of their own, timed by `bench_full_chain.py`). Issue 14's goal: verify at ≥ 0.8×
the speed of sha256sum, i.e. sha256sum seconds / verify seconds ≥ 0.8 (the median of the pairs is reported, with
every sample). Peak RSS is verify's own VmHWM. Not a test."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_pack beside this file, however it is started
from bench_pack import MEASURED_PACK, files_of, folder_bytes, warm  # noqa: E402

# MEASURED_PACK runs any bonsai-convert command (argv after the report path) and writes its own VmHWM (kB).


def time_sha256sum(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)
    return time.perf_counter() - start


def time_verify(bundle: Path, report: Path) -> tuple[float, int, list[dict]]:
    """(seconds, peak RSS bytes, the checks of verify's JSON report)."""
    checks_json = report.with_suffix(".checks.json")
    command = [sys.executable, "-c", MEASURED_PACK, str(report), "verify", str(bundle), "--no-generate"]
    command += ["--report", str(checks_json), "--kernels", "fallback"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"verify failed (exit {result.returncode}): {result.stderr[-1000:] or result.stdout[-1000:]}")
    rss = int(report.read_text()) * 1024
    checks = json.loads(checks_json.read_text()).get("checks", [])
    report.unlink()
    checks_json.unlink()
    return seconds, rss, checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench-verify.json"))
    args = parser.parse_args()
    files = files_of(args.bundle)
    total = folder_bytes(args.bundle)
    warm(args.bundle)
    samples = []
    for repeat in range(args.repeats):
        hash_seconds = time_sha256sum(files)
        verify_seconds, rss, checks = time_verify(args.bundle, args.json.with_suffix(f".hwm{repeat}"))
        samples.append(
            {
                "sha256sum_seconds": round(hash_seconds, 2),
                "verify_seconds": round(verify_seconds, 2),
                "speed_ratio": round(hash_seconds / verify_seconds, 3),
                "verify_peak_rss_bytes": rss,
            }
        )
        print(
            f"sha256sum {hash_seconds:6.1f} s   verify --no-generate {verify_seconds:6.1f} s   "
            f"speed ×{hash_seconds / verify_seconds:.2f}   RSS {rss / 1e9:.2f} GB",
            flush=True,
        )
    report = {
        "bundle": str(args.bundle),
        "bundle_bytes": total,
        "files": len(files),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "samples": samples,
        "median_speed_ratio": statistics.median(s["speed_ratio"] for s in samples),
        "checks": [{k: c.get(k) for k in ("name", "status", "detail")} for c in checks],
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"median speed ratio (sha256sum s / verify s): {report['median_speed_ratio']:.3f}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
