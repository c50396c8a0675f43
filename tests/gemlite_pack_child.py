"""Child process of test_gemlite_interpreter: gemlite's pack() vs our encoder on the demo layers (CPU)."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from bonsai_cuda import interpreter

from bonsai_convert.codecs import gemlite as codec
from bonsai_convert.demo import build_demo_pipeline
from bonsai_convert.lowbit import LowBitTensor, is_low_bit_key, split_exact


def main(report: str) -> None:
    interpreter.activate()
    from gemlite.core import DType, GemLiteLinearTriton

    cases = []
    rng = np.random.default_rng(3)
    for variant in ("binary", "ternary"):
        transformer = build_demo_pipeline(variant, seed=0).transformer
        layers = [
            (name, split_exact(name, tensor.float().numpy(), variant))
            for name, tensor in transformer.state_dict().items()
            if is_low_bit_key(name)
        ]
        # Beside the demo's layers: per-channel (K = 128) and small grouped layers with zero, negative and
        # subnormal scales (the demo's hidden size is a multiple of 128 above 128).
        for shape in ((8, 128), (3, 128), (5, 384)):
            values = np.array((-1, 1) if variant == "binary" else (-1, 0, 1), np.int8)
            codes = rng.choice(values, size=shape)
            scales = rng.uniform(-2, 2, (shape[0], shape[1] // 128)).astype(np.float16)
            scales[0, 0], scales[-1, -1] = 0, np.float16(2.0**-20)
            layers.append((f"random{shape}", LowBitTensor(f"random{shape}", codes, scales)))
        for name, low in layers:
            n, k = low.codes.shape
            if variant == "binary":
                q = torch.from_numpy((low.codes > 0).astype(np.uint8))
                scales = torch.from_numpy((low.scales.astype(np.float32) * 2).astype(np.float16))
                zeros = torch.full(scales.shape, 0.5, dtype=torch.float16)
            else:
                q = torch.from_numpy((low.codes + 1).astype(np.uint8))
                scales, zeros = torch.from_numpy(low.scales), 1
            for bitwidth in (8, 32):
                layer = GemLiteLinearTriton(
                    codec.VARIANT_BITS[variant], group_size=128, in_features=k, out_features=n,
                    input_dtype=DType.FP16, output_dtype=DType.FP16,
                )  # fmt: skip
                layer.pack(q, scales, zeros, bias=None, fma_mode=True, packing_bitwidth=bitwidth)
                theirs = {key: value.numpy() for key, value in layer.state_dict().items()}
                ours = codec.encode(low.codes, low.scales, variant, packing_bitwidth=bitwidth)
                equal = set(theirs) == set(ours) | {"meta_scale"} and float(theirs["meta_scale"]) == 0.0
                for key, value in ours.items():
                    other = theirs.get(key)
                    equal = equal and other is not None and other.dtype == value.dtype
                    equal = equal and other.shape == value.shape and other.tobytes() == value.tobytes()
                cases.append({"layer": name, "variant": variant, "shape": [n, k], "packing_bitwidth": bitwidth,
                              "equal": bool(equal)})  # fmt: skip
    with open(report, "w") as handle:
        json.dump(cases, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
