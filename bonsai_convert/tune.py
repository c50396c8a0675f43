"""`tune` (GPU only): run a CUDA bundle once so Gemlite autotunes every low-bit shape, store the autotune cache as
the transformer's `gemlite_autotune.json` (the released layout's file, `{}` until tuned; the GPU it was tuned on is
recorded in the manifest), and measure time to first image cold (fresh process, no cache) vs warm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import UsageError
from .files import sha256_file
from .layout import json_bytes
from .manifest import MANIFEST, bundle_entries, load_manifest, summarize
from .schemas import validate


def _time_first_image(bundle: Path, width: int, height: int, env: dict[str, str]) -> float:
    """Seconds for a fresh process to generate one image (imports excluded: timed inside the process)."""
    code = (
        "import sys, time; from bonsai_cuda import load_pipeline, generate;"
        "t = time.perf_counter(); pipe = load_pipeline(sys.argv[1]);"
        "generate(pipe, 'a bonsai tree', 0, 4, int(sys.argv[2]), int(sys.argv[3]));"
        "print(time.perf_counter() - t)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(bundle), str(width), str(height)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def add_file_to_manifest(bundle: Path, relative: str, autotuned_on: str | None = None) -> None:
    """List a new or changed bundle file in the manifest (size, sha256, sizes recomputed), validated, written via a
    rename; autotuned_on: the GPU the autotune cache was made on (`layout.autotuned_on`)."""
    manifest = load_manifest(bundle)
    if autotuned_on is not None:
        manifest["layout"]["autotuned_on"] = autotuned_on
    entries = [e for e in manifest["files"] if e["path"] != relative]
    path = bundle / relative
    entries.append({"path": relative, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    manifest["files"] = sorted(entries, key=lambda e: e["path"])
    fp16 = {name: c["fp16_bytes"] for name, c in manifest["components"].items() if "fp16_bytes" in c}
    weights = manifest["weights"]
    manifest.update(summarize(bundle_entries(bundle), fp16, weights["low_bit"], weights["transformer"]))
    validate(manifest, "manifest", f"{bundle}/{MANIFEST}")
    temporary = bundle / f".{MANIFEST}.partial"
    temporary.write_bytes(json_bytes(manifest))
    os.replace(temporary, bundle / MANIFEST)


def tune_bundle(bundle: Path) -> dict:
    """Tune, store the cache, and return {gpu, cache, cold_seconds, warm_seconds}."""
    import torch

    manifest = load_manifest(bundle)
    if manifest["target"] != "cuda":
        raise UsageError(f"{bundle}: tune is for cuda bundles (this one is {manifest['target']})")
    if not torch.cuda.is_available():
        raise UsageError("tune needs a CUDA GPU and none is available here (CPU runs use the decoded fallback)")
    try:
        import gemlite
    except Exception as error:  # noqa: BLE001 - gemlite fails in several ways without a usable GPU
        raise UsageError(f"tune needs gemlite (pip install -e '.[cuda]'): {error}") from error
    from bonsai_cuda.pipeline import autotune_cache_path

    width, height = manifest["profile"]["default_width"], manifest["profile"]["default_height"]
    gpu = torch.cuda.get_device_name()
    target = autotune_cache_path(bundle / manifest["layout"]["folders"]["transformer"])
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as scratch:
        # Cold: a fresh process while the bundle's cache is still empty.
        if target.exists() and json.loads(target.read_text() or "{}"):
            tuned_on = manifest["layout"].get("autotuned_on", "another GPU")
            raise UsageError(f"{target}: already tuned on {tuned_on} (write {{}} into it to tune again)")
        cold = _time_first_image(bundle, width, height, env)
        code = (
            "import sys, gemlite; from bonsai_cuda import load_pipeline, generate;"
            "pipe = load_pipeline(sys.argv[1]);"
            "generate(pipe, 'a bonsai tree', 0, 4, int(sys.argv[2]), int(sys.argv[3]));"
            "gemlite.cache_config(sys.argv[4])"
        )
        cache = Path(scratch) / "autotune.json"
        subprocess.run([sys.executable, "-c", code, str(bundle), str(width), str(height), str(cache)], check=True)
        json.loads(cache.read_text())  # gemlite wrote valid JSON
        target.write_bytes(cache.read_bytes())
    add_file_to_manifest(bundle, target.relative_to(bundle).as_posix(), autotuned_on=gpu)
    warm = _time_first_image(bundle, width, height, env)
    del gemlite
    return {
        "gpu": gpu,
        "cache": str(target),
        "cold_seconds": round(cold, 2),
        "warm_seconds": round(warm, 2),
        "size": f"{width}x{height}",
        "measured_at": time.strftime("%Y-%m-%d"),
    }
