"""Atomic folder output: build beside OUT in a temporary folder, rename at the end, never leave a partial OUT.

Names beside OUT: `.OUT.partial-<pid>` (the folder being built) and `.OUT.replaced-<pid>` (an old OUT
moved aside for the instant of a --force replacement). A run killed with SIGKILL leaves them behind; the next
run for the same OUT removes those whose process is gone, and puts a moved-aside OUT back if the kill fell
between the two renames.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

PARTIAL_MARK = ".partial-"
REPLACED_MARK = ".replaced-"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_leftovers(out: Path, mark: str) -> list[Path]:
    """`.OUT<mark><pid>` folders beside OUT whose process is gone (never a symlink)."""
    found = []
    for candidate in sorted(out.parent.glob(f".{out.name}{mark}*")):
        pid_text = candidate.name[len(f".{out.name}{mark}") :]
        if pid_text.isdigit() and not candidate.is_symlink() and not _pid_alive(int(pid_text)):
            found.append(candidate)
    return found


def clean_leftovers(out: Path) -> list[Path]:
    """Remove temporary folders of killed earlier runs for this OUT (their process is gone); return them.

    An OUT moved aside by a --force run killed before its new OUT was renamed in is restored, not removed.
    """
    removed = []
    for trash in _dead_leftovers(out, REPLACED_MARK):
        if not out.exists() and not out.is_symlink():
            os.rename(trash, out)  # killed between the two renames: the old OUT comes back unchanged
        else:
            shutil.rmtree(trash, ignore_errors=True)
        removed.append(trash)
    for candidate in _dead_leftovers(out, PARTIAL_MARK):
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def _output_error(error: OSError, where: Path) -> OutputError:
    if error.errno in DISK_FULL:
        return OutputError(f"{where}: disk full while writing (nothing was left behind)")
    return OutputError(f"{error.filename or where}: cannot write: {error.strerror}")


def _sync_folder(folder: Path) -> None:
    """Make a rename in folder durable (best effort: not every file system supports it)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes OUT if the block finishes; OUT is replaced only with force."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)  # first: it may put back an OUT that a killed --force run had moved aside
    except OSError as error:
        raise OutputError(f"{out.parent}: cannot create: {error.strerror}") from error
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{out}: exists and is not a folder")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (use --force to replace it)")
    temporary = out.parent / f".{out.name}{PARTIAL_MARK}{os.getpid()}"
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
    except OSError as error:
        raise _output_error(error, out) from error
    try:
        yield temporary
        if out.exists():
            trash = out.parent / f".{out.name}{REPLACED_MARK}{os.getpid()}"
            os.rename(out, trash)
            try:
                os.rename(temporary, out)
            except OSError:
                os.rename(trash, out)  # the old OUT stays as it was
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(temporary, out)
        _sync_folder(out.parent)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise _output_error(error, out) from error
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
