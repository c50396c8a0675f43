"""Shared fixtures: demo checkpoints and bundles are built once per test session."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

# verify records go to a throw-away cache, never to the user's ~/.cache
os.environ["BONSAI_CONVERT_CACHE"] = tempfile.mkdtemp(prefix="bonsai-test-cache-")
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

try:  # MLX's Linux CPU speed-ups (fast BLAS, freed memory kept) before any test module imports MLX
    import bonsai_mlx
except ImportError:  # pragma: no cover - MLX not installed
    pass
else:
    bonsai_mlx.enable_cpu_speedups()


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    """demo_checkpoint(variant) → a diffusers-layout demo folder (bf16, exact low-bit weights)."""
    from bonsai_convert.demo import write_demo

    made: dict[str, Path] = {}

    def build(variant: str) -> Path:
        if variant not in made:
            made[variant] = write_demo(tmp_path_factory.mktemp(f"demo-{variant}") / "checkpoint", variant, seed=0)
        return made[variant]

    return build


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory, demo_checkpoint):
    """demo_bundle(variant, target) → a bundle packed from the demo checkpoint (with golden record)."""
    from bonsai_convert.pack import PackOptions, pack

    made: dict[tuple[str, str], Path] = {}

    def build(variant: str, target: str) -> Path:
        key = (variant, target)
        if key not in made:
            out = tmp_path_factory.mktemp(f"bundle-{variant}-{target}") / "bundle"
            pack(str(demo_checkpoint(variant)), out, PackOptions(target=target))
            made[key] = out
        return made[key]

    return build


def bundle_folder(bundle: Path, component: str) -> Path:
    """A bundle's folder of a component, as its pipeline.json names it (MLX: `transformer-packed-mflux`, ...)."""
    import json

    folders = json.loads((bundle / "pipeline.json").read_text()).get("folders", {})
    return bundle / folders.get(component, component)


def load_script(name: str):
    """scripts/NAME.py imported as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree_digest(folder: Path) -> str:
    """One sha256 over every file below folder: relative path, NUL, bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
