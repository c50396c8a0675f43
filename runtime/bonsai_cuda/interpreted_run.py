"""`python -m bonsai_cuda.interpreted_run`: the CUDA runtime's pieces with Gemlite's own kernels in Triton's
interpreter, in the fresh process `interpreter.run_child` starts (TRITON_INTERPRET=1 must be set before triton is
imported). Kept apart from interpreter.py so that the layers → interpreter → pipeline imports make no circle:
this module sits above all three.

- `layers FOLDER [--reference DIR] ... --json OUT`: every low-bit linear of a component folder through gemlite's
  kernels, compared with the dense weights;
- `generate BUNDLE --prompt P ... --npz OUT`: a whole image with every low-bit linear interpreted.
"""

from __future__ import annotations

import sys
import time

import torch

from .hqq import WEIGHTS_FILE, gemlite_packable, gemlite_state, read_qmodel
from .hqq import dequantize as hqq_dequantize
from .interpreter import _state, activate, check_layers, layer_states, one_layer_per_shape
from .layers import dequantize_state
from .pipeline import generate, load_pipeline, load_tensors


def _load_folder(folder) -> dict[str, torch.Tensor]:
    from pathlib import Path

    return load_tensors(Path(folder))


def _hqq_layers(folder):
    """The HQQ layers of a text_encoder-hqq-4bit folder, or None for a folder of Gemlite tensors."""
    from pathlib import Path

    path = Path(folder) / WEIGHTS_FILE
    return read_qmodel(path)[0] if path.is_file() else None


def _reference_weights(states, reference_dir):
    """Dense weights: `X.weight` from a diffusers folder of the source, else the bundle's own decode (a function
    of the layer name: decoded when that layer is checked)."""
    if reference_dir is None:
        return lambda name: dequantize_state(states[name], name)
    from pathlib import Path

    from safetensors.torch import load_file

    dense = {}
    for path in sorted(Path(reference_dir).glob("*.safetensors")):
        dense.update(load_file(str(path)))
    return {name: dense[f"{name}.weight"].float() for name in states}


def main(argv: list[str] | None = None) -> int:
    """`python -m bonsai_cuda.interpreted_run layers FOLDER [--reference DIR] ... --json OUT` (see run_child)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bonsai_cuda.interpreted_run")
    sub = parser.add_subparsers(dest="command", required=True)
    layers = sub.add_parser("layers", help="gemlite's kernels on every low-bit linear of a component folder")
    layers.add_argument("folder")
    layers.add_argument("--reference", help="a diffusers folder with the dense source weights (X.weight)")
    layers.add_argument("--rows", default="1,64")
    layers.add_argument("--every-kernel", choices=("per-shape", "all", "none"), default="per-shape")
    layers.add_argument("--every-kernel-max-weights", type=int, help="every kernel only on layers this small")
    layers.add_argument("--layers", choices=("all", "one-per-shape"), default="all")
    layers.add_argument("--json", required=True)
    image = sub.add_parser("generate", help="the CUDA runtime with gemlite's kernels (interpreted) on a bundle")
    image.add_argument("bundle")
    image.add_argument("--prompt", required=True)
    image.add_argument("--seed", type=int, default=0)
    image.add_argument("--steps", type=int, default=4)
    image.add_argument("--width", type=int, default=64)
    image.add_argument("--height", type=int, default=64)
    image.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    image.add_argument("--text-encoder", choices=("interpreter", "decoded"), default="interpreter")
    image.add_argument("--noise", help="a .npy of the initial noise (1, 128, H/16, W/16); default: the shared noise")
    image.add_argument("--npz", required=True)
    args = parser.parse_args(argv)
    activate()
    if args.command == "layers":
        hqq_layers = _hqq_layers(args.folder)
        if hqq_layers is not None:  # an HQQ text encoder: gemlite's own pack() of each layer, against HQQ's decode
            hqq_layers = {name: layer for name, layer in hqq_layers.items() if gemlite_packable(layer)}
            states = {name: gemlite_state(layer) for name, layer in hqq_layers.items()}
        else:
            states = layer_states(_load_folder(args.folder))
        if args.layers == "one-per-shape":
            states = one_layer_per_shape(states)
        if hqq_layers is not None:
            weights = {name: hqq_dequantize(hqq_layers[name]).float() for name in states}
        else:
            weights = _reference_weights(states, args.reference)
        rows = tuple(int(v) for v in args.rows.split(","))
        results = check_layers(states, weights, rows, args.every_kernel, args.every_kernel_max_weights)
        with open(args.json, "w") as handle:
            json.dump({"import_seconds": _state["import_seconds"], "results": results}, handle, indent=1)
        return 0
    import numpy as np

    pipe = load_pipeline(
        args.bundle,
        device="cpu",
        dtype=getattr(torch, args.dtype),
        backend="interpreter",
        text_encoder_backend=args.text_encoder,
    )
    started = time.perf_counter()
    noise = np.load(args.noise, allow_pickle=False) if args.noise else None
    result = generate(pipe, args.prompt, args.seed, args.steps, args.width, args.height, noise=noise)
    calls: dict[str, int] = {}
    for module in list(pipe.transformer.modules()) + list(pipe.text_encoder.modules()):
        for kernel, count in getattr(module, "calls", {}).items():
            calls[kernel] = calls.get(kernel, 0) + count
    np.savez(
        args.npz,
        image=result.image,
        latents=result.latents,
        seconds=np.float64(time.perf_counter() - started),
        calls=np.array(json.dumps(calls)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
