"""A Hub repo id `ORG/NAME[@REVISION]` as a SOURCE: only the files a pack needs, read in place from the Hub cache.

huggingface_hub's `snapshot_download` fetches (resumable, with its progress bars, offline from the cache when
HF_HUB_OFFLINE=1) into `models--ORG--NAME/snapshots/<commit>/`, whose files are links into the repo's `blobs/`:
the readers follow exactly those links (files.hub_blob_link) and keep refusing every other one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, RemoteError

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+)(?:@(?P<revision>[A-Za-z0-9_./-]+))?$")
# What any source kind reads: diffusers folders, the released MLX and Gemlite layouts, a packed bundle's own files,
# licences. The only `.pt` files fetched are a Gemlite pack's transformer state_dict.pt and its HQQ text encoder's
# qmodel.pt (both read without unpickling).
NEEDED_FILES = [
    "model_index.json",
    "manifest.json",
    "pipeline.json",
    "bonsai_demo.json",
    "LICENSE*",
    "NOTICE*",
    "transformer/*",
    "transformer-packed-mflux/*",
    "transformer-gemlite-int1/*",
    "transformer-gemlite-int2/*",
    "text_encoder/*",
    "text_encoder-mlx-4bit/*",
    "text_encoder-hqq-4bit/*",
    "tokenizer/*",
    "vae/*",
    "scheduler/*",
]
NEVER_FILES = ["*.bin", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.msgpack", "*.h5", "*.onnx", "*.gguf"]
_PT_FOLDERS = ("gemlite", "hqq")
NEVER_FILES += [
    f"{folder[:-2]}/*.pt"
    for folder in NEEDED_FILES
    if folder.endswith("/*") and not any(k in folder for k in _PT_FOLDERS)
]
NEVER_FILES += ["transformer-gemlite-int*/[!s]*.pt", "transformer-gemlite-int*/s[!t]*.pt"]  # only state_dict.pt
NEVER_FILES += ["text_encoder-hqq-4bit/[!q]*.pt", "text_encoder-hqq-4bit/q[!m]*.pt"]  # only qmodel.pt


@dataclass(frozen=True)
class HubSnapshot:
    repo_id: str
    requested: str | None  # the revision asked for (branch, tag or commit), None for the default branch
    commit: str  # the commit the files are pinned to
    folder: Path


def parse_repo_id(spec: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) for `ORG/NAME[@REVISION]`, else None (a local path is never taken for a repo id)."""
    match = REPO_ID.match(spec)
    if match is None or Path(spec).exists() or spec.startswith((".", "/")):
        return None
    return match.group("repo"), match.group("revision")


def download(repo_id: str, revision: str | None) -> HubSnapshot:
    """Fetch (or find in the cache) the files a pack needs; one-line errors for every Hub failure."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    label = f"{repo_id}@{revision}" if revision else repo_id
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=NEEDED_FILES, ignore_patterns=NEVER_FILES)
        )
    except RevisionNotFoundError as error:
        raise InputError(f"{label}: no such revision on the Hub") from error
    except GatedRepoError as error:
        raise RemoteError(f"{label}: the repository is gated (accept its terms and set HF_TOKEN)") from error
    except RepositoryNotFoundError as error:
        raise InputError(f"{label}: no such repository on the Hub (or no access: set HF_TOKEN)") from error
    except LocalEntryNotFoundError as error:
        raise RemoteError(f"{label}: not in the Hub cache and the Hub cannot be reached ({error})") from error
    except (HfHubHTTPError, OSError) as error:
        raise RemoteError(f"{label}: download failed: {str(error).splitlines()[0][:300]}") from error
    return HubSnapshot(repo_id, revision, folder.name, folder)
