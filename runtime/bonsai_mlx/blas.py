"""A fast BLAS for MLX's Linux CPU backend, loaded before MLX makes its first matmul.

MLX's Linux CPU wheel links the reference (netlib) BLAS: an fp32 matmul of a Klein layer is ~30–70× slower than
an optimized one. MLX calls `cblas_sgemm` (and `cblas_dgemm` / `cblas_cgemm`) through its dynamic symbol table,
so a library loaded with `RTLD_GLOBAL` that exports those names takes precedence over the netlib one.

Which library: OpenBLAS from the `scipy-openblas32` wheel (the build NumPy and SciPy ship; 32-bit integers, the
CBLAS ABI MLX was compiled against; self-contained, no libgfortran; ~8 MB). NumPy's own bundled OpenBLAS is the
64-bit-integer (ILP64) build, whose ABI does not match, and torch's libraries do not export `cblas_sgemm`.
scipy-openblas prefixes every exported name with `scipy_` (so that it never clashes with a system BLAS), so this
module writes, once, a copy of that library into a cache folder with the prefix removed from its exported names
(`scipy_cblas_sgemm` → `cblas_sgemm`) and loads the copy. The rewrite touches only the dynamic symbol table:
each renamed symbol's name offset moves past the prefix inside the same string, and the GNU hash table is
rebuilt in place as one bucket (lookups in this library scan its ~5k names once at load: negligible).

Loading happens in `bonsai_mlx.enable_cpu_speedups()`; `BONSAI_MLX_BLAS=0` turns it off, `BONSAI_MLX_BLAS=/path/lib.so`
loads that library instead (it must export `cblas_sgemm`). On macOS nothing is done (Accelerate / Metal).
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PREFIX = b"scipy_"
SHT_DYNSYM = 11
SHT_GNU_HASH = 0x6FFFFFF6
REWRITE_VERSION = 1
# OpenBLAS's idle workers spin 2^n cycles after each product before they sleep (n = 28 by default: ~80 ms here).
# The spinning worker holds a core that bonsai_mlx.cpu_math's numpy / single-threaded tasks then share with it:
# the demo's 512² fp32 step took 0.39 s with the default and 0.32–0.33 s with n = 4, 12 or 20 (Klein-width s02
# 256² fp32: 5.54 against 5.43–5.59 s, the wake-ups after each product costing nothing visible). A value already
# in the environment is kept.
THREAD_TIMEOUT = "12"

_loaded: dict[str, str | None] = {}
_handles: dict[str, ctypes.CDLL] = {}
_threads: dict[str, int] = {}
_functions: dict[str, Any] = {}


def gnu_hash(name: bytes) -> int:
    value = 5381
    for byte in name:
        value = (value * 33 + byte) & 0xFFFFFFFF
    return value


def _cstring(data: bytes | bytearray, offset: int) -> bytes:
    end = data.index(b"\0", offset)
    return bytes(data[offset:end])


def unprefix_exports(data: bytes, prefix: bytes = PREFIX) -> tuple[bytearray, int]:
    """An ELF64 little-endian shared library with `prefix` removed from its defined dynamic symbol names.

    Returns the new bytes and the number of symbols renamed. A name whose unprefixed form is already exported
    is left alone. Raises ValueError on anything but an ELF64 LE file with .dynsym and .gnu.hash sections.
    """
    out = bytearray(data)
    if out[:4] != b"\x7fELF" or out[4] != 2 or out[5] != 1:
        raise ValueError("not an ELF64 little-endian file")
    (shoff,) = struct.unpack_from("<Q", out, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", out, 0x3A)
    sections = []
    for index in range(shnum):
        base = shoff + index * shentsize
        _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize = struct.unpack_from("<IIQQQQIIQQ", out, base)
        sections.append((sh_type, sh_offset, sh_size, sh_link, sh_entsize))
    dynsym = next((s for s in sections if s[0] == SHT_DYNSYM), None)
    gnu = next((s for s in sections if s[0] == SHT_GNU_HASH), None)
    if dynsym is None or gnu is None:
        raise ValueError("no .dynsym or .gnu.hash section")
    strtab_offset = sections[dynsym[3]][1]
    count = dynsym[2] // 24
    names: list[bytes] = []
    for index in range(count):
        (st_name,) = struct.unpack_from("<I", out, dynsym[1] + index * 24)
        names.append(_cstring(out, strtab_offset + st_name))
    defined = set()
    for index in range(count):
        (shndx,) = struct.unpack_from("<H", out, dynsym[1] + index * 24 + 6)
        if shndx != 0:
            defined.add(names[index])
    renamed = 0
    for index in range(count):
        entry = dynsym[1] + index * 24
        (shndx,) = struct.unpack_from("<H", out, entry + 6)
        name = names[index]
        if shndx == 0 or not name.startswith(prefix) or name[len(prefix) :] in defined:
            continue
        (st_name,) = struct.unpack_from("<I", out, entry)
        struct.pack_into("<I", out, entry, st_name + len(prefix))
        names[index] = name[len(prefix) :]
        renamed += 1
    # GNU hash: one bucket holding every hashed symbol in table order, a bloom filter that always passes.
    _, symoffset, _, bloom_shift = struct.unpack_from("<IIII", out, gnu[1])
    hashed = count - symoffset
    needed = 16 + 8 + 4 + 4 * hashed
    if needed > gnu[2]:
        raise ValueError(".gnu.hash too small to rewrite in place")
    table = struct.pack("<IIII", 1, symoffset, 1, bloom_shift) + struct.pack("<Q", 0xFFFFFFFFFFFFFFFF)
    table += struct.pack("<I", symoffset if hashed else 0)
    chain = [gnu_hash(names[i]) & ~1 for i in range(symoffset, count)]
    if chain:
        chain[-1] |= 1
    table += struct.pack(f"<{len(chain)}I", *chain)
    out[gnu[1] : gnu[1] + gnu[2]] = table + b"\0" * (gnu[2] - len(table))
    return out, renamed


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bonsai-mlx"


def _unprefixed_copy(source: Path) -> Path:
    """The cached unprefixed copy of `source` (written atomically on first use)."""
    stat = source.stat()
    name = f"libopenblas-unprefixed-v{REWRITE_VERSION}-{stat.st_size}-{int(stat.st_mtime)}.so"
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"bonsai-mlx-{os.getuid()}"):
        target = folder / name
        if target.is_file():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            data, _ = unprefix_exports(source.read_bytes())
            partial = folder / f".{name}.{os.getpid()}.partial"
            partial.write_bytes(bytes(data))
            partial.replace(target)
            return target
        except OSError:
            continue
    raise OSError("no writable cache folder for the BLAS copy")


def find_openblas() -> Path | None:
    """scipy-openblas32's library file, if that wheel is installed."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    folder = Path(scipy_openblas32.get_lib_dir())
    candidates = sorted(folder.glob(f"lib{scipy_openblas32.get_library()}*.so*"))
    return candidates[0] if candidates else None


def load_fast_blas() -> str | None:
    """Load an optimized CBLAS globally (Linux only); returns its path, or None when none was loaded."""
    if "path" in _loaded:
        return _loaded["path"]
    _loaded["path"] = None
    setting = os.environ.get("BONSAI_MLX_BLAS", "")
    if not sys.platform.startswith("linux") or setting == "0":
        return None
    try:
        if setting:
            path = Path(setting)
        else:
            source = find_openblas()
            if source is None:
                return None
            path = _unprefixed_copy(source)
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)  # read once, when the library starts
        library = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        library.cblas_sgemm  # noqa: B018 - raises AttributeError when the symbol is not exported
    except (OSError, ValueError, AttributeError):
        return None
    _loaded["path"] = str(path)
    return str(path)


def loaded_blas() -> str | None:
    """The path of the BLAS `load_fast_blas` loaded (None: MLX's own)."""
    return _loaded.get("path")


def _library() -> ctypes.CDLL | None:
    path = _loaded.get("path")
    if not path:
        return None
    if path not in _handles:
        _handles[path] = ctypes.CDLL(path)
    return _handles[path]


def blas_threads() -> int | None:
    """The loaded BLAS's thread count (None: no OpenBLAS loaded)."""
    library = _library()
    if library is None or not hasattr(library, "openblas_get_num_threads"):
        return None
    return int(library.openblas_get_num_threads())


def set_blas_threads(count: int) -> bool:
    """Set the loaded OpenBLAS's thread count (call between evaluations, never while a product runs)."""
    library = _library()
    if library is None or not hasattr(library, "openblas_set_num_threads"):
        return False
    library.openblas_set_num_threads(ctypes.c_int(max(1, count)))
    _threads["count"] = max(1, count)
    return True


CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112


def _cblas_sgemm() -> Any:
    library = _library()
    if library is None:
        return None
    if "sgemm" not in _functions:
        function = library.cblas_sgemm
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        function.argtypes = [integer] * 6 + [ctypes.c_float, pointer, integer, pointer, integer]
        function.argtypes += [ctypes.c_float, pointer, integer]
        function.restype = None
        _functions["sgemm"] = function
    return _functions["sgemm"]


def _blas_layout(x: np.ndarray) -> bool:
    """Rows evenly strided, at least a row apart, columns adjacent, float32."""
    return x.dtype == np.float32 and x.strides[1] == 4 and x.strides[0] % 4 == 0 and x.strides[0] >= 4 * x.shape[1]


def sgemm(a: np.ndarray, b: np.ndarray, out: np.ndarray, alpha: float = 1.0, transpose_b: bool = False) -> None:
    """out = alpha · a @ (bᵀ if transpose_b else b) for 2-D float32 numpy arrays whose rows are evenly strided and
    whose columns are adjacent (any row stride: a head's slice of a (S, H, D) array), by the loaded BLAS's
    cblas_sgemm (ctypes releases the GIL for the call), or by numpy without one."""
    function = _cblas_sgemm()
    if function is None or not all(_blas_layout(x) for x in (a, b, out)):
        out[...] = np.float32(alpha) * (a @ (b.T if transpose_b else b))
        return
    rows, inner = a.shape
    function(
        CBLAS_ROW_MAJOR,
        CBLAS_NO_TRANS,
        CBLAS_TRANS if transpose_b else CBLAS_NO_TRANS,
        rows,
        out.shape[1],
        inner,
        alpha,
        a.ctypes.data,
        a.strides[0] // 4,
        b.ctypes.data,
        b.strides[0] // 4,
        0.0,
        out.ctypes.data,
        out.strides[0] // 4,
    )


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


MIN_SAMPLE_SECONDS = 0.05  # shorter intervals than this keep the last thread count (5 ticks of USER_HZ=100)
_usage: dict[str, tuple[float, float, float]] = {}


def _busy_and_own_seconds() -> tuple[float, float] | None:
    """(CPU seconds every core has spent busy since boot, from /proc/stat; this process's CPU seconds, all
    threads), or None where /proc is not available."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        ticks = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError, IndexError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def others_busy_cores() -> float | None:
    """Cores' worth of CPU that other processes used since the previous call (busy time of the whole machine less
    this process's own, over the wall time between the calls); None on the first call, when less than
    MIN_SAMPLE_SECONDS passed, or without /proc.

    An average over the interval, not an instant: /proc/loadavg's running count less this process's running
    threads was racy (OpenBLAS's idle workers flip between running and sleeping while they spin), and on an
    idle 2-core machine it saw a phantom other process before a quarter of a Klein step's blocks, each of which
    then ran its products on one thread (s02 512² fp32: 15.1 s per step against 11.6 s)."""
    sample = _busy_and_own_seconds()
    if sample is None:
        return None
    now = time.perf_counter()
    previous = _usage.get("last")
    if previous is not None and now - previous[0] < MIN_SAMPLE_SECONDS:
        return None
    _usage["last"] = (now, *sample)
    if previous is None:
        return None
    wall, busy, own = now - previous[0], sample[0] - previous[1], sample[1] - previous[2]
    return max(0.0, (busy - own) / wall)


def fit_blas_threads_to_machine() -> int | None:
    """Use as many BLAS threads as cores are free of other processes' work (at least 1), judged by their CPU
    use since the previous call (`others_busy_cores`; the count is kept when that cannot be judged).

    OpenBLAS's threads wait for each other inside every product; when another process holds one of the cores,
    a 2-thread product waits for its descheduled half. Measured on a 2-core machine under a load of ~10: a
    (3, 1152, 64) × (3, 64, 1152) attention product took 41 ms of CPU with 2 threads against 6.6 ms with 1, a whole
    attention 0.36 against 0.12 CPU-s, a 1536×3072 × 3072×5461 product 1.04 against 0.88 s. Returns the count in
    effect (None: no OpenBLAS loaded, nothing done)."""
    if _library() is None:
        return None
    others = others_busy_cores()
    if others is None:
        return _threads.get("count") or blas_threads()
    count = max(1, cpu_cores() - round(others))
    if count != _threads.get("count") and not set_blas_threads(count):
        return None
    return count
