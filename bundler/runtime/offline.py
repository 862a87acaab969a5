"""Offline by construction: the variables that keep every library off the network, the
writable per-user cache folder, and the audit hook that counts (and, asked to, refuses)
every connection attempt a process makes.

Standard library only, Python 3.9, and no sibling imported: ``configure.py`` (at the
bundle's top, before the venv is used) loads this file alone for OFFLINE_ENV, and the tool
(``bundler.layout``) imports it for the same list.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The offline variables: the one list (layout.OFFLINE_ENV on the build side and configure.py,
# for pyannote.env and the venv's defaults, read it from here). Forced here, not defaulted:
# these programs never need the network.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYANNOTE_METRICS_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
    # onnxruntime >= 1.29 (faster-whisper's Silero VAD) starts DNS attempts about 10 s after
    # a session opens and writes ~/.cache/Microsoft/...; this stops both.
    "ORT_DISABLE_TELEMETRY": "1",
}
# Library caches, each under a writable per-user folder unless the user set it already.
CACHE_VARS = {"MPLCONFIGDIR": "matplotlib", "TORCH_HOME": "torch", "HF_HOME": "huggingface",
              "NUMBA_CACHE_DIR": "numba", "XDG_CACHE_HOME": "xdg"}


def go_offline(environ: dict[str, str] | Any = os.environ) -> Path | None:
    """Set the offline variables and point the library caches at a writable per-user
    folder; return that folder (None when nothing is writable: caches stay unset)."""
    for key, value in OFFLINE_ENV.items():
        environ[key] = value
    root = cache_root(environ)
    if root is not None:
        for var, sub in CACHE_VARS.items():
            environ.setdefault(var, str(root / sub))
    return root


def cache_root(environ: dict[str, str] | Any = os.environ) -> Path | None:
    """``$XDG_CACHE_HOME/pyannote-bundle``, else ``~/.cache/pyannote-bundle``, else a
    private folder under the temporary directory: the first one this user can write.

    A service user often has no home, or an unwritable one; the prefix is read-only."""
    candidates = []
    # Only under a folder that exists: a service user's nonexistent home is not created.
    if environ.get("XDG_CACHE_HOME") and Path(environ["XDG_CACHE_HOME"]).is_dir():
        candidates.append(Path(environ["XDG_CACHE_HOME"]) / "pyannote-bundle")
    if environ.get("HOME") and Path(environ["HOME"]).is_dir():
        candidates.append(Path(environ["HOME"]) / ".cache" / "pyannote-bundle")
    try:
        private: Path | None = Path(tempfile.gettempdir()) / f"pyannote-bundle-{os.getuid()}"
    except OSError:  # no writable temp dir at all: a read-only root with no volume at /tmp
        private = None
    for path in (*candidates, *([private] if private else [])):
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = path.lstat()
        except OSError:
            continue
        # In a shared /tmp, use only a real folder that is ours (no planted symlink).
        if path == private and (not path.is_dir() or path.is_symlink()
                                or st.st_uid != os.getuid()):
            continue
        if os.access(path, os.W_OK | os.X_OK):
            return path
    return None


NAME_EVENTS = frozenset({"socket.getaddrinfo", "socket.gethostbyname",
                         "socket.gethostbyname_ex", "socket.gethostbyaddr",
                         "socket.getnameinfo"})
INET = (socket.AF_INET, socket.AF_INET6)


class NetworkAudit:
    """A ``sys.addaudithook`` hook: counts every connection attempt and name lookup this
    process makes (local sockets aside), and refuses them when ``block`` is set. Looking up
    a host in ``allow`` is not counted: the database a service was told to use (``bin/serve
    --store postgresql://...``; psycopg resolves its name in Python, libpq connects in C)."""

    def __init__(self, block: bool = False, allow: Iterable[str] = ()) -> None:
        self.block = block
        self.allow = frozenset(host.lower() for host in allow)
        self.attempts: list[str] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            sock, address = args[0], args[-1]
            if getattr(sock, "family", None) not in INET:
                return
            what = f"{event.split('.')[1]} {address!r}"
        elif event in NAME_EVENTS:
            if str(args[0]).lower() in self.allow:
                return
            what = f"{event.split('.')[1]} {args[0]!r}"
        else:
            return
        if len(self.attempts) < 1000:
            self.attempts.append(what)
        if self.block:
            raise ConnectionRefusedError(f"network disabled by --block-network ({what})")
