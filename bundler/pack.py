"""Stage: one deterministic tarball, its checksums, and the sidecar digest, written atomically.

Each byte is read once: every member is hashed while it is copied into the archive (and
checked against the hash the earlier stages recorded, so a cache entry that changed on
disk cannot slip in), and the archive is hashed while it is written, for the sidecar.

Determinism: entries sorted (the small files by path, then models/, then wheels/), one
top-level folder, fixed mtime (SOURCE_DATE_EPOCH), uid
and gid 0, no owner names, modes 0644/0755, PAX format, and compressor headers without a
timestamp or file name. Two builds from the same inputs are byte-identical.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

from bundler import layout
from bundler.bundlefile import publishing
from bundler.checksums import format_checksums
from bundler.errors import OutputError
from bundler.hashing import BackgroundSha256
from bundler.progress import task

log = logging.getLogger("bundler")

BUFSIZE = 1 << 20
COMPRESSIONS = {"none": ".tar", "zstd": ".tar.zst", "gzip": ".tar.gz"}
# Wheels are zip files: measured on a 344 MB wheelhouse, zstd -3 saves ~2 % in 0.9 s and
# gzip -6 saves ~2 % in 15 s. Not compressing is the honest default (the CLI's); zstd is on
# offer.
GZIP_LEVEL = 1  # the ratio on zipped wheels barely moves with the level; the time does
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class Entry:
    """A file to pack: bytes in memory or a file on disk, with the sha256 it must have."""

    path: str  # relative to the bundle's top folder, posix
    sha256: str
    size: int
    source: Path | None = None
    data: bytes | None = None

    @classmethod
    def from_bytes(cls, path: str, data: bytes) -> Entry:
        return cls(path, hashlib.sha256(data).hexdigest(), len(data), data=data)


@dataclass(frozen=True)
class Packed:
    path: Path
    sidecar: Path
    sha256: str
    size: int
    members: int


class _HashingWriter(io.RawIOBase):
    """Write-through that hashes and counts the bytes (the archive's own digest)."""

    def __init__(self, raw: IO[bytes], advance: Callable[[int], None] = lambda n: None) -> None:
        self.raw, self.hash, self.count, self.advance = raw, BackgroundSha256(), 0, advance

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = b if isinstance(b, bytes) else bytes(b)
        self.hash.update(data)
        self.raw.write(data)
        self.count += len(data)
        self.advance(len(data))
        return len(data)

    def tell(self) -> int:
        return self.count


class _HashingReader:
    """Read-through that hashes a member while tarfile copies it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.hash = raw, BackgroundSha256()

    def read(self, n: int = -1) -> bytes:
        b = self.raw.read(n)
        if b:
            self.hash.update(b)
        return b


# The bulk goes last, models before wheels: what describes the bundle (manifest, checksums,
# the programs, the smoke files and expected result) comes first, so that `inspect` reads a
# few MB of a 4 GB bundle whatever size its models are (a 3 GB speech-recognition model).
BULK = (layout.MODELS_DIR, layout.WHEELS_DIR)


def member_order(entry: Entry) -> tuple[int, tuple[str, ...]]:
    """The sort key of a bundle member: small files by path, then models/, then wheels/."""
    parts = PurePosixPath(entry.path).parts
    rank = BULK.index(parts[0]) + 1 if len(parts) > 1 and parts[0] in BULK else 0
    return rank, parts


def bundle_filename(stem: str, compression: str) -> str:
    return stem + COMPRESSIONS[compression]


def pack(entries: Sequence[Entry], *, top: str, output_dir: Path, compression: str,
         mtime: int) -> Packed:
    """Write ``output_dir/<top><ext>`` and its sidecar; nothing under the final names on failure."""
    if compression not in COMPRESSIONS:
        raise OutputError(f"unknown compression '{compression}' (none, zstd, gzip)")
    names = [e.path for e in entries]
    if len(set(names)) != len(names) or layout.CHECKSUMS in names:
        raise OutputError("internal: duplicate bundle paths")
    sums = Entry.from_bytes(layout.CHECKSUMS,
                            format_checksums([(e.path, e.sha256) for e in entries]))
    members = sorted([*entries, sums], key=member_order)

    final = output_dir / bundle_filename(top, compression)
    with publishing(output_dir, str(final), "the bundle's name") as pub:
        total = sum(e.size for e in members)
        with open(pub.temporary(final), "wb") as raw, \
                task(f"pack: {final.name}", total) as advance:
            out = _HashingWriter(raw, advance)
            try:
                _write_tar(out, members, top, compression, mtime)
            finally:
                out.hash.close()
            raw.flush()
            os.fsync(raw.fileno())
        digest = out.hash.hexdigest()
        sidecar = pub.sidecar(final, digest)
    log.info("pack: %s (%d bytes, %d files)", final.name, out.count, len(members))
    return Packed(final, sidecar, digest, out.count, len(members))


def _write_tar(out: _HashingWriter, members: Sequence[Entry], top: str, compression: str,
               mtime: int) -> None:
    stream: Any
    if compression == "gzip":
        stream = gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0,
                               compresslevel=GZIP_LEVEL)
    elif compression == "zstd":
        import zstandard

        # A fixed worker count: zstd's multi-threaded output is reproducible for any count
        # >= 1, but differs from single-threaded output.
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=2, write_checksum=True)
        stream = cctx.stream_writer(cast(IO[bytes], out), closefd=False)
    else:
        stream = out
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT,
                      bufsize=BUFSIZE) as tar:
        # Members are copied in 1 MiB chunks, not tarfile's 16 KiB (not in typeshed).
        setattr(tar, "copybufsize", BUFSIZE)  # noqa: B010
        tar.addfile(_info(top + "/", tarfile.DIRTYPE, 0, mtime, 0o755))
        seen_dirs: set[str] = set()
        for entry in members:
            parts = PurePosixPath(entry.path).parts
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in seen_dirs:
                    seen_dirs.add(d)
                    tar.addfile(_info(f"{top}/{d}/", tarfile.DIRTYPE, 0, mtime, 0o755))
            mode = 0o755 if entry.path in layout.EXECUTABLES else 0o644
            info = _info(f"{top}/{entry.path}", tarfile.REGTYPE, entry.size, mtime, mode)
            if entry.data is not None:
                tar.addfile(info, io.BytesIO(entry.data))
                continue
            assert entry.source is not None
            with open(entry.source, "rb") as f:
                reader = _HashingReader(f)
                try:
                    tar.addfile(info, reader)
                finally:
                    digest = reader.hash.hexdigest()
            if digest != entry.sha256:
                raise OutputError(f"{entry.source} changed on disk while packing (sha256 "
                                  f"{digest} != {entry.sha256}); build again")
        # stream (gzip/zstd) is closed after tar writes its end blocks
    if stream is not out:
        stream.close()


def _info(name: str, kind: bytes, size: int, mtime: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name.rstrip("/") if kind == tarfile.DIRTYPE else name)
    info.type, info.size, info.mtime, info.mode = kind, size, mtime, mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
