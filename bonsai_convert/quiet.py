"""Silencing the libraries we drive (their bars and load reports would garble our rich output)."""

from __future__ import annotations


def quiet_libraries() -> None:
    """diffusers/transformers progress bars and load reports would garble our own rich output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
