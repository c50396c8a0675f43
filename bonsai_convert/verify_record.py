"""Passing `verify` results, recorded outside the bundle (verify never modifies a bundle).

A record lives at `<cache>/verified/<sha256 of manifest.json bytes>.json`, where `<cache>` is
`$BONSAI_CONVERT_CACHE` or `~/.cache/bonsai-convert`. Keying on the manifest bytes ties a record to one
exact manifest; `publish` also re-hashes the listed files before uploading, so a file edited after verify
(without touching the manifest) is caught there.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .errors import InputError, OutputError
from .files import cache_dir

MANIFEST_NAME = "manifest.json"


def manifest_sha256(bundle_dir: str | Path) -> str:
    """sha256 (hex) of the bundle's manifest.json bytes; InputError when it cannot be read."""
    path = Path(bundle_dir) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no manifest.json (not a bundle folder)") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return hashlib.sha256(data).hexdigest()


def record_path(bundle_dir: str | Path) -> Path:
    """Where the verify record of the bundle's current manifest is (or would be) stored."""
    return cache_dir() / "verified" / f"{manifest_sha256(bundle_dir)}.json"


def record_pass(bundle_dir: str | Path, report: dict) -> Path:
    """Store a passing verify report for the bundle's current manifest; returns the record's path.

    The write is atomic (temporary file + rename), so a concurrent `find_pass` never reads half a record.
    """
    if report.get("passed") is not True:
        raise ValueError("record_pass stores passing reports only (report['passed'] must be True)")
    target = record_path(bundle_dir)
    text = json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OutputError(f"{target}: cannot record the verify result: {exc.strerror or exc}") from None
    return target


def find_pass(bundle_dir: str | Path) -> dict | None:
    """The stored report for the bundle's current manifest when it exists and passed, else None.

    A report naming another `manifest_sha256` than the current manifest's does not count either.
    """
    digest = manifest_sha256(bundle_dir)
    path = cache_dir() / "verified" / f"{digest}.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(report, dict) or report.get("passed") is not True:
        return None
    if report.get("manifest_sha256", digest) != digest:
        return None
    return report
