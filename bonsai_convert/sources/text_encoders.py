"""The reader of a prequantized text encoder, whichever format it has."""

from __future__ import annotations

from pathlib import Path

from .gemlite import GemliteTextEncoder, is_gemlite_text_encoder
from .hqq import HqqTextEncoder, is_hqq_folder
from .mlx import QuantizedTextEncoder


def quantized_text_encoder(folder: Path) -> QuantizedTextEncoder | GemliteTextEncoder | HqqTextEncoder:
    """HQQ (a qmodel.pt: the Gemlite release's and our cuda bundles'), Gemlite (older cuda bundles, their config
    says so), else mlx-lm 4-bit."""
    if is_hqq_folder(folder):
        return HqqTextEncoder(folder)
    return GemliteTextEncoder(folder) if is_gemlite_text_encoder(folder) else QuantizedTextEncoder(folder)
