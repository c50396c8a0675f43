"""make_synthetic_checkpoint --full: depths scale, widths never do (the full write is a script run, not a test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic_checkpoint.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_scale_is_klein(script):
    from bonsai_convert.model_shapes import KLEIN_4B_TRANSFORMER, KLEIN_TEXT_ENCODER_OUT_LAYERS, QWEN3_4B

    depths = script.scaled_depths(1.0)
    assert depths["num_layers"] == KLEIN_4B_TRANSFORMER["num_layers"]
    assert depths["num_single_layers"] == KLEIN_4B_TRANSFORMER["num_single_layers"]
    assert depths["text_layers"] == QWEN3_4B["num_hidden_layers"]
    assert depths["out_layers"] == tuple(KLEIN_TEXT_ENCODER_OUT_LAYERS)


@pytest.mark.parametrize("scale", [0.01, 0.05, 0.2, 0.5])
def test_scaled_depths_keep_widths_and_three_used_layers(script, scale):
    from bonsai_convert.model_shapes import KLEIN_4B_TRANSFORMER, QWEN3_4B

    depths = script.scaled_depths(scale)
    assert depths["num_layers"] >= 1 and depths["num_single_layers"] >= 1
    out = depths["out_layers"]
    assert len(set(out)) == 3 and 1 <= min(out) and max(out) <= depths["text_layers"]
    transformer, text, vae = script.full_configs(depths)
    for key in ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "in_channels"):
        assert transformer[key] == KLEIN_4B_TRANSFORMER[key]
    for key in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads"):
        assert text[key] == QWEN3_4B[key]
    assert text["num_hidden_layers"] == depths["text_layers"]
    assert vae["latent_channels"] == 32


def test_scale_out_of_range(script):
    with pytest.raises(ValueError):
        script.scaled_depths(0)
