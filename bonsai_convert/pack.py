"""`pack`: source reader → codec → target writer → bundle + manifest, streaming one tensor at a time."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_folder
from .errors import FitError, InputError, UsageError
from .layout import (
    ComponentLayout,
    json_bytes,
    kept_text_encoder_tensors,
    make_target,
    text_encoder_layout,
    transformer_layout,
    vae_layout,
)
from .lowbit import VARIANTS, LowBitTensor, dense_from_codes, needs_ternary, quantize_absmean, split_exact
from .profiles import profile_for
from .safetensors_io import SafetensorsFile, SafetensorsWriter
from .source import Source, component_tensors, open_source, read_json, safe_files_under
from .targets.base import Target, encode_dense

ROWS_PER_CHUNK = 2048  # rows of a low-bit weight converted at once (bounds memory for 27648 x 3072 tensors)
PACK_THREADS = 2


@dataclass
class PackOptions:
    target: str
    variant: str = "auto"
    quantize: str | None = None
    force: bool = False
    golden: bool = True
    golden_prompt: str = "a bonsai tree on a wooden table, studio light"
    golden_seed: int = 0
    golden_size: int | None = None


def weight_digest(tensor: LowBitTensor) -> str:
    """sha256 of the decoded fp16 weight (C order): what verify checks without the source (row chunks)."""
    digest = hashlib.sha256()
    for start in range(0, tensor.codes.shape[0], ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        digest.update(np.ascontiguousarray(dense_from_codes(tensor.codes[rows], tensor.scales[rows])).tobytes())
    return digest.hexdigest()


class VariantResolver:
    """Decides the variant from the first low-bit tensor (auto) and holds every later tensor to it."""

    def __init__(self, requested: str, quantize: str | None, packed_variant: str | None):
        self.variant = None if requested == "auto" else requested
        self.quantize = quantize
        if packed_variant:
            if self.variant == "binary" and packed_variant == "ternary":
                raise UsageError("--variant binary: the packed source is ternary")
            self.variant = self.variant or packed_variant
        if quantize and self.variant is None:
            raise UsageError("--quantize absmean needs --variant binary or ternary")

    def split(self, name: str, weight_rows: Callable[[int, int], np.ndarray], rows: int) -> LowBitTensor:
        """Split a weight (read in row chunks) into codes and scales under the resolved variant."""
        variant = self.variant or "ternary"
        codes = scales = None
        for start in range(0, rows, ROWS_PER_CHUNK):
            stop = min(rows, start + ROWS_PER_CHUNK)
            chunk = weight_rows(start, stop)
            if self.quantize:
                part = quantize_absmean(name, chunk, variant)
            else:
                part = split_exact(name, chunk, variant)
            if codes is None:  # filled in place: no list of chunks and no concatenated copy
                codes = np.empty((rows, part.codes.shape[1]), dtype=np.int8)
                scales = np.empty((rows, part.scales.shape[1]), dtype=np.float16)
            codes[start:stop] = part.codes
            scales[start:stop] = part.scales
        tensor = LowBitTensor(name, codes, scales)
        if self.variant is None:
            self.variant = "ternary" if needs_ternary(tensor.codes) else "binary"
        return tensor


def _open_writers(root: Path, layout: ComponentLayout) -> dict[str, SafetensorsWriter]:
    writers = {}
    for shard_file in layout.shards:
        path = root / shard_file.path
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = SafetensorsWriter(path, [p.spec for p in shard_file.tensors], shard_file.metadata)
        for planned in shard_file.tensors:
            writers[planned.spec.name] = writer
    return writers


def _close_component(root: Path, layout: ComponentLayout, writers: dict[str, SafetensorsWriter]) -> None:
    for writer in {id(w): w for w in writers.values()}.values():
        writer.close()
    index = layout.index_bytes()
    if index is not None and layout.index_path:
        (root / layout.index_path).write_bytes(index)


def _write_dense_component(
    root: Path,
    layout: ComponentLayout,
    files: dict[str, SafetensorsFile],
    encode: Callable,
    tick: Callable,
    row_separable: Callable[[str], bool] = lambda name: True,
) -> None:
    """Write a text encoder / VAE tensor by tensor; big 2-D tensors in row chunks when their encoding allows."""
    writers = _open_writers(root, layout)
    try:
        for source_name in sorted(layout.outputs_of):
            handle = files[source_name]
            shape = handle.tensors[source_name].shape
            if len(shape) == 2 and shape[0] > ROWS_PER_CHUNK and row_separable(source_name):
                # e.g. Qwen3-4B's 151936 x 2560 embedding: never widened to fp32 whole
                for start in range(0, shape[0], ROWS_PER_CHUNK):
                    rows = handle.load_rows(source_name, start, min(shape[0], start + ROWS_PER_CHUNK))
                    for name, array in encode(source_name, rows).items():
                        writers[name].write_rows(name, array, start)
            else:
                for name, array in encode(source_name, handle.load(source_name)).items():
                    writers[name].write(name, array)
            tick()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    _close_component(root, layout, writers)


def write_dense_rows(writer: SafetensorsWriter, tensor) -> None:
    """Stream a dense tensor to fp16 in row chunks (a 18432 x 3072 modulation never sits in memory whole)."""
    if len(tensor.shape) < 2:
        writer.write(tensor.name, encode_dense(tensor.name, tensor.load()))
        return
    for start in range(0, tensor.shape[0], ROWS_PER_CHUNK):
        stop = min(tensor.shape[0], start + ROWS_PER_CHUNK)
        writer.write_rows(tensor.name, encode_dense(tensor.name, tensor.load_rows(start, stop)), start)


def transformer_shapes_of(source: Source) -> dict[str, tuple[tuple[int, ...], str]]:
    return {t.name: (t.shape, t.file.tensors[t.key].dtype) for t in source.tensors}


def write_transformer(
    root: Path, source: Source, target: Target, resolver: VariantResolver, shard_bytes: int, tick: Callable
) -> tuple[str, ComponentLayout, dict[str, str]]:
    """Stream every transformer tensor through the codec into the target's shards; return variant and digests."""
    digests: dict[str, str] = {}
    low_bit = [t for t in source.tensors if t.low_bit]
    first = low_bit[0] if low_bit else None

    def low_bit_tensor(tensor) -> LowBitTensor:
        if source.kind == "packed":
            decoded = source.read_low_bit(tensor)
            assert isinstance(decoded, LowBitTensor)
            return decoded
        return resolver.split(tensor.name, tensor.load_rows, tensor.shape[0])

    # The first low-bit tensor fixes the variant (auto) before anything is laid out.
    first_tensor = low_bit_tensor(first) if first else None
    variant = resolver.variant or "binary"
    layout = transformer_layout(target, transformer_shapes_of(source), variant, shard_bytes)
    writers = _open_writers(root, layout)

    def convert(tensor) -> None:
        if tensor.low_bit:
            lowbit = first_tensor if tensor is first else low_bit_tensor(tensor)
            digests[tensor.name] = weight_digest(lowbit)
            outputs = target.encode_low_bit(lowbit, variant)
        else:
            write_dense_rows(writers[tensor.name], tensor)
            outputs = {}
        for name, array in outputs.items():
            writers[name].write(name, array)
        tick()

    try:
        # Two worker threads: numpy releases the GIL in the heavy loops. Output bytes do not depend on the
        # order (every tensor has a fixed offset), so the bundle stays byte-identical.
        with ThreadPoolExecutor(PACK_THREADS) as pool:
            for future in [pool.submit(convert, tensor) for tensor in source.tensors]:
                future.result()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    _close_component(root, layout, writers)
    low_bit_names = [t.name for t in low_bit]
    config = target.transformer_config(source.transformer_config, variant, low_bit_names)
    (root / "transformer" / "config.json").write_bytes(json_bytes(config))
    return variant, layout, dict(sorted(digests.items()))


def text_encoder_plan(source: Source, target: Target, shard_bytes: int):
    """The text encoder's kept tensors, layout and files (or None for a transformer-only source)."""
    folder = source.components.get("text_encoder")
    if folder is None:
        return None
    config = read_json(folder / "config.json")
    shapes, files = component_tensors(folder)
    kept = kept_text_encoder_tensors(shapes, config, source.text_encoder_out_layers, target.truncates_text_encoder)
    return config, shapes, kept, text_encoder_layout(target, kept, shard_bytes), files


def bundle_text_encoder_config(config: dict, target: Target, kept: dict, out_layers: tuple[int, ...]) -> dict:
    result = target.text_encoder_config(config)
    if target.truncates_text_encoder:
        result["num_hidden_layers"] = min(int(config.get("num_hidden_layers", 0)), max(out_layers))
    return result


def pipeline_settings(
    target_name: str,
    variant: str,
    profile: dict,
    transformer_only: bool,
    out_layers,
    te_config: dict | None,
    max_sequence_length: int = 512,
) -> dict:
    """pipeline.json (formats/bundle.md)."""
    return {
        "format_version": 1,
        "target": target_name,
        "variant": variant,
        "transformer_only": transformer_only,
        "text_encoder_out_layers": list(out_layers),
        "text_encoder_num_hidden_layers": int(te_config["num_hidden_layers"]) if te_config else None,
        "max_sequence_length": max_sequence_length,
        "num_inference_steps": 4,
        "guidance_scale": 1.0,
        "width": profile["default_width"],
        "height": profile["default_height"],
        "vae_tile": profile["vae_tile"],
        "compute_dtype": profile["compute_dtype"],
        "profile": profile,
    }


def copy_plain_folder(source_folder: Path, destination: Path) -> None:
    """Copy the tokenizer or scheduler folder (small JSON/text files; no symlinks, no pickles)."""
    for path in safe_files_under(source_folder):
        if path.suffix in (".bin", ".pt", ".pkl", ".pth", ".ckpt"):
            raise InputError(f"{path}: pickle-based files are refused")
        relative = path.relative_to(source_folder)
        (destination / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination / relative)


def check_fit(source: Source, options: PackOptions, profile: dict) -> dict | None:
    """Memory estimate at the profile's default size; a bundle over the device budget needs --force."""
    from .plan import describe, plan

    if profile["memory_budget_bytes"] == 0 or source.transformer_only:
        return None
    variant = source.packed_variant or (options.variant if options.variant != "auto" else "ternary")
    memory = plan(
        describe(source),
        options.target,
        variant,
        profile["default_width"],
        profile["default_height"],
        golden=options.golden,
    )["memory"]
    if not memory["fits"] and not options.force:
        raise FitError(
            f"{source.label}: needs an estimated {memory['peak_bytes'] / 1e9:.2f} GB at "
            f"{memory['width']}x{memory['height']}, over the {profile['name']} budget of "
            f"{memory['budget_bytes'] / 1e9:.2f} GB (use --force to write it anyway)"
        )
    return memory


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
    """Pack SOURCE into a bundle at OUT for options.target; return the manifest."""
    use_mmap_for_large_arrays()
    from .golden import write_golden
    from .manifest import build_manifest

    if options.variant not in ("auto", *VARIANTS):
        raise UsageError(f"--variant {options.variant}: choose auto, binary or ternary")
    if options.quantize not in (None, "absmean"):
        raise UsageError(f"--quantize {options.quantize}: only absmean is supported")
    target = make_target(options.target) if options.target else None
    if target is None:
        raise UsageError("--target is required")
    profile = profile_for(options.target)
    source = open_source(source_spec)
    resolver = VariantResolver(options.variant, options.quantize, source.packed_variant)
    tick = progress.tick if progress else (lambda: None)
    memory = check_fit(source, options, profile)
    te = text_encoder_plan(source, target, profile["shard_bytes"])
    if progress:
        total = len(source.tensors) + (len(te[2]) if te else 0)
        if "vae" in source.components:
            total += len(component_tensors(source.components["vae"])[0])
        progress.start(f"packing {source_spec} → {options.target}", total)
    with atomic_folder(out, options.force) as root:
        variant, _, digests = write_transformer(root, source, target, resolver, profile["shard_bytes"], tick)
        te_config = None
        if te:
            te_config, _, kept, te_layout, te_files = te
            _write_dense_component(
                root, te_layout, te_files, target.encode_text_encoder, tick, target.text_encoder_row_separable
            )
            config = bundle_text_encoder_config(te_config, target, kept, source.text_encoder_out_layers)
            (root / "text_encoder" / "config.json").write_bytes(json_bytes(config))
        if "vae" in source.components:
            vae_shapes, vae_files = component_tensors(source.components["vae"])
            (root / "vae").mkdir()
            _write_dense_component(root, vae_layout(vae_shapes), vae_files, lambda n, v: {n: encode_dense(n, v)}, tick)
            (root / "vae" / "config.json").write_bytes(json_bytes(read_json(source.components["vae"] / "config.json")))
        for name in ("tokenizer", "scheduler"):
            if name in source.components:
                copy_plain_folder(source.components[name], root / name)
        settings = pipeline_settings(
            options.target,
            variant,
            profile,
            source.transformer_only,
            source.text_encoder_out_layers,
            te_config,
            source.max_sequence_length,
        )
        (root / "pipeline.json").write_bytes(json_bytes(settings))
        golden = None
        if options.golden and not source.transformer_only:
            if progress:
                progress.message("golden record: running the reference pipeline on the source weights")
            golden = write_golden(root, source, options, target)
        manifest = build_manifest(root, source, options, variant, profile, digests, golden, memory)
    if progress:
        progress.done()
    return manifest
