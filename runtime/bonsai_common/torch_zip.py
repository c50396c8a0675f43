"""Read torch.save's zip of a tensor dict without unpickling: the zip's entries are checked and the pickle's
opcodes walked (`pickletools.genops`, never executed) against an allow-list of what a dict of tensors needs.

HQQ's `qmodel.pt` (formats/hqq.md) is a dict of module name → that module's state dict, whose HQQ layers also hold
plain metadata (ints, bools, strings, None, a `torch.Size`, `torch.<dtype>` objects, `W_q` as an nn.Parameter, and
a tied weight referencing another module's storage): `read_module_container` reads those, and `read_container`
reads such a file as its flattened tensors `module.key`.

Shared by the CUDA runtime (which never runs a pickle either) and the converter's readers (verify, sources).
stdlib + numpy only. Spec: formats/gemlite.md, "Container".
"""

from __future__ import annotations

import pickletools
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_PICKLE_BYTES = 64 << 20
STORAGE_OF_DTYPE = {
    "F16": "HalfStorage",
    "BF16": "BFloat16Storage",
    "F32": "FloatStorage",
    "F64": "DoubleStorage",
    "I32": "IntStorage",
    "I64": "LongStorage",
    "I16": "ShortStorage",
    "I8": "CharStorage",
    "U8": "ByteStorage",
    "BOOL": "BoolStorage",
}
DTYPE_OF_STORAGE = {storage: dtype for dtype, storage in STORAGE_OF_DTYPE.items()}
ITEM_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
NUMPY_DTYPES = {
    "F16": np.float16,
    "BF16": np.uint16,  # bf16 as its bit patterns
    "F32": np.float32,
    "F64": np.float64,
    "I32": np.int32,
    "I64": np.int64,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
KNOWN_RECORDS = {"data.pkl", ".format_version", ".storage_alignment", "byteorder", "version", ".data/version"}
KNOWN_RECORDS |= {".data/serialization_id"}


class ContainerError(ValueError):
    """The file is not a plain torch tensor dict (the message names the file and the reason)."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the file: safetensors-style dtype name, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


_ALLOWED_OPCODES = {
    "PROTO", "FRAME", "STOP", "MARK", "EMPTY_DICT", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "BINUNICODE", "SHORT_BINUNICODE", "BININT", "BININT1", "BININT2", "LONG1", "NEWFALSE", "NEWTRUE", "NONE",
    "GLOBAL", "STACK_GLOBAL", "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET", "BINPERSID", "REDUCE",
    "SETITEM", "SETITEMS", "BUILD",
}  # fmt: skip
_REBUILD = ("torch._utils", "_rebuild_tensor_v2")
_PARAMETER = ("torch._utils", "_rebuild_parameter")  # an nn.Parameter: (tensor, requires_grad, hooks)
_ORDERED_DICT = ("collections", "OrderedDict")
_SIZE = ("torch", "Size")
# torch dtype objects pickle as the global `torch.<name>` (HQQ's `compute_dtype`, `unpack_view_dtype`).
TORCH_DTYPE_NAMES = frozenset(
    {"float16", "bfloat16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64", "bool"}
)


@dataclass(frozen=True)
class TorchSize:
    """A pickled `torch.Size` (HQQ's `shape`)."""

    dims: tuple[int, ...]


@dataclass(frozen=True)
class TorchDtype:
    """A pickled torch dtype object, by its attribute name (`float16` for `torch.float16`)."""

    name: str


@dataclass(frozen=True)
class TensorRef:
    """For a writer: a module entry that is the file's tensor `name` (flat `module.key`), as an nn.Parameter or a
    plain tensor. Two entries naming one tensor share its storage (a tied weight)."""

    name: str
    parameter: bool = False


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(frozen=True)
class _Tensor:
    storage: tuple  # ("storage", _Global(torch, XStorage), key, location, numel)
    offset: int
    shape: tuple
    stride: tuple


class _Mark:
    pass


def _allowed_global(module: str, name: str) -> bool:
    if (module, name) in (_REBUILD, _PARAMETER, _ORDERED_DICT, _SIZE):
        return True
    return module == "torch" and (name in DTYPE_OF_STORAGE or name in TORCH_DTYPE_NAMES)


def walk_state_dict_pickle(raw: bytes, label: str) -> dict[str, _Tensor]:
    """The {name: tensor reference} a torch.save'd state dict describes, from its opcodes (nothing is executed).

    Only the opcodes and globals a dict of tensors needs are allowed (a module's `_metadata`, set by BUILD, is
    read and ignored); anything else is refused naming the opcode or the global."""
    result = _walk_pickle(raw, label)
    if not isinstance(result, dict) or not all(isinstance(v, _Tensor) for v in result.values()):
        raise ContainerError(f"{label}: the pickle is not a dict of tensors")
    return result


def _metadata_value(value, where: str):
    """A module-dict entry that is not a tensor: only the plain values HQQ's metadata uses."""
    if isinstance(value, _Global) and value.module == "torch" and value.name in TORCH_DTYPE_NAMES:
        return TorchDtype(value.name)
    if value is None or isinstance(value, (bool, int, str, TorchSize)):
        return value
    raise ContainerError(f"{where} is a {type(value).__name__}, not a tensor or plain metadata")


def _is_module_dict(result) -> bool:
    return isinstance(result, dict) and bool(result) and all(isinstance(v, dict) for v in result.values())


def _module_dict(result, label: str) -> dict[str, dict[str, object]]:
    if not _is_module_dict(result):
        raise ContainerError(f"{label}: the pickle is not a dict of module state dicts")
    modules = {}
    for module, state in result.items():
        modules[module] = {
            key: value if isinstance(value, _Tensor) else _metadata_value(value, f"{label}: {module}.{key}")
            for key, value in state.items()
        }
    return modules


def _walk_pickle(raw: bytes, label: str):
    """Evaluate the pickle's opcodes symbolically under the allow-list; the object it describes."""
    stack: list = []
    memo: dict[int, object] = {}
    result = None
    try:
        for opcode, argument, position in pickletools.genops(raw):
            name = opcode.name
            if name not in _ALLOWED_OPCODES:
                raise ContainerError(f"{label}: pickle opcode {name} at byte {position} is not allowed in a state dict")
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                result = stack.pop()
                break
            if name == "MARK":
                stack.append(_Mark())
            elif name in ("EMPTY_DICT",):
                stack.append({})
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(name[-1])
                items = tuple(stack[-count:])
                del stack[-count:]
                stack.append(items)
            elif name == "TUPLE":
                stack.append(tuple(_pop_to_mark(stack)))
            elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BININT", "BININT1", "BININT2", "LONG1"):
                stack.append(argument)
            elif name in ("NEWFALSE", "NEWTRUE", "NONE"):
                stack.append({"NEWFALSE": False, "NEWTRUE": True, "NONE": None}[name])
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    module, _, attribute = argument.partition(" ")
                else:
                    attribute, module = stack.pop(), stack.pop()
                if not _allowed_global(module, attribute):
                    raise ContainerError(f"{label}: pickle global {module}.{attribute} is not allowed in a state dict")
                stack.append(_Global(module, attribute))
            elif name in ("BINPUT", "LONG_BINPUT"):
                memo[argument] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET"):
                stack.append(memo[argument])
            elif name == "BINPERSID":
                stack.append(("persistent", stack.pop()))
            elif name == "REDUCE":
                arguments, function = stack.pop(), stack.pop()
                stack.append(_reduce(function, arguments, label))
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                _set_item(stack[-1], key, value, label)
            elif name == "SETITEMS":
                items = _pop_to_mark(stack)
                if len(items) % 2:
                    raise ContainerError(f"{label}: SETITEMS with an odd number of items")
                for key, value in zip(items[::2], items[1::2], strict=True):
                    _set_item(stack[-1], key, value, label)
            elif name == "BUILD":
                state = stack.pop()
                if not isinstance(stack[-1], dict) or not isinstance(state, dict):
                    raise ContainerError(f"{label}: pickle BUILD on something other than a state dict")
    except ContainerError:
        raise
    except Exception as error:  # noqa: BLE001 - malformed pickles (stack underflow, bad memo, bad arguments)
        raise ContainerError(f"{label}: not a readable state-dict pickle ({type(error).__name__}: {error})") from error
    return result


def _pop_to_mark(stack: list) -> list:
    items = []
    while not isinstance(stack[-1], _Mark):
        items.append(stack.pop())
    stack.pop()
    return items[::-1]


def _reduce(function, arguments, label: str):
    if function == _Global(*_ORDERED_DICT) and arguments == ():
        return {}
    if function == _Global(*_SIZE) and isinstance(arguments, tuple) and len(arguments) == 1:
        (dims,) = arguments
        if isinstance(dims, tuple) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            return TorchSize(dims)
    if function == _Global(*_PARAMETER) and isinstance(arguments, tuple) and len(arguments) == 3:
        tensor, requires_grad, hooks = arguments
        if isinstance(tensor, _Tensor) and isinstance(requires_grad, bool) and hooks == {}:
            return tensor
    if function == _Global(*_REBUILD) and isinstance(arguments, tuple) and len(arguments) in (4, 5, 6):
        persistent, offset, shape, stride = arguments[:4]
        if (
            isinstance(persistent, tuple)
            and persistent[0] == "persistent"
            and isinstance(persistent[1], tuple)
            and len(persistent[1]) == 5
            and persistent[1][0] == "storage"
            and isinstance(persistent[1][1], _Global)
            and isinstance(offset, int)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and all(isinstance(s, int) for s in stride)
        ):
            return _Tensor(persistent[1], offset, tuple(shape), tuple(stride))
    raise ContainerError(f"{label}: a pickle call that does not build a tensor")


def _set_item(target, key, value, label: str) -> None:
    if not isinstance(target, dict) or not isinstance(key, str):
        raise ContainerError(f"{label}: a pickle item that is not a string key of a dict")
    if key in target:
        raise ContainerError(f"{label}: tensor {key} appears twice")
    target[key] = value


def _open_archive(path: Path, label: str) -> tuple[bytes, dict[str, str], dict]:
    """The zip's checked entries: data.pkl's bytes, storage key → entry name, entry name → (info, data offset)."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
            entries = archive.infolist()
            data = {info.filename: (info, _data_offset(handle, info, label)) for info in entries}
            if len(data) != len(entries):
                raise ContainerError(f"{label}: a zip entry name appears twice")
            prefixes = {name.split("/", 1)[0] for name in data}
            if len(prefixes) != 1 or not all("/" in name for name in data):
                raise ContainerError(f"{label}: zip entries are not under one archive folder")
            (prefix,) = prefixes
            storages = {}
            for name, (info, _) in data.items():
                inner = name[len(prefix) + 1 :]
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ContainerError(f"{label}: zip entry {name} is compressed (torch stores entries)")
                if inner.startswith("data/") and inner[5:].isdigit():
                    storages[inner[5:]] = name
                elif inner not in KNOWN_RECORDS:
                    raise ContainerError(f"{label}: zip entry {name} is not part of a torch state dict")
            byteorder = f"{prefix}/byteorder"
            if byteorder in data and archive.read(byteorder) != b"little":
                raise ContainerError(f"{label}: byteorder is not little-endian")
            pickle_name = f"{prefix}/data.pkl"
            if pickle_name not in data:
                raise ContainerError(f"{label}: no {pickle_name}")
            if data[pickle_name][0].file_size > MAX_PICKLE_BYTES:
                raise ContainerError(f"{label}: data.pkl is over {MAX_PICKLE_BYTES} bytes")
            raw_pickle = archive.read(pickle_name)
    except zipfile.BadZipFile as error:
        raise ContainerError(f"{label}: not a torch zip file ({error})") from error
    except OSError as error:
        raise ContainerError(f"{label}: cannot read: {error.strerror}") from error
    return raw_pickle, storages, data


def _resolve(
    references: dict[str, _Tensor], storages: dict[str, str], data: dict, label: str, aliases_allowed: bool
) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Each tensor reference checked against its storage record: name → StoredTensor, and (where allowed) the
    names that are exact aliases of an earlier tensor (same storage, offset, shape, stride: a tied weight)."""
    tensors: dict[str, StoredTensor] = {}
    aliases: dict[str, str] = {}
    owner: dict[str, tuple[str, _Tensor]] = {}  # storage key → first tensor on it
    for name, tensor in references.items():
        _, storage_type, key, _location, numel = tensor.storage
        dtype = DTYPE_OF_STORAGE.get(storage_type.name)
        if dtype is None:
            raise ContainerError(f"{label}: tensor {name}: storage {storage_type.name} is not supported")
        if str(key) not in storages:
            raise ContainerError(f"{label}: tensor {name}: storage {key} has no data record")
        if key in owner:
            first, reference = owner[key]
            if aliases_allowed and reference == tensor:
                aliases[name] = first
                continue
            raise ContainerError(f"{label}: tensor {name}: storage {key} is shared with another tensor")
        owner[key] = (name, tensor)
        info, data_offset = data[storages[str(key)]]
        item = ITEM_SIZES[dtype]
        if info.file_size != numel * item:
            size = info.file_size
            raise ContainerError(f"{label}: tensor {name}: storage {key} holds {size} bytes, not {numel} × {item}")
        count = int(np.prod(tensor.shape, dtype=np.int64)) if tensor.shape else 1
        if count and tensor.stride != contiguous_strides(tensor.shape):
            raise ContainerError(f"{label}: tensor {name}: stride {tensor.stride} is not contiguous")
        if tensor.offset < 0 or tensor.offset + count > numel:
            raise ContainerError(f"{label}: tensor {name}: runs past the end of its storage")
        begin = data_offset + tensor.offset * item
        tensors[name] = StoredTensor(name, dtype, tensor.shape, begin, begin + count * item)
    return tensors, aliases


@dataclass(frozen=True)
class ModuleContainer:
    """A dict of module state dicts (HQQ's qmodel.pt): tensors by flat name `module.key` (an alias left out),
    each module's entries (a StoredTensor or plain metadata), and alias name → the tensor it shares."""

    tensors: dict[str, StoredTensor]
    modules: dict[str, dict[str, object]]
    aliases: dict[str, str]


def read_module_container(path: Path) -> ModuleContainer:
    """A dict of module state dicts (HQQ's qmodel.pt), the zip and pickle checked, nothing unpickled.

    The zip rules are `read_container`'s; a storage may be shared only by exact aliases (a tied weight)."""
    label = str(path)
    raw_pickle, storages, data = _open_archive(path, label)
    return _module_container(_walk_pickle(raw_pickle, f"{label}: data.pkl"), storages, data, label)


def _module_container(result, storages: dict[str, str], data: dict, label: str) -> ModuleContainer:
    modules = _module_dict(result, f"{label}: data.pkl")
    references: dict[str, _Tensor] = {}
    for module, state in modules.items():
        for key, value in state.items():
            if isinstance(value, _Tensor):
                flat = f"{module}.{key}"
                if flat in references:
                    raise ContainerError(f"{label}: tensor {flat} appears twice")
                references[flat] = value
    tensors, aliases = _resolve(references, storages, data, label, aliases_allowed=True)
    resolved = {**tensors, **{name: tensors[first] for name, first in aliases.items()}}
    entries = {
        module: {
            key: resolved[f"{module}.{key}"] if isinstance(value, _Tensor) else value for key, value in state.items()
        }
        for module, state in modules.items()
    }
    return ModuleContainer(tensors, entries, aliases)


def read_container(path: Path) -> dict[str, StoredTensor]:
    """Tensor name → dtype, shape, absolute byte range; the zip and its pickle checked, nothing unpickled.

    Entries must be stored (uncompressed) under one archive folder, known records only, little-endian; each
    tensor must be contiguous, start at an element of its storage and end inside it; storages are not shared.
    A dict of module state dicts (HQQ's qmodel.pt) reads as its tensors `module.key`, aliases left out."""
    label = str(path)
    raw_pickle, storages, data = _open_archive(path, label)
    result = _walk_pickle(raw_pickle, f"{label}: data.pkl")
    if _is_module_dict(result):
        return _module_container(result, storages, data, label).tensors
    if not isinstance(result, dict) or not all(isinstance(v, _Tensor) for v in result.values()):
        raise ContainerError(f"{label}: data.pkl: the pickle is not a dict of tensors")
    references = result
    tensors, _ = _resolve(dict(sorted(references.items())), storages, data, label, aliases_allowed=False)
    return tensors


def _data_offset(handle, info: zipfile.ZipInfo, label: str) -> int:
    handle.seek(info.header_offset)
    header = handle.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ContainerError(f"{label}: zip entry {info.filename} has no local header")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def stored_array(path: Path, tensor: StoredTensor) -> np.ndarray:
    """The tensor's stored values, memory-mapped read-only (bf16 as uint16 bit patterns)."""
    dtype = NUMPY_DTYPES[tensor.dtype]
    if tensor.nbytes == 0:
        return np.zeros(tensor.shape, dtype=dtype)
    if tensor.shape == ():
        return np.fromfile(path, dtype=dtype, count=1, offset=tensor.begin).reshape(())
    return np.memmap(path, dtype=dtype, mode="r", offset=tensor.begin, shape=tensor.shape)
