"""SHA256SUMS: the list of every file a bundle holds with its sha256, in ``sha256sum -c`` form.

Written by ``pack``; read by ``integrity``, ``inspect`` and ``delta``. On the isolated host
the bundle's own installer (``runtime/install.py``, which cannot import the tool) reads the
same list; ``tests/test_contract.py`` proves the two readers agree on what the tool writes.
The sidecar beside a tarball and the parts' list of its volumes are lines of the same form.
"""

from __future__ import annotations

from collections.abc import Sequence

from bundler import layout


def checksum_line(sha256: str, path: str) -> str:
    """One line of ``sha256sum -c`` input: ``<hex>  <path>``."""
    return f"{sha256}  {path}\n"


def format_checksums(entries: Sequence[tuple[str, str]]) -> bytes:
    """SHA256SUMS from ``(path, sha256)`` pairs: one line each, sorted by path."""
    return "".join(checksum_line(sha, path) for path, sha in sorted(entries)).encode()


def parse_checksums(data: bytes, source: str = layout.CHECKSUMS) -> dict[str, str]:
    """Parse SHA256SUMS strictly; ValueError names the bad line."""
    out: dict[str, str] = {}
    for n, line in enumerate(data.decode("utf-8", "strict").splitlines(), 1):
        sha, sep, path = line.partition("  ")
        if not sep or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha) or not path:
            raise ValueError(f"{source}: line {n} is not '<sha256>  <path>'")
        if path in out:
            raise ValueError(f"{source}: line {n} lists {path} twice")
        out[path] = sha
    return out
