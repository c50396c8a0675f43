"""Compare `plan`'s memory model with the MLX runtime's measured peak memory on the demo model at several sizes.

    python scripts/validate_memory.py [--variant binary] [--sizes 64,128,256] [--dtype float32] [--json FILE]

Packs demo:VARIANT for iphone, generates at each size with the MLX runtime (mx.get_peak_memory, reset before the
prompt is encoded) and prints measured vs predicted peak with the relative error. Writes JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bonsai_convert.pack import PackOptions, pack
from bonsai_convert.plan import describe_source, plan
from bonsai_convert.runtimes import generate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="binary", choices=["binary", "ternary"])
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--dtype", default="float32", help="MLX compute dtype (fp16 is very slow on MLX's CPU)")
    parser.add_argument("--json", type=Path, default=Path("validate-memory.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        bundle = Path(scratch) / "bundle"
        source = f"demo:{args.variant}"
        pack(source, bundle, PackOptions(target="iphone", golden=False))
        description = describe_source(source)
        for size in (int(s) for s in args.sizes.split(",")):
            predicted = plan(description, "iphone", args.variant, size, size, golden=False, dtype=args.dtype)["memory"]
            result = generate(bundle, "iphone", "a bonsai tree", 0, 4, size, size, dtype=args.dtype)
            measured = result.peak_memory_bytes or 0
            rows.append(
                {
                    "size": size,
                    "measured_peak_bytes": measured,
                    "predicted_peak_bytes": predicted["peak_bytes"],
                    "relative_error": round((predicted["peak_bytes"] - measured) / measured, 4) if measured else None,
                    "predicted_phases": predicted["phases"],
                }
            )
    table = Table(title=f"MLX peak memory, demo {args.variant}, iphone bundle, {args.dtype} (Linux CPU)")
    for column in ("size", "measured", "predicted", "error"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            f"{row['size']}²",
            f"{row['measured_peak_bytes'] / 1e6:.1f} MB",
            f"{row['predicted_peak_bytes'] / 1e6:.1f} MB",
            f"{row['relative_error']:+.1%}",
        )
    Console().print(table)
    args.json.write_text(json.dumps({"variant": args.variant, "dtype": args.dtype, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
