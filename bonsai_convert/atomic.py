"""Atomic folder output: build beside OUT in a temporary folder, rename at the end, never leave a partial OUT."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

PARTIAL_MARK = ".partial-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out: Path) -> list[Path]:
    """Remove temporary folders of killed earlier runs for this OUT (their process is gone); return them."""
    removed = []
    for candidate in out.parent.glob(f".{out.name}{PARTIAL_MARK}*"):
        pid_text = candidate.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes OUT only if the block finishes; OUT is replaced only with force."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{out}: exists and is not a folder")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (use --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{out.parent}: cannot create: {error.strerror}") from error
    clean_leftovers(out)
    temporary = out.parent / f".{out.name}{PARTIAL_MARK}{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        if out.exists():
            trash = out.parent / f".{out.name}.replaced-{os.getpid()}"
            os.rename(out, trash)
            os.rename(temporary, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(temporary, out)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise OutputError(f"{out}: disk full while writing (nothing was left behind)") from error
        raise OutputError(f"{error.filename or out}: cannot write: {error.strerror}") from error
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
