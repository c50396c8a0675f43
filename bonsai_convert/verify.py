"""`verify`: byte integrity, bit-exact weights, and the golden image, for every target. Never modifies the bundle."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .codecs import mlx as mlx_codec
from .codecs import packed as packed_codec
from .dtypes import widen
from .errors import BonsaiError, InputError
from .files import read_json, sha256_file
from .lowbit import GROUP_SIZE, LowBitTensor, split_exact
from .manifest import MANIFEST, load_manifest, safe_relative
from .safetensors_io import SafetensorsFile, read_header
from .targets.base import encode_dense
from .torch_zip import TorchZipFile
from .vocabulary import MLX_TARGETS


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    status: str = ""  # "pass", "fail" or "skipped" (not checked: passed stays True, so it fails nothing)

    def __post_init__(self):
        self.status = self.status or ("pass" if self.passed else "fail")


@dataclass
class VerifyOptions:
    source: str | None = None
    generate: bool = True
    min_psnr: float | None = None
    image: Path | None = None
    dtype: str | None = None
    kernels: str = "auto"  # cuda bundles: "interpreter" (gemlite's kernels on CPU, required), "fallback", "auto"


class Checks(list):
    """The ordered list of checks; `add` records one and returns whether it passed."""

    def add(self, name: str, passed: bool, detail: str) -> bool:
        self.append(Check(name, bool(passed), detail))
        return bool(passed)

    def skip(self, name: str, detail: str) -> None:
        """A step that was not checked: reported as "skipped", never as "pass"."""
        self.append(Check(name, True, detail, "skipped"))


def worker_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def check_integrity(
    bundle: Path, checks: Checks, pool: ThreadPoolExecutor | None = None, hashes: dict | None = None
) -> dict | None:
    """Manifest schema, safe paths, no symlinks, no unlisted or missing files, sizes, sha256, safetensors headers.

    With a `pool`, the sha256 of the files is only started here, into `hashes` (each file read once, largest first,
    in parallel with whatever runs next), and `check_hashes` records it; without one it is checked here."""
    try:
        manifest = load_manifest(bundle)
    except BonsaiError as error:
        checks.add("manifest", False, str(error))
        return None
    checks.add(
        "manifest",
        True,
        f"{MANIFEST} valid ({len(manifest['files'])} files, format {manifest['format_version']})",
    )
    listed = {entry["path"]: entry for entry in manifest["files"]}
    problems: list[str] = []
    present: set[str] = set()
    for directory, folders, files in os.walk(bundle, followlinks=False):
        for name in folders + files:
            path = Path(directory) / name
            relative = path.relative_to(bundle).as_posix()
            if path.is_symlink():
                problems.append(f"{relative}: is a symbolic link")
            elif path.is_file():
                present.add(relative)
    present.discard(MANIFEST)
    for relative in sorted(present - set(listed)):
        problems.append(f"{relative}: not listed in the manifest")
    for relative in sorted(set(listed) - present):
        if not (bundle / relative).is_symlink():
            problems.append(f"{relative}: listed in the manifest but missing")
    if problems:
        checks.add(
            "files",
            False,
            "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""),
        )
        return None
    checks.add("files", True, f"{len(present)} files, no extra, none missing, no links")
    for relative, entry in sorted(listed.items()):
        path = bundle / relative
        if path.stat().st_size != entry["bytes"]:
            checks.add("sizes", False, f"{relative}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
            return None
    checks.add("sizes", True, "every file has its manifest size")
    for relative in sorted(p for p in listed if p.endswith(".safetensors")):
        try:
            read_header(bundle / relative)
        except InputError as error:
            checks.add("safetensors headers", False, str(error).replace(str(bundle) + "/", ""))
            return None
    checks.add("safetensors headers", True, "every header follows the safetensors rules")
    containers = sorted(p for p in listed if p.endswith(".pt"))
    for relative in containers:
        try:
            TorchZipFile(bundle / relative)
        except InputError as error:
            checks.add("state_dict.pt", False, str(error).replace(str(bundle) + "/", ""))
            return None
    if containers:
        detail = "zip entries and pickle opcodes are a plain tensor dict (read without unpickling)"
        if any(p.endswith("qmodel.pt") for p in containers):
            detail = "state_dict.pt and qmodel.pt: zip entries and pickle opcodes within the allow-list (not unpickled)"
        checks.add("state_dict.pt", True, detail)
    if pool is None or hashes is None:
        with ThreadPoolExecutor(worker_count()) as own:
            return manifest if check_hashes(start_hashes(bundle, manifest, own), manifest, checks) else None
    hashes.update(start_hashes(bundle, manifest, pool))
    return manifest


def start_hashes(bundle: Path, manifest: dict, pool: ThreadPoolExecutor) -> dict[str, Future]:
    """sha256 of every listed file, submitted largest first (hashlib releases the GIL: files hash in parallel)."""
    entries = sorted(manifest["files"], key=lambda entry: -entry["bytes"])
    return {entry["path"]: pool.submit(sha256_file, bundle / entry["path"]) for entry in entries}


def check_hashes(hashes: dict[str, Future], manifest: dict, checks: Checks) -> bool:
    """Wait for the digests of `start_hashes` and record the sha256 check."""
    expected = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    for relative in sorted(hashes):
        if hashes[relative].result() != expected[relative]:
            checks.add("sha256", False, f"{relative}: sha256 differs from the manifest (damaged or swapped)")
            return False
    total = sum(entry["bytes"] for entry in manifest["files"])
    return checks.add("sha256", True, f"every file matches its sha256 ({len(hashes)} files, {total / 1e9:.2f} GB)")


class BundleTensors:
    """Read tensors of a bundle component by name (its files and index validated by `component_tensors`)."""

    def __init__(self, folder: Path):
        from .sources import component_tensors

        _, self.files = component_tensors(folder)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def load(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise InputError(f"tensor {name}: missing from the bundle")
        return np.asarray(self.files[name].load(name))


def decode_low_bit(tensors: BundleTensors, target: str, variant: str, name: str) -> LowBitTensor:
    """A low-bit linear of any target back to codes and scales, with that format's own decoder."""
    if target == "gguf":
        return tensors.low_bit(name)  # type: ignore[attr-defined]
    prefix = name[: -len(".weight")]
    if target != "cuda":
        for key in (name, prefix + ".scales") + ((prefix + ".biases",) if target in MLX_TARGETS else ()):
            if key not in tensors or len(tensors.files[key].tensors[key].shape) != 2:
                raise InputError(f"tensor {key}: missing or not 2-D")
    if target == "packed":
        scales = tensors.load(prefix + ".scales")
        raw = tensors.load(name)
        if variant == "ternary" and packed_codec.invalid_ternary_bytes(raw).any():
            raise InputError(f"tensor {name}: byte > 242 is not a valid 5-trit chunk")
        return LowBitTensor(name, packed_codec.decode(raw, scales.shape[1] * GROUP_SIZE, variant), scales)
    if target in MLX_TARGETS:
        try:
            codes, scales = mlx_codec.decode(
                tensors.load(name),
                tensors.load(prefix + ".scales"),
                tensors.load(prefix + ".biases"),
                variant,
            )
        except ValueError as error:
            raise InputError(f"tensor {name}: {error}") from error
        return LowBitTensor(name, codes, scales)
    if target == "cuda":
        from .codecs import gemlite

        state = {
            key: tensors.load(f"{prefix}.{key}") for key in gemlite.STORED_LAYER_KEYS if f"{prefix}.{key}" in tensors
        }
        codes, scales = gemlite.decode(state)
        return LowBitTensor(name, codes, scales)
    raise InputError(f"unknown target {target!r}")


def _digest(tensor: LowBitTensor) -> str:
    from .pack import weight_digest

    return weight_digest(tensor)


def check_weights(
    bundle: Path, manifest: dict, source_spec: str | None, checks: Checks, pool: ThreadPoolExecutor | None = None
) -> None:
    """Every low-bit tensor decodes; bit-exact vs the source (with --source) or vs the pack-time digests.

    Without --source the tensors are decoded and digested on `pool`'s threads (one tensor per task: memory stays
    flat, a few tensors at a time whatever the model size); with --source one at a time.
    """
    try:
        folder = manifest.get("layout", {}).get("folders", {}).get("transformer", "transformer")
        if manifest["target"] == "gguf":
            from .sources.gguf import GGUFTransformer

            tensors = GGUFTransformer(bundle / folder, manifest["variant"])  # type: ignore[assignment]
        else:
            tensors = BundleTensors(bundle / folder)
    except InputError as error:
        checks.add("low-bit decode", False, str(error))
        return
    digests = manifest["weight_digests"]
    target, variant = manifest["target"], manifest["variant"]
    source = None
    if source_spec is not None:
        from .sources import open_source

        try:
            source = open_source(source_spec)
        except BonsaiError as error:
            checks.add("weights vs source", False, str(error))
            return
        source_names = {t.name for t in source.tensors if t.low_bit}
        if source_names != set(digests):
            differing = sorted(source_names ^ set(digests))
            checks.add("weights vs source", False, f"tensor {differing[0]}: low-bit tensor sets differ")
            return
    by_name = {t.name: t for t in source.tensors} if source else {}
    if source is None and pool is not None:
        futures = {name: pool.submit(_decode_and_digest, tensors, target, variant, name) for name in sorted(digests)}
        for name in sorted(digests):
            try:
                digest = futures[name].result()
            except (InputError, KeyError, ValueError, IndexError, TypeError) as error:
                for future in futures.values():
                    future.cancel()
                checks.add("low-bit decode", False, f"{error}")
                return
            if digest != digests[name]:
                for future in futures.values():
                    future.cancel()
                checks.add(
                    "weights vs manifest digests", False, f"tensor {name}: decoded weights differ from pack time"
                )
                return
        checks.add("low-bit decode", True, f"{len(digests)} low-bit linears decode ({variant}, {target} layout)")
        checks.add("weights vs manifest digests", True, "decoded fp16 weights match the digests recorded at pack time")
        return
    for name in sorted(digests):
        try:
            decoded = decode_low_bit(tensors, target, variant, name)
        except (InputError, KeyError, ValueError, IndexError, TypeError) as error:
            checks.add("low-bit decode", False, f"{error}")
            return
        if source is None:
            if _digest(decoded) != digests[name]:
                detail = f"tensor {name}: decoded weights differ from pack time"
                checks.add("weights vs manifest digests", False, detail)
                return
            continue
        reference = source.read_low_bit(by_name[name])
        if not isinstance(reference, LowBitTensor):
            reference = split_exact(name, reference, variant)
        if not np.array_equal(decoded.dense().view(np.uint16), reference.dense().view(np.uint16)):
            checks.add("weights vs source", False, f"tensor {name}: differs from the source")
            return
    checks.add("low-bit decode", True, f"{len(digests)} low-bit linears decode ({variant}, {target} layout)")
    if source is None:
        checks.add("weights vs manifest digests", True, "decoded fp16 weights match the digests recorded at pack time")
        return
    dense_dtype = manifest.get("layout", {}).get("dense_dtype", "F16")
    for tensor in source.tensors:
        if not tensor.low_bit:
            stored = tensors.load(tensor.name)
            values = tensor.load()
            # The source value as the bundle's dense dtype stores it (bf16 only when exact; fp16 rounded).
            expected = (
                widen(encode_dense(tensor.name, values, dense_dtype), dense_dtype)
                if values.dtype.kind == "f"
                else values
            )
            if not np.array_equal(stored.view(np.uint8), np.asarray(expected, dtype=stored.dtype).view(np.uint8)):
                checks.add("weights vs source", False, f"tensor {tensor.name}: differs from the source ({dense_dtype})")
                return
    checks.add("weights vs source", True, f"all {len(source.tensors)} transformer tensors bit-exact vs {source_spec}")


def _decode_and_digest(tensors: BundleTensors, target: str, variant: str, name: str) -> str:
    return _digest(decode_low_bit(tensors, target, variant, name))


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    from bonsai_common.image import psnr as common_psnr

    return float(common_psnr(reference.astype(np.float64), test.astype(np.float64)))


def side_by_side(reference: np.ndarray, bundle_image: np.ndarray, path: Path) -> None:
    """reference | bundle | amplified difference (×8), written as PNG (through a temporary file)."""
    from PIL import Image

    difference = np.clip(np.abs(reference.astype(np.int16) - bundle_image.astype(np.int16)) * 8, 0, 255)
    strip = np.concatenate([reference, bundle_image, difference.astype(np.uint8)], axis=1)
    temporary = path.with_name(f".{path.name}.partial")
    Image.fromarray(strip).save(temporary, format="PNG")
    temporary.replace(path)


def check_gemlite_kernels(bundle: Path, options: VerifyOptions, checks: Checks) -> None:
    """cuda bundles without a GPU: gemlite's own kernels (Triton interpreter) on every transformer low-bit linear,
    the production kernel for M = 1 (GEMV_REVSPLITK) and M = 64 (GEMM), against the bundle's decoded weights
    (which the weights check proved exact); on a full-size transformer on one layer of each shape (interpreted
    time). On a GPU the golden image already runs them compiled."""
    import subprocess
    import tempfile

    import torch

    name = "gemlite kernels"
    if options.kernels == "fallback":
        checks.skip(name, "not checked (--kernels fallback): only our decoder ran the low-bit layers")
        return
    if torch.cuda.is_available():
        checks.skip(name, "CUDA present: the golden image runs gemlite's compiled kernels")
        return
    from bonsai_cuda import interpreter

    reason = interpreter.unavailable_reason()
    if reason:
        if options.kernels == "interpreter":
            checks.add(name, False, f"--kernels interpreter: {reason}")
        else:
            checks.skip(name, f"not checked: {reason}")
        return
    settings = read_json(bundle / "pipeline.json")
    folder = bundle / settings.get("folders", {}).get("transformer", "transformer")
    sampled = load_manifest(bundle)["weights"]["low_bit"] > KERNEL_ALL_LAYERS_MAX_WEIGHTS
    rows = KERNEL_ROWS_SAMPLED if sampled else "1,64"
    command = ["layers", str(folder), "--every-kernel", "none", "--rows", rows, "--json"]
    with tempfile.TemporaryDirectory(prefix="bonsai-kernels-") as work:
        report = Path(work) / "layers.json"
        command += [str(report)] + (["--layers", "one-per-shape"] if sampled else [])
        try:
            interpreter.run_child(command, timeout=KERNEL_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired as error:
            # Klein-width layers take longer than that interpreted on 2 cores (measured): a failure, not a crash
            detail = f"timed out after {error.timeout:.0f} s in the Triton interpreter"
            checks.add(name, False, detail + " (full-size bundles: --kernels fallback, or verify on a GPU)")
            return
        except (RuntimeError, OSError) as error:
            checks.add(name, False, str(error)[:500])
            return
        results = read_json(report)["results"]
    worst = max((r["max_error"] / r["scale"] for r in results), default=0.0)
    bad = [r for r in results if not r["finite"] or r["max_error"] > KERNEL_TOLERANCE * r["scale"]]
    layers = len({r["layer"] for r in results})
    seconds = sum(r["seconds"] for r in results)
    kernels = " and ".join(sorted({f"{r['kernel']} (M={r['rows']})" for r in results}))
    what = f"{layers} layers (one per shape: a full-size transformer)" if sampled else f"{layers} layers"
    detail = (
        f"{what}, {kernels} in the Triton interpreter: max error "
        f"{worst:.2g} × max(1, |ref|) (limit {KERNEL_TOLERANCE:g}), {seconds:.1f} s"
    )
    if bad:
        detail += f"; {len(bad)} failed, first {bad[0]['layer']} {bad[0]['kernel']}"
    checks.add(name, bool(results) and not bad, detail)


KERNEL_TOLERANCE = 4e-3
# Above this many low-bit weights (the demo has ~2 M, Klein 4B 3.68 G) the interpreter checks one layer per shape:
# interpreted on 2 busy cores a 27648 x 3072 layer took 44 s (GEMV_REVSPLITK, M = 1) and 62 s (GEMM, M = 64), a
# 3072 x 12288 one 16 s and 6 s (measured); all 100 layers would take hours.
KERNEL_ALL_LAYERS_MAX_WEIGHTS = 100_000_000
KERNEL_ROWS_SAMPLED = "1,64"
KERNEL_TIMEOUT_SECONDS = 1800


GGUF_GENERATION_SKIPPED = (
    "skipped: no registry package runs FLUX.2 from a Q1_0/Q2_0 GGUF: stable-diffusion-cpp-python 0.4.7 (PyPI; "
    "vendored ggml 0.9.8) lacks ggml types 41/42, and llama-cpp-python 0.3.36 (ggml 0.25.3, has them) has no "
    "FLUX.2 model"
)


def check_ggml(bundle: Path, manifest: dict, checks: Checks) -> None:
    """Real ggml (llama-cpp-python's libggml-base) parses the GGUF and dequantizes every Q1_0/Q2_0 tensor."""
    from .ggml_check import GGML, LIBRARY_ENV, check_file, find_library
    from .sources.gguf import GGUF_FILE

    library = find_library()
    if library is None:
        checks.skip(
            "ggml dequantization",
            "skipped: no libggml-base with types 41/42 here "
            f"(pip install llama-cpp-python==0.3.36, or set {LIBRARY_ENV})",
        )
        return
    folder = manifest.get("layout", {}).get("folders", {}).get("transformer", "transformer")
    try:
        passed, detail = check_file(GGML(library), bundle / folder / GGUF_FILE, manifest["weight_digests"])
    except (InputError, OSError, AttributeError) as error:
        passed, detail = False, str(error)
    checks.add("ggml dequantization", passed, f"ggml's parser and to_float ({library}) vs the source digests: {detail}")


def check_golden(bundle: Path, manifest: dict, options: VerifyOptions, checks: Checks) -> float | None:
    """Run the target's runtime on the golden record and compare with the stored reference output."""
    from .runtimes import generate

    record = read_json(bundle / manifest["golden"])
    for key in ("noise", "outputs"):
        if not isinstance(record.get(key), str) or not safe_relative(record[key]):
            raise InputError(f"{manifest['golden']}: {key} path {record.get(key)!r} is not a safe relative path")
    noise = np.array(SafetensorsFile(bundle / record["noise"]).load("noise"))
    outputs = SafetensorsFile(bundle / record["outputs"])
    reference_image = outputs.load("image")
    reference_latents = outputs.load("latents")
    dtype = options.dtype or ("float32" if record["compute_dtype"] == "float32" else None)
    min_psnr = options.min_psnr if options.min_psnr is not None else (40.0 if dtype == "float32" else 35.0)
    result = generate(
        bundle,
        manifest["target"],
        record["prompt"],
        record["seed"],
        record["steps"],
        record["width"],
        record["height"],
        noise=noise,
        dtype=dtype,
    )
    value = psnr(reference_image, result.image)
    latent_error = float(np.abs(result.latents - reference_latents).max())
    checks.add(
        "golden image PSNR",
        value >= min_psnr,
        f"{value:.2f} dB vs reference (minimum {min_psnr:g} dB, {record['width']}×{record['height']}, "
        f"{dtype or 'bundle default'} via {result.backend}); max |Δ latents| {latent_error:.3g}",
    )
    mean, std = float(result.image.mean()), float(result.image.std())
    checks.add(
        "image sanity",
        mean > 5 and std > 15,
        f"mean {mean:.1f} > 5 and std {std:.1f} > 15 (not black, not constant)",
    )
    if options.image:
        side_by_side(reference_image, result.image, options.image)
    return value


def verify_bundle(bundle: Path, options: VerifyOptions) -> dict:
    """All checks; returns the report (bonsai_convert/data/schemas/verify_report.schema.json)."""
    bundle = Path(bundle)
    checks = Checks()
    psnr_value = None
    manifest_digest = None
    if bundle.is_symlink() or not bundle.is_dir():
        checks.add("bundle", False, f"{bundle}: not a bundle folder")
        manifest = None
    else:
        # Integrity and weights together: every file is hashed once while the low-bit tensors are decoded and
        # digested on the same threads (verify at full size runs at about the speed of sha256sum over the bundle).
        with ThreadPoolExecutor(worker_count()) as pool:
            hashes: dict[str, Future] = {}
            manifest = check_integrity(bundle, checks, pool, hashes)
            if manifest is not None:
                weight_checks = Checks()
                try:
                    check_weights(bundle, manifest, options.source, weight_checks, pool)
                finally:
                    hashes_ok = check_hashes(hashes, manifest, checks)
                if hashes_ok:
                    checks.extend(weight_checks)
                else:
                    manifest = None
    if manifest is not None:
        manifest_digest = hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
        if all(c.passed for c in checks):
            if not options.generate:
                checks.skip("generation", "not checked (--no-generate): the golden image was NOT compared")
            elif manifest["golden"] is None:
                checks.skip(
                    "generation",
                    "not checked: the bundle has no golden record (transformer-only or packed with --no-golden)",
                )
            if manifest["target"] == "cuda" and options.generate:
                check_gemlite_kernels(bundle, options, checks)  # runs with the runtime checks
            if manifest["target"] == "gguf":
                check_ggml(bundle, manifest, checks)  # a real ggml reads the file (independent of generation)
            if not options.generate or manifest["golden"] is None:
                pass
            elif manifest["target"] == "packed":
                checks.skip("generation", "not checked: a packed bundle has no runtime (pack it for a device)")
            elif manifest["target"] == "gguf":
                checks.skip("generation", GGUF_GENERATION_SKIPPED)
            else:
                try:
                    psnr_value = check_golden(bundle, manifest, options, checks)
                except BonsaiError as error:
                    checks.add("golden image PSNR", False, str(error))
    return {
        "bundle": str(bundle),
        "target": manifest["target"] if manifest else None,
        "variant": manifest["variant"] if manifest else None,
        "manifest_sha256": manifest_digest,
        "passed": all(c.passed for c in checks),
        "psnr_db": None if psnr_value is None else round(psnr_value, 3),
        "generation_checked": psnr_value is not None,
        "checks": [asdict(c) for c in checks],
    }


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True) + "\n"
