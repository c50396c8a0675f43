"""Shared fixtures: demo checkpoints and bundles are built once per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# verify records go to a throw-away cache, never to the user's ~/.cache
os.environ["BONSAI_CONVERT_CACHE"] = tempfile.mkdtemp(prefix="bonsai-test-cache-")


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
