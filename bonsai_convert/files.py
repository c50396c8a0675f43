"""Reading files safely: small JSON configs, streaming sha256 (SourceHasher: on a thread while pack converts),
folders without symbolic links, bundle manifests.

The lowest layer of the converter (no other module of the package is imported here but errors/schemas/safetensors).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import re
import stat
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError
from .safetensors_io import strict_json_loads
from .schemas import validate

MAX_JSON_BYTES = 10_000_000
MANIFEST = "manifest.json"
SAFE_PATH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def hub_blob_link(path: Path) -> bool:
    """Whether path is a link of a Hugging Face cache snapshot into the same repo's own `blobs/` folder.

    The Hub cache stores `models--ORG--NAME/snapshots/<commit>/<file>` as links to `models--ORG--NAME/blobs/<hash>`;
    exactly those are followed (to a regular file): any other link is refused wherever a link is checked.
    """
    absolute = Path(os.path.abspath(path))
    for parent in absolute.parents:
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith("models--"):
            blobs = parent.parent.parent / "blobs"
            target = Path(os.path.realpath(absolute))
            # one hop: the link itself points into blobs/ (relative, as huggingface_hub writes it, or absolute)
            first = Path(os.path.normpath(absolute.parent / os.readlink(absolute)))
            inside = first.parent == blobs and target.parent == Path(os.path.realpath(blobs))
            return inside and target.is_file() and not first.is_symlink()
    return False


def refused_link(path: Path) -> bool:
    """A symbolic link that must not be followed (every link but a Hub-cache snapshot's link into its blobs)."""
    return path.is_symlink() and not hub_blob_link(path)


def read_json(path: Path) -> dict:
    """Read a small JSON object file, refusing oversized, non-UTF-8 or non-object content with one line."""
    try:
        if refused_link(path):
            raise InputError(f"{path}: is a symbolic link (refused)")
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise InputError(f"{path}: not a regular file")
        if info.st_size > MAX_JSON_BYTES:
            raise InputError(f"{path}: {info.st_size} bytes is too large for a config file")
        value = strict_json_loads(path.read_bytes())
    except FileNotFoundError as error:
        raise InputError(f"{path}: missing") from error
    except RecursionError as error:
        raise InputError(f"{path}: not valid JSON (nested too deeply)") from error
    except ValueError as error:  # UnicodeDecodeError, JSONDecodeError, duplicate keys, NaN/Infinity
        raise InputError(f"{path}: not valid JSON ({str(error)[:200]})") from error
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from error
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object")
    return value


CACHE_ENV = "BONSAI_CONVERT_CACHE"


def cache_dir() -> Path:
    """The bonsai-convert cache folder: `$BONSAI_CONVERT_CACHE` or `~/.cache/bonsai-convert`."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "bonsai-convert"


def sha256_file(path: Path, chunk: int = 1 << 26) -> str:
    """Streaming sha256 of a file (or the digest `remember_sha256` recorded for it inside `known_sha256()`)."""
    if _KNOWN is not None:
        known = _KNOWN.get(file_key(path))
        if known is not None:
            return known if isinstance(known, str) else known.result()
    return sha256_stream(path, chunk)


def sha256_stream(path: Path, chunk: int = 1 << 26, stop=None) -> str:
    """sha256 of a file's bytes, read once; `stop` (a threading.Event) cancels it (raises InterruptedError).

    A regular file is hashed straight from the page cache through a moving mapped window of `chunk` bytes (no
    copy into a buffer: that copy was a tenth of pack's CPU at Klein size; one window at a time, so the mapping
    adds at most `chunk` to the process's RSS); anything else is read into one buffer. hashlib releases the GIL
    for each block.
    """
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        info = os.fstat(handle.fileno())
        blocks = _mapped_blocks(handle, info.st_size, chunk) if stat.S_ISREG(info.st_mode) else _read_blocks(handle)
        for block in blocks:
            digest.update(block)
            if stop is not None and stop.is_set():
                blocks.close()
                raise InterruptedError(str(path))
    return digest.hexdigest()


def _read_blocks(handle, chunk: int = 1 << 22):
    buffer = memoryview(bytearray(chunk))  # one buffer for the whole file: no fresh pages per block
    while size := handle.readinto(buffer):
        yield buffer[:size]


def _mapped_blocks(handle, size: int, chunk: int):
    """The file's bytes as read-only mapped windows of `chunk` bytes (a multiple of the mapping granularity)."""
    chunk = max(mmap.ALLOCATIONGRANULARITY, chunk - chunk % mmap.ALLOCATIONGRANULARITY)
    for start in range(0, size, chunk):
        with mmap.mmap(handle.fileno(), min(chunk, size - start), offset=start, access=mmap.ACCESS_READ) as window:
            if hasattr(window, "madvise"):
                window.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(window)
            try:
                yield view
            finally:
                view.release()  # no buffer may stay exported when the window closes


# Digests computed once during `pack` (by the writer as it writes, or by a reader thread over the source) and
# reused by the manifest. Only while a known_sha256() block is active: elsewhere (verify) files are always read.
_KNOWN: dict | None = None


def file_key(path: Path) -> tuple[int, ...]:
    info = os.stat(path)
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


@contextmanager
def known_sha256():
    """A scope in which remembered digests stand for reading the file (keyed by inode, size and mtime)."""
    global _KNOWN
    previous, _KNOWN = _KNOWN, {}
    try:
        yield
    finally:
        _KNOWN = previous


def remember_sha256(path: Path, digest) -> None:
    """Record the sha256 (a hex str, or a Future of one) of a file as it is now; a no-op outside known_sha256()."""
    if _KNOWN is not None:
        _KNOWN[file_key(path)] = digest


def plain_dir(path: Path) -> bool:
    """True if path is a real folder; a symbolic link (which could lead out of the source) is refused."""
    if path.is_symlink():  # the Hub cache links files only: a linked folder is always refused
        raise InputError(f"{path}: is a symbolic link (refused: it may point outside the source)")
    return path.is_dir()


def safe_files_under(root: Path) -> list[Path]:
    """All regular files below root, refusing symlinks (nothing outside the folder is ever followed)."""
    plain_dir(root)
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink() and (path.is_dir() or refused_link(path)):
            raise InputError(f"{path}: is a symbolic link (refused: it may point outside {root})")
        if path.is_file():
            files.append(path)
    return files


def safe_relative(path: str) -> bool:
    """A relative path of safe characters with no `..` component (never leaves the bundle)."""
    return bool(SAFE_PATH.match(path)) and ".." not in path.split("/")


def load_manifest(root: Path) -> dict:
    """Read and schema-validate a bundle's manifest; every path must be a safe relative path."""
    path = root / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: missing (not a bonsai-convert bundle)")
    manifest = read_json(path)
    validate(manifest, "manifest", str(path))
    for entry in manifest["files"]:
        if not safe_relative(entry["path"]):
            raise InputError(f"{path}: file path {entry['path']!r} is not a safe relative path")
    if manifest["golden"] is not None and not safe_relative(manifest["golden"]):
        raise InputError(f"{path}: golden path {manifest['golden']!r} is not a safe relative path")
    return manifest


def is_our_manifest(value: dict) -> bool:
    """Whether a parsed manifest.json was written by bonsai-convert (others, e.g. PrismML's, are not ours)."""
    tool = value.get("tool")
    return isinstance(tool, dict) and tool.get("name") == "bonsai-convert"


class SourceHasher:
    """sha256 of every source file (the manifest's source identity) on a thread of its own, while pack converts.

    Each file is read once, in order, from the page cache the conversion is filling anyway (or into it, ahead
    of the conversion, on a cold cache); `sha256_file` inside `known_sha256()` waits for the result.
    """

    def __init__(self, paths: list[Path]):
        self._stop = threading.Event()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.paths: set[Path] = set()
        self._keys: set[tuple[int, ...]] = set()
        self.add(paths)
        self._thread = threading.Thread(target=self._run, name="source-sha256", daemon=True)
        self._thread.start()

    def add(self, paths: list[Path]) -> None:
        for path in paths:
            future: Future = Future()
            try:
                key = file_key(path)
            except OSError:
                continue  # gone or unreadable: whoever needs it reads it and reports
            if key in self._keys:
                continue
            self._keys.add(key)
            self.paths.add(path)
            remember_sha256(path, future)
            self._queue.put((path, future))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                path, future = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                future.set_result(sha256_stream(path, stop=self._stop))
            except BaseException as error:  # noqa: BLE001 - handed to whoever asks for this digest
                future.set_exception(error)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
