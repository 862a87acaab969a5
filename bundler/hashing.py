"""The digests the tool checks files by, each defined once.

``sha256_file``: sha256 and size of a file. ``git_blob_sha1``: the id git (and the Hub, for
a file not in LFS) gives a file's bytes. ``BackgroundSha256``: sha256 on a second core:
hashlib releases the GIL for large updates, so a digest fed from a thread runs beside the
copy it watches (the archive's digest while its members are written or unpacked). Chunks
are handed over as immutable bytes, in order."""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path

_DEPTH = 32  # chunks in flight: bounded memory (32 x 1 MiB)
BUFSIZE = 1 << 20


def sha256_file(path: Path) -> tuple[str, int]:
    """sha256 and size of a file, in one read with large buffers."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(BUFSIZE):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub calls ``blobId``/``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class BackgroundSha256:
    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_DEPTH)
        self._digest: str | None = None
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._hash.update(chunk)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._queue.put(data if isinstance(data, bytes) else bytes(data))

    def hexdigest(self) -> str:
        """Wait for every chunk, then the digest (idempotent)."""
        if self._digest is None:
            self._queue.put(None)
            self._thread.join()
            self._digest = self._hash.hexdigest()
        return self._digest

    def close(self) -> None:
        """Stop the thread without a digest (on an error path)."""
        if self._digest is None and self._thread.is_alive():
            self.hexdigest()
