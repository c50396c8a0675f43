"""Benchmark `pack` against `cp` of the same files, in the same run: full pipeline and transformer only, both
variants, every target.

    python scripts/bench_pack.py [--variants binary,ternary] [--targets packed,iphone,ipad,mac,cuda]
        [--cases full,transformer] [--workdir DIR] [--scale F] [--repeats N] [--reference-check]
        [--keep] [--json bench-pack.json]

For each variant a synthetic Klein-4B-shaped pipeline is written with `make_synthetic_checkpoint.py --full`
(15.96 GB of bf16 at --scale 1; --scale < 1 keeps every width and shrinks only the depths), unless it exists.
The transformer-only case is a folder holding only `transformer/`, hard links to the same files (no extra disk).
For every (case, target), `repeats` times: read the input once (page cache warm for both), `cp -r` it to a fresh
folder plus `sync` (timed), remove the copy, then `bonsai-convert pack SOURCE --target T --no-golden` (timed,
peak RSS = the pack process's own VmHWM, output written and fsynced by pack). The ratio pack / cp of each pair
is printed; the JSON has every sample. --reference-check also packs each case once with
BONSAI_CONVERT_REFERENCE=1 (the plain numpy code paths) and compares the bundles byte for byte (slow).
Not a test: run it by hand; it needs about twice the checkpoint size of free disk.
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

# Peak RSS of the pack process itself (VmHWM read at exit): wait4's maxrss would include the forking parent.
MEASURED_PACK = (
    "import atexit, sys\n"
    "def report(path):\n"
    "    status = open('/proc/self/status').read()\n"
    "    open(path, 'w').write(status.split('VmHWM:')[1].split()[0])\n"
    "atexit.register(report, sys.argv[1])\n"
    "sys.argv = ['bonsai-convert'] + sys.argv[2:]\n"
    "from bonsai_convert.cli import main\n"
    "main()\n"
)


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in files_of(folder))


def warm(folder: Path) -> None:
    """Read every input file once so that cp and pack both start from the page cache."""
    for path in files_of(folder):
        with open(path, "rb", buffering=0) as handle:
            while handle.read(1 << 24):
                pass


def time_cp(source: Path, destination: Path) -> float:
    shutil.rmtree(destination, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(destination)], check=True)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(destination)
    return seconds


def time_pack(source: Path, target: str, out: Path, environment: dict | None = None) -> tuple[float, int, int, str]:
    """(seconds, peak RSS bytes, exit code, stderr tail) of one pack run."""
    shutil.rmtree(out, ignore_errors=True)
    report = out.parent / f".{out.name}.hwm"
    command = [sys.executable, "-c", MEASURED_PACK, str(report), "pack", str(source), "--target", target]
    command += ["-o", str(out), "--no-golden"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    seconds = time.perf_counter() - start
    rss = int(report.read_text()) * 1024 if report.exists() else 0
    report.unlink(missing_ok=True)
    return seconds, rss, result.returncode, result.stderr[-2000:]


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in files_of(folder):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def ensure_sources(workdir: Path, variant: str, scale: float, console: Console) -> dict[str, Path]:
    name = f"full-{variant}" if scale == 1 else f"full-{variant}-scale{scale:g}"
    full = workdir / name
    if not full.exists():
        console.print(f"writing the synthetic pipeline to {full} ...")
        command = [sys.executable, str(ROOT / "scripts" / "make_synthetic_checkpoint.py"), str(full)]
        subprocess.run([*command, "--variant", variant, "--full", "--scale", str(scale)], check=True)
    transformer_only = workdir / f"{name}-transformer-only"
    if not transformer_only.exists():
        (transformer_only / "transformer").mkdir(parents=True)
        for path in files_of(full / "transformer"):
            os.link(path, transformer_only / "transformer" / path.name)  # hard links: regular files, no copy
    return {"full": full, "transformer": transformer_only}


def write_report(args, results: list[dict]) -> None:
    report = {"cpu_count": os.cpu_count(), "scale": args.scale, "load_average": os.getloadavg(), "results": results}
    args.json.write_text(json.dumps(report, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="binary,ternary")
    parser.add_argument("--targets", default="packed,iphone,ipad,mac,cuda")
    parser.add_argument("--cases", default="full,transformer")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"))
    parser.add_argument("--scale", type=float, default=1.0, help="depth multiplier of the synthetic pipeline")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reference-check", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints afterwards")
    parser.add_argument("--json", type=Path, default=Path("bench-pack.json"))
    args = parser.parse_args()
    console = Console()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants.split(","):
        sources = ensure_sources(args.workdir, variant, args.scale, console)
        for case in args.cases.split(","):
            source = sources[case]
            input_bytes = folder_bytes(source)
            for target in args.targets.split(","):
                out = args.workdir / f"bundle-{variant}-{case}-{target}"
                for repeat in range(args.repeats):
                    warm(source)
                    cp_seconds = time_cp(source, args.workdir / "plain-copy")
                    warm(source)
                    seconds, rss, code, stderr = time_pack(source, target, out)
                    if code:
                        console.print(f"[red]pack failed[/red] {variant} {case} {target}: {stderr}")
                    record = {
                        "variant": variant,
                        "case": case,
                        "target": target,
                        "repeat": repeat,
                        "input_bytes": input_bytes,
                        "cp_seconds": round(cp_seconds, 2),
                        "pack_seconds": round(seconds, 2),
                        "ratio": round(seconds / cp_seconds, 2),
                        "pack_gb_per_s": round(input_bytes / seconds / 1e9, 3),
                        "peak_rss_bytes": rss,
                        "exit_code": code,
                        "output_bytes": folder_bytes(out) if code == 0 else None,
                    }
                    console.print(
                        f"{variant:8s} {case:12s} {target:7s} pack {seconds:6.1f} s  cp {cp_seconds:6.1f} s  "
                        f"×{seconds / cp_seconds:.2f}  RSS {rss / 1e9:.2f} GB"
                    )
                    results.append(record)
                    write_report(args, results)  # after every sample: an interrupted run keeps what it measured
                if args.reference_check and code == 0:
                    reference_out = args.workdir / f"reference-{variant}-{case}-{target}"
                    environment = dict(os.environ, BONSAI_CONVERT_REFERENCE="1")
                    ref_seconds, _, ref_code, _ = time_pack(source, target, reference_out, environment)
                    identical = ref_code == 0 and tree_digest(out) == tree_digest(reference_out)
                    results[-1]["reference_seconds"] = round(ref_seconds, 2)
                    results[-1]["identical_to_reference"] = identical
                    console.print(f"    reference code paths: {ref_seconds:.1f} s, byte-identical: {identical}")
                    shutil.rmtree(reference_out, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            for path in sources.values():
                shutil.rmtree(path, ignore_errors=True)
    table = Table(title="pack vs cp of the same files, same run (page cache warm for both; --no-golden)")
    for column in ("variant", "case", "target", "in GB", "pack s", "cp s", "× cp", "peak RSS", "out GB"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r["variant"],
            r["case"],
            r["target"],
            f"{r['input_bytes'] / 1e9:.2f}",
            f"{r['pack_seconds']:.1f}",
            f"{r['cp_seconds']:.1f}",
            f"{r['ratio']:.2f}",
            f"{r['peak_rss_bytes'] / 1e9:.2f} GB",
            f"{(r['output_bytes'] or 0) / 1e9:.2f}",
        )
    console.print(table)
    write_report(args, results)
    console.print(f"wrote {args.json}")
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
