"""sha256 on a second core: hashlib releases the GIL for large updates, so a digest fed
from a thread runs beside the copy it watches (the archive's digest while its members are
written or unpacked). Chunks are handed over as immutable bytes, in order."""

from __future__ import annotations

import hashlib
import queue
import threading

_DEPTH = 32  # chunks in flight: bounded memory (32 x 1 MiB)


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
