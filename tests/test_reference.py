"""The phased reference (text encoder freed before the transformer; low-bit weights made per layer from codes)
gives bit for bit the outputs of the whole-model reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bonsai_common.noise import initial_noise

from bonsai_convert.golden import use_shipped_text_encoder
from bonsai_convert.layout import make_target
from bonsai_convert.reference import (
    codes_transformer,
    cut_text_encoder_config,
    reference_pipeline,
    run_reference,
    run_reference_phased,
    source_transformer,
)
from bonsai_convert.sources import open_source


@pytest.fixture(scope="module")
def demo():
    return open_source("demo:ternary")


def test_cut_config_keeps_used_layers(demo):
    config = cut_text_encoder_config(demo.components["text_encoder"], demo.text_encoder_out_layers)
    assert config.num_hidden_layers == max(demo.text_encoder_out_layers)
    assert config.tie_last_hidden_states is False


def test_codes_transformer_same_weights(demo):
    dense = source_transformer(demo, torch.float32)
    codes = codes_transformer(demo, torch.float32)
    for name, module in codes.named_modules():
        if hasattr(module, "dense_weight"):
            expected = dense.get_submodule(name).weight
            assert torch.equal(module.dense_weight().view(torch.int32), expected.view(torch.int32)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_times_scales_is_the_signed_magnitude_bit_for_bit(dtype):
    """The two-pass code·scale decode equals the where() form (code 0 → +0.0) when no scale is negative or −0;
    a −0.0 scale keeps the where() form."""
    from bonsai_convert.reference import _codes_linear_class

    rng = np.random.default_rng(3)
    codes = rng.choice(np.array([-1, 0, 1], np.int8), size=(6, 256))
    scales = rng.uniform(0, 2, (6, 2)).astype(np.float16)
    scales[0, 0] = 0.0
    layer = _codes_linear_class()(codes, scales, dtype, "cpu")
    assert layer.multiply
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    fast = layer.dense_weight()
    layer.multiply = False
    assert torch.equal(fast.view(bits), layer.dense_weight().view(bits))
    scales[1, 1] = -0.0
    assert not _codes_linear_class()(codes, scales, dtype, "cpu").multiply


@pytest.mark.parametrize("target_name", ["iphone", "cuda"])
def test_phased_reference_bit_identical(demo, target_name, monkeypatch):
    import bonsai_convert.reference as reference

    monkeypatch.setattr(reference, "SHIPPED_ROWS", 100)  # the demo's embedding (512 rows) in row chunks too
    target = make_target(target_name)
    noise = initial_noise(0, 64, 64)
    args = ("a bonsai tree", noise, 2, demo.text_encoder_out_layers, demo.max_sequence_length)
    whole = reference_pipeline(demo, torch.float32)
    use_shipped_text_encoder(whole, target)  # as write_golden did before it ran in phases
    expected = run_reference(whole, *args)
    del whole
    shipped = target.text_encoder_as_shipped
    phased = run_reference_phased(demo, torch.float32, *args, shipped=shipped, device=torch.device("cpu"))
    assert np.array_equal(phased.latents.view(np.uint32), expected.latents.view(np.uint32))
    assert np.array_equal(phased.image, expected.image)
