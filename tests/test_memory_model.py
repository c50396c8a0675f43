"""The memory model (bonsai_convert/memory.py, formats/memory.md) against what MLX's CPU backend allocates: the
Klein VAE decoder (real channel widths, random weights) decoded stage by stage as the runtime does."""

from __future__ import annotations

import pytest

from bonsai_convert.memory import DENSE_CHUNK_VALUES, cpu_dequantized_bytes, vae_decode_activations
from bonsai_convert.plan import klein_4b
from bonsai_convert.plan import plan as make_plan

KLEIN_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "out_channels": 3}


@pytest.mark.parametrize("size", [64, 128])
def test_vae_decode_peak_is_the_widest_stage_within_15_percent(size):
    import mlx.core as mx
    from bonsai_mlx.vae import VAEConfig, VAEDecoder

    decoder = VAEDecoder(VAEConfig())
    decoder.set_dtype(mx.float32)
    mx.eval(decoder.parameters())
    latents = mx.random.normal((1, size // 8, size // 8, 32))
    mx.eval(latents)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(decoder.decode(latents))
    measured = mx.get_peak_memory() - before
    predicted = vae_decode_activations(KLEIN_VAE, size, size, None, 4, unfold=True)
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


def test_cpu_model_adds_the_dequantized_linear_and_the_unfolded_convolutions():
    model = klein_4b()
    gpu = make_plan(model, "iphone", "ternary", 256, 256, golden=False, dtype="float32")["memory"]
    cpu = make_plan(model, "iphone", "ternary", 256, 256, golden=False, dtype="float32", device="cpu")["memory"]
    assert (gpu["device"], cpu["device"]) == ("gpu", "cpu")
    tokens = 256 + model.max_sequence_length  # 16×16 latent tokens + the prompt
    # the widest linear: the single blocks' to_qkv_mlp_proj, 27648 × 3072, run in blocks of 5461 rows
    widest = cpu_dequantized_bytes(27648, 3072, tokens, 4, bits=2)
    assert widest == 5461 * 3072 * 4 + tokens * 27648 * 4
    assert cpu["phases"]["denoising"] - gpu["phases"]["denoising"] == widest
    assert cpu["phases"]["text_encoding"] - gpu["phases"]["text_encoding"] == cpu_dequantized_bytes(
        9728, 2560, model.max_sequence_length, 4
    )
    assert cpu["phases"]["vae_decode"] > gpu["phases"]["vae_decode"]
    with pytest.raises(ValueError, match="device 'tpu'"):
        make_plan(model, "iphone", "ternary", 256, 256, golden=False, device="tpu")


def test_model_and_runtime_agree_on_the_dequantized_block_size():
    from bonsai_mlx import cpu_layers

    assert cpu_layers.DENSE_CHUNK_VALUES == DENSE_CHUNK_VALUES


@pytest.mark.parametrize("bits, group_size", [(2, 128), (1, 128), (4, 64)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_low_bit_linear_in_blocks_gives_the_values_within_the_modelled_memory(dtype, bits, group_size):
    """A layer wider than one block: the same output as one dense product (fp32 summation order aside), and the
    extra memory `cpu_dequantized_bytes` predicts (±15 %)."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from bonsai_mlx.cpu_layers import use_dense_kernels

    out_features, in_features, tokens = 9728, 2560, 64
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    nn.quantize(model, group_size=group_size, bits=bits)
    model.set_dtype(getattr(mx, dtype))
    assert use_dense_kernels(model, mx.cpu) == 1
    mx.eval(model.parameters())
    layer = model.layers[0]
    x = mx.random.normal((1, tokens, in_features)).astype(getattr(mx, dtype))
    mx.eval(x)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    y = model(x)
    mx.eval(y)
    measured = mx.get_peak_memory() - before - y.nbytes
    # The weights are scale·q + bias in fp32 and the product accumulates in fp32 in every dtype: a bf16 output is
    # the float64 product rounded once (2⁻⁹ relative).
    wide = [a.astype(mx.float32) for a in (layer.scales, layer.biases)]
    dense = mx.dequantize(layer.weight, *wide, group_size=group_size, bits=bits)
    expected = np.array(x.astype(mx.float32), np.float64) @ np.array(dense, np.float64).T
    rtol = 2.0**-8 if dtype == "bfloat16" else 1e-5
    assert np.allclose(np.array(y.astype(mx.float32)), expected, rtol=rtol, atol=1e-4)
    predicted = cpu_dequantized_bytes(out_features, in_features, tokens, getattr(mx, dtype).size, bits)
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_unpacked_binary_and_ternary_weights_are_mx_dequantize_bit_for_bit(bits, dtype):
    import mlx.core as mx
    from bonsai_mlx.cpu_layers import unpack_affine

    weight = mx.random.normal((300, 1024), key=mx.random.key(bits))
    q, scales, biases = mx.quantize(weight, group_size=128, bits=bits)
    scales, biases = scales.astype(getattr(mx, dtype)), biases.astype(getattr(mx, dtype))
    expected = mx.dequantize(q, scales, biases, group_size=128, bits=bits)
    got = unpack_affine(q, scales, biases, bits, 128)
    assert got.dtype == expected.dtype and mx.array_equal(got, expected).item()
