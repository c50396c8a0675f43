"""Benchmark `pack` on a full-size (Klein-4B-shaped) synthetic checkpoint, for every target.

    python scripts/bench_pack.py [--variant binary|ternary] [--workdir DIR] [--targets packed,iphone,...]
        [--source DIR] [--no-baseline] [--json bench-pack.json]

For each target: wall seconds, input GB/s, the time of a plain copy of the same input files (same run) and the
ratio, peak RSS of the pack process, output bytes per component, and whether two packs are byte-identical.
Also a naive baseline for contrast: load the whole state dict with torch, quantize with `mx.quantize`.
Prints a table and writes JSON. Not a test: run it by hand (it needs ~3× the checkpoint size of free disk).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent

BASELINE = """
import sys, time
import mlx.core as mx
from safetensors.torch import load_file
from pathlib import Path
from bonsai_convert.lowbit import is_low_bit_key
bits = 1 if sys.argv[2] == "binary" else 2
state = {}
for path in sorted(Path(sys.argv[1], "transformer").glob("*.safetensors")):
    state.update(load_file(path))
out = {}
for name, tensor in state.items():
    if is_low_bit_key(name):
        out[name] = mx.quantize(mx.array(tensor.float().numpy()).astype(mx.float16), group_size=128, bits=bits)
        mx.eval(out[name])
"""


def run_measured(command: list[str]) -> tuple[float, int, int]:
    """Run a command; return (seconds, peak RSS bytes of that process, exit code)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read().decode() if process.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(stderr, file=sys.stderr)
    return seconds, usage.ru_maxrss * 1024, code


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["binary", "ternary"], default="binary")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"))
    parser.add_argument("--source", type=Path, help="an existing synthetic checkpoint (else one is written)")
    parser.add_argument("--targets", default="packed,iphone,ipad,mac,cuda")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("bench-pack.json"))
    args = parser.parse_args()
    console = Console()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.source or args.workdir / f"synthetic-{args.variant}"
    if not source.exists():
        console.print(f"writing the synthetic checkpoint to {source} ...")
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "make_synthetic_checkpoint.py"),
                str(source),
                "--variant",
                args.variant,
            ],
            check=True,
        )
    inputs = sorted((source / "transformer").glob("*.safetensors"))
    input_bytes = sum(p.stat().st_size for p in inputs)
    copy_dir = args.workdir / "plain-copy"
    shutil.rmtree(copy_dir, ignore_errors=True)
    copy_dir.mkdir()
    start = time.perf_counter()
    for path in inputs:
        shutil.copyfile(path, copy_dir / path.name)
    os.sync()
    copy_seconds = time.perf_counter() - start
    shutil.rmtree(copy_dir)
    results = []
    cli = [sys.executable, "-m", "bonsai_convert", "pack", str(source)]
    for target in args.targets.split(","):
        outs = [args.workdir / f"{target}-{i}" for i in (1, 2)]
        runs = []
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_measured([*cli, "--target", target, "-o", str(out)]))
        seconds, rss, code = runs[0]
        manifest = json.loads((outs[0] / "manifest.json").read_text()) if code == 0 else {}
        results.append(
            {
                "target": target,
                "exit_code": code,
                "input_bytes": input_bytes,
                "seconds": round(seconds, 2),
                "seconds_second_run": round(runs[1][0], 2),
                "gb_per_s": round(input_bytes / seconds / 1e9, 3),
                "copy_seconds": round(copy_seconds, 2),
                "ratio_to_copy": round(seconds / copy_seconds, 2),
                "peak_rss_bytes": max(rss, runs[1][1]),
                "output_bytes": folder_bytes(outs[0]) if code == 0 else None,
                "components": {k: v["bytes"] for k, v in manifest.get("components", {}).items()},
                "reproducible": code == 0 and tree_digest(outs[0]) == tree_digest(outs[1]),
            }
        )
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
    baseline = None
    if not args.no_baseline:
        seconds, rss, code = run_measured([sys.executable, "-c", BASELINE, str(source), args.variant])
        baseline = {
            "seconds": round(seconds, 2),
            "peak_rss_bytes": rss,
            "exit_code": code,
            "what": "safetensors.torch.load_file of every shard, then mx.quantize of each low-bit linear",
        }
    table = Table(title=f"pack of a Klein-4B-shaped {args.variant} checkpoint ({input_bytes / 1e9:.2f} GB in)")
    for column in ("target", "s", "GB/s", "× copy", "peak RSS", "transformer out", "reproducible"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r["target"],
            f"{r['seconds']:.1f}",
            f"{r['gb_per_s']:.2f}",
            f"{r['ratio_to_copy']:.1f}",
            f"{r['peak_rss_bytes'] / 1e9:.2f} GB",
            f"{r['components'].get('transformer', 0) / 1e9:.3f} GB",
            "yes" if r["reproducible"] else "NO",
        )
    if baseline:
        table.add_row(
            "naive baseline",
            f"{baseline['seconds']:.1f}",
            f"{input_bytes / baseline['seconds'] / 1e9:.2f}",
            f"{baseline['seconds'] / copy_seconds:.1f}",
            f"{baseline['peak_rss_bytes'] / 1e9:.2f} GB",
            "—",
            "—",
        )
    console.print(table)
    console.print(f"plain copy of the same {len(inputs)} files: {copy_seconds:.1f} s")
    report = {
        "variant": args.variant,
        "input_bytes": input_bytes,
        "copy_seconds": round(copy_seconds, 2),
        "cpu_count": os.cpu_count(),
        "targets": results,
        "baseline": baseline,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.json}")
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
