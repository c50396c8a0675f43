"""Publish a verified bundle to the Hugging Face Hub: model card, upload plan, upload, post-upload check.

Flow (`publish`): passing verify record for the current manifest.json (verify_record.py) → re-hash every
listed file against the manifest → model card (README.md, built in memory, never written into the bundle) →
`create_repo(exist_ok=True)` → branch for `revision` → one `create_commit` holding exactly manifest.json, the
listed files and README.md → `list_repo_tree` at the new commit: every file's size and sha256 (LFS oid) or git
blob id must match the bundle, else RemoteError naming the file.

Upload function: huggingface_hub 2.4 has no `upload_large_folder`; `upload_folder` uploads whatever lies in
a folder and would need the card written next to the bundle. `create_commit` with explicit
`CommitOperationAdd`s uploads exactly the verified files plus the card (as bytes) in one atomic commit,
honours `revision` and the commit message, and resumes on re-run: files the Hub already stores are skipped
(preupload oid / LFS batch with no upload action), and with `hf_xet` installed (the default) Xet
deduplicates chunks already sent.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import (
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import InputError, RemoteError, UsageError
from .files import load_manifest, sha256_stream
from .verify_record import MANIFEST_NAME, find_pass
from .vocabulary import DEFAULT_BASE_MODEL, TARGETS, VARIANTS

CARD_NAME = "README.md"
DEFAULT_REVISION = "main"
# Hub library keys (huggingface.js model-libraries): MLX bundles load with MLX, CUDA bundles are diffusers
# pipelines with Gemlite linears (Gemlite is no Hub library). Packed codes load with no Hub library: omitted.
LIBRARY_BY_TARGET: dict[str, str | None] = {
    "iphone": "mlx",
    "ipad": "mlx",
    "mac": "mlx",
    "cuda": "diffusers",
    "packed": None,
    "gguf": None,  # the Hub recognises .gguf files by themselves; stable-diffusion.cpp is no Hub library key
}
TARGET_DESCRIPTION = {
    "packed": "the canonical packed format (codes at information size, the source for other targets)",
    "iphone": "MLX on iPhone",
    "ipad": "MLX on iPad",
    "mac": "MLX on Apple-silicon Macs",
    "cuda": "NVIDIA GPUs through diffusers with Gemlite low-bit kernels",
    "gguf": "stable-diffusion.cpp / ggml: one GGUF transformer with upstream ggml Q1_0 / Q2_0 low-bit linears",
}
COMPONENT_ORDER = ("transformer", "text_encoder", "vae", "tokenizer", "scheduler", "configs", "golden")
RESERVED_PATHS = (MANIFEST_NAME, CARD_NAME, ".gitattributes")
_PATH_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_UPLOAD_FAILED_RE = re.compile(r"Error while uploading '(?P<path>[^']+)' to the Hub")
_TOKEN_LIKE_RE = re.compile(r"(hf_[A-Za-z0-9]{30,}|Bearer\s+\S+)")
_CONNECT_ERRORS = {"ConnectError", "ConnectTimeout", "ProxyError", "UnsupportedProtocol"}
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class BundleFile:
    """One file listed in manifest.json."""

    path: str
    bytes: int
    sha256: str


@dataclass
class PublishResult:
    """What `publish` did (or, for a dry run, would do)."""

    repo_id: str
    revision: str
    files: list[tuple[str, int]]
    total_bytes: int
    dry_run: bool
    verified: bool
    card_text: str
    card_path: Path | None = None
    commit_oid: str | None = None
    commit_url: str | None = None
    stale_remote_files: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ manifest


def manifest_files(manifest: dict) -> list[BundleFile]:
    """The manifest's `files`, validated (safe relative paths, sizes, sha256s), sorted by path."""
    seen: set[str] = set()
    result: list[BundleFile] = []
    for index, entry in enumerate(manifest.get("files") or []):
        where = f"manifest.json: files/{index}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected an object")
        path, size, sha = entry.get("path"), entry.get("bytes"), entry.get("sha256")
        if not isinstance(path, str) or not _PATH_RE.match(path) or ".." in path.split("/"):
            raise InputError(f"{where}: unsafe or malformed path {path!r}")
        if path in RESERVED_PATHS:
            raise InputError(f"{where}: {path} may not be listed (publish writes it)")
        if path in seen:
            raise InputError(f"{where}: {path} is listed twice")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InputError(f"{where}: {path}: 'bytes' must be a non-negative integer")
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise InputError(f"{where}: {path}: 'sha256' must be 64 lowercase hex digits")
        seen.add(path)
        result.append(BundleFile(path=path, bytes=size, sha256=sha))
    return sorted(result, key=lambda f: f.path)


def _git_blob_id(path: Path, size: int) -> str:
    """Git blob sha1 of a file (what the Hub reports as `oid` for a non-LFS file), streamed."""
    digest = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_bundle_files(bundle_dir: str | Path, files: Iterable[BundleFile]) -> None:
    """Re-hash every listed file: a regular file inside the bundle with the manifest's size and sha256.

    Raises InputError naming the first file that is missing, a link, outside the bundle, or changed after
    verify.
    """
    root = Path(bundle_dir).resolve()
    for item in files:
        local = root / item.path
        if local.is_symlink():
            raise InputError(f"{item.path}: is a symbolic link; a bundle holds regular files only")
        if not local.exists():
            raise InputError(f"{item.path}: listed in manifest.json but missing from the bundle")
        if not local.resolve().is_relative_to(root):
            raise InputError(f"{item.path}: resolves outside the bundle folder")
        if not local.is_file():
            raise InputError(f"{item.path}: is not a regular file")
        actual_size = local.stat().st_size
        if actual_size != item.bytes:
            raise InputError(
                f"{item.path}: {actual_size} bytes but manifest.json says {item.bytes}: the file changed "
                "after verify; re-run verify"
            )
        if sha256_stream(local) != item.sha256:
            raise InputError(
                f"{item.path}: sha256 differs from manifest.json: the file changed after verify; re-run verify"
            )


def plan_upload(bundle_dir: str | Path, manifest: dict) -> list[tuple[str, int]]:
    """(path in repo, bytes) of the bundle files publish uploads: manifest.json and every listed file.

    The model card (README.md) is added by `publish`; it is not part of the bundle.
    """
    manifest_size = (Path(bundle_dir) / MANIFEST_NAME).stat().st_size
    plan = [(MANIFEST_NAME, manifest_size)] + [(f.path, f.bytes) for f in manifest_files(manifest)]
    return sorted(plan)


# ------------------------------------------------------------------------------------------------ model card


def format_bytes(n: float | None) -> str:
    """Decimal units as in the Bonsai paper's Table 2 (GB = 1e9 bytes)."""
    if n is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _reduction(fp16_bytes: Any, size: Any) -> str:
    if isinstance(fp16_bytes, (int, float)) and isinstance(size, (int, float)) and fp16_bytes > 0 and size > 0:
        return f"{fp16_bytes / size:.2f}×"
    return "—"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _size_table(manifest: dict) -> list[str]:
    components = manifest.get("components") or {}
    names = [n for n in COMPONENT_ORDER if n in components] + sorted(set(components) - set(COMPONENT_ORDER))
    lines = ["| Component | FP16 | This bundle | Reduction (FP16 ÷ bundle) |", "|---|---:|---:|---:|"]
    for name in names:
        entry = components[name] if isinstance(components[name], dict) else {}
        size, fp16 = _number(entry.get("bytes")), _number(entry.get("fp16_bytes"))
        lines.append(f"| {name} | {format_bytes(fp16)} | {format_bytes(size)} | {_reduction(fp16, size)} |")
    payload = manifest.get("payload") if isinstance(manifest.get("payload"), dict) else {}
    size, fp16 = _number(payload.get("bytes")), _number(payload.get("fp16_bytes"))
    lines.append(
        f"| **Total payload** | **{format_bytes(fp16)}** | **{format_bytes(size)}** | **{_reduction(fp16, size)}** |"
    )
    return lines


def _checks(report: dict) -> list[tuple[str, bool]]:
    """(name, passed) of a report's `checks`: a list of {name, passed} or a map name → bool/{passed}."""
    raw = report.get("checks")
    items: list[tuple[str, bool]] = []
    if isinstance(raw, dict):
        for name in sorted(raw):
            value = raw[name]
            ok = value.get("passed") if isinstance(value, dict) else value
            items.append((str(name), ok is True))
    elif isinstance(raw, list):
        for value in raw:
            if isinstance(value, dict) and isinstance(value.get("name"), str):
                items.append((value["name"], value.get("passed") is True))
    return items


def _verify_section(report: dict | None) -> list[str]:
    if report is None:
        return [
            "This bundle was published **without** a passing `bonsai-convert verify` record "
            "(`--allow-unverified`). Run `bonsai-convert verify` on the downloaded folder before relying "
            "on it.",
        ]
    lines = [
        "`bonsai-convert verify` passed on this exact bundle (keyed by the sha256 of its `manifest.json`).",
        "",
    ]
    psnr = _number(report.get("psnr_db"))
    if psnr is not None:
        lines.append(f"- Golden image: the runtime's output is **{psnr:.2f} dB** PSNR from the reference")
    elif report.get("generation_checked") is False or "psnr_db" in report:
        lines.append("- Golden image: **not compared** (no image was generated during verify)")
    checks = _checks(report)
    if checks:
        passed = [name for name, ok in checks if ok]
        lines.append(f"- Checks passed ({len(passed)}/{len(checks)}): " + ", ".join(f"`{n}`" for n in passed))
    return lines


def _usage_section(manifest: dict, repo_id: str, local_dir: str) -> list[str]:
    download = [f"hf download {repo_id} --local-dir {local_dir}", f"bonsai-convert verify {local_dir}"]
    python = ["from huggingface_hub import snapshot_download", "", f'bundle = snapshot_download("{repo_id}")']
    if manifest.get("target") == "packed":
        intro = "A packed bundle has no runtime: download it and pack it for a device with `bonsai-convert`:"
        run = f"bonsai-convert pack {local_dir} --target mac -o {local_dir}-mac"
        python.append("# then: bonsai-convert pack <bundle> --target mac -o bundle-mac")
    elif manifest.get("transformer_only") is True:
        intro = (
            "This bundle holds the transformer only (no text encoder or VAE), so it cannot generate on its "
            "own. Download and check it with `bonsai-convert`:"
        )
        run = f"bonsai-convert inspect {local_dir}"
        python.append("# then: bonsai-convert inspect <bundle>")
    else:
        intro = "Download the bundle and run it with the reference runtime of `bonsai-convert`:"
        run = f'bonsai-convert generate {local_dir} --prompt "a bonsai tree on a wooden desk" -o image.png'
        python.append("# then: bonsai-convert generate <bundle> --prompt ... -o image.png")
    return [intro, "", "```bash", *download, run, "```", "", "From Python:", "", "```python", *python, "```"]


def build_model_card(manifest: dict, verify_report: dict | None, repo_id: str) -> ModelCard:
    """The bundle's model card: Hub metadata, size table, verify result, usage. Deterministic (no dates)."""
    target, variant = manifest.get("target"), manifest.get("variant")
    if target not in TARGETS:
        raise InputError(f"manifest.json: target must be one of {', '.join(TARGETS)}, got {target!r}")
    if variant not in VARIANTS:
        raise InputError(f"manifest.json: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    base_model = manifest.get("base_model") or DEFAULT_BASE_MODEL
    data = ModelCardData(
        license="apache-2.0",
        base_model=base_model,
        base_model_relation="quantized",
        pipeline_tag="text-to-image",
        library_name=LIBRARY_BY_TARGET[target],
        tags=["bonsai", variant, target, "bonsai-convert", "flux2-klein"],
    )
    name = repo_id.split("/")[-1]
    bpw = manifest.get("bits_per_weight") if isinstance(manifest.get("bits_per_weight"), dict) else {}
    low_bit, transformer_bpw = _number(bpw.get("low_bit_linears")), _number(bpw.get("transformer"))
    tool = manifest.get("tool") if isinstance(manifest.get("tool"), dict) else {}
    version = tool.get("version") if isinstance(tool.get("version"), str) else __version__
    weights = "±1 (binary)" if variant == "binary" else "{−1, 0, +1} (ternary)"

    body: list[str] = [
        f"# {name}",
        "",
        f"A **{variant}** Bonsai build of [{base_model}](https://huggingface.co/{base_model}) for "
        f"**{target}**: {TARGET_DESCRIPTION[target]}. The transformer's low-bit linears hold weights in "
        f"{weights} with one FP16 scale per 128 weights. Packed with `bonsai-convert` {version}.",
        "",
    ]
    if manifest.get("exact") is True:
        body.append(
            "The conversion is **exact**: every low-bit weight decodes to the source checkpoint's fp16 "
            "weight bit for bit."
        )
    elif manifest.get("exact") is False:
        method = manifest.get("quantize") or "a lossy projection"
        body.append(
            f"The conversion is **lossy**: full-precision weights were quantized with `{method}`; this is "
            "not a trained binary/ternary model."
        )
    body += ["", "## Size", "", *_size_table(manifest), ""]
    if low_bit is not None or transformer_bpw is not None:
        parts = []
        if low_bit is not None:
            parts.append(f"{low_bit:.3f} in the low-bit linears")
        if transformer_bpw is not None:
            parts.append(f"{transformer_bpw:.3f} over the whole transformer")
        body += [f"Bits per weight: {', '.join(parts)}.", ""]
    body += [
        "Sizes are decimal (1 GB = 10⁹ bytes). `manifest.json` lists every file with its size and sha256.",
        "",
        "## Verification",
        "",
        *_verify_section(verify_report),
        "",
        "## Usage",
        "",
        *_usage_section(manifest, repo_id, name),
        "",
        "## License",
        "",
        f"Apache-2.0, as the base model [{base_model}](https://huggingface.co/{base_model}).",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


# ------------------------------------------------------------------------------------------------ dry run


def print_plan(
    console: Console, plan: list[tuple[str, int]], *, repo_id: str, revision: str, dry_run: bool = True
) -> None:
    """Rich table of the files to upload, their sizes and the total."""
    table = Table(title=f"Upload to {repo_id} @ {revision}", title_justify="left")
    table.add_column("File")
    table.add_column("Size", justify="right")
    table.add_column("Bytes", justify="right")
    for path, size in plan:
        table.add_row(path, format_bytes(size), f"{size:,}")
    total = sum(size for _, size in plan)
    table.add_section()
    table.add_row(f"{len(plan)} files", format_bytes(total), f"{total:,}", style="bold")
    console.print(table)
    if dry_run:
        console.print("dry run: nothing was sent to the Hub")


# ------------------------------------------------------------------------------------------------ publish


def _secrets(token: str | None) -> list[str]:
    found = [token] if token else []
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name):
            found.append(os.environ[name])
    return [s for s in found if len(s) >= 4]


def scrub(text: str, token: str | None = None) -> str:
    """Text with tokens (the given one, HF_TOKEN, anything token-shaped) replaced by ***, on one line."""
    for secret in _secrets(token):
        text = text.replace(secret, "***")
    text = _TOKEN_LIKE_RE.sub("***", text)
    return " ".join(text.split())


def _token_available(token: str | None) -> bool:
    if token:
        return True
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # token lookup failing means no usable token
        return False


def _remote_error(exc: BaseException, *, repo_id: str, revision: str, token: str | None, endpoint: str) -> RemoteError:
    """One-line RemoteError for a failure while talking to the Hub (token never included)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    http = next((e for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None)
    status = http.response.status_code if http is not None else None
    upload = next((m for e in chain if (m := _UPLOAD_FAILED_RE.search(str(e)))), None)
    root = chain[-1]
    detail = f"{type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''}".rstrip(": ")
    if status == 401:
        if _token_available(token):
            message = (
                "the Hub rejected the Hugging Face token (HTTP 401): it is invalid or expired; "
                "set HF_TOKEN or run `hf auth login` with a write token"
            )
        else:
            message = "no Hugging Face token found (HTTP 401): set HF_TOKEN or run `hf auth login` with a write token"
    elif upload is not None:
        message = (
            f"upload of {upload['path']} failed ({detail}); re-run the same command to resume: "
            "files already on the Hub are not sent again"
        )
    elif status == 403:
        message = f"the Hub refused write access to {repo_id} (HTTP 403): the token lacks write permission there"
    elif isinstance(http, RevisionNotFoundError):
        message = f"revision {revision!r} not found in {repo_id} (HTTP {status})"
    elif isinstance(http, RepositoryNotFoundError):
        message = f"repository {repo_id} not found (HTTP {status})"
    elif any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        message = "HF_HUB_OFFLINE is set: unset it to publish"
    elif "Invalid metadata in README.md" in str(exc):
        message = f"the Hub rejected the model card metadata: {exc}"
    elif status is not None:
        server = http.server_message if http is not None and http.server_message else str(http)
        message = f"the Hub answered HTTP {status}: {server.splitlines()[0] if server else ''}"
    elif any(type(e).__name__ in _CONNECT_ERRORS or isinstance(e, ConnectionRefusedError) for e in chain):
        message = f"cannot reach the Hub at {endpoint} ({detail})"
    else:
        message = f"publishing to {repo_id} failed: {detail}"
    return RemoteError(scrub(message, token))


def _operations(bundle: Path, files: list[BundleFile], card_bytes: bytes) -> list[CommitOperationAdd]:
    """Commit operations: manifest.json, every listed file (sha256 preset, just checked), README.md."""
    operations = [CommitOperationAdd(path_in_repo=MANIFEST_NAME, path_or_fileobj=str(bundle / MANIFEST_NAME))]
    for item in files:
        op = CommitOperationAdd(path_in_repo=item.path, path_or_fileobj=str(bundle / item.path))
        op.upload_info.sha256 = bytes.fromhex(item.sha256)  # just re-hashed: spare huggingface_hub a second pass
        operations.append(op)
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card_bytes))
    return operations


def check_remote(remote: dict[str, RepoFile], bundle: Path, files: list[BundleFile], card_bytes: bytes) -> list[str]:
    """Compare the Hub's files with the bundle: RemoteError naming the first mismatch; returns extra paths.

    LFS files: size and LFS oid (= sha256 of the content). Regular (git) files: size and git blob sha1.
    """
    manifest_bytes = (bundle / MANIFEST_NAME).read_bytes()
    expected: dict[str, tuple[int, str, Path | bytes]] = {
        MANIFEST_NAME: (len(manifest_bytes), hashlib.sha256(manifest_bytes).hexdigest(), manifest_bytes),
        CARD_NAME: (len(card_bytes), hashlib.sha256(card_bytes).hexdigest(), card_bytes),
    }
    for item in files:
        expected[item.path] = (item.bytes, item.sha256, bundle / item.path)
    for path in sorted(expected):
        size, sha, source = expected[path]
        entry = remote.get(path)
        if entry is None:
            raise RemoteError(f"{path}: missing on the Hub after the upload")
        if entry.size != size:
            raise RemoteError(f"{path}: the Hub holds {entry.size} bytes, the bundle {size}")
        if entry.lfs is not None:
            if entry.lfs.sha256 != sha:
                raise RemoteError(
                    f"{path}: the Hub's sha256 {entry.lfs.sha256[:16]}… differs from the bundle's {sha[:16]}…"
                )
        else:
            if isinstance(source, bytes):
                blob = hashlib.sha1(f"blob {len(source)}\0".encode() + source, usedforsecurity=False).hexdigest()
            else:
                blob = _git_blob_id(source, size)
            if entry.blob_id != blob:
                raise RemoteError(f"{path}: the Hub's git blob id differs from the bundle file's")
    return sorted(set(remote) - set(expected) - {".gitattributes"})


def _check_repo_id(repo_id: str) -> None:
    if not _REPO_ID_RE.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UsageError(f"--repo-id must look like OWNER/NAME (letters, digits, . _ -), got {repo_id!r}")


def publish(
    bundle_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    card_out: str | Path | None = None,
    allow_unverified: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    console: Console | None = None,
) -> PublishResult:
    """Upload a verified bundle and its model card to `repo_id`, then check the Hub holds the same bytes.

    Raises InputError (bundle missing/changed/unverified), UsageError (bad repo id / card path), RemoteError
    (Hub refused or failed, or holds different bytes). A dry run prints the plan and sends nothing.
    """
    console = console if console is not None else Console()
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise InputError(f"{bundle}: not a folder")
    _check_repo_id(repo_id)
    rev = revision or DEFAULT_REVISION

    manifest = load_manifest(Path(bundle))  # schema-validated, every listed path safe
    files = manifest_files(manifest)
    report = find_pass(bundle)
    if report is None and not allow_unverified:
        raise InputError(
            f"{bundle}: no passing verify record for this manifest.json; run "
            f"`bonsai-convert verify {bundle}` first (or pass --allow-unverified)"
        )
    check_bundle_files(bundle, files)
    card = build_model_card(manifest, report, repo_id)
    card_text = str(card)
    card_bytes = card_text.encode("utf-8")

    card_path: Path | None = None
    if card_out is not None:
        card_path = Path(card_out)
        if card_path.resolve().is_relative_to(bundle.resolve()):
            raise UsageError(f"--card-out {card_path}: inside the bundle; a bundle holds only its listed files")
        try:
            card_path.parent.mkdir(parents=True, exist_ok=True)
            card_path.write_bytes(card_bytes)
        except OSError as exc:
            raise UsageError(f"--card-out {card_path}: cannot write: {exc.strerror or exc}") from None

    plan = sorted(plan_upload(bundle, manifest) + [(CARD_NAME, len(card_bytes))])
    total = sum(size for _, size in plan)
    result = PublishResult(
        repo_id=repo_id,
        revision=rev,
        files=plan,
        total_bytes=total,
        dry_run=dry_run,
        verified=report is not None,
        card_text=card_text,
        card_path=card_path,
    )
    if report is None:
        console.print("[yellow]warning:[/] publishing a bundle without a passing verify record")
    if dry_run:
        print_plan(console, plan, repo_id=repo_id, revision=rev)
        return result

    variant, target = manifest.get("variant"), manifest.get("target")
    message = commit_message or (
        f"Upload Bonsai {variant} bundle for {target} ({len(plan)} files, {format_bytes(total)}) "
        f"with bonsai-convert {__version__}"
    )
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if rev != DEFAULT_REVISION and not rev.startswith("refs/"):
            api.create_branch(repo_id, branch=rev, repo_type="model", exist_ok=True)
        console.print(f"uploading {len(plan)} files ({format_bytes(total)}) to {repo_id} @ {rev}")
        info = api.create_commit(
            repo_id,
            _operations(bundle, files, card_bytes),
            commit_message=message,
            revision=revision,
            repo_type="model",
        )
        remote = {
            entry.path: entry
            for entry in api.list_repo_tree(repo_id, recursive=True, revision=info.oid, repo_type="model")
            if isinstance(entry, RepoFile)
        }
    except Exception as exc:  # every Hub/network failure becomes one scrubbed line (chain kept for --debug)
        raise _remote_error(exc, repo_id=repo_id, revision=rev, token=token, endpoint=api.endpoint) from exc

    result.stale_remote_files = check_remote(remote, bundle, files, card_bytes)
    result.commit_oid, result.commit_url = info.oid, info.commit_url
    console.print(
        f"published {len(plan)} files to {repo_id} @ {rev} (commit {info.oid[:12]}); "
        "the Hub's sizes and sha256s match manifest.json"
    )
    if result.stale_remote_files:
        console.print(
            f"[yellow]warning:[/] {repo_id} @ {rev} also holds {len(result.stale_remote_files)} file(s) "
            f"not in this bundle (left untouched): {escape(', '.join(result.stale_remote_files))}"
        )
    return result
