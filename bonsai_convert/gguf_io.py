"""GGUF files (formats/gguf.md): header by gguf-py's GGUFWriter, tensor data filled positionally; a checked reader.

Writing: gguf-py 0.19.0's GGUFWriter writes the header (magic, version, key/values, tensor infos) from the plan
alone; the tensor data is then written at fixed offsets by `GGUFFileWriter` (a `PositionalHashingWriter`), tensor by
tensor or in row chunks from several threads, so no tensor is held twice and the bytes do not depend on the order.
GGUFWriter's own data path (`write_tensor_data`) takes whole tensors in file order, which would hold the fused qkv
tensors and serialize the pack. Type 42 (Q2_0) is passed to gguf-py as its integer id: its enum lacks it.

Reading: gguf-py's GGUFReader (memory-mapped) parses the header; its tensor table is built here instead, because
GGUFReader maps every type id through its enum and GGML_QUANT_SIZES and so refuses a file holding type 42.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import InputError
from .safetensors_io import PositionalHashingWriter, TensorSpec

ALIGNMENT = 32  # GGUF's default alignment (general.alignment is not written)
F32, F16, BF16, Q1_0, Q2_0 = 0, 1, 30, 41, 42
TYPE_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q1_0: "Q1_0", Q2_0: "Q2_0"}
BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q1_0: (128, 18), Q2_0: (64, 18)}  # (weights, bytes) per block
TYPE_OF_DTYPE = {"F32": F32, "F16": F16, "BF16": BF16}
NUMPY_OF_TYPE = {F32: np.float32, F16: np.float16, BF16: np.uint16}  # bf16 as bit patterns, as elsewhere


def padded(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: name, ggml type id, shape in numpy order ([rows, cols]; GGUF stores it reversed)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        weights, size = BLOCKS[self.ggml_type]
        count = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        return count // weights * size

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if len(self.shape) > 1 else self.nbytes


@dataclass(frozen=True)
class Piece:
    """Where one planned output lands: rows from `row` on of GGUF tensor `tensor`; `swap_halves`: its first and
    second half of rows trade places (diffusers' norm_out.linear vs BFL's final_layer.adaLN_modulation.1)."""

    tensor: str
    row: int = 0
    swap_halves: bool = False


@dataclass
class GGUFLayout:
    """A GGUF file's plan: its tensors in file order, string key/values, and each planned output's place."""

    architecture: str
    tensors: list[GGUFTensor]
    pieces: dict[str, Piece]
    metadata: dict[str, str] = field(default_factory=dict)

    @cached_property
    def header(self) -> bytes:
        """Header bytes (padded to the alignment) as gguf-py's GGUFWriter writes them."""
        import gguf

        with tempfile.TemporaryDirectory(prefix="bonsai-gguf-") as folder:
            path = Path(folder) / "header.gguf"
            writer = gguf.GGUFWriter(path, self.architecture)
            for key, value in sorted(self.metadata.items()):
                writer.add_string(key, value)
            for tensor in self.tensors:
                # A non-uint8 dtype keeps `shape` as the logical shape; raw_dtype is the ggml type id (an int for 42).
                raw_type = gguf.GGMLQuantizationType(tensor.ggml_type) if tensor.ggml_type != Q2_0 else Q2_0
                writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            writer.close()
            header = path.read_bytes()
        return header + bytes(padded(len(header)) - len(header))

    @cached_property
    def offsets(self) -> dict[str, int]:
        """Absolute file offset of each tensor's data (each padded to the alignment, as GGUFWriter lays them)."""
        offsets, offset = {}, len(self.header)
        for tensor in self.tensors:
            offsets[tensor.name] = offset
            offset += padded(tensor.nbytes)
        return offsets

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(padded(t.nbytes) for t in self.tensors)


class GGUFFileWriter(PositionalHashingWriter):
    """Fills a GGUFLayout: header and alignment padding at once, then each planned output at its rows."""

    def __init__(self, path: Path, specs: list[TensorSpec], layout: GGUFLayout):
        by_name = {t.name: t for t in layout.tensors}
        offsets = {}
        for spec in specs:
            piece = layout.pieces[spec.name]
            offsets[spec.name] = layout.offsets[piece.tensor] + piece.row * by_name[piece.tensor].row_bytes
        super().__init__(path, specs, offsets, layout.nbytes)
        self._swapped = {name: p for name, p in layout.pieces.items() if p.swap_halves and name in self.specs}
        self._pwrite(layout.header, 0)
        for tensor in layout.tensors:
            end = layout.offsets[tensor.name] + tensor.nbytes
            if padded(end) > end:
                self._pwrite(bytes(padded(end) - end), end)

    def write(self, name: str, array: np.ndarray) -> None:
        if name in self._swapped:
            self.write_rows(name, array, 0)
            return
        super().write(name, array)

    def write_rows(self, name: str, rows: np.ndarray, start: int) -> None:
        if name not in self._swapped:
            super().write_rows(name, rows, start)
            return
        half = self.specs[name].shape[0] // 2
        data = np.asarray(rows)
        stop = start + data.shape[0]
        for low, high in ((start, min(stop, half)), (max(start, half), stop)):  # the parts in each half
            if low < high:
                destination = low + half if low < half else low - half
                super().write_rows(name, data[low - start : high - start], destination)


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as a GGUF file stores it: `dtype` is F32/F16/BF16, or U8 for Q1_0/Q2_0 blocks."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # logical, numpy order
    offset: int

    @property
    def dtype(self) -> str:
        return TYPE_NAMES[self.ggml_type] if self.ggml_type in NUMPY_OF_TYPE else "U8"


class GGUFFile:
    """A GGUF file's header parsed and validated (GGUFReader maps it only while parsing); `raw(name)` maps a tensor's
    stored array (floats [rows, cols], bf16 as uint16 bits; Q1_0/Q2_0 as uint8 blocks [rows, row bytes])."""

    def __init__(self, path: Path, allowed_types: tuple[int, ...] = tuple(BLOCKS)):
        import gguf

        self.path = Path(path)

        class _Reader(gguf.GGUFReader):
            def _build_tensors(self, start_offs, fields):  # the tensor table is read below
                self.bonsai_tensor_fields = fields

        try:
            reader = _Reader(self.path)
        except (ValueError, IndexError, OverflowError, TypeError, KeyError, UnicodeDecodeError, OSError) as error:
            raise InputError(f"{self.path}: not a readable GGUF file ({error})") from error
        self.metadata: dict[str, object] = {}
        for key, value in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = value.contents()
            except (ValueError, IndexError, UnicodeDecodeError) as error:
                raise InputError(f"{self.path}: key {key}: unreadable value ({error})") from error
        size = reader.data.shape[0]
        self.tensors: dict[str, StoredTensor] = {}
        for item in reader.bonsai_tensor_fields:
            _, name_bytes, _, dims, raw_type, offset = item.parts
            try:
                name = bytes(name_bytes).decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(f"{self.path}: a tensor name is not UTF-8") from error
            ggml_type = int(raw_type[0])
            shape = tuple(int(d) for d in reversed(dims.tolist()))
            if name in self.tensors:
                raise InputError(f"{self.path}: tensor {name} appears twice")
            if ggml_type not in allowed_types:
                allowed = ", ".join(TYPE_NAMES[t] for t in allowed_types)
                raise InputError(f"{self.path}: tensor {name}: ggml type {ggml_type} is not one of {allowed}")
            if not 1 <= len(shape) <= 2 or any(d < 1 or d > 1 << 24 for d in shape):
                raise InputError(f"{self.path}: tensor {name}: shape {list(shape)} is not a weight shape")
            weights, _ = BLOCKS[ggml_type]
            if shape[-1] % weights:
                raise InputError(f"{self.path}: tensor {name}: {shape[-1]} columns do not fill {weights}-blocks")
            tensor = StoredTensor(name, ggml_type, shape, reader.data_offset + int(offset[0]))
            if int(offset[0]) % ALIGNMENT or tensor.offset + GGUFTensor(name, ggml_type, shape).nbytes > size:
                raise InputError(f"{self.path}: tensor {name}: data at {tensor.offset} is misaligned or past the end")
            self.tensors[name] = tensor

    def raw(self, name: str) -> np.ndarray:
        """A fresh read-only map of one tensor (unmapped when dropped: pages read do not pile up in the process)."""
        tensor = self.tensors[name]
        nbytes = GGUFTensor(name, tensor.ggml_type, tensor.shape).nbytes
        if tensor.ggml_type in NUMPY_OF_TYPE:
            return np.memmap(self.path, NUMPY_OF_TYPE[tensor.ggml_type], "r", tensor.offset, tensor.shape)
        rows = tensor.shape[0] if len(tensor.shape) > 1 else 1
        return np.memmap(self.path, np.uint8, "r", tensor.offset, (rows, nbytes // rows))
