"""Benchmark the whole release chain on one pipeline folder: `pack` (golden record included) then `verify`
(generation included) for each target, beside `cp -r` of the source and `sha256sum` of each bundle, same run.

    python scripts/bench_full_chain.py SOURCE [--targets iphone,cuda] [--workdir DIR] [--golden-size N]
        [--kernels auto|interpreter|fallback] [--verify-source] [--timeout S] [--keep] [--json full-chain.json]

SOURCE is a pipeline folder, e.g. one written by
`python scripts/make_synthetic_checkpoint.py OUT --variant ternary --full [--scale F]` (15.96 GB at --scale 1).
Steps, in this order: read SOURCE once (page cache warm), `cp -r SOURCE` to a fresh folder plus `sync` (timed,
then removed); then per target: `bonsai-convert pack SOURCE --target T -o BUNDLE` (timed; the pack fsyncs what it
writes), `sha256sum` of every file of BUNDLE (timed, one process, page cache as pack left it), and
`bonsai-convert verify BUNDLE --report R --image P` (timed). pack and verify each run in their own Python whose
peak RSS is its own VmHWM read at exit (bench_pack.py's MEASURED_PACK); for verify the largest child's peak RSS
(the Gemlite-interpreter child of a cuda verify without a GPU) is recorded separately, as getrusage reports it.
`--kernels` is handed to the cuda verify (auto: gemlite's kernels in the Triton interpreter on every transformer
low-bit linear when installed, with the 600 s child limit verify sets). The JSON has every stage, the verify
report's checks (PSNR, the details with their own timings), the golden record's settings and the commit of the
code that ran (the importable `bonsai_convert`: point PYTHONPATH at a clean checkout to measure a commit).
It is rewritten after every stage, so an interrupted run keeps what it measured. Exit 0 only if every stage
passed. Not a test (tests/test_full_chain.py is the reduced-depth CI version): it needs the size of SOURCE plus
the bundles of free disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_pack beside this file, however it is started
from bench_pack import MEASURED_PACK, files_of, folder_bytes, time_cp, warm  # noqa: E402

# MEASURED_PACK runs any bonsai-convert command (argv after the report path) and writes its own VmHWM (kB) to
# argv[1]. VmHWM counts file pages mapped into the process (safetensors memmaps) as well as its own memory, so this
# prefix also samples RssAnon and RssFile every 0.2 s and writes their peaks (kB) to argv[1] + ".sampled", and the
# largest waited-for child's peak RSS (kB, ru_maxrss) to argv[1] + ".children".
MEASURED_COMMAND = (
    "import atexit, resource, sys, threading, time\n"
    "peaks = {'RssAnon:': 0, 'RssFile:': 0}\n"
    "def sample():\n"
    "    while True:\n"
    "        for line in open('/proc/self/status'):\n"
    "            key = line.split(None, 1)[0]\n"
    "            if key in peaks:\n"
    "                peaks[key] = max(peaks[key], int(line.split()[1]))\n"
    "        time.sleep(0.2)\n"
    "threading.Thread(target=sample, daemon=True).start()\n"
    "def report_extra(path):\n"
    "    open(path + '.children', 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "    open(path + '.sampled', 'w').write(f\"{peaks['RssAnon:']} {peaks['RssFile:']}\")\n"
    "atexit.register(report_extra, sys.argv[1])\n"
) + MEASURED_PACK


def code_under_test(workdir: Path) -> dict:
    """Which bonsai_convert the subprocesses import (PYTHONPATH first), and its git commit when it has one."""
    probe = "import bonsai_convert, pathlib; print(pathlib.Path(bonsai_convert.__file__).resolve().parent.parent)"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=workdir)
    root = Path(found.stdout.strip())
    info: dict = {"path": str(root), "commit": None, "dirty": None}
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:
        info["commit"] = commit.stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True)
        info["dirty"] = bool(status.stdout.strip())
    elif (root / ".bench-commit").exists():  # a `git archive` snapshot made for this benchmark
        info["commit"] = (root / ".bench-commit").read_text().strip()
        info["dirty"] = False
    return info


def run_measured(arguments: list[str], log: Path, timeout: float | None) -> dict:
    """One bonsai-convert command in its own Python: seconds, peak RSS (own VmHWM; sampled anonymous and
    file-backed peaks), largest child's peak RSS, exit code, and its output lines with the second each appeared.
    It runs in the log's folder: `python -c` puts the working directory first on sys.path, and a checkout there
    would shadow PYTHONPATH."""
    report = log.with_suffix(".hwm")
    extras = [Path(f"{report}.children"), Path(f"{report}.sampled")]
    for path in (report, *extras):
        path.unlink(missing_ok=True)
    command = [sys.executable, "-c", MEASURED_COMMAND, str(report), *arguments]
    lines: list[list] = []
    start = time.perf_counter()
    options = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent)
    process = subprocess.Popen(command, text=True, errors="replace", **options)

    def read_output() -> None:
        with open(log, "w") as output:
            for line in process.stdout:
                elapsed = time.perf_counter() - start
                output.write(f"{elapsed:8.1f} s | {line}")
                output.flush()
                if line.strip():
                    lines.append([round(elapsed, 1), line.rstrip()])

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the whole group: verify's interpreter child too
        code = process.wait()
        timed_out = True
    seconds = time.perf_counter() - start
    reader.join(timeout=10)

    def kilobytes(path: Path) -> list[int] | None:
        return [int(v) * 1024 for v in path.read_text().split()] if path.exists() else None

    rss, child_rss, sampled = (kilobytes(path) for path in (report, *extras))
    for path in (report, *extras):
        path.unlink(missing_ok=True)
    return {
        "command": ["bonsai-convert", *arguments],
        "seconds": round(seconds, 2),
        "peak_rss_bytes": rss[0] if rss else None,
        "peak_rss_anon_bytes": sampled[0] if sampled else None,
        "peak_rss_file_bytes": sampled[1] if sampled else None,
        "children_peak_rss_bytes": child_rss[0] if child_rss else None,
        "exit_code": code,
        "timed_out": timed_out,
        "passed": code == 0 and not timed_out,
        "log": str(log),
        "output": lines[-200:],  # [seconds since start, line]: when each phase began
    }


def time_sha256sum(bundle: Path) -> dict:
    files = files_of(bundle)
    start = time.perf_counter()
    result = subprocess.run(["sha256sum", *map(str, files)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in files)
    return {
        "seconds": round(seconds, 2),
        "files": len(files),
        "bytes": size,
        "gb_per_s": round(size / seconds / 1e9, 3) if seconds else None,
        "exit_code": result.returncode,
    }


def golden_settings(bundle: Path) -> dict | None:
    manifest_path = bundle / "manifest.json"
    if not manifest_path.exists():
        return None
    golden = json.loads(manifest_path.read_text()).get("golden")
    if not golden or not (bundle / golden).exists():
        return None
    record = json.loads((bundle / golden).read_text())
    keys = ("width", "height", "steps", "compute_dtype", "max_sequence_length", "seed", "prompt", "reference")
    return {k: record[k] for k in keys if k in record}


def write_report(path: Path, report: dict) -> None:
    report["load_average_now"] = os.getloadavg()
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(path)


def gb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def print_table(console: Console, report: dict) -> None:
    table = Table(title=f"full chain on {report['source']} ({gb(report['source_bytes'])} GB), one run")
    columns = ("stage", "target", "wall s", "VmHWM GB", "anon GB", "file GB", "child GB", "exit", "result", "detail")
    for column in columns:
        table.add_column(column, justify="left" if column in ("stage", "detail") else "right")
    copy = report.get("copy")
    if copy:
        rate = f"{copy['gb_per_s']:.3f} GB/s"
        table.add_row("cp -r + sync", "-", f"{copy['seconds']:.1f}", "-", "-", "-", "-", "0", "pass", rate)
    for entry in report["targets"]:
        target = entry["target"]
        for stage in ("pack", "sha256sum", "verify"):
            record = entry.get(stage)
            if record is None:
                continue
            if stage == "sha256sum":
                detail = f"{record['files']} files, {gb(record['bytes'])} GB, {record['gb_per_s']} GB/s"
                ok = record["exit_code"] == 0
                row = [f"{record['seconds']:.1f}", "-", "-", "-", "-", str(record["exit_code"])]
                row.append("pass" if ok else "FAIL")
                table.add_row(stage, target, *row, detail)
                continue
            if stage == "pack":
                detail = f"bundle {gb(entry.get('bundle_bytes'))} GB"
            else:
                psnr = entry.get("psnr_db")
                failed = [c["name"] for c in entry.get("verify_checks", []) if not c["passed"]]
                detail = f"PSNR {psnr} dB" if psnr is not None else "no PSNR"
                if failed:
                    detail += "; failed: " + ", ".join(failed)
            result = "TIMEOUT" if record["timed_out"] else ("pass" if record["passed"] else "FAIL")
            table.add_row(
                stage,
                target,
                f"{record['seconds']:.1f}",
                gb(record["peak_rss_bytes"]),
                gb(record["peak_rss_anon_bytes"]),
                gb(record["peak_rss_file_bytes"]),
                gb(record["children_peak_rss_bytes"]),
                str(record["exit_code"]),
                result,
                detail,
            )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--targets", default="iphone,cuda")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"))
    parser.add_argument("--golden-size", type=int, default=None, help="pack --golden-size (default: pack's)")
    parser.add_argument("--kernels", default="auto", help="verify --kernels for cuda bundles")
    parser.add_argument("--verify-source", action="store_true", help="verify --source SOURCE (bit-exact weights)")
    parser.add_argument("--no-copy", action="store_true", help="skip the cp -r comparison")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per pack/verify before it is killed")
    parser.add_argument("--keep", action="store_true", help="keep the bundles afterwards")
    parser.add_argument("--json", type=Path, default=Path("full-chain.json"))
    args = parser.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    source = args.source.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir.resolve()
    report: dict = {
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(source),
        "source_bytes": folder_bytes(source),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "load_average_start": os.getloadavg(),
        "code": code_under_test(workdir),
        "notes": [
            "peak_rss_bytes: VmHWM of the pack/verify process itself, which counts resident pages of memory-mapped "
            "files (safetensors memmaps) too; peak_rss_anon_bytes / peak_rss_file_bytes: the peaks of RssAnon "
            "(its own memory) and RssFile sampled every 0.2 s; children_peak_rss_bytes: the largest waited-for "
            "child's ru_maxrss",
            "sha256sum runs right after pack, so the bundle is mostly in the page cache",
        ],
        "copy": None,
        "targets": [],
    }
    synthetic = source / "bonsai_demo.json"
    if synthetic.exists():
        report["source_settings"] = json.loads(synthetic.read_text())
    console.print(f"code under test: {report['code']}")
    if not args.no_copy:
        console.print(f"reading {source} once, then cp -r + sync ...")
        warm(source)
        seconds = time_cp(source, workdir / "plain-copy")
        report["copy"] = {
            "seconds": round(seconds, 2),
            "gb_per_s": round(report["source_bytes"] / seconds / 1e9, 3),
        }
        console.print(f"cp -r + sync: {seconds:.1f} s")
        write_report(args.json, report)
    for target in args.targets.split(","):
        bundle = workdir / f"bundle-{target}"
        shutil.rmtree(bundle, ignore_errors=True)
        entry: dict = {"target": target}
        report["targets"].append(entry)
        pack_arguments = ["pack", str(source), "--target", target, "-o", str(bundle)]
        if args.golden_size:
            pack_arguments += ["--golden-size", str(args.golden_size)]
        console.print(f"[bold]{target}[/bold]: {' '.join(pack_arguments)}")
        entry["pack"] = run_measured(pack_arguments, workdir / f"pack-{target}.log", args.timeout)
        console.print(f"  pack {entry['pack']['seconds']:.1f} s, exit {entry['pack']['exit_code']}")
        write_report(args.json, report)
        if not entry["pack"]["passed"]:
            console.print("[red]pack failed[/red]: " + " | ".join(text for _, text in entry["pack"]["output"][-5:]))
            continue
        entry["bundle_bytes"] = folder_bytes(bundle)
        entry["golden"] = golden_settings(bundle)
        entry["sha256sum"] = time_sha256sum(bundle)
        console.print(f"  sha256sum {entry['sha256sum']['seconds']:.1f} s")
        write_report(args.json, report)
        verify_report = workdir / f"verify-{target}.json"
        verify_report.unlink(missing_ok=True)
        verify_arguments = ["verify", str(bundle), "--report", str(verify_report)]
        verify_arguments += ["--image", str(workdir / f"verify-{target}.png")]
        if target == "cuda":
            verify_arguments += ["--kernels", args.kernels]
        if args.verify_source:
            verify_arguments += ["--source", str(source)]
        console.print(f"  {' '.join(verify_arguments)}")
        entry["verify"] = run_measured(verify_arguments, workdir / f"verify-{target}.log", args.timeout)
        if verify_report.exists():
            verified = json.loads(verify_report.read_text())
            entry["psnr_db"] = verified.get("psnr_db")
            entry["generation_checked"] = verified.get("generation_checked")
            entry["verify_passed"] = verified.get("passed")
            entry["verify_checks"] = verified.get("checks", [])
        console.print(f"  verify {entry['verify']['seconds']:.1f} s, exit {entry['verify']['exit_code']}")
        write_report(args.json, report)
        if not args.keep:
            shutil.rmtree(bundle, ignore_errors=True)
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    stages = [entry.get(stage) for entry in report["targets"] for stage in ("pack", "verify")]
    hashes = [entry.get("sha256sum") for entry in report["targets"]]
    report["passed"] = all(s is not None and s["passed"] for s in stages) and all(
        h is not None and h["exit_code"] == 0 for h in hashes
    )
    write_report(args.json, report)
    print_table(console, report)
    console.print(f"wrote {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
