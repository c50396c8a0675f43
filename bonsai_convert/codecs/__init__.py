"""One pure-numpy codec per on-disk format (no I/O); each matches a spec in formats/."""

from __future__ import annotations

from collections.abc import Iterator

ROW_BLOCK = 1024  # rows encoded at once: bounds temporaries for 27648-row Klein linears


def row_blocks(rows: int, block: int = ROW_BLOCK) -> Iterator[slice]:
    """Consecutive row slices covering `rows`."""
    for start in range(0, rows, block):
        yield slice(start, min(rows, start + block))
