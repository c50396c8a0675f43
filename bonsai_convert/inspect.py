"""`inspect`: a bundle's sizes per component, bits per weight, reductions vs FP16 (Table-2 style)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .manifest import load_manifest

GB = 1e9


def inspect_bundle(bundle: Path) -> dict:
    """The JSON report of `inspect --json` (from the validated manifest)."""
    manifest = load_manifest(Path(bundle))
    return {
        "target": manifest["target"],
        "variant": manifest["variant"],
        "exact": manifest["exact"],
        "profile": manifest["profile"]["name"],
        "components": manifest["components"],
        "payload": manifest["payload"],
        "low_bit_bits_per_weight": manifest["bits_per_weight"]["low_bit_linears"],
        "transformer_bits_per_weight": manifest["bits_per_weight"]["transformer"],
        "total_bytes": manifest["total_bytes"],
        "files": len(manifest["files"]),
        "memory": manifest.get("memory"),
    }


def _size(value: int | None) -> str:
    if value is None:
        return "—"
    if value >= 1e8:
        return f"{value / GB:.3f} GB"
    return f"{value / 1e6:.3f} MB"


def size_table(title: str, components: dict, payload: dict | None, packed: dict | None = None) -> Table:
    """FP16 vs (packed vs) this bundle per component, with the reduction; parts of the transformer below it."""
    table = Table(title=title)
    columns = ["component", "FP16"] + (["packed"] if packed else []) + ["bundle", "reduction"]
    for column in columns:
        table.add_column(column, justify="left" if column == "component" else "right")
    for name, record in components.items():
        reduction = record.get("reduction")
        label = name + (" (est.)" if record.get("estimated") else "")
        packed_cell = [_size(packed["components"].get(name, {}).get("bytes"))] if packed else []
        table.add_row(
            label,
            _size(record.get("fp16_bytes")),
            *packed_cell,
            _size(record["bytes"]),
            f"{reduction:.2f}×" if reduction else "—",
        )
        for part, size in record.get("parts", {}).items():
            if size:
                table.add_row(f"  {part}", "", *([""] if packed else []), _size(size), "", style="dim")
    if payload:
        packed_cell = [_size(packed["payload"]["bytes"])] if packed else []
        table.add_row(
            "payload",
            _size(payload["fp16_bytes"]),
            *packed_cell,
            _size(payload["bytes"]),
            f"{payload['reduction']:.2f}×" if payload.get("reduction") else "—",
            style="bold",
        )
    return table


def print_table(report: dict, console: Console, packed: dict | None = None) -> None:
    title = f"{report['target']} bundle, {report['variant']}" + ("" if report["exact"] else " (lossy)")
    console.print(size_table(title, report["components"], report["payload"], packed))
    console.print(
        f"low-bit linears: {report['low_bit_bits_per_weight']:.4f} bpw · transformer: "
        f"{report['transformer_bits_per_weight']:.4f} bpw · total {report['total_bytes']:,} bytes in "
        f"{report['files']} files"
    )
