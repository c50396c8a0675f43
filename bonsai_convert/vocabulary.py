"""The words of the tool, each defined once: targets, variants, verify's kernel modes, the default base model.

The command line builds its choices (Enums) from these; every module that checks or branches on a target or a
variant imports them from here. Nothing else lives here, so any module may import it.
"""

from __future__ import annotations

MLX_TARGETS = ("iphone", "ipad", "mac")  # MLX bundles (PrismML's released MLX layout), one device profile each
CUDA_TARGET = "cuda"  # Gemlite bundles (PrismML's released Gemlite layout)
PACKED_TARGET = "packed"  # the canonical format at information size
GGUF_TARGET = "gguf"  # one GGUF transformer (ggml Q1_0/Q2_0) for stable-diffusion.cpp / ggml
TARGETS = (PACKED_TARGET, *MLX_TARGETS, CUDA_TARGET, GGUF_TARGET)

VARIANTS = ("binary", "ternary")  # {-1,+1} and {-1,0,+1} weights, one scale per 128
AUTO_VARIANT = "auto"  # pack: detect the variant from the source's weights
PACK_VARIANTS = (AUTO_VARIANT, *VARIANTS)

# verify of a cuda bundle without a GPU: Gemlite's own kernels in Triton's interpreter ("interpreter", required),
# our decoder only ("fallback"), or the interpreter where it can run ("auto").
KERNEL_MODES = ("auto", "interpreter", "fallback")

QUANTIZERS = ("absmean",)  # pack --quantize: lossy projections of full-precision weights (opt-in)
DENSE_DTYPES = {"bfloat16": "BF16", "float16": "F16"}  # pack --dtype: a bundle's dense float dtype → safetensors
COMPUTE_DTYPES = ("float16", "float32", "bfloat16")  # generate / verify --dtype: the runtime's compute dtype
MEMORY_DEVICES = ("gpu", "cpu")  # plan --device: the profile's GPU, or MLX's CPU backend

DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.2-klein-4B"  # the model Bonsai Image 4B was trained from
