"""The reader of a prequantized text encoder, whichever format it has."""

from __future__ import annotations

from pathlib import Path

from .gemlite import GemliteTextEncoder, is_gemlite_text_encoder
from .mlx import QuantizedTextEncoder


def quantized_text_encoder(folder: Path) -> QuantizedTextEncoder | GemliteTextEncoder:
    """Gemlite (our cuda bundles' config says so), else mlx-lm 4-bit."""
    return GemliteTextEncoder(folder) if is_gemlite_text_encoder(folder) else QuantizedTextEncoder(folder)
