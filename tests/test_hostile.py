"""Broken and hostile inputs are refused with one line, the right exit code, and nothing left behind.

Every case runs the real CLI entry (`bonsai_convert.cli.main`) in-process with sys.argv patched (subprocesses
cost seconds of imports each); a few cases also run as real `python -m bonsai_convert` processes. The committed
corpus is tests/corpus/ (README.md there lists every case); the cases that need a whole Klein transformer are
built here from a tiny synthetic transformer-only source (valid: `test_tiny_source_packs_and_verifies`).
"""

from __future__ import annotations

import ast
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bonsai_convert.errors import InputError, OutputError
from bonsai_convert.lowbit import is_low_bit_key
from bonsai_convert.safetensors_io import (
    SafetensorsFile,
    SafetensorsWriter,
    TensorSpec,
    float32_to_bf16_bits,
    read_header,
)

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
# A valid Flux2Transformer2DModel config, small enough that the whole source is 1.9 MB (hidden 128 = 2 × 64).
TINY_CONFIG = dict(
    _class_name="Flux2Transformer2DModel",
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=64,
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=[16, 16, 16, 16],
    rope_theta=2000,
    guidance_embeds=False,
)
BF16_NAN, BF16_INF, BF16_ONE, F16_INF = 0x7FC0, 0x7F80, 0x3F80, 0x7C00


# ------------------------------------------------------------------------------------------------------------
# Running the CLI and checking a refusal


class Hung(BaseException):
    """The command ran past its time limit (a reader blocked or looped)."""


def run_cli(capsys: pytest.CaptureFixture, *args: str, limit_s: float = 60.0) -> tuple[int, str, str]:
    """`bonsai-convert ARGS` in this process: (exit code, stdout, stderr); a hang fails instead of blocking."""
    from bonsai_convert import cli

    def alarm(signum, frame):
        raise Hung(f"bonsai-convert {' '.join(args)}: still running after {limit_s} s")

    capsys.readouterr()
    saved = sys.argv
    sys.argv = ["bonsai-convert", *args]
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sys.argv = saved
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(out: Path) -> list[Path]:
    """Temporary folders of the atomic writer beside OUT."""
    return sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.replaced-*"))


def assert_refused(code: int, out_text: str, err: str, exit_code: int, names: str, reason: str, out: Path | None):
    """Exactly one stderr line `error: <names ...>: <reason>`, the exit code, no traceback, nothing written."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {err!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert names in line, f"{names!r} not named in {line!r}"
    assert reason in line, f"{reason!r} not in {line!r}"
    assert "Traceback" not in err + out_text and "internal error" not in line, line
    assert code == exit_code, f"exit {code}, expected {exit_code}: {line}"
    if out is not None:
        assert not out.exists(), f"{out} was left behind"
        assert not leftovers(out), f"left behind: {leftovers(out)}"


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every path below root with its size and mtime (to prove nothing was modified)."""
    return {p.relative_to(root).as_posix(): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------------------------------------
# Building broken sources


def write_tiny_source(root: Path, config: dict | None = None) -> Path:
    """A transformer-only Flux2 source: exact ternary low-bit linears (scale 1/32), other weights k/256, bf16."""
    from bonsai_convert.model_shapes import transformer_shapes

    config = dict(config or TINY_CONFIG)
    shapes = transformer_shapes(config)
    rng = np.random.default_rng(0)
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    specs = [TensorSpec(name, "BF16", shape) for name, shape in shapes.items()]
    with SafetensorsWriter(root / WEIGHTS, specs, {"format": "pt"}) as writer:
        for name, shape in sorted(shapes.items()):
            if is_low_bit_key(name):
                values = rng.choice(np.array([-1.0, 0.0, 1.0], np.float32), size=shape) / 32
            else:
                values = rng.integers(-64, 64, size=shape).astype(np.float32) / 256
            writer.write(name, float32_to_bf16_bits(values.astype(np.float32)))
    return root


def patch_tensor(path: Path, tensor: str, element: int, value: int, width: int = 2) -> None:
    """Overwrite one element of a tensor in place (header untouched)."""
    info = read_header(path)[0][tensor]
    with open(path, "r+b") as handle:
        handle.seek(info.begin + element * width)
        handle.write(value.to_bytes(width, "little"))


def rewrite(path: Path, drop: tuple[str, ...] = (), add: dict[str, tuple[str, np.ndarray]] | None = None) -> None:
    """Rewrite a safetensors file without some tensors and/or with extra ones (dtype, array)."""
    source = SafetensorsFile(path)
    tensors = {name: (source.tensors[name].dtype, np.array(source.raw(name))) for name in source.keys()}
    for name in drop:
        tensors.pop(name)
    tensors.update(add or {})
    del source
    temporary = path.with_suffix(".rewrite")
    specs = [TensorSpec(name, dtype, tuple(array.shape)) for name, (dtype, array) in tensors.items()]
    with SafetensorsWriter(temporary, specs, {"format": "pt"}) as writer:
        for name, (_, array) in tensors.items():
            writer.write(name, array)
    os.replace(temporary, path)


def copy_tree(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination, symlinks=True)
    return destination


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    return write_tiny_source(tmp_path_factory.mktemp("tiny") / "source")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_source) -> Path:
    """The tiny source packed to the `packed` target (a valid packed-bundle source and verify input)."""
    from bonsai_convert.pack import PackOptions, pack

    out = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
    pack(str(tiny_source), out, PackOptions(target="packed", golden=False))
    return out


def bundle_weights(bundle: Path) -> Path:
    return sorted((bundle / "transformer").glob("*.safetensors"))[0]


# ------------------------------------------------------------------------------------------------------------
# The committed corpus: every file is a SOURCE that `pack` must refuse (exit 3) naming the file


CORPUS_FILES = {
    "no_header_length.safetensors": "no header length",
    "header_length_past_eof.safetensors": "runs past the file end",
    "header_length_over_100mb.safetensors": "exceeds 100000000",
    "header_not_utf8.safetensors": "not valid UTF-8 JSON",
    "header_invalid_json.safetensors": "not valid UTF-8 JSON",
    "header_nested_too_deeply.safetensors": "nested too deeply",
    "header_duplicate_tensor.safetensors": "duplicate key 'w'",
    "header_not_an_object.safetensors": "not a JSON object",
    "metadata_not_strings.safetensors": "__metadata__ must map strings to strings",
    "entry_missing_fields.safetensors": "tensor a: header entry must have exactly dtype, shape, data_offsets",
    "unknown_dtype.safetensors": "tensor a: unknown dtype 'Q4_K'",
    "negative_dimension.safetensors": "tensor a: shape must be a list of non-negative integers",
    "dtype_shape_mismatch.safetensors": "tensor a: shape [4] of F32 needs 16 bytes, data_offsets give 8",
    "overlapping_offsets.safetensors": "tensor b: data_offsets overlaps the previous tensor",
    "gap_between_tensors.safetensors": "tensor b: data_offsets leaves a gap",
    "offsets_past_eof.safetensors": "tensor a: data_offsets end past the end of the file",
    "truncated_data.safetensors": "tensor b: data_offsets end past the end of the file",
    "trailing_bytes.safetensors": "(truncated or padded)",
    "huge_shape.safetensors": "tensor a: data_offsets end past the end of the file",
    "bfl_not_flux.safetensors": "not a FLUX.2 BFL checkpoint (no img_in.weight",
    "bfl_img_in_not_2d.safetensors": "not a FLUX.2 BFL checkpoint (cannot infer a config",
    "bfl_block_index_gap.safetensors": "double_blocks indices [1] are not 0..0",
}
# JSON corpus files dropped into a copy of the tiny source at the given place: (place, reason)
CORPUS_JSON = {
    "config_invalid_json.json": ("transformer/config.json", "not valid JSON"),
    "config_nan_value.json": ("transformer/config.json", "not valid JSON (NaN is not valid JSON)"),
    "config_flux1_dev.json": ("transformer/config.json", "FluxTransformer2DModel, not Flux2Transformer2DModel"),
    "config_flux2_dev.json": ("transformer/config.json", "guidance_embeds (FLUX.2 dev)"),
    "index_path_traversal.json": (
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "shard name '../../outside.safetensors' is not a plain file name",
    ),
}


def _build_corpus_module():
    spec = importlib.util.spec_from_file_location("build_corpus", CORPUS / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_corpus_is_committed_documented_and_reproducible():
    built = _build_corpus_module().corpus()
    readme = (CORPUS / "README.md").read_text()
    on_disk = {p.name for p in CORPUS.iterdir() if p.name not in ("README.md", "build_corpus.py", "__pycache__")}
    assert on_disk == set(built) == set(CORPUS_FILES) | set(CORPUS_JSON)
    for name, data in built.items():
        assert (CORPUS / name).read_bytes() == data, f"{name} differs from build_corpus.py (rerun it)"
        assert f"`{name}`" in readme, f"{name} is not described in tests/corpus/README.md"
    for name in RECIPES:
        assert f"`{name}`" in readme, f"recipe {name} is not described in tests/corpus/README.md"


@pytest.mark.parametrize("name", sorted(CORPUS_FILES))
def test_corpus_file_is_refused(name, tmp_path, capsys):
    out = tmp_path / "OUT"
    code, stdout, err = run_cli(capsys, "pack", str(CORPUS / name), "--target", "packed", "-o", str(out))
    assert_refused(code, stdout, err, InputError.exit_code, str(CORPUS / name), CORPUS_FILES[name], out)


@pytest.mark.parametrize("name", sorted(CORPUS_JSON))
def test_corpus_json_is_refused(name, tmp_path, capsys, tiny_source):
    place, reason = CORPUS_JSON[name]
    source = copy_tree(tiny_source, tmp_path / "source")
    shutil.copyfile(CORPUS / name, source / place)
    out = tmp_path / "OUT"
    code, stdout, err = run_cli(capsys, "pack", str(source), "--target", "packed", "-o", str(out))
    assert_refused(code, stdout, err, InputError.exit_code, str(source / place), reason, out)


def test_corpus_refusals_in_real_processes(tmp_path):
    """The console entry point itself: one line on stderr, exit code, no traceback (processes run in parallel)."""
    cases = ["header_length_over_100mb.safetensors", "overlapping_offsets.safetensors", "huge_shape.safetensors"]
    processes = {}
    for name in cases:
        out = tmp_path / f"OUT-{name}"
        command = [sys.executable, "-m", "bonsai_convert", "pack", str(CORPUS / name), "--target", "packed", "-o"]
        processes[name] = (out, subprocess.Popen([*command, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True, cwd=tmp_path))  # fmt: skip
    for name, (out, process) in processes.items():
        stdout, err = process.communicate(timeout=120)
        assert_refused(process.returncode, stdout, err, 3, str(CORPUS / name), CORPUS_FILES[name], out)


# ------------------------------------------------------------------------------------------------------------
# Generated cases (need a whole transformer): name → builder(tmp, tiny_source, tiny_bundle) → (args, code, names,
# reason, OUT or None). README.md lists them under "Generated cases".

Case = tuple[list[str], int, str, str, "Path | None"]


def _pack(source: Path, tmp: Path) -> tuple[list[str], Path]:
    out = tmp / "OUT"
    return ["pack", str(source), "--target", "packed", "-o", str(out)], out


def nan_weight(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(tiny, tmp / "source")
    patch_tensor(source / WEIGHTS, "x_embedder.weight", 3, BF16_NAN)
    args, out = _pack(source, tmp)
    return args, 3, "x_embedder.weight", "non-finite value nan at index (0, 3)", out


def inf_low_bit_weight(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(tiny, tmp / "source")
    patch_tensor(source / WEIGHTS, "transformer_blocks.0.attn.to_q.weight", 1, BF16_INF)
    args, out = _pack(source, tmp)
    return args, 3, "transformer_blocks.0.attn.to_q.weight", "non-finite value inf", out


def non_ternary_value(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(tiny, tmp / "source")
    patch_tensor(source / WEIGHTS, "transformer_blocks.0.attn.to_k.weight", 5, BF16_ONE)
    args, out = _pack(source, tmp)
    return args, 3, "transformer_blocks.0.attn.to_k.weight", "not ternary: row 0, group 0", out


def in_features_not_multiple_of_128(tmp: Path, tiny: Path, bundle: Path) -> Case:
    config = dict(TINY_CONFIG, attention_head_dim=48, axes_dims_rope=[12, 12, 12, 12])  # hidden 96
    source = write_tiny_source(tmp / "source", config)
    args, out = _pack(source, tmp)
    reason = "in_features 96 is not divisible by the group size 128"
    return args, 3, "transformer_blocks.0.attn.to_q.weight", reason, out


def wrong_shape(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(tiny, tmp / "source")
    name = "transformer_blocks.0.attn.to_q.weight"
    rewrite(source / WEIGHTS, drop=(name,), add={name: ("BF16", np.zeros((128, 120), np.uint16))})
    args, out = _pack(source, tmp)
    return args, 3, f"tensor {name}", "shape [128, 120], expected [128, 128]", out


def missing_tensor(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(tiny, tmp / "source")
    rewrite(source / WEIGHTS, drop=("proj_out.weight",))
    args, out = _pack(source, tmp)
    return args, 3, "proj_out.weight", "missing transformer tensor", out


def unknown_tensor(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(tiny, tmp / "source")
    rewrite(source / WEIGHTS, add={"lora_A.weight": ("F16", np.zeros((4, 128), np.float16))})
    args, out = _pack(source, tmp)
    return args, 3, "lora_A.weight", "unknown transformer tensor", out


def symlinked_shard_outside(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(tiny, tmp / "source")
    outside = tmp / "outside.safetensors"
    shutil.move(source / WEIGHTS, outside)
    (source / WEIGHTS).symlink_to(outside)
    args, out = _pack(source, tmp)
    return args, 3, str(source / WEIGHTS), "is a symbolic link (refused", out


def symlinked_transformer_folder(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = tmp / "source"
    source.mkdir()
    (source / "transformer").symlink_to(tiny / "transformer", target_is_directory=True)
    args, out = _pack(source, tmp)
    return args, 3, str(source / "transformer"), "is a symbolic link (refused", out


def fifo_shard(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(tiny, tmp / "source")
    fifo = source / "transformer" / "zz-extra.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block forever
    args, out = _pack(source, tmp)
    return args, 3, str(fifo), "not a regular file", out


def index_lists_absent_tensor(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(tiny, tmp / "source")
    names = read_header(source / WEIGHTS)[0]
    weight_map = {name: Path(WEIGHTS).name for name in names} | {"extra.weight": Path(WEIGHTS).name}
    index = source / (WEIGHTS + ".index.json")
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    args, out = _pack(source, tmp)
    return args, 3, f"{index}: tensor extra.weight", "is listed but not in", out


def text_encoder_index_traversal(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(tiny, tmp / "source")
    (tmp / "outside.safetensors").write_bytes((CORPUS / "trailing_bytes.safetensors").read_bytes()[:-8])
    (source / "text_encoder").mkdir()
    (source / "text_encoder" / "config.json").write_text("{}")
    index = source / "text_encoder" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "../../outside.safetensors", "b": "../../outside.safetensors"}}))
    args, out = _pack(source, tmp)
    return args, 3, str(index), "shard name '../../outside.safetensors' is not a plain file name", out


def packed_inf_scale(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(bundle, tmp / "bundle")
    patch_tensor(bundle_weights(source), "transformer_blocks.0.attn.to_v.scales", 0, F16_INF)
    args, out = _pack(source, tmp)
    return args, 3, "transformer_blocks.0.attn.to_v.scales", "non-finite scale", out


def packed_invalid_ternary_byte(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(bundle, tmp / "bundle")
    patch_tensor(bundle_weights(source), "transformer_blocks.0.ff.linear_out.weight", 7, 250, width=1)
    args, out = _pack(source, tmp)
    return args, 3, "transformer_blocks.0.ff.linear_out.weight", "byte > 242", out


def packed_scales_wrong_dtype(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(bundle, tmp / "bundle")
    name = "single_transformer_blocks.0.attn.to_out.scales"
    scales = SafetensorsFile(bundle_weights(source)).load(name).astype(np.float32)
    rewrite(bundle_weights(source), drop=(name,), add={name: ("F32", scales)})
    args, out = _pack(source, tmp)
    return args, 3, f"tensor {name}", "expected F16 [out, in/128]", out


def packed_manifest_path_traversal(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(bundle, tmp / "bundle")
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["files"][0]["path"] = "../../../etc/passwd"
    (source / "manifest.json").write_text(json.dumps(manifest))
    args, out = _pack(source, tmp)
    return args, 3, str(source / "manifest.json"), "'../../../etc/passwd' is not a safe relative path", out


def verify_manifest_path_traversal(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(bundle, tmp / "bundle")
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["files"][0]["path"] = "transformer/../../outside.txt"
    (source / "manifest.json").write_text(json.dumps(manifest))
    return ["verify", str(source)], 5, str(source / "manifest.json"), "is not a safe relative path", None


def verify_symlink_in_bundle(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(bundle, tmp / "bundle")
    (tmp / "outside.json").write_text("{}")
    (source / "pipeline.json").unlink()
    (source / "pipeline.json").symlink_to(tmp / "outside.json")
    return ["verify", str(source)], 5, "pipeline.json", "is a symbolic link", None


def verify_manifest_invalid_json(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(bundle, tmp / "bundle")
    (source / "manifest.json").write_bytes(b'{"format_version": 1, "files": [\xff')
    return ["verify", str(source)], 5, str(source / "manifest.json"), "not valid JSON", None


def verify_truncated_shard(tmp: Path, tiny: Path, bundle: Path) -> Case:
    source = copy_tree(bundle, tmp / "bundle")
    weights = bundle_weights(source)
    os.truncate(weights, weights.stat().st_size - 100)
    relative = weights.relative_to(source).as_posix()
    return ["verify", str(source)], 5, relative, "bytes, manifest says", None


RECIPES: dict[str, Callable[[Path, Path, Path], Case]] = {
    f.__name__: f
    for f in (
        nan_weight, inf_low_bit_weight, non_ternary_value, in_features_not_multiple_of_128, wrong_shape,
        missing_tensor, unknown_tensor, symlinked_shard_outside, symlinked_transformer_folder, fifo_shard,
        index_lists_absent_tensor, text_encoder_index_traversal, packed_inf_scale, packed_invalid_ternary_byte,
        packed_scales_wrong_dtype, packed_manifest_path_traversal, verify_manifest_path_traversal,
        verify_symlink_in_bundle, verify_manifest_invalid_json, verify_truncated_shard,
    )
}  # fmt: skip


def test_tiny_source_packs_and_verifies(tiny_source, tiny_bundle, tmp_path, capsys):
    """The unbroken baseline of every generated case is accepted (so each refusal is due to its one defect)."""
    code, _, err = run_cli(capsys, "verify", str(tiny_bundle))
    assert code == 0, err
    code, _, err = run_cli(capsys, "pack", str(tiny_bundle), "--target", "iphone", "-o", str(tmp_path / "mlx"))
    assert code == 0, err
    assert not leftovers(tmp_path / "mlx")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_generated_case_is_refused(name, tmp_path, capsys, tiny_source, tiny_bundle):
    args, exit_code, names, reason, out = RECIPES[name](tmp_path, tiny_source, tiny_bundle)
    target = Path(args[1])
    before = tree_state(target) if target.is_dir() else None
    code, stdout, err = run_cli(capsys, *args)
    assert_refused(code, stdout, err, exit_code, names, reason, out)
    if before is not None:
        assert tree_state(target) == before, "the input was modified"


def test_verify_refuses_1d_scales_with_exit_5(tiny_bundle, tmp_path, capsys):
    import hashlib

    bundle = copy_tree(tiny_bundle, tmp_path / "bundle")
    name = "transformer_blocks.0.attn.to_v.scales"
    scales = SafetensorsFile(bundle_weights(bundle)).load(name).ravel().copy()
    rewrite(bundle_weights(bundle), drop=(name,), add={name: ("F16", scales)})
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:  # a consistent manifest: only the decode check can catch it
        data = (bundle / entry["path"]).read_bytes()
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, err = run_cli(capsys, "verify", str(bundle))
    assert_refused(code, stdout, err, 5, name, "", None)


# ------------------------------------------------------------------------------------------------------------
# Atomic output


def test_existing_out_is_never_modified_without_force(tiny_source, tmp_path, capsys):
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_state(out)
    code, stdout, err = run_cli(capsys, "pack", str(tiny_source), "--target", "packed", "-o", str(out))
    assert_refused(code, stdout, err, OutputError.exit_code, str(out), "already exists (use --force", None)
    assert tree_state(out) == before and not leftovers(out)
    (tmp_path / "FILE").write_text("x")
    code, stdout, err = run_cli(capsys, "pack", str(tiny_source), "--target", "packed", "-o", str(tmp_path / "FILE"))
    assert_refused(code, stdout, err, OutputError.exit_code, "FILE", "exists and is not a folder", None)


def test_failed_force_run_keeps_the_old_out(tmp_path, capsys):
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_state(out)
    code, stdout, err = run_cli(capsys, "pack", str(CORPUS / "truncated_data.safetensors"), "--target", "packed",
                                "-o", str(out), "--force")  # fmt: skip
    assert code == InputError.exit_code and err.startswith("error: ")
    assert tree_state(out) == before and not leftovers(out)


def test_disk_full_is_one_clear_line_and_leaves_nothing(tiny_source, tmp_path, capsys, monkeypatch):
    def full(self, name, array):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(SafetensorsWriter, "write", full)
    out = tmp_path / "OUT"
    code, stdout, err = run_cli(capsys, "pack", str(tiny_source), "--target", "packed", "-o", str(out))
    assert_refused(code, stdout, err, OutputError.exit_code, str(out), "disk full", out)


def _interrupted_pack(tiny_source: Path, out: Path, capsys, monkeypatch) -> tuple[int, str, str]:
    """pack, with Ctrl-C arriving after every tensor has been written."""
    import bonsai_convert.pack as pack_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pack_module, "json_bytes", interrupt)  # the JSON files are written last
    return run_cli(capsys, "pack", str(tiny_source), "--target", "packed", "-o", str(out))


def test_ctrl_c_leaves_nothing(tiny_source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "OUT"
    _interrupted_pack(tiny_source, out, capsys, monkeypatch)
    assert not out.exists() and not leftovers(out)


def test_ctrl_c_exits_130_with_one_line(tiny_source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "OUT"
    code, stdout, err = _interrupted_pack(tiny_source, out, capsys, monkeypatch)
    assert_refused(code, stdout, err, 130, "interrupted", "no partial output", out)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_force_run_killed_between_renames_gets_its_old_out_back(tmp_path):
    from bonsai_convert.atomic import atomic_folder

    out = tmp_path / "OUT"
    pid = _dead_pid()
    moved = tmp_path / f".OUT.replaced-{pid}"  # the old OUT, moved aside just before the kill
    moved.mkdir()
    (moved / "keep.txt").write_text("mine")
    (tmp_path / f".OUT.partial-{pid}").mkdir()
    with pytest.raises(OutputError, match="already exists"), atomic_folder(out):
        pass
    assert (out / "keep.txt").read_text() == "mine" and not leftovers(out)


def test_kill_9_during_pack_leaves_no_out_and_next_run_cleans_up(tiny_source, tmp_path, capsys, monkeypatch):
    from bonsai_convert.sources import clean_demo_leftovers

    out = tmp_path / "OUT"
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp))
    process = subprocess.Popen(
        [sys.executable, "-m", "bonsai_convert", "pack", "demo:ternary", "--target", "iphone", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    try:
        while not leftovers(out):
            assert process.poll() is None, f"pack ended before its temporary folder appeared: {process.stderr.read()}"
            assert time.monotonic() < deadline, "the temporary folder never appeared"
            time.sleep(0.02)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists(), "kill -9 left an OUT"
    assert [p.name for p in leftovers(out)] == [f".OUT.partial-{process.pid}"]
    # The next run for the same OUT removes the killed run's folder and writes OUT.
    code, _, err = run_cli(capsys, "pack", str(tiny_source), "--target", "packed", "-o", str(out))
    assert code == 0, err
    assert out.is_dir() and not leftovers(out)
    # The killed run's demo checkpoint (in its TMPDIR) is removed by the next demo run.
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    assert [p.name.split("-")[2] for p in clean_demo_leftovers()] == [str(process.pid)]
    assert not list(temp.glob("bonsai-demo-*"))


# ------------------------------------------------------------------------------------------------------------
# No pickle anywhere


FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _forbidden_uses(path: Path) -> list[str]:
    """torch.load, pickle-family imports/calls, weights_only=False, allow_pickle=True in one Python file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in FORBIDDEN_MODULES or (module == "torch" and any(a.name == "load" for a in node.names)):
                found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Name) and base.id == "torch" and node.attr == "load":
                found.append(f"{where}: torch.load")
            if isinstance(base, ast.Name) and base.id in FORBIDDEN_MODULES:
                found.append(f"{where}: {base.id}.{node.attr}")
        elif isinstance(node, ast.keyword):
            value = node.value
            if isinstance(value, ast.Constant):
                if node.arg == "weights_only" and value.value is False:
                    found.append(f"{where}: weights_only=False")
                if node.arg in ("allow_pickle", "trust_remote_code") and value.value is True:
                    found.append(f"{where}: {node.arg}=True")
    return found


def test_no_pickle_or_torch_load_in_package_or_runtime():
    files = sorted((REPO / "bonsai_convert").rglob("*.py")) + sorted((REPO / "runtime").rglob("*.py"))
    assert len(files) > 10
    found = [use for path in files for use in _forbidden_uses(path)]
    assert not found, "pickle-based loading is forbidden: " + "; ".join(found)
    # And as plain text, outside comments and strings (a docstring may say "never pickles").
    import io
    import re
    import tokenize

    pattern = re.compile(r"(?<!safetensors\.)\btorch\s*\.\s*load\b|\bpickle\b|weights_only\s*=\s*False")
    for path in files:
        tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        code = " ".join(t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.STRING))
        assert not pattern.search(code.replace(" . ", ".")), f"{path}: pickle-based loading"


def test_the_pickle_scan_catches_each_form(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import pickle\nimport torch\nfrom torch import load\n"
        "x = torch.load('m.pt', weights_only=False)\ny = pickle.loads(b'')\nz = np.load('a', allow_pickle=True)\n"
        '"""torch.load and pickle in a docstring are fine"""\n'
    )
    assert len(_forbidden_uses(sample)) == 6, _forbidden_uses(sample)


def test_pickle_sources_are_refused(tmp_path, capsys):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"\x80\x04\x95 not really a pickle")
    out = tmp_path / "OUT"
    code, stdout, err = run_cli(capsys, "pack", str(checkpoint), "--target", "packed", "-o", str(out))
    assert_refused(code, stdout, err, 3, str(checkpoint), "must be a .safetensors BFL checkpoint (no pickles)", out)
