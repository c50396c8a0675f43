"""CUDA runtime for Bonsai bundles in the Gemlite layout (formats/gemlite.md): diffusers + GemLite kernels.

On a GPU with gemlite installed each low-bit linear is a `GemLiteLinearTriton` filled by `load_state_dict`;
elsewhere `GemliteDecodedLinear` decodes the same tensors to a dense weight per layer as it runs (CPU fallback, CI).
"""

from .layers import GemliteDecodedLinear, LayoutError, dequantize_state, gemlite_available
from .pipeline import BundleError, Generation, generate, load_pipeline

__all__ = [
    "BundleError",
    "GemliteDecodedLinear",
    "Generation",
    "LayoutError",
    "dequantize_state",
    "gemlite_available",
    "generate",
    "load_pipeline",
]
