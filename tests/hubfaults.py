"""The loopback Hub's test doubles: fault injection, and the standalone server.

``FaultyHub`` is ``bundler.demo.hub.LoopbackHub`` that can answer with the faults a real
download meets (rate limits, 5xx, a dropped connection, corrupted bytes), so the builder's
handling of each one is tested against the real ``huggingface_hub`` client.
``python tests/hubfaults.py --repo ORG/NAME=DIR`` serves folders as Hub repos until Ctrl-C
(with no faults).
"""

from __future__ import annotations

import argparse
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import cast

from bundler.demo.hub import Handler, HttpError, HubFile, HubRepo, LoopbackHub, gated_message

#: Faults ``FaultyHub.inject`` understands.
FAULTS = frozenset({"401", "403", "404", "429", "500", "502", "503", "drop", "corrupt"})
# These two alter a file body, so they wait for a GET of file content (a HEAD cannot carry them).
_BODY_FAULTS = frozenset({"drop", "corrupt"})


class _FaultyHandler(Handler):
    # "drop" or "corrupt" taken for the request being handled (one handler serves a connection).
    _body_fault: str | None = None

    def before(self, repo_id: str, path: str | None, *, api: bool) -> None:
        hub = cast(FaultyHub, self.hub)
        self._body_fault = None
        fault = hub._take_fault(repo_id, path, content=self.command == "GET" and not api)
        if fault in _BODY_FAULTS:
            self._body_fault = fault
        elif fault is not None:
            raise _fault_error(fault, repo_id)

    def file_body(self, entry: HubFile) -> bytes:
        data = entry.content
        if self._body_fault == "corrupt" and data:
            # Same size, one byte flipped: only a content hash can tell.
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        return data

    def write_body(self, body: bytes) -> None:
        if self._body_fault == "drop":
            # Promise the whole body, deliver about half, hang up: a connection lost mid-file.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


def _fault_error(fault: str, repo_id: str) -> HttpError:
    if fault == "401":
        return HttpError(401, gated_message(repo_id), "GatedRepo")
    if fault == "403":
        return HttpError(403, "Forbidden", None, {"X-Error-Message": "Forbidden"})
    if fault == "429":
        # Retry-After: 0 keeps tests fast; the client still waits its own second on top.
        return HttpError(429, "Too Many Requests", None, {"Retry-After": "0"})
    # A bare 404 or 5xx with no X-Error-Code: what a proxy or a failing Hub front end sends.
    reasons = {
        "404": "Not Found",
        "500": "Internal Error",
        "502": "Bad Gateway",
        "503": "Service Unavailable",
    }
    return HttpError(int(fault), reasons[fault])


class FaultyHub(LoopbackHub):
    """A ``LoopbackHub`` whose answers can be replaced by queued faults (``inject``)."""

    handler_class = _FaultyHandler

    def __init__(self, repos: Iterable[HubRepo], *, tokens: Iterable[str] = (),
                 port: int = 0) -> None:
        super().__init__(repos, tokens=tokens, port=port)
        self._faults: dict[tuple[str, str | None], deque[str]] = {}

    def inject(self, repo_id: str, path: str | None, *faults: str) -> None:
        """Queue ``faults`` for ``repo_id``; each is consumed by one matching request, in order.

        With a ``path``, only ``resolve`` requests for that file match; with ``None``, any request
        for the repo (API calls included). ``"drop"`` and ``"corrupt"`` wait for a GET of file
        content; a HEAD passes them by. ``"corrupt"`` does nothing to an empty file.
        """
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {sorted(FAULTS)}")
        index = self._indexes.get(repo_id)
        if index is None:
            raise KeyError(f"no repo {repo_id}")
        if path is not None and path not in index.files:
            raise KeyError(f"no file {path} in {repo_id}")
        with self._lock:
            self._faults.setdefault((repo_id, path), deque()).extend(faults)

    def _take_fault(self, repo_id: str, path: str | None, *, content: bool) -> str | None:
        keys = [(repo_id, path), (repo_id, None)] if path is not None else [(repo_id, None)]
        with self._lock:
            for key in keys:
                queue = self._faults.get(key)
                if queue and (content or queue[0] not in _BODY_FAULTS):
                    return queue.popleft()
        return None


def main(argv: list[str] | None = None) -> int:
    """Serve folders as Hub repos until Ctrl-C: ``tests/hubfaults.py --repo ORG/NAME=DIR``."""
    parser = argparse.ArgumentParser(prog="hubfaults.py", description=main.__doc__)
    parser.add_argument(
        "--repo",
        action="append",
        required=True,
        metavar="ORG/NAME=DIR",
        help="serve the files under DIR as repo ORG/NAME (repeatable)",
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: free)")
    args = parser.parse_args(argv)
    repos = []
    for spec in args.repo:
        repo_id, sep, folder = spec.partition("=")
        if not sep:
            parser.error(f"--repo wants ORG/NAME=DIR, got {spec!r}")
        try:
            repos.append(HubRepo.from_dir(repo_id, Path(folder)))
        except (ValueError, OSError) as err:
            parser.error(str(err))
    with LoopbackHub(repos, port=args.port) as hub:
        for repo in repos:
            print(f"{repo.repo_id}@{repo.commit} ({len(repo.files)} files)")
        print(
            f"Serving on {hub.url}  (try: HF_ENDPOINT={hub.url} pyannote-bundle build ...)",
            flush=True,
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
