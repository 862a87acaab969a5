"""Writing OCI image archives and their layers, deterministically, with no daemon.

Each layer is an uncompressed tar, written deterministically: entries sorted, every mtime
``LAYER_EPOCH``, owner 0:0 with no names, GNU long names (no PAX headers, which carry
times), modes as given. The layer mtimes are one constant rather than a bundle's
SOURCE_DATE_EPOCH: a release built on another day must not change 7 GB of unchanged files.

Why uncompressed: gzip's bytes depend on the zlib build (zlib and zlib-ng give different
streams at the same level), so a compressed layer would not have the same digest on every
build host; and gzip is slow (``gzip -6`` of the 210 MB Debian base layer took 43 s here,
``-1`` 14 s: minutes for a venv of GBs). ``skopeo copy --preserve-digests`` pushes the
layers as they are.

The archive is an OCI image layout in a tar (podman's, skopeo's and buildah's
``oci-archive`` transport), itself deterministic: the layout's folders, the blobs (in the
order they are added, or by digest with ``write_archive``), ``index.json`` and
``oci-layout``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from bundler.errors import IntegrityError

LAYER_EPOCH = 946684800  # 2000-01-01T00:00:00Z: every mtime in every layer we write
OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYERS = {"application/vnd.docker.image.rootfs.diff.tar.gzip": MT_LAYER_GZIP,
                 "application/vnd.docker.image.rootfs.diff.tar": MT_LAYER}
BLOCK = 512
RECORD = 20 * BLOCK
CHUNK = 1 << 20


@dataclass(frozen=True)
class Blob:
    """One blob of the archive: its digest and size known before it is written."""

    digest: str  # sha256 hex
    size: int
    media_type: str
    write: Callable[[IO[bytes]], None] = field(repr=False, compare=False)
    # Called once the blob is in the archive: a layer's staged files are removed then, so
    # the disk holds about one copy of the image, not the staged root and the archive both.
    written: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    diff_id: str = ""  # sha256 of the uncompressed tar (layers)
    role: str = ""  # base, venv, models, config
    holds: str = ""


# --- deterministic tar -------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """A file system entry of a layer we write (path relative to the root, no slash)."""

    name: str
    kind: str  # "dir", "file", "symlink"
    mode: int
    size: int = 0
    source: Path | None = None
    target: str = ""


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.mtime = LAYER_EPOCH
    info.mode = entry.mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif entry.kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, entry.target
    else:
        info.size = entry.size
    return info


class _Sink(io.RawIOBase):
    """Counts and hashes what is written, and passes it on to ``out`` when there is one."""

    def __init__(self, out: IO[bytes] | None = None) -> None:
        super().__init__()
        self.hash = hashlib.sha256()
        self.size = 0
        self.out = out

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += len(view)
        if self.out is not None:
            self.out.write(view)
        return len(view)


def write_layer(entries: list[Entry], out: IO[bytes] | _Sink) -> None:
    """The layer tar of ``entries``, in their (sorted) order, to ``out``."""
    with tarfile.open(fileobj=cast(IO[bytes], out), mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for entry in entries:
            info = _tarinfo(entry)
            if entry.kind == "file":
                assert entry.source is not None
                with open(entry.source, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def layer_digest(entries: list[Entry]) -> str:
    """The sha256 of the layer tar of ``entries`` (its digest and diff_id), without writing
    it anywhere: what ``ArchiveWriter.add_layer`` names the same layer when it streams it."""
    sink = _Sink()
    write_layer(entries, sink)
    return sink.hash.hexdigest()


def bytes_blob(data: bytes, media_type: str) -> Blob:
    def write(out: IO[bytes]) -> None:
        out.write(data)

    return Blob(hashlib.sha256(data).hexdigest(), len(data), media_type, write)


def file_blob(path: Path, media_type: str, digest: str, size: int, diff_id: str, role: str,
              holds: str) -> Blob:
    def write(out: IO[bytes]) -> None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != digest:
            raise IntegrityError(path.name, f"sha256 {h.hexdigest()} is not the {digest} "
                                 "its manifest records: the base is damaged")

    return Blob(digest, size, media_type, write, diff_id=diff_id, role=role, holds=holds)


def _header(name: str, size: int, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.mtime = LAYER_EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.size = 0 if directory else size
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


class ArchiveWriter:
    """An oci-archive tar being written at ``path`` (beside it, renamed when whole): the
    layout's folders, then blobs in the order they are added, then ``finish`` writes
    index.json and oci-layout. Use it as a context manager: on any failure the partial
    file is removed.

    A layer (``add_layer``) is streamed into the archive once, hashed as it goes: its tar
    header, which names the blob by the digest only known at the end, is written first with
    a placeholder name of the same length and rewritten once the layer ends. Each staged
    byte is read once (hashing the layer first, then streaming it again, read the 7.9 GB
    venv twice)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.written: set[str] = set()
        self.file: IO[bytes] | None = None
        self.out = _Sink()

    def __enter__(self) -> ArchiveWriter:
        self.file = open(self.tmp, "wb")
        self.out = _Sink(self.file)
        self.out.write(_header("blobs/", 0, True))
        self.out.write(_header("blobs/sha256/", 0, True))
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if self.file is not None:
            self.file.close()
        if kind is not None:
            self.tmp.unlink(missing_ok=True)

    def add(self, blob: Blob) -> None:
        """A blob whose digest and size are known before it is written (once per digest)."""
        if blob.digest in self.written:
            return
        out = self.out
        out.write(_header(f"blobs/sha256/{blob.digest}", blob.size))
        start = out.size
        blob.write(cast(IO[bytes], out))
        if out.size - start != blob.size:
            raise IntegrityError(f"blob {blob.digest}", "its size changed while the image "
                                 "was written; build again")
        out.write(b"\0" * (-blob.size % BLOCK))
        self.written.add(blob.digest)
        if blob.written is not None:
            blob.written()

    def add_layer(self, entries: list[Entry], role: str, holds: str) -> Blob:
        """The layer tar of ``entries``, streamed into the archive once and hashed on the
        way; its staged files are removed once it is in (the disk then holds about one copy
        of the image, not the staged root and the archive both). Returns its blob."""
        assert self.file is not None
        out = self.out
        header_at = out.size
        # "blobs/sha256/" + 64 hex is 77 characters: one 512-byte header whatever the
        # digest and size, so the real one fits exactly where the placeholder was.
        out.write(_header(f"blobs/sha256/{'0' * 64}", 0))
        layer = _Sink(cast(IO[bytes], out))
        write_layer(entries, layer)
        digest, size = layer.hash.hexdigest(), layer.size
        if digest in self.written:  # the same bytes as a blob already in: one copy
            self.file.seek(header_at)
            self.file.truncate()
            out.size = header_at
        else:
            out.write(b"\0" * (-size % BLOCK))
            end = self.file.tell()
            self.file.seek(header_at)
            self.file.write(_header(f"blobs/sha256/{digest}", size))
            self.file.seek(end)
            self.written.add(digest)
        for entry in entries:
            if entry.kind == "file" and entry.source is not None:
                entry.source.unlink(missing_ok=True)
        return Blob(digest, size, MT_LAYER, _never_again, diff_id=digest, role=role,
                    holds=holds)

    def finish(self, index: bytes) -> int:
        """index.json and oci-layout, the end of the tar, then the archive in its place.
        Returns its size."""
        assert self.file is not None
        out = self.out
        layout = json.dumps({"imageLayoutVersion": "1.0.0"}, separators=(",", ":")).encode()
        for name, data in (("index.json", index), ("oci-layout", layout)):
            out.write(_header(name, len(data)))
            out.write(data)
            out.write(b"\0" * (-len(data) % BLOCK))
        out.write(b"\0" * (2 * BLOCK))
        out.write(b"\0" * (-out.size % RECORD))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return out.size


def _never_again(out: IO[bytes]) -> None:
    """A streamed layer's ``write``: its staged files are gone once it is in the archive."""
    raise IntegrityError("layer", "a streamed layer is written into its archive once")


def write_archive(path: Path, blobs: list[Blob], index: bytes) -> int:
    """The oci-archive tar at ``path`` (written beside it, renamed when whole): the layout's
    folders, every blob by digest, index.json and oci-layout, in sorted order."""
    unique = {b.digest: b for b in blobs}
    with ArchiveWriter(path) as archive:
        for digest in sorted(unique):
            archive.add(unique[digest])
        return archive.finish(index)


def canonical(data: Any) -> bytes:
    """JSON as the image's digests cover it: sorted keys, no spaces."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
