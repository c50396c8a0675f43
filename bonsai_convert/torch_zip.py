"""torch.save's zip container (a dict of tensors, or HQQ's dict of module state dicts: formats/hqq.md), written
deterministically and read without unpickling.

Why by hand (formats/gemlite.md, "Container"): `torch.save` needs every tensor in memory at once, writes a random
`.data/serialization_id` (so two packs would differ) and its size cannot be predicted from shapes; `torch.load`
executes the pickle (weights_only runs a restricted unpickler, but still an unpickler). Here the file is laid out
from shapes alone (`plan` predicts it byte for byte), written tensor by tensor at fixed offsets, and read by walking
the pickle's opcodes (`pickletools.genops`, never executed) against an allow-list. The files load with
`torch.load(path, weights_only=True)` and `mmap=True`; Python's `zipfile` reads them too.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bonsai_common.torch_zip import (
    STORAGE_OF_DTYPE,
    ContainerError,
    TensorRef,
    TorchDtype,
    TorchSize,
    contiguous_strides,
    read_container,
)

from .errors import InputError
from .safetensors_io import PositionalHashingWriter, SafetensorsFile, TensorInfo, TensorSpec

ALIGNMENT = 64  # torch's `.storage_alignment`: every record's data starts at a multiple of it (mmap-able)
# Records besides data/<key>, in the order torch 2.13 writes them (`.data/serialization_id` left out: random).
SMALL_RECORDS = ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little"))
TRAILING_RECORDS = (("version", b"3\n"),)
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, time 00:00 (fixed: deterministic)
_ZIP64_LIMIT = 0xFFFFFFFF


def archive_name(file_name: str) -> str:
    """The folder inside the zip: torch.save names it after the file (`state_dict.pt` → `state_dict/`)."""
    return file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0]


# --- the pickle (protocol 2, what torch.save writes, without its memo) ---------------------------------------------


def _unicode(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _tuple(items: list[bytes]) -> bytes:
    if not items:
        return b")"
    if len(items) <= 3:
        return b"".join(items) + b"\x85\x86\x87"[len(items) - 1 : len(items)]
    return b"(" + b"".join(items) + b"t"


def _tensor(spec: TensorSpec, key: int) -> bytes:
    """`torch._utils._rebuild_tensor_v2(storage key, 0, shape, stride, False, OrderedDict())`, storage `key`."""
    numel = int(np.prod(spec.shape, dtype=np.int64)) if spec.shape else 1
    storage = _tuple(
        [_unicode("storage"), b"ctorch\n" + STORAGE_OF_DTYPE[spec.dtype].encode() + b"\n"]
        + [_unicode(str(key)), _unicode("cpu"), _int(numel)]
    )
    arguments = [
        storage + b"Q",  # BINPERSID
        _int(0),
        _tuple([_int(d) for d in spec.shape]),
        _tuple([_int(s) for s in contiguous_strides(spec.shape)]),
        b"\x89",  # NEWFALSE: requires_grad
        _EMPTY_ORDERED_DICT,  # backward hooks
    ]
    return b"ctorch._utils\n_rebuild_tensor_v2\n(" + b"".join(arguments) + b"tR"


_EMPTY_ORDERED_DICT = b"ccollections\nOrderedDict\n)R"


def state_dict_pickle(specs: list[TensorSpec]) -> bytes:
    """data.pkl for {name: tensor} in name order; tensor i is storage `i`, offset 0, contiguous."""
    out = [b"\x80\x02}"]  # PROTO 2, EMPTY_DICT
    if specs:
        out.append(b"(")
    for key, spec in enumerate(specs):
        out.append(_unicode(spec.name) + _tensor(spec, key))
    if specs:
        out.append(b"u")  # SETITEMS
    out.append(b".")
    return b"".join(out)


def _value(value: object, tensors: dict[str, tuple[int, TensorSpec]], where: str) -> bytes:
    """One module entry as torch.save pickles it: a tensor (or nn.Parameter) of the file, or plain metadata."""
    if isinstance(value, TensorRef):
        if value.name not in tensors:
            raise ValueError(f"{where}: tensor {value.name} is not in the file")
        key, spec = tensors[value.name]
        tensor = _tensor(spec, key)
        if not value.parameter:
            return tensor
        # torch._utils._rebuild_parameter(tensor, requires_grad=False, OrderedDict())
        return b"ctorch._utils\n_rebuild_parameter\n" + tensor + b"\x89" + _EMPTY_ORDERED_DICT + b"\x87R"
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"  # NEWTRUE / NEWFALSE
    if isinstance(value, int):
        return _int(value)
    if isinstance(value, str):
        return _unicode(value)
    if isinstance(value, TorchSize):
        return b"ctorch\nSize\n" + _tuple([_tuple([_int(d) for d in value.dims])]) + b"R"
    if isinstance(value, TorchDtype):
        return b"ctorch\n" + value.name.encode() + b"\n"
    raise ValueError(f"{where}: {type(value).__name__} cannot be written")


def module_dict_pickle(specs: list[TensorSpec], modules: dict[str, dict[str, object]]) -> bytes:
    """data.pkl for {module: {key: value}} (HQQ's qmodel.pt, formats/hqq.md), modules and keys in the given order.

    Tensor values are `TensorRef`s to `specs` (name order = storage keys 0, 1, ...); each spec is referenced at
    least once, and a second reference shares the storage (a tied weight)."""
    tensors = {spec.name: (key, spec) for key, spec in enumerate(specs)}
    referenced = {v.name for state in modules.values() for v in state.values() if isinstance(v, TensorRef)}
    if referenced != set(tensors):
        raise ValueError(f"tensors not referenced by a module: {sorted(set(tensors) - referenced)[:3]}")
    out = [b"\x80\x02}"]
    if modules:
        out.append(b"(")
    for module, state in modules.items():
        out.append(_unicode(module) + b"}")
        if state:
            out.append(b"(")
            out += [_unicode(key) + _value(value, tensors, f"{module}.{key}") for key, value in state.items()]
            out.append(b"u")
    if modules:
        out.append(b"u")
    out.append(b".")
    return b"".join(out)


# --- the zip layout -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One stored zip entry: its name, where its local header and its data start, its size."""

    name: str
    header_offset: int
    data_offset: int
    size: int

    def local_header(self, crc: int) -> bytes:
        name = self.name.encode()
        pad = self.data_offset - self.header_offset - 30 - len(name)
        extra = b"FB" + struct.pack("<H", pad - 4) + b"Z" * (pad - 4) if pad else b""
        fields = (0x04034B50, 20, 0, 0, 0, _DOS_DATE, crc, self.size, self.size, len(name), len(extra))
        return struct.pack("<IHHHHHIIIHH", *fields) + name + extra


def _padding(offset: int, name_length: int) -> int:
    pad = -(offset + 30 + name_length) % ALIGNMENT
    return pad + ALIGNMENT if 0 < pad < 4 else pad  # an extra field needs its 4-byte header


@dataclass(frozen=True)
class ContainerLayout:
    """Every byte range of a state_dict.pt, from the tensor specs alone."""

    archive: str
    specs: tuple[TensorSpec, ...]  # name order = storage keys 0, 1, ...
    records: tuple[Record, ...]
    contents: dict[str, bytes]  # the small records' bytes (data.pkl, version, ...)
    central_offset: int

    @property
    def tensor_records(self) -> dict[str, Record]:
        prefix = f"{self.archive}/data/"
        data = [r for r in self.records if r.name.startswith(prefix)]
        return {spec.name: record for spec, record in zip(self.specs, data, strict=True)}

    def central_directory(self, crcs: dict[str, int]) -> bytes:
        entries = []
        for record in self.records:
            name = record.name.encode()
            extra = b""
            offset = record.header_offset
            if offset >= _ZIP64_LIMIT:
                extra, offset = struct.pack("<HHQ", 1, 8, offset), _ZIP64_LIMIT
            version = 45 if extra else 20
            fields = (0x02014B50, version, version, 0, 0, 0, _DOS_DATE, crcs[record.name], record.size, record.size)
            entries.append(
                struct.pack("<IHHHHHHIII", *fields)
                + struct.pack("<HHHHHII", len(name), len(extra), 0, 0, 0, 0, offset)
                + name
                + extra
            )
        directory = b"".join(entries)
        count, size, start = len(self.records), len(directory), self.central_offset
        tail = b""
        if start >= _ZIP64_LIMIT or start + size >= _ZIP64_LIMIT or count >= 0xFFFF:
            end64 = start + size
            tail = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, start)
            tail += struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
            count, size, start = min(count, 0xFFFF), min(size, _ZIP64_LIMIT), min(start, _ZIP64_LIMIT)
        return directory + tail + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, size, start, 0)

    @property
    def size(self) -> int:
        return self.central_offset + len(self.central_directory({r.name: 0 for r in self.records}))


def container_layout(
    specs: list[TensorSpec], archive: str, modules: dict[str, dict[str, object]] | None = None
) -> ContainerLayout:
    """Records in torch's order: data.pkl, the small records, data/0 … data/N−1, version; each 64-byte aligned.

    `modules` (a dict of module state dicts, HQQ's qmodel.pt) replaces the flat {name: tensor} pickle."""
    ordered = tuple(sorted(specs, key=lambda s: s.name))
    for spec in ordered:
        if spec.dtype not in STORAGE_OF_DTYPE:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} has no torch storage here")
        if spec.nbytes >= _ZIP64_LIMIT:
            raise ValueError(f"{spec.name}: {spec.nbytes} bytes, one record must stay under 4 GiB")
    pickled = state_dict_pickle(list(ordered)) if modules is None else module_dict_pickle(list(ordered), modules)
    contents = {f"{archive}/data.pkl": pickled}
    contents |= {f"{archive}/{name}": value for name, value in SMALL_RECORDS}
    sizes = [(name, len(value)) for name, value in contents.items()]
    sizes += [(f"{archive}/data/{key}", spec.nbytes) for key, spec in enumerate(ordered)]
    trailing = {f"{archive}/{name}": value for name, value in TRAILING_RECORDS}
    sizes += [(name, len(value)) for name, value in trailing.items()]
    contents |= trailing
    records, offset = [], 0
    for name, size in sizes:
        data_offset = offset + 30 + len(name.encode()) + _padding(offset, len(name.encode()))
        records.append(Record(name, offset, data_offset, size))
        offset = data_offset + size
    return ContainerLayout(archive, ordered, tuple(records), contents, offset)


def file_size(specs: list[TensorSpec], archive: str, modules: dict[str, dict[str, object]] | None = None) -> int:
    """The exact size of the state_dict.pt (or module-dict qmodel.pt) `TorchZipWriter` writes for these specs."""
    return container_layout(specs, archive, modules).size


# --- the writer -----------------------------------------------------------------------------------------------------


class TorchZipWriter(PositionalHashingWriter):
    """Writes a state_dict.pt tensor by tensor (or in row chunks), from several threads, at fixed offsets.

    A record's local header holds its CRC-32, so it is written once the record is complete (rows arriving in order
    are checksummed as they come; otherwise the record is read back); the central directory is written at close."""

    def __init__(
        self,
        path: Path,
        specs: list[TensorSpec],
        metadata: dict[str, str] | None = None,
        modules: dict[str, dict[str, object]] | None = None,
    ):
        self.layout = container_layout(list(specs), archive_name(str(path)), modules)
        records = self.layout.tensor_records
        offsets = {name: record.data_offset for name, record in records.items()}
        super().__init__(path, self.layout.specs, offsets, self.layout.size)
        self._records = records
        self._crc: dict[str, int] = {}
        self._crc_done: dict[str, int] = {}  # bytes checksummed in order so far, per tensor
        for record in self.layout.records:
            if record.name in self.layout.contents:
                data = self.layout.contents[record.name]
                self._crc[record.name] = zlib.crc32(data)
                self._pwrite(record.local_header(self._crc[record.name]) + data, record.header_offset)

    def _wrote(self, name: str, view: memoryview, offset: int) -> None:
        record = self._records[name]
        with self._lock:
            done = self._crc_done.get(name, 0)
            if done >= 0 and offset - record.data_offset == done:
                self._crc[record.name] = zlib.crc32(view, self._crc.get(record.name, 0))
                self._crc_done[name] = done + view.nbytes
            else:
                self._crc_done[name] = -1  # out of order: read back at completion

    def _completed(self, name: str) -> None:
        record = self._records[name]
        if self._crc_done.get(name, 0) != record.size:
            self._crc[record.name] = self._crc_of_file(record.data_offset, record.size)
        self._crc.setdefault(record.name, 0)  # an empty tensor
        self._pwrite(record.local_header(self._crc[record.name]), record.header_offset)

    def _finish(self) -> None:
        for record in self.layout.records:  # empty tensors were never written
            if record.name not in self._crc:
                self._crc[record.name] = 0
                self._pwrite(record.local_header(0), record.header_offset)
        self._pwrite(self.layout.central_directory(self._crc), self.layout.central_offset)


class TorchZipFile(SafetensorsFile):
    """A validated state_dict.pt (bonsai_common.torch_zip: nothing unpickled) whose tensors are memory-mapped on
    demand: SafetensorsFile's reading over the tensors found in the zip."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        try:
            self.tensors: dict[str, TensorInfo] = read_container(self.path)
        except ContainerError as error:
            raise InputError(str(error)) from error
