#!/usr/bin/env python
"""GPU proof that our numpy Gemlite encoding is gemlite's own (formats/gemlite.md, "How equality is proven").

For random exact binary/ternary layers at several shapes it checks, against the installed gemlite:
  1. `GemLiteLinearTriton.pack()` on CUDA tensors (Triton packer) and on CPU tensors (torch packer) give
     state_dict() tensors equal to `bonsai_convert.codecs.gemlite.encode` byte for byte;
  2. our tensors load with `load_state_dict` into a fresh layer without a re-pack (state_dict unchanged), also
     through `bonsai_cuda.layers.build_linear` (the runtime's path);
  3. the loaded layer's output matches a dense fp16 matmul with the exact weights (GEMV, GEMM_SPLITK and GEMM
     batch sizes), and every kernel the CPU harness runs (bonsai_cuda.interpreter.check_layer: each of the five
     matmul types at M = 1, the GEMM ones at M = 64) is within the harness's tolerance, compiled this time;
  4. packing bitwidth 8 (the released packs' uint8 words): pack() on CUDA equals `encode(..., packing_bitwidth=8)`.
Prints a table and writes JSON. Needs CUDA and gemlite; without them it prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gpu_common import require_gpu

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

SHAPES = [(256, 128), (640, 640), (3072, 3072), (18432, 3072), (3072, 9216), (27648, 3072), (3072, 12288)]
BATCHES = (1, 16, 256)  # gemlite picks GEMV_REVSPLITK (M ≤ 4), GEMM_SPLITK (4 < M < 64), GEMM (M ≥ 64)
CHECKS = ("pack_cuda", "pack_cpu", "pack_cuda_8", "load_state_dict", "runtime_load")
KERNEL_TOLERANCE = 4e-3  # the CPU harness's limit (tests/test_gemlite_interpreter.py), × max(1, max |ref|)
REL_TOLERANCE = 2e-3  # relative Frobenius error of the fp16 output against the fp32 product


def random_layer(rng, shape: tuple[int, int], variant: str):
    import numpy as np

    values = (-1, 1) if variant == "binary" else (-1, 0, 1)
    codes = rng.choice(np.array(values, np.int8), size=shape)
    scales = rng.uniform(0.005, 0.06, (shape[0], shape[1] // 128)).astype(np.float16)
    scales[0, 0] = 0  # an all-zero group
    scales[-1, -1] = np.float16(2.0**-20)  # a subnormal scale
    return codes, scales


def gemlite_pack(torch, gemlite, codes, scales, variant: str, device: str, packing_bitwidth: int = 32):
    """What gemlite itself stores for these codes (A16W1/A16W2, fp16, group 128, fma_mode, 32-bit words)."""
    import numpy as np
    from gemlite.core import DType, GemLiteLinearTriton

    n, k = codes.shape
    nbits = 1 if variant == "binary" else 2
    layer = GemLiteLinearTriton(nbits, group_size=128, in_features=k, out_features=n,
                                input_dtype=DType.FP16, output_dtype=DType.FP16)  # fmt: skip
    if variant == "binary":
        q = torch.from_numpy(((codes + 1) // 2).astype(np.uint8)).to(device)
        s = torch.from_numpy((scales.astype(np.float32) * 2).astype(np.float16)).to(device)
        zeros = torch.full(scales.shape, 0.5, dtype=torch.float16, device=device)
    else:
        q = torch.from_numpy((codes + 1).astype(np.uint8)).to(device)
        s = torch.from_numpy(scales).to(device)
        zeros = 1
    layer.pack(q, s, zeros, bias=None, fma_mode=True, packing_bitwidth=packing_bitwidth)
    return layer


def state_numpy(layer) -> dict:
    return {key: value.detach().cpu().numpy() for key, value in layer.state_dict().items()}


def differences(ours: dict, theirs: dict) -> list[str]:
    """Names of tensors that differ in name, dtype, shape or bytes (empty: byte-identical)."""
    import numpy as np

    theirs = dict(theirs)
    if "meta_scale" not in ours and float(theirs.get("meta_scale", 0.0)) == 0.0:
        theirs.pop("meta_scale", None)  # we do not store it (the released loader rejects it); 0.0 is the default
    problems = [f"missing {key}" for key in sorted(set(theirs) - set(ours))]
    problems += [f"extra {key}" for key in sorted(set(ours) - set(theirs))]
    for key in sorted(set(ours) & set(theirs)):
        a, b = np.asarray(ours[key]), np.asarray(theirs[key])
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{key}: ours {a.dtype}{list(a.shape)} vs gemlite {b.dtype}{list(b.shape)}")
        elif a.tobytes() != b.tobytes():
            problems.append(f"{key}: bytes differ")
    return problems


def check_shape(torch, gemlite, rng, shape, variant: str) -> dict:
    import numpy as np
    from bonsai_cuda.layers import build_linear
    from gemlite.core import DType, GemLiteLinearTriton

    from bonsai_convert.codecs import gemlite as codec
    from bonsai_convert.lowbit import dense_from_codes

    codes, scales = random_layer(rng, shape, variant)
    ours = codec.encode(codes, scales, variant)
    row: dict = {"variant": variant, "shape": list(shape)}
    row["pack_cuda"] = differences(ours, state_numpy(gemlite_pack(torch, gemlite, codes, scales, variant, "cuda")))
    row["pack_cpu"] = differences(ours, state_numpy(gemlite_pack(torch, gemlite, codes, scales, variant, "cpu")))
    ours_8 = codec.encode(codes, scales, variant, packing_bitwidth=8)
    theirs_8 = gemlite_pack(torch, gemlite, codes, scales, variant, "cuda", packing_bitwidth=8)
    row["pack_cuda_8"] = differences(ours_8, state_numpy(theirs_8))

    n, k = shape
    fresh = GemLiteLinearTriton(codec.VARIANT_BITS[variant], group_size=128, in_features=k, out_features=n,
                                input_dtype=DType.FP16, output_dtype=DType.FP16)  # fmt: skip
    fresh.load_state_dict({key: torch.from_numpy(np.array(v)).cuda() for key, v in ours.items()})
    row["load_state_dict"] = differences(ours, state_numpy(fresh))
    runtime_layer = build_linear({key: torch.from_numpy(np.array(v)) for key, v in ours.items()},
                                 "gemlite", "cuda", torch.float16, "check")  # fmt: skip
    row["runtime_load"] = differences(ours, state_numpy(runtime_layer))

    weight = torch.from_numpy(dense_from_codes(codes, scales)).cuda()
    errors = {}
    for batch in BATCHES:
        x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            exact = x.float() @ weight.float().t()
            dense = (x @ weight.t()).float()
            got = fresh(x).float()
        norm = exact.norm().item() or 1.0
        errors[batch] = {
            "gemlite_rel": (got - exact).norm().item() / norm,
            "torch_fp16_rel": (dense - exact).norm().item() / norm,
            "max_abs_vs_torch_fp16": (got - dense).abs().max().item(),
            "finite": bool(torch.isfinite(got).all()),
        }
    row["matmul"] = errors
    from bonsai_cuda.interpreter import ALL_KERNELS, GEMM_KERNELS, check_layer

    row["kernels"] = [check_layer(fresh, weight, 1, kernel) for kernel in ALL_KERNELS]
    row["kernels"] += [check_layer(fresh, weight, 64, kernel) for kernel in GEMM_KERNELS]
    kernels_ok = all(r["finite"] and r["max_error"] <= KERNEL_TOLERANCE * r["scale"] for r in row["kernels"])
    row["ok"] = (
        not any(row[key] for key in CHECKS)
        and kernels_ok
        and all(e["finite"] and e["gemlite_rel"] <= REL_TOLERANCE for e in errors.values())
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("gemlite_gpu_check.json"), help="where to write results")
    parser.add_argument("--quick", action="store_true", help="only the small shapes (no Klein-sized layers)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch, gemlite = require_gpu("nothing was checked")
    import numpy as np

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    shapes = SHAPES[:3] if args.quick else SHAPES
    rows = []
    header = (
        f"{'variant':8} {'shape':>13} {'pack cuda':>9} {'pack cpu':>8} {'pack 8':>6} {'load':>5} {'runtime':>7} "
        + " ".join(f"{'rel M=' + str(m):>11}" for m in BATCHES)
    )
    print(header)
    started = time.time()
    for variant in ("binary", "ternary"):
        for shape in shapes:
            row = check_shape(torch, gemlite, rng, shape, variant)
            rows.append(row)
            flags = ["ok" if not row[key] else "DIFF" for key in CHECKS]
            rels = " ".join(f"{row['matmul'][m]['gemlite_rel']:11.2e}" for m in BATCHES)
            print(f"{variant:8} {str(shape[0]) + 'x' + str(shape[1]):>13} {flags[0]:>9} {flags[1]:>8} "
                  f"{flags[2]:>6} {flags[3]:>5} {flags[4]:>7} {rels}{'' if row['ok'] else '  FAIL'}")  # fmt: skip
            for kernel in row["kernels"]:
                if not (kernel["finite"] and kernel["max_error"] <= KERNEL_TOLERANCE * kernel["scale"]):
                    print(f"    kernel {kernel['kernel']} M={kernel['rows']}: max error {kernel['max_error']:.3g}")
            for key in CHECKS:
                for problem in row[key][:5]:
                    print(f"    {key}: {problem}")
    result = {
        "gemlite_version": getattr(gemlite, "__version__", "?"),
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(0),
        "rel_tolerance": REL_TOLERANCE,
        "seconds": round(time.time() - started, 1),
        "ok": all(row["ok"] for row in rows),
        "rows": rows,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'ALL EQUAL' if result['ok'] else 'MISMATCH'}: {len(rows)} layers, results in {args.json}")
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
