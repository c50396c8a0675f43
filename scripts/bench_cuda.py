#!/usr/bin/env python
"""Per-step time and VRAM of a Klein-4B-shaped transformer: Gemlite 1/2-bit layers vs dense bf16 torch.

No checkpoint is needed: the 100 low-bit linears get random exact binary/ternary codes (encoded with
bonsai_convert.codecs.gemlite, loaded with the runtime's bonsai_cuda.layers.build_linear), every other weight
is random. One step = one transformer forward at the given image size with a 512-token prompt (batch 1,
no CFG, as Klein's 4-step distilled sampling). Prints a table and writes JSON. Needs CUDA and gemlite;
without them it prints one line and exits 2. Cold Triton autotuning of the 1/2-bit kernels can take a
minute per (variant, batch rows, layer shape) and there are 5 layer shapes, so under a 10-minute limit run one
variant and size at a time and keep the tuning:
    python scripts/bench_cuda.py --variants binary --sizes 512 --config-cache gemlite_autotune.json
(--autotune default skips tuning: quick, slower kernels.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from gpu_common import require_gpu

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

# FLUX.2 [klein] 4B (diffusers 0.42.1's Flux2Transformer2DModel config of black-forest-labs/FLUX.2-klein-4B).
KLEIN_4B = dict(
    patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False,
)  # fmt: skip
TEXT_TOKENS = 512


def _materialize(torch, model, device, dtype) -> None:
    """Give every parameter still on the meta device random values (2-D: N(0, 0.02²), 1-D norms: ones)."""
    from torch import nn

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if param.dim() >= 2:
                    value = torch.randn(param.shape, device=device, dtype=dtype) * 0.02
                else:
                    value = torch.ones(param.shape, device=device, dtype=dtype)
                module._parameters[name] = nn.Parameter(value, requires_grad=False)


def dense_model(torch, dtype):
    """The transformer with plain torch Linear layers (all weights random, in `dtype`)."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    with init_empty_weights():
        model = Flux2Transformer2DModel(**KLEIN_4B)
    _materialize(torch, model, "cuda", dtype)
    return model.eval()


def gemlite_model(torch, variant: str, seed: int):
    """The transformer with GemLite layers for the 100 block linears (fp16 activations), the rest fp16."""
    import numpy as np
    from accelerate import init_empty_weights
    from bonsai_cuda.layers import build_linear
    from bonsai_cuda.pipeline import replace_module
    from diffusers import Flux2Transformer2DModel

    from bonsai_convert.codecs import gemlite as codec
    from bonsai_convert.lowbit import GROUP_SIZE, is_low_bit_key

    rng = np.random.default_rng(seed)
    with init_empty_weights():
        model = Flux2Transformer2DModel(**KLEIN_4B)
    names = [name for name, _ in model.named_parameters() if is_low_bit_key(name)]
    for name in names:
        prefix = name[: -len(".weight")]
        linear = model.get_submodule(prefix)
        shape = (linear.out_features, linear.in_features)
        if variant == "binary":
            codes = (rng.integers(0, 2, shape, dtype=np.int8) * 2 - 1).astype(np.int8)
        else:
            codes = (rng.integers(0, 3, shape, dtype=np.int8) - 1).astype(np.int8)
        scales = rng.uniform(0.005, 0.03, (shape[0], shape[1] // GROUP_SIZE)).astype(np.float16)
        state = {k: torch.from_numpy(np.array(v)) for k, v in codec.encode(codes, scales, variant).items()}
        replace_module(model, prefix, build_linear(state, "gemlite", "cuda", torch.float16, prefix))
    _materialize(torch, model, "cuda", torch.float16)
    return model.eval(), len(names)


def inputs(torch, size: int, dtype):
    """One denoising step's transformer inputs at size×size pixels (as Flux2KleinPipeline builds them)."""
    side = size // 16
    hidden = torch.randn(1, side * side, 128, device="cuda", dtype=dtype)
    text = torch.randn(1, TEXT_TOKENS, KLEIN_4B["joint_attention_dim"], device="cuda", dtype=dtype)
    zero = torch.arange(1)
    img_ids = torch.cartesian_prod(zero, torch.arange(side), torch.arange(side), zero)[None].cuda()
    txt_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(TEXT_TOKENS))[None].cuda()
    timestep = torch.full((1,), 0.75, device="cuda", dtype=dtype)
    return dict(hidden_states=hidden, encoder_hidden_states=text, timestep=timestep, img_ids=img_ids,
                txt_ids=txt_ids, guidance=None, return_dict=False)  # fmt: skip


def measure(torch, model, size: int, dtype, warmup: int, steps: int) -> dict:
    kwargs = inputs(torch, size, dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.time()
    with torch.no_grad():
        for _ in range(warmup):
            out = model(**kwargs)[0]
        torch.cuda.synchronize()
        warm_seconds = time.time() - started
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(**kwargs)[0]
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return {
        "size": size,
        "ms_per_step_mean": round(statistics.mean(times), 2),
        "ms_per_step_median": round(statistics.median(times), 2),
        "ms_per_step_min": round(min(times), 2),
        "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
        "warmup_seconds": round(warm_seconds, 1),
        "output_finite": bool(torch.isfinite(out).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--variants", nargs="+", default=["binary", "ternary"], choices=["binary", "ternary"])
    parser.add_argument("--steps", type=int, default=10, help="timed transformer forwards per size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards first (autotune, compile)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense bf16 baseline")
    parser.add_argument("--autotune", choices=["fast", "default", "max"], default="fast")
    parser.add_argument("--config-cache", type=Path, help="gemlite autotune cache: loaded if present, then saved")
    parser.add_argument("--json", type=Path, default=Path("bench_cuda.json"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch, gemlite = require_gpu("nothing was measured")
    torch.manual_seed(args.seed)
    gemlite.set_autotune(args.autotune)
    if args.config_cache and args.config_cache.exists():
        gemlite.load_config(str(args.config_cache))

    runs = [] if args.no_dense else [("dense-bf16", None)]
    runs += [(f"gemlite-{v}", v) for v in args.variants]
    rows = []
    print(f"{'backend':16} {'size':>5} {'ms/step':>9} {'median':>8} {'weights GB':>10} {'peak GB':>8}")
    for label, variant in runs:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        built = time.time()
        if variant is None:
            model, dtype, low_bit = dense_model(torch, torch.bfloat16), torch.bfloat16, 0
        else:
            (model, low_bit), dtype = gemlite_model(torch, variant, args.seed), torch.float16
        weights_gb = (torch.cuda.memory_allocated() - before) / 1e9
        build_seconds = time.time() - built
        for size in args.sizes:
            row = {"backend": label, "low_bit_layers": low_bit, "weights_gb": round(weights_gb, 3),
                   "build_seconds": round(build_seconds, 1)}  # fmt: skip
            row.update(measure(torch, model, size, dtype, args.warmup, args.steps))
            rows.append(row)
            print(f"{label:16} {size:>5} {row['ms_per_step_mean']:>9.2f} {row['ms_per_step_median']:>8.2f} "
                  f"{row['weights_gb']:>10.3f} {row['peak_vram_gb']:>8.3f}"
                  f"{'' if row['output_finite'] else '  (non-finite output)'}")  # fmt: skip
        del model
    if args.config_cache:
        gemlite.cache_config(str(args.config_cache))
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch_version": torch.__version__,
        "gemlite_version": getattr(gemlite, "__version__", "?"),
        "config": KLEIN_4B,
        "text_tokens": TEXT_TOKENS,
        "steps": args.steps,
        "warmup": args.warmup,
        "autotune": args.autotune,
        "rows": rows,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results in {args.json}")


if __name__ == "__main__":
    main()
