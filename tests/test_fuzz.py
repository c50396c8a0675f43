"""Fuzzing: garbage into the safetensors, JSON, manifest and BFL readers and the low-bit decoders.

Every property allows only the documented refusals (InputError; ValueError from a codec) and runs each example
under a time limit and a memory ceiling, so a crash, a hang or a huge allocation all fail. Here the run is
bounded and derandomized (seconds, reproducible in CI); `scripts/fuzz.py --seconds N` runs the same TARGETS
with fresh randomness for as long as asked.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import signal
import struct
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bonsai_convert.codecs import gemlite
from bonsai_convert.codecs import mlx as mlx_codec
from bonsai_convert.codecs import packed as packed_codec
from bonsai_convert.errors import InputError
from bonsai_convert.files import read_json
from bonsai_convert.lowbit import GROUP_SIZE
from bonsai_convert.manifest import load_manifest, safe_relative
from bonsai_convert.safetensors_io import DTYPE_SIZES, SafetensorsFile, TensorSpec, build_header, read_header

TIME_LIMIT_S = 5.0
MEMORY_LIMIT_BYTES = 64 << 20  # every input here is < 1 MB: anything near this is an allocation from a claim
CI = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
_WORK = Path(tempfile.mkdtemp(prefix="bonsai-fuzz-"))
atexit.register(shutil.rmtree, _WORK, True)


class Hang(BaseException):
    """An example ran past TIME_LIMIT_S (BaseException: no reader may swallow it)."""


@contextlib.contextmanager
def bounded(label: str) -> Iterator[None]:
    """Fail on a hang (SIGALRM) or a peak Python/numpy allocation above MEMORY_LIMIT_BYTES."""

    def alarm(signum, frame):
        raise Hang(f"{label}: ran past {TIME_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    tracemalloc.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT_BYTES, f"{label}: allocated {peak} bytes"


_COUNTER = iter(range(1 << 62))


@contextlib.contextmanager
def scratch_file(name: str, data: bytes) -> Iterator[Path]:
    """A fresh file holding data, removed afterwards (a new name each time: no memory map sees it rewritten)."""
    path = _WORK / f"{next(_COUNTER)}-{name}"
    path.write_bytes(data)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------------
# safetensors reader

NAMES = st.sampled_from(["a", "b", "x_embedder.weight", "__metadata__", "", "é", "a" * 300])
DTYPES = st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), st.sampled_from(["Q4", "", "f32", "BF16 "]), st.integers())
DIMS = st.one_of(st.integers(0, 8), st.integers(-3, 2**64), st.sampled_from([True, 1.0, "2", None]))
OFFSETS = st.one_of(st.integers(0, 64), st.integers(-(2**65), 2**65))


@st.composite
def header_entries(draw) -> object:
    """One header entry: mostly well-formed, sometimes any JSON value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(st.none(), st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=3)))
    entry = {
        "dtype": draw(DTYPES),
        "shape": draw(st.one_of(st.lists(DIMS, max_size=4), st.integers(0, 4))),
        "data_offsets": draw(st.one_of(st.lists(OFFSETS, min_size=2, max_size=2), st.lists(OFFSETS, max_size=3))),
    }
    if draw(st.booleans()) and draw(st.booleans()):
        entry.pop(draw(st.sampled_from(sorted(entry))))
    return entry


@st.composite
def structured_files(draw) -> bytes:
    """A header of drawn entries (or metadata), a length prefix that may lie, and some data bytes."""
    header = draw(st.dictionaries(NAMES, header_entries(), max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), st.integers())
        )
    encoded = json.dumps(header).encode()
    encoded += b" " * draw(st.integers(0, 7))
    length = draw(
        st.one_of(st.just(len(encoded)), st.integers(0, 2**64 - 1), st.integers(len(encoded) - 8, len(encoded) + 8))
    )
    data = bytes(draw(st.integers(0, 96)))
    return struct.pack("<Q", max(0, min(length, 2**64 - 1))) + encoded + data


@st.composite
def mutated_files(draw) -> bytes:
    """A valid file with a few bytes flipped, cut or inserted."""
    specs = [TensorSpec("w", draw(st.sampled_from(["F16", "BF16", "F32", "U8"])), (draw(st.integers(0, 4)), 3)),
             TensorSpec("b", "F32", (draw(st.integers(0, 3)),))]  # fmt: skip
    data = bytearray(build_header(specs, {"format": "pt"}) + bytes(sum(s.nbytes for s in specs)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:]
    return bytes(data)


NESTED_HEADERS = st.integers(1, 5000).map(lambda depth: struct.pack("<Q", 2 * depth) + b"[" * depth + b"]" * depth)
SAFETENSORS_FILES = st.one_of(st.binary(max_size=256), structured_files(), mutated_files(), NESTED_HEADERS)


def check_safetensors(data: bytes) -> None:
    """read_header refuses with InputError or returns a header that obeys the safetensors rules; tensors then load."""
    with scratch_file("fuzz.safetensors", data) as path, bounded("read_header"):
        try:
            handle = SafetensorsFile(path)
        except InputError as error:
            assert str(path) in str(error)
            return
        (header_length,) = struct.unpack("<Q", data[:8])
        position = 8 + header_length
        for info in sorted(handle.tensors.values(), key=lambda i: i.begin):
            assert info.begin == position and info.end >= info.begin
            assert info.nbytes == int(np.prod(info.shape, dtype=object)) * DTYPE_SIZES[info.dtype]
            position = info.end
            try:
                values = handle.load(info.name)
            except InputError:  # dtypes numpy cannot hold (F8) are refused, by name
                continue
            assert tuple(values.shape) == info.shape
        assert position == len(data)


@CI
@given(SAFETENSORS_FILES)
def test_safetensors_reader(data: bytes) -> None:
    check_safetensors(data)


# ------------------------------------------------------------------------------------------------------------
# JSON files (config, index, pipeline, profile-like) and the manifest

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)
JSON_BYTES = st.one_of(
    st.binary(max_size=128),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.sampled_from(
        [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1, "a": 2}', b"\xef\xbb\xbf{}", b'{"a": 1' + b"0" * 5000 + b"}"]
    ),
)


def check_json(data: bytes) -> None:
    """read_json returns a dict equal to the standard parse, or refuses with InputError naming the file."""
    with scratch_file("fuzz.json", data) as path, bounded("read_json"):
        try:
            value = read_json(path)
        except InputError as error:
            assert str(path) in str(error)
            return
    assert isinstance(value, dict) and value == json.loads(data.decode("utf-8"))


@CI
@given(JSON_BYTES)
def test_json_reader(data: bytes) -> None:
    check_json(data)


MANIFEST_TEMPLATE = {
    "format_version": 2,
    "tool": {"name": "bonsai-convert", "version": "0.1.0", "dependencies": {}},
    "target": "packed",
    "profile": {"name": "packed", "memory_budget_bytes": 0, "default_width": 1024, "default_height": 1024},
    "variant": "ternary",
    "exact": True,
    "quantize": None,
    "base_model": "black-forest-labs/FLUX.2-klein-4B",
    "transformer_only": True,
    "source": {"label": "demo", "kind": "transformer-only", "files": []},
    "files": [{"path": "pipeline.json", "bytes": 2, "sha256": "0" * 64}],
    "components": {"transformer": {"bytes": 0}},
    "payload": {"bytes": 0, "fp16_bytes": 0, "reduction": None},
    "total_bytes": 0,
    "bits_per_weight": {"low_bit_linears": 0.0, "transformer": 0.0},
    "weights": {"low_bit": 0, "transformer": 0},
    "low_bit_tensors": 0,
    "weight_digests": {},
    "golden": None,
    "memory": None,
    "layout": {"folders": {"transformer": "transformer"}, "dense_dtype": "F16", "released_loaders": False},
}
HOSTILE_PATHS = st.sampled_from(
    ["../x", "/etc/passwd", "a/../../b", "a\\..\\b", "", "a//b", "a/", "..", "~/.ssh/id_rsa", "C:/x", "a\x00b",
     "\u2024\u2024/x", "x" * 600, "transformer/../../../etc", "golden/./golden.json"]
)  # fmt: skip


@st.composite
def manifests(draw) -> bytes:
    """The template with one field replaced by a hostile path or any JSON value, or random bytes."""
    if draw(st.integers(0, 5)) == 0:
        return draw(JSON_BYTES)
    manifest = json.loads(json.dumps(MANIFEST_TEMPLATE))
    where = draw(st.sampled_from(["files.path", "golden", "files", "top", "extra"]))
    value = draw(st.one_of(HOSTILE_PATHS, JSON_VALUES))
    if where == "files.path":
        manifest["files"].append({"path": value, "bytes": 1, "sha256": "a" * 64})
    elif where == "golden":
        manifest["golden"] = value
    elif where == "files":
        manifest["files"] = value
    elif where == "top":
        manifest[draw(st.sampled_from(sorted(MANIFEST_TEMPLATE)))] = value
    else:
        manifest[draw(st.text(max_size=5))] = value
    return json.dumps(manifest).encode()


def check_manifest(data: bytes) -> None:
    """load_manifest refuses with InputError, or every path it hands out stays inside the bundle."""
    bundle = _WORK / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_bytes(data)
    with bounded("load_manifest"):
        try:
            manifest = load_manifest(bundle)
        except InputError:
            return
    for entry in manifest["files"]:
        assert safe_relative(entry["path"]) and ".." not in entry["path"].split("/")
    assert manifest["golden"] is None or safe_relative(manifest["golden"])


def test_manifest_template_is_valid() -> None:
    """The fuzzing template passes load_manifest (else update it to the manifest schema)."""
    check_manifest(json.dumps(MANIFEST_TEMPLATE).encode())
    assert load_manifest(_WORK / "bundle")["files"][0]["path"] == "pipeline.json"


@CI
@given(manifests())
def test_manifest_reader(data: bytes) -> None:
    check_manifest(data)


# ------------------------------------------------------------------------------------------------------------
# Codecs: well-shaped containers of arbitrary content (what the validated readers hand them)

ROWS = st.integers(1, 6)
GROUPS = st.integers(1, 3)
ANY_FP16 = hnp.from_dtype(np.dtype(np.float16), allow_nan=True, allow_infinity=True)


@st.composite
def packed_inputs(draw) -> tuple[np.ndarray, int, str]:
    variant = draw(st.sampled_from(["binary", "ternary"]))
    in_features = draw(st.integers(1, 400))
    columns = packed_codec.code_bytes_per_row(in_features, variant)
    return draw(hnp.arrays(np.uint8, (draw(ROWS), columns))), in_features, variant


def check_packed(case: tuple[np.ndarray, int, str]) -> None:
    """Any bytes decode to codes of the variant's alphabet and shape (bytes > 242 are flagged, not decoded)."""
    raw, in_features, variant = case
    with bounded("packed.decode"):
        codes = packed_codec.decode(raw, in_features, variant)
    assert codes.dtype == np.int8 and codes.shape == (raw.shape[0], in_features)
    assert set(np.unique(codes)) <= ({-1, 1} if variant == "binary" else {-1, 0, 1})
    if variant == "binary" or not packed_codec.invalid_ternary_bytes(raw).any():
        full = in_features // (8 if variant == "binary" else 5)  # the bytes holding no padding round-trip
        assert np.array_equal(packed_codec.encode(codes, variant)[:, :full], raw[:, :full])


@CI
@given(packed_inputs())
def test_packed_decoder(case) -> None:
    check_packed(case)


@st.composite
def mlx_inputs(draw) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    variant = draw(st.sampled_from(["binary", "ternary"]))
    rows, groups = draw(ROWS), draw(GROUPS)
    words = groups * GROUP_SIZE * mlx_codec.BITS[variant] // 32
    weight = draw(hnp.arrays(np.uint32, (rows, words)))
    biases = draw(hnp.arrays(np.float16, (rows, groups), elements=ANY_FP16))
    if draw(st.booleans()):  # consistent scales, so decoding gets past the scale check
        s = (-biases).astype(np.float16)
        scales = (s * np.float16(2)).astype(np.float16) if variant == "binary" else s
    else:
        scales = draw(hnp.arrays(np.float16, (rows, groups), elements=ANY_FP16))
    return weight, scales, biases, variant


def check_mlx(case: tuple[np.ndarray, np.ndarray, np.ndarray, str]) -> None:
    """Any words/scales/biases: ValueError, or codes in the alphabet with the scales' shape."""
    weight, scales, biases, variant = case
    with bounded("mlx.decode"):
        try:
            codes, s = mlx_codec.decode(weight, scales, biases, variant)
        except ValueError:
            return
    assert codes.dtype == np.int8 and codes.shape == (weight.shape[0], scales.shape[1] * GROUP_SIZE)
    assert set(np.unique(codes)) <= ({-1, 1} if variant == "binary" else {-1, 0, 1}) and s.shape == scales.shape


@CI
@given(mlx_inputs())
def test_mlx_decoder(case) -> None:
    check_mlx(case)


ANY_ARRAY = hnp.arrays(
    st.sampled_from([np.int32, np.float16, np.float32, np.uint8, np.int64]),
    hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=6),
)


@st.composite
def gemlite_states(draw) -> dict[str, np.ndarray]:
    """A real encoded layer with one tensor replaced, one metadata field changed, or a tensor dropped."""
    variant = draw(st.sampled_from(["binary", "ternary"]))
    rows, groups = draw(ROWS), draw(GROUPS)
    values = [-1, 1] if variant == "binary" else [-1, 0, 1]
    codes = draw(hnp.arrays(np.int8, (rows, groups * GROUP_SIZE), elements=st.sampled_from(values)))
    scales = draw(hnp.arrays(np.float16, (rows, groups), elements=st.floats(-100, 100, width=16)))
    state = gemlite.encode(codes, scales, variant)
    action = draw(st.sampled_from(["replace", "metadata", "orig_shape", "drop", "random_words"]))
    key = draw(st.sampled_from(gemlite.STORED_LAYER_KEYS))
    if action == "replace":
        state[key] = draw(ANY_ARRAY)
    elif action == "metadata":
        metadata = state["metadata"].copy()
        metadata[draw(st.integers(0, 11))] = draw(st.integers(-(2**31), 2**31 - 1))
        state["metadata"] = metadata
    elif action == "orig_shape":
        state["orig_shape"] = np.array(draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=2, max_size=2)),
                                       dtype=np.int32)  # fmt: skip
    elif action == "drop":
        state.pop(key)
    else:
        state["W_q"] = draw(hnp.arrays(np.int32, state["W_q"].shape))
    return state


def check_gemlite(state: dict[str, np.ndarray]) -> None:
    """Any state: InputError/ValueError, or codes in the alphabet shaped [out, in] with matching scales."""
    with bounded("gemlite.decode"):
        try:
            codes, scales = gemlite.decode(state)
        except (InputError, ValueError):
            return
    assert codes.dtype == np.int8 and codes.ndim == 2 and scales.shape == (codes.shape[0], codes.shape[1] // 128)
    assert set(np.unique(codes)) <= {-1, 0, 1}


@CI
@given(gemlite_states())
def test_gemlite_decoder(state) -> None:
    check_gemlite(state)


# ------------------------------------------------------------------------------------------------------------
# BFL single files: random FLUX-like key sets (the config is inferred from shapes, so odd sets must be refused)

BFL_KEYS = st.sampled_from(
    ["img_in.weight", "txt_in.weight", "double_blocks.0.img_mlp.0.weight", "double_blocks.1.img_attn.qkv.weight",
     "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "single_blocks.3.linear2.weight",
     "final_layer.adaLN_modulation.1.weight", "guidance_in.in_layer.weight", "model.diffusion_model.img_in.weight",
     "double_blocks.x.img_mlp.0.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight"]
)  # fmt: skip


@st.composite
def bfl_files(draw) -> bytes:
    keys = draw(st.sets(BFL_KEYS, min_size=1, max_size=8))
    if draw(st.booleans()):
        keys |= {"img_in.weight", "txt_in.weight"}
    shapes = {key: tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 128, 256]), max_size=3))) for key in keys}
    specs = [TensorSpec(key, "F16", shape) for key, shape in shapes.items()]
    return build_header(specs, {"format": "pt"}) + bytes(sum(spec.nbytes for spec in specs))


def check_bfl(data: bytes) -> None:
    """open_source on a BFL-looking single file: a Source, or InputError naming the file."""
    import diffusers.loaders.single_file_utils  # noqa: F401 - imported outside the time and memory limits
    import torch  # noqa: F401

    from bonsai_convert.sources import open_source

    with scratch_file("bfl.safetensors", data) as path:
        read_header(path)  # the generator writes valid files: only the FLUX.2 checks may refuse
        with bounded("open_source(bfl)"):
            try:
                open_source(str(path))
            except InputError as error:
                assert str(path) in str(error) or "tensor" in str(error)


@settings(CI, max_examples=40)
@given(bfl_files())
def test_bfl_reader(data: bytes) -> None:
    check_bfl(data)


# ------------------------------------------------------------------------------------------------------------
# Codec contracts beyond the readers' guarantees (shapes and dtypes that only a buggy caller passes)


@st.composite
def misshapen_codec_calls(draw) -> tuple[str, tuple]:
    """A decode call on arbitrary arrays: (codec, its arguments)."""
    array = draw(ANY_ARRAY)
    other = draw(ANY_ARRAY)
    variant = draw(st.sampled_from(["binary", "ternary", "quaternary"]))
    codec = draw(st.sampled_from(["packed", "mlx"]))
    if codec == "packed":
        return codec, (array, draw(st.integers(-8, 64)), variant)
    return codec, (array, other, other, variant)


DECODERS = {"packed": packed_codec.decode, "mlx": mlx_codec.decode}


def well_formed_shape(codec: str, args: tuple) -> tuple[int, int] | None:
    """The codes shape a well-formed call decodes to, or None for a misshapen call (which must raise ValueError)."""
    if codec == "packed":
        array, in_features, variant = args
        fits = (
            variant in ("binary", "ternary")
            and array.dtype == np.uint8
            and array.ndim == 2
            and in_features >= 1
            and array.shape[1] == packed_codec.code_bytes_per_row(in_features, variant)
        )
        return (array.shape[0], in_features) if fits else None
    weight, scales, _, variant = args
    bits = {"binary": 1, "ternary": 2}.get(variant)
    fits = (
        bits is not None
        and weight.dtype == np.uint32
        and weight.ndim == 2
        and scales.ndim == 2
        and scales.shape[0] == weight.shape[0]
        and scales.shape[1] >= 1
        and weight.shape[1] * 32 == scales.shape[1] * 128 * bits
    )
    return (weight.shape[0], scales.shape[1] * 128) if fits else None


@settings(CI, max_examples=200)
@given(misshapen_codec_calls())
def test_codecs_refuse_misshapen_arrays_with_value_error(call) -> None:
    """A misshapen call raises ValueError (nothing else); whatever a codec accepts is well formed and decodes to
    codes of the declared shape in {-1, 0, +1}."""
    codec, args = call
    with bounded("decode"):
        try:
            result = DECODERS[codec](*args)
        except ValueError:
            return
    expected = well_formed_shape(codec, args)
    assert expected is not None, f"{codec}.decode accepted a misshapen call: {[getattr(a, 'shape', a) for a in args]}"
    codes = result if codec == "packed" else result[0]
    assert codes.shape == expected and set(np.unique(codes).tolist()) <= {-1, 0, 1}


def test_the_misshapen_property_tells_well_formed_calls_apart() -> None:
    """The predicate above is not vacuous: a real packed row is well formed and decodes; one byte short is not."""
    codes = np.array([[1, -1] * 64], dtype=np.int8)
    packed = packed_codec.encode(codes, "binary")
    assert well_formed_shape("packed", (packed, 128, "binary")) == (1, 128)
    assert packed_codec.decode(packed, 128, "binary").shape == (1, 128)
    assert well_formed_shape("packed", (packed[:, :-1], 128, "binary")) is None
    with pytest.raises(ValueError):
        packed_codec.decode(packed[:, :-1], 128, "binary")


# ------------------------------------------------------------------------------------------------------------
# For scripts/fuzz.py: name → (strategy, check)

TARGETS: dict[str, tuple[st.SearchStrategy, Callable[[object], None]]] = {
    "safetensors": (SAFETENSORS_FILES, check_safetensors),
    "json": (JSON_BYTES, check_json),
    "manifest": (manifests(), check_manifest),
    "packed": (packed_inputs(), check_packed),
    "mlx": (mlx_inputs(), check_mlx),
    "gemlite": (gemlite_states(), check_gemlite),
    "bfl": (bfl_files(), check_bfl),
}
