"""`demo:binary` / `demo:ternary`: the tiny demo checkpoint, built once per process in a temporary folder."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from .. import demo

_DEMO_CACHE: dict[tuple[str, int], Path] = {}
DEMO_TEMP_PREFIX = "bonsai-demo-"


def clean_demo_leftovers() -> list[Path]:
    """Remove demo temporary folders of killed runs (`bonsai-demo-<pid>-...` whose process is gone)."""
    removed = []
    for candidate in Path(tempfile.gettempdir()).glob(f"{DEMO_TEMP_PREFIX}*-*"):
        pid_text = candidate.name[len(DEMO_TEMP_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or candidate.is_symlink() or not candidate.is_dir():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
        except OSError:
            continue
    return removed


def demo_folder(variant: str, seed: int) -> Path:
    """Build the demo checkpoint once per process in a temporary folder (removed at exit or by a later run)."""
    key = (variant, seed)
    if key not in _DEMO_CACHE:
        clean_demo_leftovers()
        folder = Path(tempfile.mkdtemp(prefix=f"{DEMO_TEMP_PREFIX}{os.getpid()}-{variant}-"))
        atexit.register(shutil.rmtree, folder, True)
        demo.write_demo(folder / "checkpoint", variant, seed)
        _DEMO_CACHE[key] = folder / "checkpoint"
    return _DEMO_CACHE[key]
