"""`pack`: source reader → codec → target writer → bundle + manifest, streaming one tensor at a time."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels
from .atomic import atomic_folder
from .description import describe, transformer_shapes_of  # noqa: F401 - transformer_shapes_of re-exported
from .dtypes import widen, widen_bf16_rows
from .errors import FitError, InputError, UsageError
from .files import SourceHasher, known_sha256, remember_sha256
from .gguf_io import GGUFFileWriter
from .layout import (
    DEFAULT_GOLDEN_PROMPT,
    BundleLayout,
    ComponentLayout,
    bundle_layout,
    json_bytes,
    make_target,
)
from .lowbit import (
    LowBitTensor,
    dense_from_codes,
    needs_ternary,
    quantize_absmean,
    split_exact,
    split_exact_stored,
    to_fp16,
)
from .profiles import profile_for
from .safetensors_io import PositionalHashingWriter, SafetensorsFile, SafetensorsWriter
from .sources import (
    GemliteTextEncoder,
    QuantizedTextEncoder,
    Source,
    component_tensors,
    open_source,
    quantized_text_encoder,
)
from .targets.base import Target, encode_dense, encode_dense_stored
from .torch_zip import TorchZipWriter
from .vocabulary import AUTO_VARIANT, PACK_VARIANTS, QUANTIZERS, TARGETS

ROWS_PER_CHUNK = 2048  # rows of a low-bit weight converted at once (bounds memory for 27648 x 3072 tensors)
PACK_THREADS = 2


@dataclass
class PackOptions:
    target: str
    variant: str = AUTO_VARIANT
    quantize: str | None = None
    force: bool = False
    golden: bool = True
    golden_prompt: str = DEFAULT_GOLDEN_PROMPT
    golden_seed: int = 0
    golden_size: int | None = None
    dtype: str | None = None  # dense float dtype: bfloat16 (MLX default) or float16


def weight_digest(tensor: LowBitTensor) -> str:
    """sha256 of the decoded fp16 weight (C order): what verify checks without the source (row chunks).

    The exact split computes it in the same pass (`LowBitTensor.digest`); other tensors are decoded here.
    """
    if tensor.digest is not None:
        return tensor.digest
    digest = hashlib.sha256()
    for start in range(0, tensor.codes.shape[0], ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        digest.update(np.ascontiguousarray(dense_from_codes(tensor.codes[rows], tensor.scales[rows])).tobytes())
    return digest.hexdigest()


class VariantResolver:
    """Decides the variant from the first low-bit tensor (auto) and holds every later tensor to it."""

    def __init__(self, requested: str, quantize: str | None, stored_variant: str | None):
        self.variant = None if requested == AUTO_VARIANT else requested
        self.quantize = quantize
        if stored_variant:
            if self.variant == "binary" and stored_variant == "ternary":
                raise UsageError("--variant binary: the packed source is ternary")
            self.variant = self.variant or stored_variant
        if quantize and self.variant is None:
            raise UsageError("--quantize absmean needs --variant binary or ternary")

    def split(
        self,
        name: str,
        weight_rows: Callable[[int, int], np.ndarray],
        rows: int,
        stored_rows: tuple[Callable[[int, int], np.ndarray], str] | None = None,
        reuse_buffers: bool = False,
    ) -> LowBitTensor:
        """Split a weight (read in row chunks) into codes and scales under the resolved variant.

        stored_rows (a reader of the stored values and their safetensors dtype) takes the fused compiled split,
        which also hashes the decoded weight as it goes (`LowBitTensor.digest`, the manifest's weight digest).
        reuse_buffers: the codes live in this thread's scratch buffer (valid until the thread's next split).
        """
        variant = self.variant or "ternary"
        fused = stored_rows is not None and not self.quantize
        digest = hashlib.sha256() if fused else None
        codes = scales = None
        for start in range(0, rows, ROWS_PER_CHUNK):
            stop = min(rows, start + ROWS_PER_CHUNK)
            if fused:
                read, stored_dtype = stored_rows
                stored = read(start, stop)
                if codes is None:  # written in place by the kernel: no per-chunk arrays, no copies
                    shape, groups = (rows, stored.shape[1]), (rows, stored.shape[1] // 128)
                    codes = kernels.scratch("codes", shape, np.int8) if reuse_buffers else np.empty(shape, np.int8)
                    scales = np.empty(groups, dtype=np.float16)
                decoded = kernels.scratch("decoded", stored.shape, np.uint16)
                out = (codes[start:stop], scales[start:stop].view(np.uint16), decoded)
                split_exact_stored(name, stored, stored_dtype, variant, out=out)
                digest.update(decoded)
                continue
            if self.quantize:
                part = quantize_absmean(name, weight_rows(start, stop), variant)
            else:
                part = split_exact(name, weight_rows(start, stop), variant)
            if codes is None:  # filled in place: no list of chunks and no concatenated copy
                codes = np.empty((rows, part.codes.shape[1]), dtype=np.int8)
                scales = np.empty((rows, part.scales.shape[1]), dtype=np.float16)
            codes[start:stop] = part.codes
            scales[start:stop] = part.scales
        tensor = LowBitTensor(name, codes, scales, digest.hexdigest() if digest else None)
        if self.variant is None:
            self.variant = "ternary" if needs_ternary(tensor.codes) else "binary"
        return tensor


def _open_writers(root: Path, layout: ComponentLayout) -> dict[str, PositionalHashingWriter]:
    writers = {}
    for shard_file in layout.shards:
        path = root / shard_file.path
        path.parent.mkdir(parents=True, exist_ok=True)
        specs = [p.spec for p in shard_file.tensors]
        if shard_file.gguf is not None:
            writer: PositionalHashingWriter = GGUFFileWriter(path, specs, shard_file.gguf)
        elif shard_file.container == "torch-zip":
            writer = TorchZipWriter(path, specs, shard_file.metadata, shard_file.modules)
        else:
            writer = SafetensorsWriter(path, specs, shard_file.metadata)
        for planned in shard_file.tensors:
            writers[planned.spec.name] = writer
    return writers


def _close_component(root: Path, layout: ComponentLayout, writers: dict[str, PositionalHashingWriter]) -> None:
    for writer in {id(w): w for w in writers.values()}.values():
        writer.close()
        if writer.sha256 is not None:  # hashed as it was written: the manifest does not read the file again
            remember_sha256(writer.path, writer.sha256)
    index = layout.index_bytes()
    if index is not None and layout.index_path:
        (root / layout.index_path).write_bytes(index)


def _fill_component(root: Path, layout: ComponentLayout, writers: dict[str, PositionalHashingWriter], fill) -> None:
    """Run fill(); if it fails, abort every file of the component (no partial file), else close them and write
    the index."""
    try:
        fill()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    _close_component(root, layout, writers)


def _write_dense_component(
    root: Path,
    layout: ComponentLayout,
    files: dict[str, SafetensorsFile],
    encode: Callable,
    tick: Callable,
    row_separable: Callable[[str], bool] = lambda name: True,
    encode_stored: Callable | None = None,
) -> None:
    """Write a text encoder / VAE tensor by tensor on PACK_THREADS threads; big 2-D tensors in row chunks when
    their encoding allows. A tensor that stays dense (one float output of its own name) is converted from its
    stored values by `encode_dense_stored` (what `encode` does to the widened values, in one compiled pass), and
    one the target encodes from its stored bf16/fp16 patterns (`encode_stored`, e.g. the 4-bit text encoder) is
    never widened. A tensor that must be widened and encoded whole holds `whole_tensor` while it does, so two of
    them never sit in memory together."""
    writers = _open_writers(root, layout)
    whole_tensor = threading.Lock()

    def convert(source_name: str) -> None:
        handle = files[source_name]
        info = handle.tensors[source_name]
        shape = info.shape
        outputs = layout.outputs_of[source_name]
        dense = (
            len(outputs) == 1
            and outputs[0].spec.name == source_name
            and outputs[0].spec.dtype in ("F16", "BF16")
            and info.dtype in ("BF16", "F16")
        )
        from_stored = encode_stored is not None and info.dtype in ("BF16", "F16")

        def rows_of(start: int, stop: int) -> dict[str, np.ndarray]:
            stored = handle.raw(source_name)[start:stop]  # a view of the mapped file: read once, by the kernel
            if dense:
                out = kernels.scratch("dense", stored.shape, np.uint16)
                encoded = encode_dense_stored(source_name, stored, info.dtype, outputs[0].spec.dtype, out)
                return {source_name: encoded}
            encoded = encode_stored(source_name, stored, info.dtype) if from_stored and stored.ndim == 2 else None
            if encoded is not None:
                return encoded
            if info.dtype == "BF16" and stored.ndim == 2:  # widened into a reused buffer
                return encode(source_name, widen_bf16_rows(stored))
            return encode(source_name, handle.load_rows(source_name, start, stop))

        def whole() -> dict[str, np.ndarray]:
            stored = handle.raw(source_name)
            encoded = encode_stored(source_name, stored, info.dtype) if from_stored and stored.ndim == 2 else None
            if encoded is not None:  # its working set is the codes, never the widened tensor: no lock
                return encoded
            with whole_tensor if len(shape) == 2 and shape[0] > ROWS_PER_CHUNK else contextlib.nullcontext():
                return encode(source_name, handle.load(source_name))

        if len(shape) == 2 and shape[0] > ROWS_PER_CHUNK and (dense or row_separable(source_name)):
            # e.g. Qwen3-4B's 151936 x 2560 embedding: never widened to fp32 whole
            for start in range(0, shape[0], ROWS_PER_CHUNK):
                for name, array in rows_of(start, min(shape[0], start + ROWS_PER_CHUNK)).items():
                    writers[name].write_rows(name, array, start)
        elif dense and shape:
            writers[source_name].write(source_name, rows_of(0, shape[0])[source_name])
        else:
            for name, array in whole().items():
                writers[name].write(name, array)
        tick()

    def fill() -> None:
        with ThreadPoolExecutor(PACK_THREADS) as pool:
            for future in [pool.submit(convert, name) for name in sorted(layout.outputs_of)]:
                future.result()

    _fill_component(root, layout, writers, fill)


def stored_reader(tensor) -> tuple[Callable[[int, int], np.ndarray], str] | None:
    """Rows of a source tensor as stored (bf16 as uint16 bits, no widening) and its dtype; None if not float."""
    dtype = tensor.file.tensors[tensor.key].dtype
    if dtype not in ("BF16", "F16", "F32") or not tensor.shape:
        return None

    def read(start: int, stop: int) -> np.ndarray:  # a read-only view of the mapped file where it can be
        raw = tensor.file.raw(tensor.key)
        return raw[start:stop] if tensor.rows is None else np.array(raw[list(tensor.rows[start:stop])])

    return read, dtype


def _write_prequantized_text_encoder(
    root: Path,
    layout: ComponentLayout,
    reader: QuantizedTextEncoder | GemliteTextEncoder,
    target: Target,
    tick: Callable,
) -> None:
    """An MLX pack's 4-bit text encoder: carried unchanged where the target stores the same tensors (MLX
    targets), else dequantized and encoded by the target (formats/bundle.md says what that costs)."""
    writers = _open_writers(root, layout)

    def fill() -> None:
        for name in sorted(layout.outputs_of):
            planned = {p.spec.name: p.spec.dtype for p in layout.outputs_of[name]}
            shapes = {p.spec.name: p.spec.shape for p in layout.outputs_of[name]}
            stored = reader.stored(name)
            if (
                target.carries_quantized_text_encoder == reader.format
                and len(stored) > 1
                and set(stored) == set(planned)
                and all(tuple(value.shape) == shapes[key] for key, value in stored.items())  # e.g. HQQ group 64
            ):
                outputs = {key: _as_dtype(key, value, planned[key]) for key, value in stored.items()}
            else:
                outputs = target.encode_text_encoder(name, reader.load(name))
            for key, array in outputs.items():
                writers[key].write(key, array)
            tick()

    _fill_component(root, layout, writers, fill)


def _as_dtype(name: str, stored: np.ndarray, dtype: str) -> np.ndarray:
    """A stored tensor (bf16 as bits) in the planned dtype: unchanged, or bf16 → fp16 (refused if inexact)."""
    if dtype != "F16" or stored.dtype != np.uint16:
        return stored
    values = widen(stored, "BF16")
    result = to_fp16(name, values)
    if not np.array_equal(result.astype(np.float32), values):
        raise InputError(f"{name}: a bf16 value is not exact in fp16 (pack without --dtype float16)")
    return result


def write_dense_rows(writer: PositionalHashingWriter, tensor, float_dtype: str = "F16") -> None:
    """Stream a dense tensor in row chunks (a 18432 x 3072 modulation never sits in memory whole)."""
    stored = stored_reader(tensor)

    def encoded(start: int, stop: int) -> np.ndarray:
        if stored is None:
            return encode_dense(tensor.name, tensor.load_rows(start, stop), float_dtype)
        read, dtype = stored
        return encode_dense_stored(tensor.name, read(start, stop), dtype, float_dtype)

    if len(tensor.shape) < 2:
        writer.write(tensor.name, encoded(0, tensor.shape[0] if tensor.shape else 1))
        return
    for start in range(0, tensor.shape[0], ROWS_PER_CHUNK):
        stop = min(tensor.shape[0], start + ROWS_PER_CHUNK)
        writer.write_rows(tensor.name, encoded(start, stop), start)


def write_transformer(
    root: Path, source: Source, target: Target, resolver: VariantResolver, lay_out: Callable, tick: Callable
) -> tuple[str, BundleLayout, dict[str, str]]:
    """Stream every transformer tensor through the codec into its planned file; return variant, layout, digests.

    lay_out(variant) gives the bundle layout; it is called once the first low-bit tensor has fixed the variant.
    """
    digests: dict[str, str] = {}
    low_bit = [t for t in source.tensors if t.low_bit]
    first = low_bit[0] if low_bit else None

    def low_bit_tensor(tensor, reuse_buffers: bool = False) -> LowBitTensor:
        if source.stored_variant is not None:  # the source stores codes: decoded, never re-split
            decoded = source.read_low_bit(tensor)
            assert isinstance(decoded, LowBitTensor)
            return decoded
        return resolver.split(tensor.name, tensor.load_rows, tensor.shape[0], stored_reader(tensor), reuse_buffers)

    # The first low-bit tensor fixes the variant (auto) before anything is laid out.
    first_tensor = low_bit_tensor(first) if first else None
    variant = resolver.variant or "binary"
    bundle = lay_out(variant)
    layout = bundle.components["transformer"]
    writers = _open_writers(root, layout)

    def convert(tensor) -> None:
        if tensor.low_bit:
            lowbit = first_tensor if tensor is first else low_bit_tensor(tensor, reuse_buffers=True)
            digests[tensor.name] = weight_digest(lowbit)
            outputs = target.encode_low_bit(lowbit, variant)
        else:
            write_dense_rows(writers[tensor.name], tensor, target.dense_dtype)
            outputs = {}
        for name, array in outputs.items():
            writers[name].write(name, array)
        tick()

    def fill() -> None:
        # Two worker threads: numpy releases the GIL in the heavy loops. Output bytes do not depend on the
        # order (every tensor has a fixed offset), so the bundle stays byte-identical.
        nonlocal first_tensor
        if first is not None:  # written (and freed) before the pool starts: never held beside two others
            convert(first)
            first_tensor = None
        with ThreadPoolExecutor(PACK_THREADS) as pool:
            for future in [pool.submit(convert, tensor) for tensor in source.tensors if tensor is not first]:
                future.result()

    _fill_component(root, layout, writers, fill)
    return variant, bundle, dict(sorted(digests.items()))


def copy_file(source_path: Path, destination: Path) -> None:
    """Copy a tokenizer/scheduler/licence file as it is (no symlinks, no pickles)."""
    if source_path.suffix in (".bin", ".pt", ".pkl", ".pth", ".ckpt"):
        raise InputError(f"{source_path}: pickle-based files are refused")
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source_path, destination)


def check_fit(model, source: Source, options: PackOptions, profile: dict) -> dict | None:
    """Memory estimate at the profile's default size; a bundle over the device budget needs --force."""
    from .plan import plan

    if profile["memory_budget_bytes"] == 0 or source.transformer_only:
        return None
    variant = source.stored_variant or (options.variant if options.variant != AUTO_VARIANT else "ternary")
    memory = plan(
        model,
        options.target,
        variant,
        profile["default_width"],
        profile["default_height"],
        golden=options.golden,
        dense_dtype=options.dtype,
    )["memory"]
    if not memory["fits"] and not options.force:
        raise FitError(
            f"{source.label}: needs an estimated {memory['peak_bytes'] / 1e9:.2f} GB at "
            f"{memory['width']}x{memory['height']}, over the {profile['name']} budget of "
            f"{memory['budget_bytes'] / 1e9:.2f} GB (use --force to write it anyway)"
        )
    return memory


def _files_to_hash(source_spec: str) -> list[Path]:
    """Regular files of a source folder (or the file itself), without following links; [] for anything else."""
    path = Path(source_spec)
    try:
        if path.is_file() and not path.is_symlink():
            return [path]
        if not path.is_dir() or path.is_symlink():
            return []
        found = []
        for folder, _, names in os.walk(path):
            for name in sorted(names):
                candidate = Path(folder) / name
                if candidate.is_file() and not candidate.is_symlink():
                    found.append(candidate)
        return sorted(found)
    except OSError:
        return []


def use_mmap_for_large_arrays() -> None:
    """Keep peak memory flat across many tensors (glibc only; elsewhere a no-op).

    glibc's malloc raises its mmap threshold after large frees and then serves big numpy arrays from per-thread
    heaps, which fragment: RSS then grows with the number of tensors packed. A fixed 1 MiB threshold makes every
    large array its own mapping, returned to the OS when freed.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return


def pack(source_spec: str, out: Path, options: PackOptions, progress=None) -> dict:
    """Pack SOURCE into a bundle at OUT for options.target (executing its layout); return the manifest."""
    use_mmap_for_large_arrays()
    if options.variant not in PACK_VARIANTS:
        raise UsageError(f"--variant {options.variant}: choose auto, binary or ternary")
    if options.quantize not in (None, *QUANTIZERS):
        raise UsageError(f"--quantize {options.quantize}: choose one of {', '.join(QUANTIZERS)}")
    if options.target not in TARGETS:
        raise UsageError(f"--target {options.target}: choose one of {', '.join(TARGETS)}")
    if options.dtype not in (None, "bfloat16", "float16"):
        raise UsageError(f"--dtype {options.dtype}: choose bfloat16 or float16")
    target = make_target(options.target, options.dtype)
    profile = profile_for(options.target)
    collecting = gc.isenabled()
    gc.disable()  # pack makes no reference cycles worth a collection; the collector cost ~10% of a pack's CPU
    try:
        with known_sha256():
            # Hash the source's files from the start, while the libraries load and the source is validated.
            hasher = SourceHasher(_files_to_hash(source_spec))
            try:
                source = open_source(source_spec)
                hasher.add(list(source.files))
                return _pack_source(source, source_spec, out, options, target, profile, progress)
            finally:
                hasher.close()
    finally:
        if collecting:
            gc.enable()


def _pack_source(source: Source, source_spec: str, out: Path, options: PackOptions, target, profile, progress) -> dict:
    from .golden import write_golden
    from .manifest import build_manifest

    model = describe(source)
    resolver = VariantResolver(options.variant, options.quantize, source.stored_variant)
    tick = progress.tick if progress else (lambda: None)
    memory = check_fit(model, source, options, profile)

    def lay_out(variant: str) -> BundleLayout:
        return bundle_layout(
            model,
            target,
            variant,
            profile,
            golden=options.golden,
            golden_prompt=options.golden_prompt,
            golden_seed=options.golden_seed,
            golden_size=options.golden_size,
        )

    if progress:
        planned = lay_out(source.stored_variant or "binary")
        total = sum(len(c.outputs_of) for c in planned.components.values())
        progress.start(f"packing {source_spec} → {options.target}", total)
    with atomic_folder(out, options.force) as root:
        variant, bundle, digests = write_transformer(root, source, target, resolver, lay_out, tick)
        if "text_encoder" in bundle.components and source.text_encoder_prequantized:
            reader = quantized_text_encoder(source.components["text_encoder"])
            _write_prequantized_text_encoder(root, bundle.components["text_encoder"], reader, target, tick)
        elif "text_encoder" in bundle.components:
            _, te_files = component_tensors(source.components["text_encoder"])
            _write_dense_component(
                root,
                bundle.components["text_encoder"],
                te_files,
                target.encode_text_encoder,
                tick,
                target.text_encoder_row_separable,
                target.encode_text_encoder_stored,
            )
        if "vae" in bundle.components:
            _, vae_files = component_tensors(source.components["vae"])

            def encode_vae(name: str, values: np.ndarray) -> dict[str, np.ndarray]:
                return {name: encode_dense(name, values, target.dense_dtype)}

            _write_dense_component(root, bundle.components["vae"], vae_files, encode_vae, tick)
        for path, copied in bundle.copies:
            assert copied.path is not None
            copy_file(copied.path, root / path)
        golden_json = None
        if bundle.golden is not None:
            if progress:
                progress.message("golden record: running the reference pipeline on the source weights")
            gc.enable()  # the reference pipeline builds models: let the collector run again
            golden_json = write_golden(root, source, target, bundle.golden, options.golden_prompt, options.golden_seed)
        for path, value in bundle.json_files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(json_bytes(value))
        manifest = build_manifest(
            root, source, options, variant, profile, digests, golden_json, memory, model, target.dense_dtype
        )
    if progress:
        progress.done()
    return manifest
