"""A local stand-in for the Hugging Face Hub: the endpoints huggingface_hub 2.4 calls to publish a bundle.

Request and response shapes follow the client source (huggingface_hub 2.4: hf_api.py, _commit_api.py,
lfs.py, utils/_http.py, utils/_pagination.py):

- `POST /api/repos/create` {name, organization, visibility?, type?} → {url, name}; 409 when it exists.
- `GET /api/models/{repo}` and `.../revision/{rev}` → model info ({id, sha, private, siblings}).
- `GET /api/models/{repo}/refs`; `POST /api/models/{repo}/branch/{branch}` {startingPoint?} (409: exists).
- `GET /api/whoami-v2`; `POST /api/validate-yaml` {content, repoType} → {errors, warnings} (400 on errors).
- `POST /api/models/{repo}/preupload/{rev}` {files: [{path, sample, size}]} → {files: [{path, uploadMode,
  shouldIgnore, oid?}], commitOid}; `oid`: sha256 of a stored LFS file, git blob sha1 of a regular one.
- `POST /{repo}.git/info/lfs/objects/batch` (git-lfs batch API, transfers basic/multipart) → per object no
  `actions` when stored, else `upload` (a PUT URL; multipart: `header` = {chunk_size, "1": url, ...} and
  the href is the completion URL) and `verify`. PUT/part/completion URLs stand for S3 pre-signed URLs.
- `POST /api/models/{repo}/commit/{rev}` NDJSON (header, file, lfsFile, deletedFile, deletedFolder) →
  {success, commitOid, commitUrl, hookOutput, pullRequestUrl}.
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=` → entries {type, oid, size, path,
  lfs?: {oid, size, pointerSize}} (+ lastCommit, securityFileStatus with expand), paginated with a
  `Link: <…>; rel="next"` header; `POST /api/models/{repo}/paths-info/{rev}` (form: paths, expand).

Uploads go through plain LFS: huggingface_hub 2.4 picks Xet purely client-side (`is_xet_available()`:
hf_xet installed and HF_HUB_DISABLE_XET unset); no server answer steers it back to LFS, so tests set
`huggingface_hub.constants.HF_HUB_DISABLE_XET = True`. Anything else the client asks for is logged at
ERROR, kept in `unknown_requests` and answered 501, so a test fixture can fail on it.

Fault switches: `token` (every /api and LFS request then needs `Authorization: Bearer <token>`, else 401),
`drop_uploads(oid, times)` (close the socket in the middle of that object's next LFS PUTs),
`corrupt_tree_sha256(path)` (tree and paths-info report a wrong sha256 / blob id for that file).
The server is bounded: request bodies up to `max_body` bytes, idle connections time out, and it stops
itself after `lifetime_s` seconds.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import math
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import yaml

log = logging.getLogger("tests.hub_server")

# The .gitattributes the Hub puts in every new model repo (LFS patterns).
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.ftz",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.lfs.*",
        "*.mlmodel",
        "*.model",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.rar",
        "*.safetensors",
        "saved_model/**/*",
        "*.tar.*",
        "*.tar",
        "*.tflite",
        "*.tgz",
        "*.wasm",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )
)
REGULAR_MAX_BYTES = 10 * 1024 * 1024  # bigger files always go to LFS
FIXED_DATE = "2026-01-01T00:00:00.000Z"
KNOWN_LICENSES = {"apache-2.0", "mit", "openrail", "other", "cc-by-4.0", "cc-by-nc-4.0", "llama3", "gemma"}
KNOWN_PIPELINES = {
    "text-to-image",
    "image-to-image",
    "text-generation",
    "feature-extraction",
    "text-to-video",
}
KNOWN_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
_REPO_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")
_OID_RE = re.compile(r"^[0-9a-f]{64}$")
_FRONT_MATTER_RE = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


def git_blob_id(data: bytes) -> str:
    """Git's object id of a blob (what the Hub reports as `oid` of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    """The git-lfs pointer file stored in git for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    """A file in a commit: regular (content in git) or LFS (pointer in git, content in the LFS store)."""

    size: int
    blob_id: str
    content: bytes | None = None
    lfs_oid: str | None = None
    pointer_size: int | None = None


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    parts: dict[str, dict[int, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: str
    status: int
    authenticated: bool


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not delay stop()
    hub: FakeHub


class FakeHub:
    """In-memory Hub on 127.0.0.1 (random port). Use as a context manager or start()/stop()."""

    def __init__(
        self,
        *,
        token: str | None = None,
        user: str = "bonsai-tester",
        lifetime_s: float = 120.0,
        tree_page_size: int = 1000,
        expand_page_size: int = 50,
        multipart_threshold: int | None = None,
        part_size: int = 5 * 1024 * 1024,
        max_body: int = 64 * 1024 * 1024,
    ) -> None:
        self.token = token
        self.user = user
        self.lifetime_s = lifetime_s
        self.tree_page_size = tree_page_size
        self.expand_page_size = expand_page_size
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_body = max_body
        self.repos: dict[str, Repo] = {}
        self.requests: list[RequestRecord] = []
        self.unknown_requests: list[str] = []
        self.lfs_put_attempts: list[str] = []  # oid of every LFS PUT (whole object or part), dropped ones included
        self._drops: dict[str, int] = {}
        self._corrupt: set[str] = set()
        self._counter = 0
        self.lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeHub:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.hub = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ fault switches

    def drop_uploads(self, oid: str, times: int = 1) -> None:
        """Close the connection in the middle of the next `times` LFS PUTs of object `oid`."""
        with self.lock:
            self._drops[oid] = times

    def clear_drops(self) -> None:
        with self.lock:
            self._drops.clear()

    def corrupt_tree_sha256(self, path: str) -> None:
        """Report a wrong sha256 (LFS) or blob id (regular) for `path` in tree listings and paths-info."""
        with self.lock:
            self._corrupt.add(path)

    # ------------------------------------------------------------------ inspection

    def head(self, repo_id: str, revision: str = "main") -> Commit:
        with self.lock:
            repo = self.repos[repo_id]
            return repo.commits[repo.branches[revision]]

    def file_content(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        with self.lock:
            stored = self.head(repo_id, revision).files[path]
            if stored.lfs_oid is not None:
                return self.repos[repo_id].lfs[stored.lfs_oid]
            assert stored.content is not None
            return stored.content

    def seed_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """Create `repo_id` holding exactly `files` in one commit on main (LFS for weights); return its commit id."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id=repo_id, private=private))
            stored: dict[str, StoredFile] = {}
            for path, content in files.items():
                if path.endswith(".safetensors") or len(content) > REGULAR_MAX_BYTES:
                    oid = hashlib.sha256(content).hexdigest()
                    repo.lfs[oid] = content
                    pointer = lfs_pointer(oid, len(content))
                    stored[path] = StoredFile(len(content), git_blob_id(pointer), None, oid, len(pointer))
                else:
                    stored[path] = StoredFile(len(content), git_blob_id(content), content)
            commit = self.new_commit(repo, repo.branches.get("main"), "seed", stored)
            repo.branches["main"] = commit.oid
            return commit.oid

    # ------------------------------------------------------------------ helpers used by the handler

    def take_drop(self, oid: str) -> bool:
        with self.lock:
            left = self._drops.get(oid, 0)
            if left > 0:
                self._drops[oid] = left - 1
                return True
            return False

    def is_corrupt(self, path: str) -> bool:
        with self.lock:
            return path in self._corrupt

    def new_commit(self, repo: Repo, parent: str | None, title: str, files: dict[str, StoredFile]) -> Commit:
        with self.lock:
            self._counter += 1
            seed = json.dumps([self._counter, parent, title, sorted((p, f.blob_id) for p, f in files.items())]).encode()
            commit = Commit(
                oid=hashlib.sha1(seed, usedforsecurity=False).hexdigest(),
                parent=parent,
                title=title,
                files=files,
            )
            repo.commits[commit.oid] = commit
            return commit


class _Reply(Exception):
    """Raised by route handlers to answer with an error status."""

    def __init__(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.payload, self.headers = status, payload, headers or {}


def _error(status: int, message: str, code: str | None = None) -> _Reply:
    headers = {"X-Error-Message": message}
    if code is not None:
        headers["X-Error-Code"] = code
    return _Reply(status, {"error": message}, headers)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds an idle or stalled connection may hold a thread
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls
    server: _Server

    # ------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args: Any) -> None:  # request line only: never headers
        log.debug("fake hub: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def _base(self) -> str:
        return self.hub.url

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self._query = parse_qs(split.query, keep_blank_values=True)
        self._raw_path, self._raw_query = split.path, split.query
        self._body_cache: bytes | None = None
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        status = 0
        try:
            status = self._route(method, segments)
        except _Reply as reply:
            status = reply.status
            self._drain()
            self._send(reply.status, reply.payload, reply.headers)
        except ConnectionError:
            self.close_connection = True
        except Exception as exc:  # a bug in the fake: answer 500 and make it visible
            log.exception("fake hub: error while serving %s %s", method, split.path)
            status = 500
            self._send(500, {"error": f"fake hub error: {exc!r}"})
        with self.hub.lock:
            self.hub.requests.append(
                RequestRecord(method, split.path, split.query, status, "authorization" in self.headers)
            )

    def _body(self) -> bytes:
        if self._body_cache is None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks, total = [], 0
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():
                            pass
                        break
                    total += size
                    if total > self.hub.max_body:
                        self.close_connection = True
                        raise _error(413, "request body too large")
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self._body_cache = b"".join(chunks)
            else:
                length = int(self.headers.get("Content-Length") or 0)
                if length > self.hub.max_body:
                    self.close_connection = True
                    raise _error(413, "request body too large")
                self._body_cache = self.rfile.read(length) if length else b""
        return self._body_cache

    def _drain(self) -> None:
        """Read an unread request body before an early answer (or close the connection if it cannot be)."""
        try:
            self._body()
        except (_Reply, OSError, ValueError):
            self.close_connection = True

    def _json(self) -> Any:
        try:
            return json.loads(self._body() or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _error(400, "invalid JSON body") from None

    def _send(
        self,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> int:
        if isinstance(payload, bytes):
            data = payload
        else:
            data = json.dumps(payload).encode()
        headers = dict(headers or {})
        content_type = headers.pop("Content-Type", content_type)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", f"fake-{id(self):x}")
        if self.close_connection:
            self.send_header("Connection", "close")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        return status

    def _drop_connection(self) -> int:
        """Read a little of the body, then close the socket without answering (a dropped upload)."""
        length = int(self.headers.get("Content-Length") or 0)
        try:
            self.rfile.read(min(length, 1024) if length else 64)
        except OSError:
            pass
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        log.info("fake hub: dropped the connection during %s %s", self.command, self._raw_path)
        return 0

    def _authorize(self, *, required: bool = False) -> None:
        """401 unless the request carries the hub's token (when the hub has one, or `required`)."""
        header = self.headers.get("Authorization")
        if self.hub.token is None and not required:
            return
        if header is None:
            raise _error(401, "Invalid username or password.")
        if self.hub.token is not None and header != f"Bearer {self.hub.token}":
            raise _error(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _error(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        oid = repo.branches.get(revision)
        if oid is None and revision in repo.commits:
            oid = revision
        if oid is None:
            raise _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    # ------------------------------------------------------------------ routing

    def _route(self, method: str, seg: list[str]) -> int:
        if method == "POST" and seg == ["api", "repos", "create"]:
            return self._create_repo()
        if method == "GET" and seg == ["api", "whoami-v2"]:
            return self._whoami()
        if method == "POST" and seg == ["api", "validate-yaml"]:
            return self._validate_yaml()
        if len(seg) >= 4 and seg[:2] == ["api", "models"]:
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            if method == "GET" and not rest:
                return self._model_info(repo_id, "main")
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._model_info(repo_id, rest[1])
            if method == "GET" and rest == ["refs"]:
                return self._refs(repo_id)
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                return self._create_branch(repo_id, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo_id, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo_id, rest[1])
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
                return self._paths_info(repo_id, rest[1])
        if (
            method == "POST"
            and len(seg) == 6
            and seg[1].endswith(".git")
            and seg[2:] == ["info", "lfs", "objects", "batch"]
        ):
            return self._lfs_batch(f"{seg[0]}/{seg[1][:-4]}")
        if seg[:1] == ["_storage"] and len(seg) >= 4:
            repo_id, oid, rest = f"{seg[1]}/{seg[2]}", seg[3], seg[4:]
            if method == "PUT" and not rest:
                return self._storage_put(repo_id, oid)
            if method == "PUT" and len(rest) == 2 and rest[0] == "part" and rest[1].isdigit():
                return self._storage_put_part(repo_id, oid, int(rest[1]))
            if method == "POST" and rest == ["complete"]:
                return self._storage_complete(repo_id, oid)
        if method == "POST" and len(seg) == 3 and seg[0] == "_lfs_verify":
            return self._lfs_verify(f"{seg[1]}/{seg[2]}")
        if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            return self._resolve_file(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        return self._unknown(method)

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> int:
        """`/{repo}/resolve/{rev}/{path}`: a file's bytes (Range answered 206), with the Hub's metadata headers."""
        self._authorize()
        with self.hub.lock:
            commit = self._resolve(self._repo(repo_id), revision)
            stored = commit.files.get(path)
            if stored is None:
                raise _Reply(404, {"error": f"{path} does not exist"}, {"X-Error-Code": "EntryNotFound"})
            data = self.hub.repos[repo_id].lfs[stored.lfs_oid] if stored.lfs_oid else stored.content
        assert data is not None
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes", "ETag": f'"{stored.blob_id}"'}
        if stored.lfs_oid:
            headers.update({"X-Linked-Etag": f'"{stored.lfs_oid}"', "X-Linked-Size": str(stored.size)})
        status = 200
        ranged = re.match(r"^bytes=(\d+)-(\d*)$", self.headers.get("Range") or "")
        if ranged and self.command == "GET":
            start = int(ranged.group(1))
            stop = int(ranged.group(2)) + 1 if ranged.group(2) else len(data)
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            data, status = data[start:stop], 206
        return self._send(status, data, headers, content_type="application/octet-stream")

    def _unknown(self, method: str) -> int:
        line = f"{method} {self._raw_path}" + (f"?{self._raw_query}" if self._raw_query else "")
        log.error("fake hub: UNHANDLED REQUEST %s (the client called an endpoint tests/hub_server.py lacks)", line)
        with self.hub.lock:
            self.hub.unknown_requests.append(line)
        self._body()
        return self._send(501, {"error": f"not implemented by tests/hub_server.py: {line}"})

    # ------------------------------------------------------------------ repos, refs, whoami, yaml

    def _create_repo(self) -> int:
        self._authorize(required=True)
        body = self._json()
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise _error(400, "name is required")
        if body.get("type") not in (None, "model"):
            raise _error(400, f"this fake hub only hosts models, not {body['type']!r}")
        repo_id = f"{body.get('organization') or self.hub.user}/{body['name']}"
        if not _REPO_ID_RE.match(repo_id):
            raise _error(400, f"invalid repo name {repo_id!r}")
        with self.hub.lock:
            if repo_id in self.hub.repos:
                raise _Reply(409, {"error": "You already created this model repo", "url": f"{self._base()}/{repo_id}"})
            repo = Repo(repo_id=repo_id, private=body.get("visibility") == "private" or body.get("private") is True)
            content = GITATTRIBUTES.encode()
            files = {".gitattributes": StoredFile(size=len(content), blob_id=git_blob_id(content), content=content)}
            repo.branches["main"] = self.hub.new_commit(repo, None, "initial commit", files).oid
            self.hub.repos[repo_id] = repo
        return self._send(200, {"url": f"{self._base()}/{repo_id}", "name": repo_id, "id": repo_id})

    def _whoami(self) -> int:
        self._authorize(required=True)
        return self._send(
            200,
            {
                "type": "user",
                "name": self.hub.user,
                "fullname": "Bonsai Tester",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
            },
        )

    def _model_info(self, repo_id: str, revision: str) -> int:
        self._authorize()
        with self.hub.lock:
            repo = self._repo(repo_id)
            commit = self._resolve(repo, revision)
            siblings = [{"rfilename": path} for path in sorted(commit.files)]
            payload = {
                "_id": repo_id,
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": FIXED_DATE,
                "createdAt": FIXED_DATE,
                "siblings": siblings,
            }
        return self._send(200, payload)

    def _refs(self, repo_id: str) -> int:
        self._authorize()
        with self.hub.lock:
            repo = self._repo(repo_id)
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                for name, oid in sorted(repo.branches.items())
            ]
        return self._send(200, {"branches": branches, "converts": [], "tags": []})

    def _create_branch(self, repo_id: str, branch: str) -> int:
        self._authorize(required=True)
        body = self._json() or {}
        with self.hub.lock:
            repo = self._repo(repo_id)
            if branch in repo.branches:
                raise _error(409, "Reference already exists")
            start = self._resolve(repo, body.get("startingPoint") or "main")
            repo.branches[branch] = start.oid
        return self._send(200, {})

    def _validate_yaml(self) -> int:
        self._authorize()
        body = self._json()
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, str):
            raise _error(400, "content is required")
        match = _FRONT_MATTER_RE.search(content)
        if not match:
            return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            meta = yaml.safe_load(match.group(2)) or {}
        except yaml.YAMLError as exc:
            return self._send(400, {"errors": [{"message": f"invalid YAML: {exc}"}], "warnings": []})
        errors = _metadata_errors(meta)
        return self._send(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})

    # ------------------------------------------------------------------ upload: preupload, LFS, commit

    def _preupload(self, repo_id: str, revision: str) -> int:
        self._authorize(required=True)
        body = self._json()
        if not isinstance(body, dict) or not isinstance(body.get("files"), list):
            raise _error(400, "files is required")
        with self.hub.lock:
            repo = self._repo(repo_id)
            commit = self._resolve(repo, revision)
            answer = []
            for entry in body["files"]:
                path, size = entry.get("path"), entry.get("size")
                sample = base64.b64decode(entry.get("sample") or "")
                if not isinstance(path, str) or not isinstance(size, int):
                    raise _error(400, "each file needs path and size")
                lfs = size > REGULAR_MAX_BYTES or b"\0" in sample or _matches_lfs_pattern(path)
                item: dict[str, Any] = {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                }
                existing = commit.files.get(path)
                if existing is not None:
                    item["oid"] = existing.lfs_oid if existing.lfs_oid is not None else existing.blob_id
                answer.append(item)
        return self._send(200, {"files": answer, "commitOid": commit.oid})

    def _lfs_batch(self, repo_id: str) -> int:
        self._authorize(required=True)
        body = self._json()
        if not isinstance(body, dict) or body.get("operation") != "upload" or not isinstance(body.get("objects"), list):
            raise _error(400, "this fake hub answers LFS batch uploads only")
        if body.get("hash_algo", "sha256") != "sha256":
            raise _error(400, "hash_algo must be sha256")
        base = self._base()
        objects, multipart = [], False
        with self.hub.lock:
            repo = self._repo(repo_id)
            for obj in body["objects"]:
                oid, size = obj.get("oid"), obj.get("size")
                if not isinstance(oid, str) or not _OID_RE.match(oid) or not isinstance(size, int) or size < 0:
                    objects.append(
                        {
                            "oid": str(oid),
                            "size": size if isinstance(size, int) else 0,
                            "error": {"code": 422, "message": "invalid oid or size"},
                        }
                    )
                    continue
                if oid in repo.lfs and len(repo.lfs[oid]) == size:
                    objects.append({"oid": oid, "size": size})  # already stored: no actions
                    continue
                store = f"{base}/_storage/{repo_id}/{oid}"
                verify = {"href": f"{base}/_lfs_verify/{repo_id}", "header": {"X-Fake-Verify": "1"}}
                threshold = self.hub.multipart_threshold
                if threshold is not None and size > threshold and "multipart" in body.get("transfers", []):
                    multipart = True
                    n_parts = math.ceil(size / self.hub.part_size)
                    header = {"chunk_size": str(self.hub.part_size)}
                    header.update({str(i): f"{store}/part/{i}?X-Amz-Signature=fake" for i in range(1, n_parts + 1)})
                    upload = {"href": f"{store}/complete", "header": header}
                else:
                    upload = {"href": f"{store}?X-Amz-Signature=fake"}
                objects.append(
                    {
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {"upload": upload, "verify": verify},
                    }
                )
        payload = {
            "transfer": "multipart" if multipart else "basic",
            "objects": objects,
            "hash_algo": "sha256",
        }
        return self._send(200, payload, content_type="application/vnd.git-lfs+json")

    def _storage_put(self, repo_id: str, oid: str) -> int:
        with self.hub.lock:
            self.hub.lfs_put_attempts.append(oid)
        if self.hub.take_drop(oid):
            return self._drop_connection()
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Reply(400, b"<Error><Code>BadDigest</Code></Error>", {"Content-Type": "application/xml"})
        with self.hub.lock:
            self._repo(repo_id).lfs[oid] = data
        return self._send(200, b"", {"ETag": f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'})

    def _storage_put_part(self, repo_id: str, oid: str, number: int) -> int:
        with self.hub.lock:
            self.hub.lfs_put_attempts.append(oid)
        if self.hub.take_drop(oid):
            return self._drop_connection()
        data = self._body()
        with self.hub.lock:
            self._repo(repo_id).parts.setdefault(oid, {})[number] = data
        return self._send(200, b"", {"ETag": f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'})

    def _storage_complete(self, repo_id: str, oid: str) -> int:
        body = self._json()
        if not isinstance(body, dict) or body.get("oid") != oid or not isinstance(body.get("parts"), list):
            raise _error(400, "completion needs oid and parts")
        with self.hub.lock:
            repo = self._repo(repo_id)
            stored = repo.parts.get(oid, {})
            chunks = []
            for index, part in enumerate(body["parts"], start=1):
                data = stored.get(part.get("partNumber"))
                if part.get("partNumber") != index or data is None:
                    raise _error(400, f"part {index} missing")
                if part.get("etag") != f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"':
                    raise _error(400, f"part {index}: etag mismatch")
                chunks.append(data)
            content = b"".join(chunks)
            if hashlib.sha256(content).hexdigest() != oid:
                raise _error(400, "assembled object does not match its oid")
            repo.lfs[oid] = content
            repo.parts.pop(oid, None)
        return self._send(200, {})

    def _lfs_verify(self, repo_id: str) -> int:
        self._authorize(required=True)
        body = self._json()
        with self.hub.lock:
            data = self._repo(repo_id).lfs.get(body.get("oid") if isinstance(body, dict) else None)
        if data is None or len(data) != body.get("size"):
            raise _error(404, "Object not found")
        return self._send(200, {})

    def _commit(self, repo_id: str, revision: str) -> int:
        self._authorize(required=True)
        if self.headers.get("Content-Type", "").split(";")[0] != "application/x-ndjson":
            raise _error(400, "commit payload must be application/x-ndjson")
        if self._query:
            raise _error(400, f"unsupported commit parameters {sorted(self._query)}")
        try:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _error(400, "invalid NDJSON") from None
        if not lines or lines[0].get("key") != "header":
            raise _error(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        with self.hub.lock:
            repo = self._repo(repo_id)
            if revision not in repo.branches:
                raise _error(
                    400 if revision in repo.commits else 404,
                    f"Invalid rev id: {revision}",
                    None if revision in repo.commits else "RevisionNotFound",
                )
            head = repo.commits[repo.branches[revision]]
            if header.get("parentCommit") not in (None, head.oid):
                raise _error(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _error(400, "file content must be base64")
                    content = base64.b64decode(value.get("content") or "")
                    files[path] = StoredFile(size=len(content), blob_id=git_blob_id(content), content=content)
                elif key == "lfsFile":
                    oid, size = value.get("oid"), value.get("size")
                    if value.get("algo") != "sha256" or oid not in repo.lfs or len(repo.lfs[oid]) != size:
                        raise _error(
                            422,
                            "Your push was rejected because an LFS pointer pointed to a file that "
                            f"does not exist. For instance: {path}",
                        )
                    pointer = lfs_pointer(oid, size)
                    files[path] = StoredFile(
                        size=size, blob_id=git_blob_id(pointer), lfs_oid=oid, pointer_size=len(pointer)
                    )
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _error(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for name in [p for p in files if p.startswith(prefix)]:
                        del files[name]
                else:
                    raise _error(400, f"unsupported commit operation {key!r}")
            commit = self.hub.new_commit(repo, head.oid, str(header.get("summary") or ""), files)
            repo.branches[revision] = commit.oid
        return self._send(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "hookOutput": "",
                "commitUrl": f"{self._base()}/{repo_id}/commit/{commit.oid}",
                "pullRequestUrl": None,
            },
        )

    # ------------------------------------------------------------------ reading: tree, paths-info

    def _entry(self, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        stored = commit.files.get(path)
        if stored is None:  # a folder
            entry: dict[str, Any] = {
                "type": "directory",
                "size": 0,
                "path": path,
                "oid": hashlib.sha1(f"tree {commit.oid} {path}".encode(), usedforsecurity=False).hexdigest(),
            }
        else:
            entry = {"type": "file", "oid": stored.blob_id, "size": stored.size, "path": path}
            if stored.lfs_oid is not None:
                entry["lfs"] = {
                    "oid": stored.lfs_oid,
                    "size": stored.size,
                    "pointerSize": stored.pointer_size,
                }
            if self.hub.is_corrupt(path):
                if "lfs" in entry:
                    entry["lfs"]["oid"] = _flip(stored.lfs_oid or "")
                else:
                    entry["oid"] = _flip(stored.blob_id)
            if expand:
                entry["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False},
                    "pickleImportScan": None,
                }
        if expand:
            entry["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": FIXED_DATE}
        return entry

    def _tree(self, repo_id: str, revision: str, path: str) -> int:
        self._authorize()
        recursive = self._flag("recursive")
        expand = self._flag("expand")
        cursor = int((self._query.get("cursor") or ["0"])[0])
        with self.hub.lock:
            commit = self._resolve(self._repo(repo_id), revision)
            prefix = f"{path.strip('/')}/" if path.strip("/") else ""
            folders = {"/".join(p.split("/")[:i]) for p in commit.files for i in range(1, p.count("/") + 1)}
            if prefix and prefix.rstrip("/") not in folders:
                raise _error(404, f"{path} does not exist on {revision}", "EntryNotFound")
            names = [p for p in sorted(set(commit.files) | folders) if p.startswith(prefix)]
            if not recursive:
                names = [p for p in names if "/" not in p[len(prefix) :]]
            size = self.hub.expand_page_size if expand else self.hub.tree_page_size
            page = [self._entry(commit, p, expand) for p in names[cursor : cursor + size]]
        headers = {}
        if cursor + size < len(names):
            query = {k: v[0] for k, v in self._query.items()}
            query["cursor"] = str(cursor + size)
            headers["Link"] = f'<{self._base()}{self._raw_path}?{urlencode(query)}>; rel="next"'
        return self._send(200, page, headers)

    def _paths_info(self, repo_id: str, revision: str) -> int:
        self._authorize()
        form = parse_qs(self._body().decode(), keep_blank_values=True)
        expand = (form.get("expand") or ["false"])[0].lower() in ("1", "true")
        with self.hub.lock:
            commit = self._resolve(self._repo(repo_id), revision)
            folders = {"/".join(p.split("/")[:i]) for p in commit.files for i in range(1, p.count("/") + 1)}
            found = [self._entry(commit, p, expand) for p in form.get("paths", []) if p in commit.files or p in folders]
        return self._send(200, found)

    def _flag(self, name: str) -> bool:
        return (self._query.get(name) or ["false"])[0].lower() in ("1", "true")


def _flip(hex_digest: str) -> str:
    """The same digest with its first digit changed."""
    return ("0" if hex_digest[:1] != "0" else "1") + hex_digest[1:]


def _matches_lfs_pattern(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    for line in GITATTRIBUTES.splitlines():
        pattern = line.split()[0]
        if fnmatch.fnmatchcase(path if "/" in pattern else name, pattern):
            return True
    return False


def _metadata_errors(meta: Any) -> list[str]:
    """A subset of the Hub's model-card metadata rules."""
    if not isinstance(meta, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    if "license" in meta and meta["license"] not in KNOWN_LICENSES:
        errors.append(f'"license" must be one of {sorted(KNOWN_LICENSES)}')
    if "pipeline_tag" in meta and meta["pipeline_tag"] not in KNOWN_PIPELINES:
        errors.append(f'"pipeline_tag" must be a known task, got {meta["pipeline_tag"]!r}')
    base = meta.get("base_model")
    if base is not None:
        bases = base if isinstance(base, list) else [base]
        if not all(isinstance(b, str) and _REPO_ID_RE.match(b) for b in bases):
            errors.append('"base_model" must be a repo id or a list of repo ids')
    if "base_model_relation" in meta:
        if meta["base_model_relation"] not in KNOWN_RELATIONS:
            errors.append(f'"base_model_relation" must be one of {sorted(KNOWN_RELATIONS)}')
        if base is None:
            errors.append('"base_model_relation" needs "base_model"')
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        errors.append('"tags" must be a list of strings')
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append('"library_name" must be a string')
    return errors
