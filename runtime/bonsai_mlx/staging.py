"""Stage-by-stage evaluation of MLX graphs, to bound what is live at once.

Evaluated as one graph, MLX may run every node that does not depend on the activations first and keep the results
until their consumers run: each low-bit layer's dequantized weight on the CPU device (bonsai_mlx.cpu_layers), the
temporaries of several decoder stages (GroupNorm's, a convolution's padded and, on the CPU, unfolded input). At
Klein widths on Linux CPU that measured 1.0 GB over the weights while encoding a 64-token prompt in bf16 and a
1.75 GB VAE-decode peak at 256² in fp32 against 0.81 GB stage by stage. Evaluating after each layer or stage
gives the same values; formats/memory.md models the stage-by-stage peaks.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx


def staged(*arrays: mx.array) -> mx.array:
    """Evaluate now; returns the (first) array, so a stage reads `h = staged(layer(h))`."""
    mx.eval(*arrays)
    return arrays[0]


def staged_slices(part: Callable[[slice], mx.array], length: int, step: int, axis: int) -> mx.array:
    """part(s) for consecutive slices s of range(length), `step` long, each evaluated before the next is built
    (left lazy, MLX may run every slice's first kernel before any second one and hold all their temporaries),
    concatenated along `axis`; part(slice(None)), unevaluated, when one slice covers it all."""
    if length <= step:
        return part(slice(None))
    parts = []
    for start in range(0, length, step):
        parts.append(staged(part(slice(start, start + step))))
    return mx.concatenate(parts, axis=axis)
