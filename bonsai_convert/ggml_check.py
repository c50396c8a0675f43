"""A `gguf` bundle checked by real ggml (not our code): ggml's own GGUF parser opens the transformer file, ggml's own
Q1_0/Q2_0 `to_float` dequantizes every low-bit tensor (which must hash to the source weights' digests), and ggml's CPU
backend runs one `ggml_mul_mat` with a low-bit tensor (close to the float64 product: ggml quantizes activations).

ggml comes from a registry package: `libggml-base.so` of PyPI llama-cpp-python (0.3.36 vendors a ggml 0.25.3 with
types 41 and 42), found as the `llama_cpp` package's `lib/` or at $BONSAI_GGML_LIBRARY. Called through ctypes on
ggml's public C API (gguf.h, ggml.h `ggml_get_type_traits`); nothing here is compiled by us.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np

from .errors import InputError

LIBRARY_ENV = "BONSAI_GGML_LIBRARY"
TYPE_NAMES = {41: "q1_0", 42: "q2_0"}
BLOCKS = {41: (128, 18), 42: (64, 18)}
# ggml's CPU dot products quantize the activations (to 8 bits per 32 values) before multiplying: measured 0.4-0.6 %
# of the largest output on the demo; a misread layout gives errors of order 1.
MATMUL_TOLERANCE = 0.02


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


class _ContextParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def find_library() -> Path | None:
    """libggml-base.so from $BONSAI_GGML_LIBRARY or an installed llama_cpp package, else None."""
    explicit = os.environ.get(LIBRARY_ENV)
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    for candidate in sorted((Path(spec.origin).parent / "lib").glob("libggml-base.*")):
        return candidate
    return None


class GGML:
    """The few ggml entry points used here, bound with their C signatures."""

    def __init__(self, library: Path):
        self.path = library
        lib = ctypes.CDLL(str(library))
        lib.gguf_init_from_file.restype = ctypes.c_void_p
        lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
        lib.gguf_free.argtypes = [ctypes.c_void_p]
        for name, restype in (
            ("gguf_get_n_tensors", ctypes.c_int64),
            ("gguf_get_data_offset", ctypes.c_size_t),
            ("gguf_get_version", ctypes.c_uint32),
        ):
            getattr(lib, name).restype = restype
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        for name, restype in (
            ("gguf_get_tensor_name", ctypes.c_char_p),
            ("gguf_get_tensor_type", ctypes.c_int),
            ("gguf_get_tensor_offset", ctypes.c_size_t),
            ("gguf_get_tensor_size", ctypes.c_size_t),
        ):
            getattr(lib, name).restype = restype
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        pointer = ctypes.c_void_p
        for name, restype, argtypes in (
            ("ggml_init", pointer, [_ContextParams]),
            ("ggml_free", None, [pointer]),
            ("ggml_new_tensor_2d", pointer, [pointer, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
            ("ggml_mul_mat", pointer, [pointer, pointer, pointer]),
            ("ggml_new_graph", pointer, [pointer]),
            ("ggml_build_forward_expand", None, [pointer, pointer]),
            ("ggml_get_data", pointer, [pointer]),
            ("ggml_nbytes", ctypes.c_size_t, [pointer]),
        ):
            getattr(lib, name).restype = restype
            getattr(lib, name).argtypes = argtypes
        self.lib = lib
        cpu = sorted(library.parent.glob("libggml-cpu.so*"))
        self.cpu = ctypes.CDLL(str(cpu[0])) if cpu else None  # ggml's CPU backend: graph compute
        if self.cpu is not None:
            self.cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
            self.cpu.ggml_graph_compute_with_ctx.argtypes = [pointer, pointer, ctypes.c_int]

    def traits(self, ggml_type: int) -> _TypeTraits:
        return self.lib.ggml_get_type_traits(ggml_type).contents

    def tensor_table(self, path: Path) -> tuple[int, dict[str, tuple[int, int, int]]]:
        """ggml's own parse of a GGUF file: data offset and name → (type, offset in data, bytes)."""
        context = self.lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
        if not context:
            raise InputError(f"{path}: ggml's gguf_init_from_file refused the file")
        try:
            data_offset = int(self.lib.gguf_get_data_offset(context))
            table = {}
            for index in range(int(self.lib.gguf_get_n_tensors(context))):
                name = self.lib.gguf_get_tensor_name(context, index).decode()
                table[name] = (
                    int(self.lib.gguf_get_tensor_type(context, index)),
                    int(self.lib.gguf_get_tensor_offset(context, index)),
                    int(self.lib.gguf_get_tensor_size(context, index)),
                )
            return data_offset, table
        finally:
            self.lib.gguf_free(context)

    def mul_mat(self, ggml_type: int, blocks: np.ndarray, cols: int, activations: np.ndarray) -> np.ndarray:
        """ggml's CPU `ggml_mul_mat` of a quantized weight [rows, cols] (blocks) with float32 activations [n, cols]
        → [n, rows] (ggml quantizes the activations for its dot products, so this is close, not exact)."""
        assert self.cpu is not None
        source = np.ascontiguousarray(blocks, dtype=np.uint8)
        inputs = np.ascontiguousarray(activations, dtype=np.float32)
        rows, count = source.shape[0], inputs.shape[0]
        lib = self.lib
        context = lib.ggml_init(_ContextParams(source.nbytes + inputs.nbytes * 3 + rows * count * 4 + (16 << 20)))
        if not context:
            raise MemoryError("ggml_init failed")
        try:
            weight = lib.ggml_new_tensor_2d(context, ggml_type, cols, rows)
            given = lib.ggml_new_tensor_2d(context, 0, cols, count)  # GGML_TYPE_F32
            if lib.ggml_nbytes(weight) != source.nbytes:
                raise InputError(f"ggml sizes a {rows}x{cols} type {ggml_type} tensor {lib.ggml_nbytes(weight)} bytes")
            ctypes.memmove(lib.ggml_get_data(weight), source.ctypes.data, source.nbytes)
            ctypes.memmove(lib.ggml_get_data(given), inputs.ctypes.data, inputs.nbytes)
            product = lib.ggml_mul_mat(context, weight, given)
            graph = lib.ggml_new_graph(context)
            lib.ggml_build_forward_expand(graph, product)
            if self.cpu.ggml_graph_compute_with_ctx(context, graph, 2) != 0:
                raise InputError("ggml_graph_compute_with_ctx failed")
            out = ctypes.cast(lib.ggml_get_data(product), ctypes.POINTER(ctypes.c_float))
            return np.ctypeslib.as_array(out, shape=(count, rows)).copy()
        finally:
            lib.ggml_free(context)

    def dequantize(self, ggml_type: int, blocks: np.ndarray, count: int) -> np.ndarray:
        """ggml's to_float of `count` weights in `blocks` (uint8, C order) → float32."""
        source = np.ascontiguousarray(blocks, dtype=np.uint8)
        out = np.empty(count, dtype=np.float32)
        to_float = _TO_FLOAT(self.traits(ggml_type).to_float)
        to_float(source.ctypes.data, out.ctypes.data, count)
        return out


def check_file(ggml: GGML, path: Path, digests: dict[str, str]) -> tuple[bool, str]:
    """Open `path` with ggml; every Q1_0/Q2_0 tensor dequantized by ggml, cast to fp16 (exact) and hashed per diffusers
    tensor must give the manifest's weight digest (sha256 of the source's fp16 weight). Returns (passed, detail)."""
    from .gguf_io import GGUFFile
    from .gguf_names import diffusers_parts

    ours = GGUFFile(path)
    data_offset, table = ggml.tensor_table(path)
    if set(table) != set(ours.tensors):
        return False, f"ggml lists {len(table)} tensors, the bundle {len(ours.tensors)}"
    checked = set()
    sample = None  # the first low-bit tensor: the one ggml multiplies with
    for name, (ggml_type, offset, size) in sorted(table.items()):
        stored = ours.tensors[name]
        if ggml_type != stored.ggml_type or data_offset + offset != stored.offset:
            return False, f"tensor {name}: ggml reads type {ggml_type} at byte {data_offset + offset}"
        if ggml_type not in TYPE_NAMES:
            continue
        traits = ggml.traits(ggml_type)
        weights, block_bytes = BLOCKS[ggml_type]
        found = (traits.type_name.decode(), traits.blck_size, traits.type_size)
        if found != (TYPE_NAMES[ggml_type], weights, block_bytes):
            expected = f"{TYPE_NAMES[ggml_type]} {weights}/{block_bytes}"
            return False, f"ggml's type {ggml_type} is {found}, expected {expected}"
        blocks = ours.raw(name)
        sample = sample or (name, ggml_type)
        if size != blocks.nbytes:
            return False, f"tensor {name}: ggml sizes it {size} bytes, the bundle {blocks.nbytes}"
        cols = stored.shape[1]
        for part, first, last, _ in diffusers_parts(name, stored.shape[0]):
            digest = hashlib.sha256()
            for start in range(first, last, 1024):
                stop = min(last, start + 1024)
                values = ggml.dequantize(ggml_type, blocks[start:stop], (stop - start) * cols)
                half = values.astype(np.float16)
                if not np.array_equal(half.astype(np.float32).view(np.uint32), values.view(np.uint32)):
                    return False, f"tensor {name}: ggml's dequantization is not fp16-exact (rows {start}..{stop})"
                digest.update(half.tobytes())
            if digests.get(part) != digest.hexdigest():
                return False, f"tensor {part}: ggml's dequantization differs from the source weights"
            checked.add(part)
    matmul = ""
    if ggml.cpu is not None and sample is not None:
        name, ggml_type = sample
        blocks, cols = ours.raw(name), ours.tensors[name].shape[1]
        rows = min(blocks.shape[0], 1024)
        activations = np.random.default_rng(0).standard_normal((4, cols)).astype(np.float32)
        weights = ggml.dequantize(ggml_type, blocks[:rows], rows * cols).reshape(rows, cols).astype(np.float64)
        reference = activations.astype(np.float64) @ weights.T
        product = ggml.mul_mat(ggml_type, blocks[:rows], cols, activations)
        error = float(np.abs(product - reference).max() / max(np.abs(reference).max(), 1e-30))
        if not error < MATMUL_TOLERANCE:
            return False, f"tensor {name}: ggml's mul_mat is off by {error:.3g} of the largest output"
        matmul = f"; ggml mul_mat on {name} within {error:.2%} of the float64 product"
    missing = sorted(set(digests) - checked)
    if missing:
        return False, f"tensor {missing[0]}: not a Q1_0/Q2_0 tensor of the file"
    return True, f"{len(checked)} low-bit linears ({len(table)} GGUF tensors){matmul}"
