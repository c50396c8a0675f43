"""The tensors of one Gemlite linear (a `GemLiteLinearTriton` state dict), by key: one definition for the
converter's codec and source readers and for the cuda runtime."""

from __future__ import annotations

# What a bundle stores per linear: exactly the keys PrismML's released loader takes (it raises on any other key).
STORED_LAYER_KEYS = ("W_q", "scales", "zeros", "metadata", "orig_shape")
# Every key a GemLiteLinearTriton state dict may hold: the stored ones, `meta_scale` (a 0-d fp32 0.0 used only by
# NVFP4, which `load_state_dict` defaults when absent) and `bias` (none in Klein's low-bit linears).
LAYER_KEYS = (*STORED_LAYER_KEYS, "meta_scale", "bias")
