"""Gemlite's own Triton kernels on CPU tensors: the Triton interpreter with stand-ins for the CUDA queries.

`activate()` sets `TRITON_INTERPRET=1`, answers what `import gemlite` asks of a GPU (device capability and
properties, the Triton driver's target, shared memory and benchmarker), imports gemlite and applies two
interpreter-only workarounds (formats/gemlite.md, "Gemlite's kernels on CPU"):

- `GEMM`: the kernel computes `(k * stride_mul).to(tl.int32)` where `k` is the `tl.range` loop variable. Compiled,
  `k` is an int32 tensor; the interpreter maps `tl.range` to Python's `range`, so `k * stride_mul` is a Python
  float without `.to`. The loop variable is given back as an int whose product with a float has `.to` (truncation
  toward zero, as the compiled fp32 → int32 cast).
- `GEMV`: the launcher indexes a per-GPU workspace list (`fp4_mapping[W_q.device.index]`, built for
  `torch.cuda.device_count()` GPUs) with a CPU tensor's device index None; the list is replaced by a mapping that
  answers every index with the same CPU table (it is read only by MX/NVFP4 layers).

Nothing of the kernels themselves is changed. Installed by the optional extra `cuda-sim` (gemlite + triton; on
Linux x86-64 they come with the project's base install). Never used when a real GPU is present.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time

import torch

GEMLITE_VERSION = "0.6.0.post2"
STAND_IN_GPU = "NVIDIA H100 80GB HBM3 (Triton interpreter stand-in)"
MAX_SHARED_MEM = 232448
NUM_SMS = 132
# matmul types gemlite 0.6.0.post2 has, and the M they are meant for (core.py get_matmul_type / get_default_gemv).
GEMV_KERNELS = ("GEMV_REVSPLITK", "GEMV", "GEMV_SPLITK")  # M = 1 (GEMV_REVSPLITK is gemlite's default below 8 bits)
GEMM_KERNELS = ("GEMM_SPLITK", "GEMM")  # any M (gemlite: GEMM_SPLITK for 4 < M < 64, GEMM for M ≥ 64)
ALL_KERNELS = GEMV_KERNELS + GEMM_KERNELS

_lock = threading.Lock()
_state: dict = {}


class InterpreterUnavailable(RuntimeError):
    """gemlite / triton are not installed (or not importable) here: the harness cannot run."""


def unavailable_reason() -> str | None:
    """Why the harness cannot run here (None when it can). Does not import gemlite."""
    import importlib.metadata as md

    if torch.cuda.is_available() and "gemlite" not in sys.modules:
        return "a CUDA GPU is present: run gemlite's compiled kernels instead (scripts/gemlite_gpu_check.py)"
    for package, version in (("triton", None), ("gemlite", GEMLITE_VERSION)):
        try:
            found = md.version(package)
        except md.PackageNotFoundError:
            return f"{package} is not installed (pip install -e '.[cuda-sim]')"
        if version is not None and found != version:
            return f"gemlite {found} is installed; the harness is written for gemlite {version}"
    return None


class _Props:
    name = STAND_IN_GPU
    multi_processor_count = NUM_SMS
    total_memory = 80 * 2**30
    major, minor = 9, 0


class _Utils:
    @staticmethod
    def get_device_properties(_index=0) -> dict:
        return {"max_shared_mem": MAX_SHARED_MEM, "multiprocessor_count": NUM_SMS}


class _Driver:
    """What gemlite and Triton's autotuner ask of `triton.runtime.driver.active`."""

    utils = _Utils()

    def __init__(self, target):
        self._target = target

    def get_current_target(self):
        return self._target

    def get_benchmarker(self):
        def bench(_fn, *args, quantiles=None, **kwargs):  # runs nothing: every config "takes" 1 ms
            return [1.0] * len(quantiles) if quantiles else 1.0

        return bench

    def get_current_device(self):
        return 0

    def get_current_stream(self, _device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True


class _LoopIndex(int):
    """A `tl.range` loop variable in the interpreter: k·(a float) keeps the compiled `.to(tl.int32)`."""

    def __mul__(self, other):
        if isinstance(other, float):
            return _LoopFloat(int(self) * other)
        return int.__mul__(self, other)

    __rmul__ = __mul__


class _LoopFloat(float):
    def to(self, _dtype, *args, **kwargs):
        return int(math.trunc(self))  # fp32 → int32 truncates toward zero


def _patch_interpreter_range() -> None:
    from triton.runtime import interpreter

    if getattr(interpreter._patch_lang_core, "_bonsai", False):
        return
    original = interpreter._patch_lang_core

    def patched(lang, scope):
        original(lang, scope)

        def loop_range(arg1, arg2=None, step=None, **_kwargs):
            start, end = (0, arg1) if arg2 is None else (arg1, arg2)
            return (_LoopIndex(k) for k in range(start, end, 1 if step is None else step))

        scope.set_attr(lang, "range", loop_range)

    patched._bonsai = True
    interpreter._patch_lang_core = patched


def _prefer_large_tiles() -> None:
    """Autotune without timing: each config gemlite offers "takes" 1/(BLOCK_M·BLOCK_N·BLOCK_K), so the largest tile
    that fits wins. Interpreted cost is per program and per loop step, so this is the fastest config here; any
    config gemlite offers computes the same product (the kernels' correctness does not depend on it)."""
    from triton.runtime import autotuner

    if getattr(autotuner.Autotuner._bench, "_bonsai", False):
        return

    def bench(self, *args, config, **meta):
        kwargs = config.kwargs
        tile = kwargs.get("BLOCK_SIZE_M", 1) * kwargs.get("BLOCK_SIZE_N", 1) * kwargs.get("BLOCK_SIZE_K", 1)
        return [1.0 / max(tile, 1)] * 3

    bench._bonsai = True
    autotuner.Autotuner._bench = bench


class _AnyDevice(dict):
    def __missing__(self, _key):
        return self[None]


def activate():
    """Import gemlite with its kernels in the Triton interpreter (idempotent); returns the gemlite module."""
    with _lock:
        if "gemlite" in _state:
            return _state["gemlite"]
        reason = unavailable_reason()
        if reason:
            raise InterpreterUnavailable(reason)
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            # triton.language's own @jit helpers were made compiled at import: they cannot run interpreted.
            raise InterpreterUnavailable(
                "triton was imported before TRITON_INTERPRET=1 was set in this process: use run_child()"
            )
        os.environ["TRITON_INTERPRET"] = "1"
        import triton
        from triton.backends.compiler import GPUTarget

        torch.cuda.get_device_capability = lambda *_a, **_k: (9, 0)
        torch.cuda.get_device_properties = lambda *_a, **_k: _Props()
        torch.cuda.get_device_name = lambda *_a, **_k: STAND_IN_GPU
        triton.runtime.driver.set_active(_Driver(GPUTarget("cuda", 90, 32)))
        _patch_interpreter_range()
        _prefer_large_tiles()
        started = time.perf_counter()
        try:
            import gemlite
            from gemlite.triton_kernels import gemv_kernels
        except Exception as error:  # noqa: BLE001 - any import failure means no harness
            raise InterpreterUnavailable(f"import gemlite failed under the interpreter: {error}") from error
        gemv_kernels.fp4_mapping = _AnyDevice(
            {None: torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.int8)}
        )
        _state["gemlite"] = gemlite
        _state["import_seconds"] = time.perf_counter() - started
        return gemlite


def gemlite_layer(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A GemLiteLinearTriton filled by `load_state_dict` from one linear's stored tensors (no re-pack), on CPU."""
    activate()
    from gemlite.core import DType, GemLiteLinearTriton

    metadata = state["metadata"].tolist()
    out_features, in_features = (int(v) for v in state["orig_shape"].tolist())
    dtypes = {0: DType.FP32, 1: DType.FP16, 2: DType.BF16}
    layer = GemLiteLinearTriton(
        W_nbits=int(metadata[1]),
        group_size=int(metadata[2]),
        in_features=in_features,
        out_features=out_features,
        input_dtype=dtypes[int(metadata[5])],
        output_dtype=dtypes[int(metadata[6])],
    )
    layer.load_state_dict({key: value.cpu() for key, value in state.items()})
    _pad_metadata(layer)
    return layer


def _pad_metadata(layer: torch.nn.Module) -> None:
    """Give `scales`/`zeros` zero-filled memory after their last row (same values, shapes and strides).

    GEMM_SPLITK loads `scales[k_m]` without a mask; when K is not a multiple of BLOCK_SIZE_K·SPLIT_K its last
    split reads group rows past G (the matching activations and weights are masked to 0). On a GPU that reads
    whatever follows the allocation; the interpreter reads host memory, and NaN there turns 0·NaN into NaN outputs
    (seen on 5760×640). Zeros there make the over-read harmless, as finite memory does on a GPU."""
    for key in ("scales", "zeros"):
        value = getattr(layer, key, None)
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            continue
        rows = value.shape[0]
        padded = torch.zeros((rows + max(rows, 64), value.shape[1]), dtype=value.dtype)
        padded[:rows] = value
        setattr(layer, key, torch.nn.Parameter(padded[:rows], requires_grad=False))


def default_kernel(batch: int) -> str:
    """The kernel gemlite's `forward` picks for M = batch on a GPU below 8 bits (core.py, 0.6.0.post2)."""
    if batch >= 64:
        return "GEMM"
    if batch > 4:
        return "GEMM_SPLITK"
    return "GEMV_REVSPLITK"


def run_kernel(layer: torch.nn.Module, x: torch.Tensor, kernel: str) -> torch.Tensor:
    """One gemlite kernel on fp16 activations x [M, K]: interpreted for CPU tensors, compiled on a GPU."""
    if x.device.type == "cpu":
        activate()
    with torch.no_grad():
        return layer.forward_manual(x.to(torch.float16).contiguous(), matmul_type=kernel)


class InterpretedGemliteLinear(torch.nn.Module):
    """A low-bit linear run by gemlite's own kernel for each call's M (interpreted), fp16 in, model dtype out."""

    def __init__(self, state: dict[str, torch.Tensor], name: str = ""):
        super().__init__()
        self.layer = gemlite_layer(state)
        self.name = name
        self.out_features, self.in_features = (int(v) for v in state["orig_shape"].tolist())
        self.calls: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        kernel = default_kernel(rows.shape[0])
        self.calls[kernel] = self.calls.get(kernel, 0) + 1
        out = run_kernel(self.layer, rows, kernel)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gemlite kernels (interpreter)"


# ----------------------------------------------------------------------------------------------------
# Checks, run in a child process (TRITON_INTERPRET must be set before triton is first imported).


def layer_states(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: its Gemlite tensors} of a component's tensors (modules that have `X.W_q`)."""
    prefixes = sorted(name[: -len(".W_q")] for name in tensors if name.endswith(".W_q"))
    keys = ("W_q", "scales", "zeros", "metadata", "orig_shape", "meta_scale")
    return {p: {k: tensors[f"{p}.{k}"] for k in keys if f"{p}.{k}" in tensors} for p in prefixes}


def check_layer(
    layer: torch.nn.Module, weight: torch.Tensor, rows: int, kernel: str, seed: int = 0
) -> dict[str, float | int | str | bool]:
    """One kernel on seeded fp16 activations [rows, K] against a float64 matmul with the dense weight [N, K].

    Also used on a GPU (scripts/gemlite_gpu_check.py): x is made on the CPU and moved to the layer's device."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, weight.shape[1], generator=generator).to(torch.float16)
    device = layer.W_q.device
    started = time.perf_counter()
    out = run_kernel(layer, x.to(device), kernel)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    out = out.cpu().to(torch.float64)
    reference = x.to(torch.float64) @ weight.cpu().to(torch.float64).t()
    finite = bool(torch.isfinite(out).all())
    error = float((out - reference).abs().max()) if finite else float("inf")
    return {
        "kernel": kernel,
        "rows": rows,
        "max_error": error,
        "scale": max(1.0, float(reference.abs().max())),
        "finite": finite,
        "seconds": round(seconds, 3),
    }


def one_layer_per_shape(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """The first layer (name order) of each distinct [N, K]: Klein 4B's 100 low-bit linears have 5 shapes."""
    chosen: dict[tuple[int, ...], str] = {}
    for name, state in sorted(states.items()):
        chosen.setdefault(tuple(state["orig_shape"].tolist()), name)
    return {name: states[name] for name in sorted(chosen.values())}


def check_layers(
    states: dict[str, dict[str, torch.Tensor]],
    weights,
    rows: tuple[int, ...] = (1, 64),
    every_kernel: str = "per-shape",
    every_kernel_max_weights: int | None = None,
) -> list[dict]:
    """Gemlite's kernels on every layer given: the production kernel for each M on all layers, and every kernel
    that runs in the interpreter (GEMV kernels at M = 1, GEMM kernels at any M) on the first layer of each shape
    (every_kernel 'per-shape'), on all layers ('all') or none ('none'). weights: {name: dense [N, K]} or a
    function of the name (decoded one layer at a time: a Klein-4B transformer dense is 14.7 GB in fp32)."""
    results = []
    shapes_seen = set()
    for name, state in states.items():
        layer = gemlite_layer(state)
        weight = weights(name) if callable(weights) else weights[name]
        shape = tuple(weight.shape)
        all_kernels = every_kernel == "all" or (every_kernel == "per-shape" and shape not in shapes_seen)
        if every_kernel_max_weights is not None and weight.numel() > every_kernel_max_weights:
            all_kernels = False  # only the production kernels on the largest layers (interpreted time)
        shapes_seen.add(shape)
        for m in rows:
            kernels = (GEMV_KERNELS + GEMM_KERNELS if m == 1 else GEMM_KERNELS) if all_kernels else ()
            kernels = tuple(dict.fromkeys((default_kernel(m),) + kernels))
            for kernel in kernels:
                results.append({"layer": name, "shape": list(shape), **check_layer(layer, weight, m, kernel)})
    return results


def run_child(argv: list[str], timeout: float = 600) -> None:
    """Run `python -m bonsai_cuda.interpreted_run ARGV` in a fresh Python with TRITON_INTERPRET=1; raise
    RuntimeError with its stderr on failure."""
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "bonsai_cuda.interpreted_run", *argv]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
        raise RuntimeError(f"gemlite interpreter run failed ({done.returncode}): " + " | ".join(tail))
