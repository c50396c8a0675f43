"""Compare `plan`'s memory model with the MLX runtime's measured peak memory, per phase.

    python scripts/validate_memory.py [--source demo:binary|PATH] [--bundle DIR] [--target iphone]
        [--sizes 64,128,256] [--dtype float32] [--max-sequence-length L] [--json FILE]

Packs SOURCE for TARGET (without golden record) unless --bundle is given, generates at each size with the MLX
runtime and compares `mx.get_peak_memory()` of each phase (text encoding, denoising — which includes loading the
transformer —, VAE decode; the peak is reset before each) with the model's phase predictions, with the relative
error (predicted − measured) / measured; the predictions are the model's `device="cpu"` ones (MLX's CPU backend:
dequantized low-bit linears, unfolded convolutions), since that is what runs here. Each size runs in a fresh process
(bonsai_mlx first, for the BLAS). At Klein widths use a `make_synthetic_checkpoint.py --full --scale F` source:
depth changes only the number of resident layers, not the per-layer terms. Writes JSON. Not a test."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

PHASES = ("text_encoding", "denoising", "vae_decode")


def measure(bundle: Path, target: str, size: int, dtype: str, max_sequence_length: int | None) -> dict:
    """One generation in this process: per-phase MLX peaks."""
    import bonsai_mlx

    bonsai_mlx.enable_cpu_speedups()  # first: the BLAS before MLX is imported

    pipeline = bonsai_mlx.load_pipeline(bundle, dtype=dtype, max_sequence_length=max_sequence_length)
    result = pipeline.generate("a bonsai tree", seed=0, steps=2, width=size, height=size)
    return {"phases": result.phase_peak_bytes, "peak": result.peak_memory_bytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="demo:binary")
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--target", default="iphone", choices=["iphone", "ipad", "mac"])
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--dtype", default="float32", help="MLX compute dtype")
    parser.add_argument("--max-sequence-length", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path("validate-memory.json"))
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.bundle, args.target, args.measure, args.dtype, args.max_sequence_length)))
        return 0
    from bonsai_convert.pack import PackOptions, pack
    from bonsai_convert.plan import describe_source, plan

    description = describe_source(args.source)
    if args.max_sequence_length:
        description.max_sequence_length = args.max_sequence_length
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        bundle = args.bundle
        if bundle is None:
            bundle = Path(scratch) / "bundle"
            pack(args.source, bundle, PackOptions(target=args.target, golden=False))
        manifest = json.loads((bundle / "manifest.json").read_text())
        for size in (int(s) for s in args.sizes.split(",")):
            predicted = plan(
                description, args.target, manifest["variant"], size, size, golden=False, dtype=args.dtype, device="cpu"
            )
            command = [sys.executable, __file__, "--measure", str(size), "--bundle", str(bundle)]
            command += ["--target", args.target, "--dtype", args.dtype]
            if args.max_sequence_length:
                command += ["--max-sequence-length", str(args.max_sequence_length)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            measured = json.loads(output.strip().splitlines()[-1])
            phases = {}
            for phase in PHASES:
                got, want = measured["phases"][phase], predicted["memory"]["phases"][phase]
                phases[phase] = {
                    "measured_bytes": got,
                    "predicted_bytes": want,
                    "relative_error": round((want - got) / got, 4) if got else None,
                }
            rows.append({"size": size, "phases": phases})
    table = Table(title=f"MLX peak memory per phase, {args.source}, {args.target}, {args.dtype} (Linux CPU)")
    table.add_column("size", justify="right")
    for phase in PHASES:
        table.add_column(f"{phase}: measured / predicted (error)", justify="right")
    for row in rows:
        cells = []
        for phase in PHASES:
            cell = row["phases"][phase]
            error = cell["relative_error"]
            cells.append(
                f"{cell['measured_bytes'] / 1e9:.3f} / {cell['predicted_bytes'] / 1e9:.3f} GB"
                + (f" ({error:+.1%})" if error is not None else "")
            )
        table.add_row(f"{row['size']}²", *cells)
    Console().print(table)
    report = {"source": args.source, "target": args.target, "dtype": args.dtype, "rows": rows}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
