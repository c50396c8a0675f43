"""Per-step time of the MLX runtime beside diffusers' reference on the same weights, size and machine.

    python scripts/bench_runtime.py [--source demo:ternary|PATH] [--bundle DIR] [--size 512] [--steps 3]
        [--max-sequence-length L] [--dtype float32] [--json bench-runtime.json]

The MLX side runs an `iphone` bundle of SOURCE (packed here without a golden record unless --bundle is given)
through `bonsai_mlx` (OpenBLAS + dequantize/matmul on the CPU device); the diffusers side runs
`Flux2KleinPipeline` on SOURCE's weights (bonsai_convert.reference) — the golden-record reference. Both start
from the same numpy noise, in the same dtype, each in its own process (so neither library's threads or BLAS
affect the other; peak RSS per side). Per-step time is the transformer forward + scheduler step; the median over
the steps after the first is reported (the first includes lazy-evaluation and allocation warm-up). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a bonsai tree on a rock, studio light"


def mlx_side(bundle: Path, size: int, steps: int, dtype: str, max_sequence_length: int | None) -> dict:
    import bonsai_mlx

    bonsai_mlx.enable_cpu_speedups()  # first: the BLAS before MLX is imported
    from bonsai_common import initial_noise
    from bonsai_mlx import allocator, blas

    start = time.perf_counter()
    pipeline = bonsai_mlx.load_pipeline(bundle, dtype=dtype, max_sequence_length=max_sequence_length)
    embeds, _ = pipeline.encode_prompt(PROMPT)
    encoded = time.perf_counter()
    _, seconds = pipeline.denoise(embeds, initial_noise(0, size, size), steps)
    return {
        "step_seconds": seconds,
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
    marks: list[float] = []
    seconds: list[float] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: marks.append(time.perf_counter()))

    def on_step(_pipe, _step, _timestep, kwargs):
        seconds.append(time.perf_counter() - marks[-1])
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
        "load_and_encode_seconds": (marks[0] - start) if marks else None,
        "torch_threads": torch.get_num_threads(),
    }


def run_side(args: argparse.Namespace, side: str, bundle: Path) -> dict:
    """One side in a child process; returns its result with the child's peak RSS and wall time."""
    command = [sys.executable, __file__, "--side", side, "--source", args.source, "--bundle", str(bundle)]
    command += ["--size", str(args.size), "--steps", str(args.steps), "--dtype", args.dtype]
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
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="demo:ternary")
    parser.add_argument("--bundle", type=Path, default=None, help="an iphone/ipad/mac bundle of SOURCE")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-sequence-length", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench-runtime.json"))
    parser.add_argument("--side", choices=["mlx", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "mlx":
        print(json.dumps(mlx_side(args.bundle, args.size, args.steps, args.dtype, args.max_sequence_length)))
        return 0
    if args.side == "diffusers":
        print(json.dumps(diffusers_side(args.source, args.size, args.steps, args.dtype, args.max_sequence_length)))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        bundle = args.bundle
        if bundle is None:
            from bonsai_convert.pack import PackOptions, pack

            bundle = Path(scratch) / "bundle"
            pack(args.source, bundle, PackOptions(target="iphone", golden=False))
        diffusers = run_side(args, "diffusers", bundle)
        mlx = run_side(args, "mlx", bundle)
    ratio = mlx["median_step_seconds"] / diffusers["median_step_seconds"]
    report = {
        "source": args.source,
        "size": args.size,
        "steps": args.steps,
        "dtype": args.dtype,
        "max_sequence_length": args.max_sequence_length,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": _cpus()},
        "mlx": mlx,
        "diffusers": diffusers,
        "ratio_mlx_over_diffusers": round(ratio, 3),
    }
    print(f"{'':12}{'per step (median)':>20}{'load+encode':>14}{'peak RSS':>12}")
    for name, side in (("diffusers", diffusers), ("mlx", mlx)):
        rss = f"{side['peak_rss_bytes'] / 1e9:.2f} GB"
        load = side["load_and_encode_seconds"]
        print(f"{name:12}{side['median_step_seconds']:>19.3f}s{load:>13.2f}s{rss:>12}")
    print(f"MLX / diffusers per step: {ratio:.2f}x  ({args.source}, {args.size}², {args.dtype}, BLAS {mlx['blas']})")
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


if __name__ == "__main__":
    raise SystemExit(main())
