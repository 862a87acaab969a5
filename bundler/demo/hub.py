"""A loopback Hugging Face Hub: the Hub's HTTP protocol on 127.0.0.1, for ``demo`` and tests.

The real Hub is unreachable from build and CI machines, yet the builder must be proven against the
*real* ``huggingface_hub`` client (0.3x and 1.x/2.x), not a mock of it. This module serves in-memory
model repositories with exactly the routes, headers and error signals that client relies on.
``demo`` builds against it; the tests also inject the faults a real download meets (rate limits,
5xx, dropped connections, corrupted bytes) through a subclass of ``Handler`` kept with them
(``tests/hubfaults.py``), beside the standalone server.

Standard library only (and the digest helpers): it must run wherever the test suite runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from bundler.hashing import git_blob_sha1

__all__ = ["Handler", "HttpError", "HubFile", "HubRepo", "LoopbackHub", "gated_message"]

# The Hub stores big and binary files in LFS; the client then gets the sha256 as ETag and in the
# listings, which is what the builder checks downloads against.
_LFS_MIN_SIZE = 10 * 1024
_LFS_SUFFIXES = (".bin", ".npz", ".pt", ".ckpt", ".onnx", ".safetensors")

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

# Bounds, so that a misbehaving client cannot grow the server without limit and an idle
# keep-alive connection cannot hold a thread forever.
_MAX_BODY = 1 << 20
_MAX_LOG = 100_000
_IDLE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class HubRepo:
    """One model repository: its files at a single commit on a single branch.

    ``commit`` defaults to a sha1 over the repo id and the sorted paths and contents, so the same
    files always give the same commit and a changed file gives a new one.
    """

    repo_id: str
    # Out of hash and repr: the commit already stands for the content, and a repr of model
    # weights would flood any assertion message.
    files: Mapping[str, bytes] = field(hash=False, repr=False)
    branch: str = "main"
    commit: str | None = None
    gated: bool = False

    def __post_init__(self) -> None:
        if not _REPO_ID.fullmatch(self.repo_id):
            raise ValueError(f"repo_id must look like 'org/name', got {self.repo_id!r}")
        if not self.branch or "/" in self.branch or _COMMIT.fullmatch(self.branch):
            raise ValueError(f"invalid branch name {self.branch!r}")
        for path in self.files:
            parts = path.split("/")
            if any(part in ("", ".", "..") for part in parts) or "\\" in path:
                raise ValueError(f"invalid path in repo {self.repo_id}: {path!r}")
        # A read-only copy: the server indexes the files once, so later mutation must be impossible.
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))
        if self.commit is None:
            digest = hashlib.sha1(self.repo_id.encode() + b"\0")
            for path in sorted(self.files):
                content = self.files[path]
                # Length-prefixed so that no two different repos hash the same byte stream.
                digest.update(b"%s\0%d\0" % (path.encode(), len(content)) + content)
            object.__setattr__(self, "commit", digest.hexdigest())
        elif not _COMMIT.fullmatch(self.commit):
            raise ValueError(f"commit must be 40 lowercase hex digits, got {self.commit!r}")

    @classmethod
    def from_dir(cls, repo_id: str, root: Path, **kw: Any) -> HubRepo:
        """A repo holding every file under ``root``, keyed by its relative POSIX path."""
        root = Path(root)
        if not root.is_dir():
            raise NotADirectoryError(f"not a directory: {root}")
        files = {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }
        return cls(repo_id, files, **kw)


@dataclass(frozen=True)
class HubFile:
    """A file as the Hub describes it, computed once per repo."""

    path: str
    content: bytes = field(repr=False)
    sha256: str
    blob_id: str  # for an LFS file: the id of its pointer, as git stores only the pointer
    lfs: bool
    pointer_size: int

    @classmethod
    def of(cls, path: str, content: bytes) -> HubFile:
        sha256 = hashlib.sha256(content).hexdigest()
        lfs = len(content) > _LFS_MIN_SIZE or path.endswith(_LFS_SUFFIXES)
        if lfs:
            pointer = (
                f"version https://git-lfs.github.com/spec/v1\n"
                f"oid sha256:{sha256}\nsize {len(content)}\n"
            ).encode()
            return cls(path, content, sha256, git_blob_sha1(pointer), True, len(pointer))
        return cls(path, content, sha256, git_blob_sha1(content), False, 0)

    @property
    def etag(self) -> str:
        # The client names its cache blobs after the ETag: sha256 for LFS, git sha1 otherwise.
        return f'"{self.sha256 if self.lfs else self.blob_id}"'

    def tree_item(self) -> dict[str, Any]:
        """The entry of ``/tree`` and ``/paths-info``."""
        item: dict[str, Any] = {
            "type": "file",
            "oid": self.blob_id,
            "size": len(self.content),
            "path": self.path,
        }
        if self.lfs:
            item["lfs"] = {
                "oid": self.sha256,
                "size": len(self.content),
                "pointerSize": self.pointer_size,
            }
        return item

    def sibling(self, blobs: bool) -> dict[str, Any]:
        """The entry of ``siblings`` in ``/api/models``: metadata only when ``blobs=true``."""
        item: dict[str, Any] = {"rfilename": self.path}
        if blobs:
            item.update(size=len(self.content), blobId=self.blob_id)
            if self.lfs:
                item["lfs"] = {
                    "sha256": self.sha256,
                    "size": len(self.content),
                    "pointerSize": self.pointer_size,
                }
        return item


class _Index:
    """A repo's files and folders, precomputed so handlers only look things up."""

    def __init__(self, repo: HubRepo) -> None:
        self.repo = repo
        self.commit = cast(str, repo.commit)
        self.files = {p: HubFile.of(p, c) for p, c in sorted(repo.files.items())}
        dirs: set[str] = set()
        for path in self.files:
            parts = path.split("/")
            # Every ancestor folder, not only the direct parent: the Hub lists each one.
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        self.dirs = sorted(dirs)

    def dir_item(self, path: str) -> dict[str, Any]:
        # A stable id derived from the folder's content (not git's tree hash: nothing checks it).
        below = "".join(f"{e.path}\0{e.blob_id}\0" for e in self._under(path))
        return {
            "type": "directory",
            "oid": hashlib.sha1(below.encode()).hexdigest(),
            "size": 0,
            "path": path,
        }

    def _under(self, path: str) -> Iterator[HubFile]:
        prefix = f"{path}/" if path else ""
        return (e for p, e in self.files.items() if p.startswith(prefix))

    def tree(self, path: str, recursive: bool) -> list[dict[str, Any]]:
        """A listing like the Hub's: folders first, then files; folders are listed either way."""
        prefix = f"{path}/" if path else ""

        def shown(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

        return [self.dir_item(d) for d in self.dirs if shown(d)] + [
            e.tree_item() for p, e in self.files.items() if shown(p)
        ]

    def info(self, blobs: bool) -> dict[str, Any]:
        """The body of ``/api/models/{repo_id}[/revision/{rev}]``."""
        org = self.repo.repo_id.split("/")[0]
        return {
            "_id": self.commit[:24],
            "id": self.repo.repo_id,
            "modelId": self.repo.repo_id,
            "author": org,
            "sha": self.commit,
            "private": False,
            # The Hub says "auto" or "manual" for a gated repo; the client only tests truthiness.
            "gated": "auto" if self.repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": [e.sibling(blobs) for e in self.files.values()],
        }


class HttpError(Exception):
    """A response that ends the handling of a request, with the Hub's error signals: raise it
    from a ``Handler`` hook to answer with an error."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


class _Server(ThreadingHTTPServer):
    # Daemon threads: a forgotten connection must never keep a test process alive.
    daemon_threads = True
    # Port 0 picks a free port; reusing an address could let two test servers share one.
    allow_reuse_address = False

    def __init__(self, hub: LoopbackHub, port: int) -> None:
        self.hub = hub
        super().__init__(("127.0.0.1", port), hub.handler_class)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up (or stop() closing its idle connection) is routine, not a bug
        # worth a traceback on stderr; anything else still gets one.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    """Routes one connection's requests to the hub. Keep-alive, as the client pools connections.

    Hooks for a subclass (``LoopbackHub.handler_class``): ``before`` sees each request first,
    ``file_body`` gives a file's bytes, ``write_body`` sends them."""

    # HTTP/1.1 so that Content-Length governs the body: a short body is then a protocol error
    # the client can detect, which is what the "drop" fault needs.
    protocol_version = "HTTP/1.1"
    timeout = _IDLE_TIMEOUT_S
    server_version = "LoopbackHub/1"
    sys_version = ""

    @property
    def hub(self) -> LoopbackHub:
        return cast(_Server, self.server).hub

    def setup(self) -> None:
        super().setup()
        self.hub._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.hub._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        # Silent: the request log is ``LoopbackHub.requests``; stderr noise would hide test output.
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        hub = self.hub
        auth = self.headers.get("Authorization")
        hub._log(
            {
                "method": self.command,
                "path": self.path,
                # The token itself never reaches the log: tests assert it cannot leak from there.
                "headers": {
                    k: ("<redacted>" if k.lower() == "authorization" else v)
                    for k, v in self.headers.items()
                },
                "authorized": auth is not None,
            }
        )
        try:
            body = self._read_body()
            self._route(body, auth)
        except HttpError as err:
            self._send_error(err)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HttpError(411, "Length Required")
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self.close_connection = True
            raise HttpError(413, "Request body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _route(self, body: bytes, auth: str | None) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        # Split before unquoting: a revision like refs/pr/1 arrives as one segment, refs%2Fpr%2F1.
        parts = url.path.split("/")[1:]
        method = self.command
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            rest = parts[4:]
            if method == "GET" and not rest:
                index = self._open(repo_id, None, auth, None, api=True)
                return self._send_json(index.info(_flag(query, "blobs")))
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                index = self._open(repo_id, None, auth, unquote(rest[1]), api=True)
                return self._send_json(index.info(_flag(query, "blobs")))
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                index = self._open(repo_id, None, auth, unquote(rest[1]), api=True)
                sub = unquote("/".join(rest[2:])).strip("/")
                if sub and sub not in index.dirs:
                    raise HttpError(
                        404, f'{sub} does not exist on "{unquote(rest[1])}"', "EntryNotFound"
                    )
                # One page holds everything: no Link header, so paginating clients stop here.
                return self._send_json(index.tree(sub, _flag(query, "recursive")))
            if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
                index = self._open(repo_id, None, auth, unquote(rest[1]), api=True)
                return self._send_json(self._paths_info(index, body))
        elif len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
            path = unquote("/".join(parts[4:]))
            index = self._open(repo_id, path, auth, unquote(parts[3]), api=False)
            return self._send_file(index, path)
        raise HttpError(404, "Not Found")

    def before(self, repo_id: str, path: str | None, *, api: bool) -> None:
        """Called first for every request of a repo (``path``: the file, for a download);
        raise ``HttpError`` to answer with it. Nothing here: the Hub serves."""

    def file_body(self, entry: HubFile) -> bytes:
        """The bytes served for a file."""
        return entry.content

    def write_body(self, body: bytes) -> None:
        """Send a file's bytes, after headers that promised ``len(body)`` of them."""
        self.wfile.write(body)

    def _open(
        self, repo_id: str, path: str | None, auth: str | None, rev: str | None, *, api: bool
    ) -> _Index:
        """Apply, in the Hub's order, ``before``, then repo, gate and revision checks."""
        hub = self.hub
        self.before(repo_id, path, api=api)
        index = hub._indexes.get(repo_id)
        if index is None:
            raise HttpError(404, "Repository not found", "RepoNotFound")
        if index.repo.gated:
            token = auth[len("Bearer ") :] if auth and auth.startswith("Bearer ") else None
            if token is None:
                # The Hub words it differently for files and for the API; both carry GatedRepo.
                msg = (
                    f"Access to model {repo_id} is restricted. You must be authenticated to "
                    "access it."
                    if api
                    else gated_message(repo_id)
                )
                raise HttpError(401, msg, "GatedRepo")
            if token not in hub._tokens:
                raise HttpError(
                    403,
                    f"Access to model {repo_id} is restricted and you are not "
                    f"in the authorized list. Visit https://huggingface.co/{repo_id}"
                    " to ask for access.",
                    "GatedRepo",
                )
        if rev is not None and rev not in (index.repo.branch, index.commit):
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return index

    def _paths_info(self, index: _Index, body: bytes) -> list[dict[str, Any]]:
        # huggingface_hub posts a form; other clients post JSON. Accept both.
        if self.headers.get("Content-Type", "").startswith("application/json"):
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                raise HttpError(400, "Invalid JSON body") from None
            paths = data.get("paths", []) if isinstance(data, dict) else []
            paths = [paths] if isinstance(paths, str) else paths
        else:
            paths = parse_qs(body.decode("utf-8", "replace")).get("paths", [])
        out: list[dict[str, Any]] = []
        for raw in paths:
            path = str(raw).strip("/")
            if path in index.files:
                out.append(index.files[path].tree_item())
            elif path in index.dirs:
                out.append(index.dir_item(path))
            # Unknown paths are left out, not an error: that is how the Hub answers.
        return out

    def _send_file(self, index: _Index, path: str) -> None:
        entry = index.files.get(path)
        commit_header = {"X-Repo-Commit": index.commit}
        if entry is None:
            # The Hub names the commit even here; the client caches the absence under it.
            raise HttpError(404, "Entry not found", "EntryNotFound", commit_header)
        data = self.file_body(entry)
        size = len(data)
        headers = {
            **commit_header,
            "ETag": entry.etag,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.lfs:
            # What the Hub sends beside its redirect to the CDN; the client prefers these two.
            headers["X-Linked-Etag"] = entry.etag
            headers["X-Linked-Size"] = str(size)
        status, start, end = 200, 0, size
        match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if self.command == "GET" and match and any(match.groups()):
            first, last = match.groups()
            if not first:  # suffix range: the last N bytes
                start = max(size - int(last), 0)
            else:
                start = int(first)
                end = min(int(last) + 1, size) if last else size
            if start >= size or start >= end:
                raise HttpError(
                    416,
                    "Requested range not satisfiable",
                    headers={**commit_header, "Content-Range": f"bytes */{size}"},
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        body = data[start:end]
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        self.write_body(body)

    def _send_json(self, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, err: HttpError) -> None:
        body = json.dumps({"error": err.message}).encode()
        self.send_response(err.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        # The client maps errors from X-Error-Code, not from the status: 404 alone means nothing.
        if err.code is not None:
            self.send_header("X-Error-Code", err.code)
            self.send_header("X-Error-Message", err.message)
        for name, value in err.headers.items():
            self.send_header(name, value)
        # Even on HEAD: the client needs a length to know where the next response starts.
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    return query.get(name, [""])[-1].lower() in ("1", "true")


def gated_message(repo_id: str) -> str:
    """What the Hub says to a download of a gated repo without a token."""
    return (
        f"Access to model {repo_id} is restricted. You must have access to it and be "
        "authenticated to access it. Please log in."
    )


class LoopbackHub:
    """A threaded Hub on ``127.0.0.1`` serving ``repos``; a context manager.

    ``tokens`` are the bearer tokens accepted for gated repos. ``port`` 0 picks a free port.
    """

    handler_class: type[Handler] = Handler

    def __init__(
        self, repos: Iterable[HubRepo], *, tokens: Iterable[str] = (), port: int = 0
    ) -> None:
        self._indexes: dict[str, _Index] = {}
        for repo in repos:
            if repo.repo_id in self._indexes:
                raise ValueError(f"duplicate repo {repo.repo_id}")
            self._indexes[repo.repo_id] = _Index(repo)
        self._tokens = frozenset(tokens)
        self._port = port
        self._lock = threading.Lock()
        self._log_entries: deque[dict[str, Any]] = deque(maxlen=_MAX_LOG)
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``; the value for ``HF_ENDPOINT`` or ``endpoint=``."""
        if self._server is None:
            raise RuntimeError("LoopbackHub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """A copy of the log: ``method``, ``path``, ``headers`` (token redacted), ``authorized``."""
        with self._lock:
            return list(self._log_entries)

    def start(self) -> LoopbackHub:
        """Bind and serve in a daemon thread. Returns ``self``."""
        if self._server is not None:
            raise RuntimeError("LoopbackHub is already started")
        self._server = _Server(self, self._port)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"LoopbackHub:{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every connection, so no handler thread outlives the hub."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            # Wakes handler threads blocked reading the next keep-alive request.
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _log(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._log_entries.append(entry)

    def _track(self, conn: socket.socket, open_: bool) -> None:
        with self._lock:
            if open_:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)
