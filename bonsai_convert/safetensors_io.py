"""Validated, memory-mapped safetensors reading and streaming, deterministic safetensors writing.

Written by hand on purpose: the `safetensors` package reads bf16 only into torch (not numpy), does not let us refuse a
hostile header with our own one-line error before anything is mapped, and its writer needs every tensor in memory at
once. Here the header is checked against the safetensors format's rules (8-byte length, JSON header, contiguous
non-overlapping offsets that match shape × dtype and end at the file's end) before any data is touched, tensors are
memory-mapped one at a time, and files are written tensor by tensor with a header computed from shapes alone (so `plan`
can predict file sizes byte for byte). Files stay readable by safetensors/mlx/torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bonsai_common.torch_zip import StoredTensor

from .errors import InputError

MAX_HEADER_BYTES = 100_000_000
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "F16": np.float16,
    "I32": np.int32,
    "U32": np.uint32,
    "F32": np.float32,
    "I64": np.int64,
    "U64": np.uint64,
    "F64": np.float64,
}
DTYPE_OF_NUMPY = {np.dtype(v).str: k for k, v in NUMPY_DTYPES.items()}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


# One header entry: name, dtype, shape and absolute byte range in the file (the same record as a state_dict.pt's).
TensorInfo = StoredTensor


def strict_json_object_pairs(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook refusing duplicate keys (a duplicate would silently hide the earlier value)."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def strict_json_loads(raw: bytes) -> object:
    """Strict UTF-8 JSON: no duplicate keys, no NaN/Infinity; raises ValueError or RecursionError."""
    text = raw.decode("utf-8")
    return json.loads(text, object_pairs_hook=strict_json_object_pairs, parse_constant=_refuse_constant)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; nothing else of the file is read."""
    try:
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode):  # a FIFO or device would block or never end
            raise InputError(f"{path}: not a regular file")
        file_size = status.st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: truncated safetensors file ({file_size} bytes, no header length)")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > MAX_HEADER_BYTES:
                raise InputError(f"{path}: safetensors header length {header_length} exceeds {MAX_HEADER_BYTES}")
            if 8 + header_length > file_size:
                raise InputError(f"{path}: safetensors header length {header_length} runs past the file end")
            raw = handle.read(header_length)
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from error
    try:
        header = strict_json_loads(raw)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)[:200]
        raise InputError(f"{path}: safetensors header is not valid UTF-8 JSON ({reason})") from error
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_start = 8 + header_length
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _check_entry(path, name, entry, data_start)
    expected = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.end > file_size:
            raise InputError(
                f"{path}: tensor {info.name}: data_offsets end past the end of the file ({file_size} bytes)"
            )
        if info.begin - data_start != expected:
            problem = "overlaps the previous tensor" if info.begin - data_start < expected else "leaves a gap"
            raise InputError(f"{path}: tensor {info.name}: data_offsets {problem}")
        expected = info.end - data_start
    if data_start + expected != file_size:
        raise InputError(
            f"{path}: file is {file_size} bytes but its header describes {data_start + expected} (truncated or padded)"
        )
    return infos, metadata


def _check_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"{path}: tensor {name}: header entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise InputError(f"{path}: tensor {name}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"{path}: tensor {name}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InputError(f"{path}: tensor {name}: data_offsets must be two ordered non-negative integers")
    numel = 1
    for dim in shape:
        numel *= dim
    if numel * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
        raise InputError(
            f"{path}: tensor {name}: shape {shape} of {dtype} needs {numel * DTYPE_SIZES[dtype]} bytes,"
            f" data_offsets give {offsets[1] - offsets[0]}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


class SafetensorsFile:
    """A validated safetensors file whose tensors are memory-mapped on demand (never all at once)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored values, memory-mapped (bf16 comes back as uint16 bit patterns)."""
        info = self.tensors[name]
        dtype = np.uint16 if info.dtype == "BF16" else NUMPY_DTYPES.get(info.dtype)
        if dtype is None:
            raise InputError(f"{self.path}: tensor {name}: dtype {info.dtype} is not supported here")
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype=dtype)
        if info.shape == ():
            return np.fromfile(self.path, dtype=dtype, count=1, offset=info.begin).reshape(())
        return np.memmap(self.path, dtype=dtype, mode="r", offset=info.begin, shape=info.shape)

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor as numpy (only those rows are read); bf16 widened to float32."""
        values = self.raw(name)[start:stop]
        if self.tensors[name].dtype == "BF16":
            return bf16_bits_to_float32(values)
        return np.array(values)

    def load(self, name: str) -> np.ndarray:
        """The tensor as numpy; bf16 is widened exactly to float32."""
        values = self.raw(name)
        if self.tensors[name].dtype == "BF16":
            return bf16_bits_to_float32(values)
        return np.asarray(values)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bf16 is the upper half of a float32: widen exactly by shifting the bit pattern."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 → bf16 bit patterns (uint16)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


@dataclass(frozen=True)
class TensorSpec:
    """What will be written: a name, a safetensors dtype and a shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * DTYPE_SIZES[self.dtype]


def build_header(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """Deterministic header: tensors in name order, compact JSON, space-padded to 8 bytes (as safetensors does)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for spec in sorted(specs, key=lambda s: s.name):
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def file_size(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> int:
    """The exact size of the safetensors file `SafetensorsWriter` writes for these specs."""
    specs = list(specs)
    return len(build_header(specs, metadata)) + sum(spec.nbytes for spec in specs)


PENDING_HASH_BYTES = 16 << 20  # out-of-order writes kept in memory for the running sha256 (beyond: re-read)


class PositionalHashingWriter:
    """Writes a file tensor by tensor (or in row chunks), in any order and from several threads: offsets are fixed
    up front, and every write is a positional `os.pwrite`. The container (safetensors, torch zip) is the subclass's.

    The file's sha256 is computed while writing (`sha256` after `close`): bytes that land right after what is
    hashed so far are hashed from memory at once; writes ahead of that are kept (up to PENDING_HASH_BYTES) until
    the gap before them is filled, and beyond that read back from the page cache when their turn comes."""

    def __init__(self, path: Path, specs: Iterable[TensorSpec], offsets: dict[str, int], size: int):
        self.path = Path(path)
        self.sha256: str | None = None
        self._hash = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) are in _hash
        self._pending: dict[int, tuple[int, bytes | None]] = {}  # offset → (length, bytes or None: re-read)
        self._pending_bytes = 0
        self._hash_lock = threading.Lock()
        self.specs = {spec.name: spec for spec in specs}
        self._offsets = offsets
        self._size = size
        self._written: set[str] = set()
        self._rows_done: dict[str, int] = {}
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._closed = False

    # Hooks of the container: a tensor's bytes landed / a tensor is complete / everything is written.
    def _wrote(self, name: str, view: memoryview, offset: int) -> None:
        pass

    def _completed(self, name: str) -> None:
        pass

    def _finish(self) -> None:
        pass

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        start, whole = offset, view
        while view.nbytes:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written
        self._hash_written(whole, start)

    def _hash_written(self, view: memoryview, offset: int) -> None:
        """Feed the running sha256 in file order (see the class docstring)."""
        if not view.nbytes:
            return
        with self._hash_lock:
            if offset != self._hashed:
                keep = self._pending_bytes + view.nbytes <= PENDING_HASH_BYTES
                self._pending[offset] = (view.nbytes, bytes(view) if keep else None)
                self._pending_bytes += view.nbytes if keep else 0
                return
            self._hash.update(view)
            self._hashed += view.nbytes
            while self._hashed in self._pending:
                length, data = self._pending.pop(self._hashed)
                if data is None:
                    self._hash_from_file(self._hashed, length)
                else:
                    self._pending_bytes -= length
                    self._hash.update(data)
                self._hashed += length

    def _blocks_of_file(self, offset: int, length: int):
        end = offset + length
        while offset < end:
            block = os.pread(self._fd, min(1 << 22, end - offset), offset)
            if not block:
                raise RuntimeError(f"{self.path}: short read at byte {offset}")
            yield block
            offset += len(block)

    def _hash_from_file(self, offset: int, length: int) -> None:
        for block in self._blocks_of_file(offset, length):
            self._hash.update(block)

    def _crc_of_file(self, offset: int, length: int) -> int:
        crc = 0
        for block in self._blocks_of_file(offset, length):
            crc = zlib.crc32(block, crc)
        return crc

    def _check(self, name: str, data: np.ndarray, full: bool) -> TensorSpec:
        spec = self.specs.get(name)
        if spec is None or name in self._written:
            raise RuntimeError(f"{self.path}: tensor {name} is not expected here (or written twice)")
        shape_ok = tuple(data.shape) == spec.shape if full else tuple(data.shape[1:]) == spec.shape[1:]
        if not shape_ok:
            raise RuntimeError(f"{self.path}: tensor {name}: shape {data.shape} does not match spec {spec.shape}")
        dtype = DTYPE_OF_NUMPY.get(data.dtype.str)
        if dtype != spec.dtype and not (spec.dtype == "BF16" and dtype == "U16"):
            raise RuntimeError(f"{self.path}: tensor {name}: dtype {data.dtype} does not match spec {spec.dtype}")
        return spec

    @staticmethod
    def _bytes(data: np.ndarray) -> memoryview:
        return memoryview(np.ascontiguousarray(data.astype(data.dtype.newbyteorder("<"), copy=False)).reshape(-1))

    def write(self, name: str, array: np.ndarray) -> None:
        """The whole tensor (bf16 tensors are given as uint16 bit patterns)."""
        data = np.asarray(array, order="C")
        self._check(name, data, full=True)
        view = self._bytes(data)
        self._pwrite(view, self._offsets[name])
        self._wrote(name, view, self._offsets[name])
        with self._lock:
            self._written.add(name)
        self._completed(name)

    def write_rows(self, name: str, rows: np.ndarray, start: int) -> None:
        """Rows [start, start+len(rows)) of a tensor (streaming); it counts as written once all rows are in."""
        data = np.asarray(rows, order="C")
        spec = self._check(name, data, full=False)
        if start < 0 or start + data.shape[0] > spec.shape[0]:
            raise RuntimeError(f"{self.path}: rows {start}..{start + data.shape[0]} of {name} are out of range")
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape[0] else 0
        view = self._bytes(data)
        offset = self._offsets[name] + start * row_bytes
        self._pwrite(view, offset)
        self._wrote(name, view, offset)
        with self._lock:
            self._rows_done[name] = self._rows_done.get(name, 0) + data.shape[0]
            complete = self._rows_done[name] == spec.shape[0]
            if complete:
                self._written.add(name)
        if complete:
            self._completed(name)

    @property
    def complete(self) -> bool:
        return len(self._written) == len(self.specs)

    def abort(self) -> None:
        """Close without completing (the caller removes the file)."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def close(self) -> None:
        missing = sorted(set(self.specs) - self._written)
        if missing:
            self.abort()
            raise RuntimeError(f"{self.path}: {len(missing)} tensors were not written (first: {missing[0]})")
        self._finish()
        os.ftruncate(self._fd, self._size)
        with self._hash_lock:
            if self._hashed == self._size and not self._pending:
                self.sha256 = self._hash.hexdigest()
        os.fsync(self._fd)
        self.abort()

    def __enter__(self) -> PositionalHashingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SafetensorsWriter(PositionalHashingWriter):
    """A safetensors file: the header (from the specs alone) first, then every tensor in name order."""

    def __init__(self, path: Path, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None):
        specs = list(specs)
        header = build_header(specs, metadata)
        offsets, offset = {}, len(header)
        for spec in sorted(specs, key=lambda s: s.name):
            offsets[spec.name] = offset
            offset += spec.nbytes
        super().__init__(path, specs, offsets, offset)
        self._pwrite(header, 0)
