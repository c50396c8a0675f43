"""Per-step time of the MLX runtime beside diffusers' reference on the same weights, size and machine.

    python scripts/bench_runtime.py [--cases demo:512,klein:256,klein:512] [--dtypes float32,bundle]
        [--klein-source DIR] [--workdir DIR] [--steps 3] [--repeats 1] [--dense-cache-gb G] [--json PATH]
    python scripts/bench_runtime.py --source demo:ternary|PATH [--bundle DIR] --size 512 --dtype float32 ...

A case is SOURCE:SIZE. `demo` is `demo:ternary` (hidden 640, 1 + 2 blocks, 128 prompt tokens); `klein` is the
Klein-width synthetic ternary pipeline `make_synthetic_checkpoint.py OUT --variant ternary --full --scale 0.2`
(every tensor at Klein 4B's shape, 1 + 4 blocks, 512 prompt tokens; written to WORKDIR/klein-s02 on first use
unless --klein-source is given); anything else is a source path. `--dtypes` lists compute dtypes, `bundle` being
the bundle's own (pipeline.json compute_dtype: float16 for iphone). Every case × dtype runs in this one
invocation, so the ratios share the machine's state.

The MLX side runs an `iphone` bundle of each source (packed into WORKDIR without a golden record unless --bundle
is given) through `bonsai_mlx` (OpenBLAS + dequantize/matmul on the CPU device, products in fp32); the diffusers
side runs `Flux2KleinPipeline` on the source's weights (bonsai_convert.reference) — the golden-record reference.
Both start from the same numpy noise, in the same dtype, each in its own process (so neither library's threads
or BLAS affect the other; peak RSS per side). Per-step time is the transformer forward + scheduler step; the
median over the steps after the first is reported (the first includes lazy-evaluation and allocation warm-up),
with the process CPU seconds of the same steps (all threads; steadier than wall time on a shared machine).
`--repeats N` runs each side N times, alternating, and reports the median of those medians (this machine's
speed drifts by ±15 % over minutes).
`--dense-cache-gb` lets the MLX side keep that much fp32 dequantized weight across steps (load_pipeline's
dense_cache_bytes; diffusers holds every weight dense). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a bonsai tree on a rock, studio light"


def mlx_side(
    bundle: Path, size: int, steps: int, dtype: str, max_sequence_length: int | None, dense_cache_bytes: int
) -> dict:
    import bonsai_mlx

    bonsai_mlx.enable_cpu_speedups()  # first: the BLAS before MLX is imported
    from bonsai_common import initial_noise
    from bonsai_mlx import allocator, blas

    start = time.perf_counter()
    pipeline = bonsai_mlx.load_pipeline(
        bundle, dtype=dtype, max_sequence_length=max_sequence_length, dense_cache_bytes=dense_cache_bytes
    )
    embeds, _ = pipeline.encode_prompt(PROMPT)
    encoded = time.perf_counter()
    cpu_marks = [time.process_time()]
    _, seconds = pipeline.denoise(
        embeds, initial_noise(0, size, size), steps, on_step=lambda *_: cpu_marks.append(time.process_time())
    )
    return {
        "step_seconds": seconds,
        "step_cpu_seconds": [b - a for a, b in zip(cpu_marks, cpu_marks[1:], strict=False)],
        "load_and_encode_seconds": encoded - start,
        "blas": blas.loaded_blas(),
        "freed_memory_kept": allocator.freed_memory_kept(),
    }


def diffusers_side(source: str, size: int, steps: int, dtype: str, max_sequence_length: int | None) -> dict:
    import numpy as np
    import torch
    from bonsai_common import initial_noise

    from bonsai_convert.reference import reference_pipeline
    from bonsai_convert.sources import open_source

    opened = open_source(source)
    start = time.perf_counter()
    pipe = reference_pipeline(opened, getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    marks: list[tuple[float, float]] = []
    seconds: list[float] = []
    cpu_seconds: list[float] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda *_: marks.append((time.perf_counter(), time.process_time()))
    )

    def on_step(_pipe, _step, _timestep, kwargs):
        seconds.append(time.perf_counter() - marks[-1][0])
        cpu_seconds.append(time.process_time() - marks[-1][1])
        return kwargs

    noise = initial_noise(0, size, size)
    with torch.no_grad():
        pipe(
            prompt=PROMPT,
            latents=torch.from_numpy(np.ascontiguousarray(noise)).to(getattr(torch, dtype)),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=1.0,
            text_encoder_out_layers=tuple(opened.text_encoder_out_layers),
            max_sequence_length=max_sequence_length or opened.max_sequence_length,
            output_type="latent",
            callback_on_step_end=on_step,
        )
    hook.remove()
    return {
        "step_seconds": seconds,
        "step_cpu_seconds": cpu_seconds,
        "load_and_encode_seconds": (marks[0][0] - start) if marks else None,
        "torch_threads": torch.get_num_threads(),
    }


def run_side(args: argparse.Namespace, side: str, source: str, bundle: Path, size: int, dtype: str) -> dict:
    """One side in a child process; returns its result with the child's peak RSS and wall time."""
    command = [sys.executable, __file__, "--side", side, "--source", source, "--bundle", str(bundle)]
    command += ["--size", str(size), "--steps", str(args.steps), "--dtype", dtype]
    command += ["--dense-cache-gb", str(args.dense_cache_gb)]
    if args.max_sequence_length:
        command += ["--max-sequence-length", str(args.max_sequence_length)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)  # this child's own high-water mark (not the max over children)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{side} side failed with exit code {child.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.perf_counter() - start, 2)
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    later = result["step_seconds"][1:] or result["step_seconds"]
    result["median_step_seconds"] = statistics.median(later)
    later_cpu = result["step_cpu_seconds"][1:] or result["step_cpu_seconds"]
    result["median_step_cpu_seconds"] = statistics.median(later_cpu)
    return result


def klein_source(args: argparse.Namespace) -> Path:
    """The Klein-width synthetic pipeline (--scale 0.2), written once into the work folder."""
    if args.klein_source:
        return args.klein_source
    folder = args.workdir / "klein-s02"
    if not (folder / "model_index.json").is_file():
        script = Path(__file__).with_name("make_synthetic_checkpoint.py")
        command = [sys.executable, str(script), str(folder), "--variant", "ternary", "--full", "--scale", "0.2"]
        subprocess.run(command, check=True)
    return folder


def resolve_source(args: argparse.Namespace, name: str) -> str:
    return {"demo": "demo:ternary"}.get(name) or (str(klein_source(args)) if name == "klein" else name)


def bundle_for(args: argparse.Namespace, source: str, bundles: dict[str, Path]) -> Path:
    """An iphone bundle of `source` (--bundle for a single case), packed into the work folder once per run."""
    if args.bundle is not None:
        return args.bundle
    if source not in bundles:
        from bonsai_convert.pack import PackOptions, pack

        bundle = args.workdir / f"bundle-{len(bundles)}"
        if bundle.exists():
            shutil.rmtree(bundle)
        pack(source, bundle, PackOptions(target="iphone", golden=False))
        bundles[source] = bundle
    return bundles[source]


def bundle_dtype(bundle: Path) -> str:
    return json.loads((bundle / "pipeline.json").read_text()).get("compute_dtype", "float16")


def run_case(args: argparse.Namespace, name: str, size: int, dtype: str, bundles: dict[str, Path]) -> dict:
    """Both sides `--repeats` times, alternating (diffusers, MLX, diffusers, ...), so that a drift of the machine's
    speed reaches both; each side's figure is the median over its runs of the per-run median step."""
    source = resolve_source(args, name)
    bundle = bundle_for(args, source, bundles)
    dtype = bundle_dtype(bundle) if dtype == "bundle" else dtype
    runs: dict[str, list[dict]] = {"diffusers": [], "mlx": []}
    for _ in range(args.repeats):
        for side in runs:
            runs[side].append(run_side(args, side, source, bundle, size, dtype))
    diffusers, mlx = (summary(runs[side]) for side in ("diffusers", "mlx"))
    ratio = mlx["median_step_seconds"] / diffusers["median_step_seconds"]
    cpu_ratio = mlx["median_step_cpu_seconds"] / diffusers["median_step_cpu_seconds"]
    print(
        f"{name:>8} {size:>5}² {dtype:>9}  diffusers {diffusers['median_step_seconds']:8.3f} s  "
        f"mlx {mlx['median_step_seconds']:8.3f} s  ratio {ratio:5.2f}x (CPU time {cpu_ratio:4.2f}x)  peak RSS "
        f"{diffusers['peak_rss_bytes'] / 1e9:.2f} / {mlx['peak_rss_bytes'] / 1e9:.2f} GB",
        flush=True,
    )
    return {
        "case": name,
        "source": source,
        "size": size,
        "dtype": dtype,
        "mlx": mlx,
        "diffusers": diffusers,
        "ratio_mlx_over_diffusers": round(ratio, 3),
        "cpu_time_ratio_mlx_over_diffusers": round(cpu_ratio, 3),
    }


def summary(runs: list[dict]) -> dict:
    """One side's runs: the first run's fields, medians over the runs, every run's steps kept."""
    result = dict(runs[0])
    result["median_step_seconds"] = statistics.median(r["median_step_seconds"] for r in runs)
    result["median_step_cpu_seconds"] = statistics.median(r["median_step_cpu_seconds"] for r in runs)
    result["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    if len(runs) > 1:
        result["runs"] = [
            {key: r[key] for key in ("step_seconds", "step_cpu_seconds", "median_step_seconds", "wall_seconds")}
            for r in runs
        ]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="demo:512,klein:256,klein:512", help="SOURCE:SIZE,... (demo, klein, a path)")
    parser.add_argument("--dtypes", default="float32,bundle", help="compute dtypes; bundle = pipeline.json's")
    parser.add_argument("--source", default=None, help="a single case's source (with --size, --dtype)")
    parser.add_argument("--bundle", type=Path, default=None, help="an iphone/ipad/mac bundle of --source")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "bundle"])
    parser.add_argument(
        "--klein-source", type=Path, default=None, help="a make_synthetic_checkpoint --scale 0.2 folder"
    )
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating; medians over them")
    parser.add_argument("--dense-cache-gb", type=float, default=4.0, help="MLX: fp32 dequantized weights kept (GB)")
    parser.add_argument("--max-sequence-length", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench-runtime.json"))
    parser.add_argument("--side", choices=["mlx", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "mlx":
        cache = int(args.dense_cache_gb * 1e9)
        result = mlx_side(args.bundle, args.size, args.steps, args.dtype, args.max_sequence_length, cache)
        print(json.dumps(result))
        return 0
    if args.side == "diffusers":
        print(json.dumps(diffusers_side(args.source, args.size, args.steps, args.dtype, args.max_sequence_length)))
        return 0
    if args.source is not None:
        cases = [(args.source, args.size)]
        dtypes = [args.dtype or "float32"]
    else:
        if args.bundle is not None:
            parser.error("--bundle needs --source")
        cases = [(name, int(size)) for name, size in (c.rsplit(":", 1) for c in args.cases.split(","))]
        dtypes = args.dtypes.split(",") if args.dtype is None else [args.dtype]
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundles: dict[str, Path] = {}
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "steps": args.steps,
        "repeats": args.repeats,
        "dense_cache_gb": args.dense_cache_gb,
        "max_sequence_length": args.max_sequence_length,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": _cpus()},
        "results": [],
    }
    results = report["results"]
    for name, size in cases:
        for dtype in dtypes:
            results.append(run_case(args, name, size, dtype, bundles))
            report["blas"] = results[0]["mlx"]["blas"]
            report["machine"]["load_average_after"] = os.getloadavg()
            args.json.write_text(json.dumps(report, indent=2) + "\n")  # after every case: a partial run keeps its rows
    print(f"{'case':>8} {'size':>6} {'dtype':>9} {'MLX / diffusers per step':>26}")
    for r in results:
        print(f"{r['case']:>8} {r['size']:>5}² {r['dtype']:>9} {r['ratio_mlx_over_diffusers']:>25.2f}x")
    print(f"wrote {args.json}")
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


if __name__ == "__main__":
    raise SystemExit(main())
