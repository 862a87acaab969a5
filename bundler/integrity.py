"""Offline stage: prove a tarball is the bundle its checksums describe, and unpack it safely.

One streaming pass over the file: the outer bytes are hashed for the sidecar while each
member is checked (PEP 706's ``data`` filter, plus: regular files and folders only, sane
names, one top-level folder, no duplicates, size and count limits) and written, hashed,
into the work folder. Then SHA256SUMS is checked in both directions and manifest.json
against it. On any failure the caller removes the work folder: nothing is installed from a
bad bundle.

No parser differential: the README tells the sysadmin to unpack with GNU tar, so the members
read here must be the members GNU tar unpacks. Python's tarfile quietly ends the archive at
a header it cannot read where GNU tar skips it and unpacks what follows; the two pick
differently among several extended headers for one member, apply global headers and
old-style name prefixes differently, and expand sparse files their own ways. Each of those
is refused (``_StrictInfo``, ``check_member``), and after the end-of-archive marker only
zero bytes may follow (``BundleStream.read_to_end``), so nothing can hide behind the end.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Self

from bundler import layout
from bundler.bundlefile import (
    SIDECAR_SUFFIX,
    Sidecar,
    name_bad_part,
    open_raw,
    read_sidecar,
    total_size,
    whole,
)
from bundler.checksums import parse_checksums
from bundler.errors import IntegrityError, OutputError
from bundler.hashing import BackgroundSha256
from bundler.progress import task

BUFSIZE = 1 << 20
MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}

# Member names: Linux's NAME_MAX and PATH_MAX, and a depth far beyond any bundle's (its
# deepest file is five folders down) yet far below what recursion in path handling survives.
MAX_COMPONENT_BYTES = 255
MAX_NAME_BYTES = 4096
MAX_DEPTH = 32
_POSIX_MAGIC = b"ustar\x0000"
_EXTENDED = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK)
_TAMPERED = "damaged or tampered: get the bundle again from its source"


@dataclass(frozen=True)
class Limits:
    """Refuse a bundle before it fills the disk. Defaults fit a CUDA pyannote bundle (~4 GB)."""

    max_bytes: int = 32 * 1024**3  # unpacked size
    max_members: int = 10_000
    max_member_bytes: int = 8 * 1024**3


@dataclass(frozen=True)
class Integrity:
    """The result of a successful check."""

    root: Path  # the unpacked bundle folder
    top: str
    sidecar: str  # "match" or "absent"
    sha256: str  # of the tarball
    files: int
    bytes: int
    manifest: dict[str, Any] = field(default_factory=dict)
    members_checked_by: str = "sha256 of each member"

    def as_dict(self) -> dict[str, Any]:
        return {"ok": True, "sidecar": self.sidecar, "sha256": self.sha256,
                "files": self.files, "bytes": self.bytes,
                "members_checked_by": self.members_checked_by}


class _ReadFailed(Exception):
    """The tarball's own bytes could not be read (an I/O error): not a verdict on them."""


class _NotTar(Exception):
    """A place where tarfile would stop quietly, or GNU tar read something else: refused.
    Not a BundlerError, so nothing between the tar reader and ``open_bundle`` mistakes it
    for a verdict with a member name."""

    def __init__(self, offset: int, problem: str, truncated: bool = False) -> None:
        super().__init__(problem)
        self.offset, self.problem, self.truncated = offset, problem, truncated


class HashingReader(io.RawIOBase):
    def __init__(self, raw: IO[bytes], advance: Callable[[int], None] = lambda n: None) -> None:
        self.raw, self.hash, self.count, self.advance = raw, BackgroundSha256(), 0, advance

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            n = self.raw.readinto(b)  # type: ignore[attr-defined]
        except OSError as exc:
            raise _ReadFailed(exc.strerror or str(exc)) from None
        if n:
            self.hash.update(memoryview(b)[:n])  # copied: the buffer is reused
            self.count += n
            self.advance(n)
        return n or 0

    def drain(self) -> None:
        """Hash whatever the decompressor left unread: the digest covers the whole file."""
        buf = bytearray(BUFSIZE)
        while self.readinto(buf):
            pass


class _StrictInfo(tarfile.TarInfo):
    """tarfile's header reader, made to refuse what it would pass over or read otherwise
    than GNU tar (see the module's docstring). tarfile calls these hooks for every header,
    the extended ones that come before a member included."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        obj = super().frombuf(buf, encoding, errors)
        # tarfile prepends the ustar prefix field (bytes 345-500) whatever the magic; GNU
        # tar reads it only under the POSIX one (the old GNU format keeps times there).
        obj._foreign_prefix = (buf[345:346] not in (b"", b"\0")  # type: ignore[attr-defined]
                               and buf[257:265] != _POSIX_MAGIC
                               and obj.type not in tarfile.GNU_TYPES)
        return obj

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:  # type: ignore[attr-defined]
            raise  # a zero block, the end-of-archive marker: read_to_end checks what follows
        except (tarfile.EmptyHeaderError,  # type: ignore[attr-defined]
                tarfile.TruncatedHeaderError):  # type: ignore[attr-defined]
            if tarfile_.offset == 0:
                raise _NotTar(0, "not a tar archive: too short for a tar header") from None
            raise _NotTar(tarfile_.offset, "the tarball ends where a tar header should be",
                          truncated=True) from None
        except (tarfile.HeaderError, ValueError) as exc:
            # ValueError: tarfile parses extended headers' numbers (sparse maps) with int()
            raise _NotTar(tarfile_.offset, "an unreadable tar header "
                          f"({' '.join(str(exc).split()) or type(exc).__name__}), which tar -x "
                          "would skip to unpack what follows") from None

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if getattr(self, "_foreign_prefix", False):
            raise _NotTar(self.offset, "a ustar name prefix under a non-POSIX magic: GNU tar "
                          "ignores it, Python's tarfile does not")
        if self.type == tarfile.XGLTYPE:
            raise _NotTar(self.offset, "a global PAX header: tar readers apply it "
                          "differently, and a bundle has none")
        if self.type not in _EXTENDED:
            return super()._proc_member(tarfile_)  # type: ignore[misc]
        # An extended header (long name, PAX) is read with the header it describes: a second
        # one before that header means tar readers disagree about which name wins.
        if getattr(tarfile_, "_bundler_extended", False):
            raise _NotTar(self.offset, "several extended headers for one member: tar "
                          "readers disagree about which one names it")
        tarfile_._bundler_extended = True  # type: ignore[attr-defined]
        try:
            return super()._proc_member(tarfile_)  # type: ignore[misc]
        finally:
            tarfile_._bundler_extended = False  # type: ignore[attr-defined]


@dataclass
class BundleStream:
    """A bundle opened for one pass: its members in order, and the outer bytes read so far
    (``reader.count``, ``reader.hash``)."""

    name: str
    kind: str  # compression: "none", "gzip" or "zstd"
    reader: HashingReader
    tar: tarfile.TarFile

    def members(self) -> Iterator[tarfile.TarInfo]:
        """Each member, after ``check_member``: no name reaches other code unchecked."""
        for member in self.tar:
            check_member(member)
            yield member

    def read_to_end(self) -> None:
        """After the last member: only zero bytes may follow the end-of-archive marker, to
        the end of the stream; then the rest of the file is hashed. A tail, not a 2nd pass."""
        stream = self.tar.fileobj  # tarfile's reader: it holds what it read ahead
        assert stream is not None
        pos = self.tar.offset + tarfile.BLOCKSIZE  # past the zero block that ended the loop
        while chunk := stream.read(BUFSIZE):
            rest = chunk.lstrip(b"\0")
            if rest:
                raise _NotTar(pos + len(chunk) - len(rest), "data after the end-of-archive "
                              "marker: a bundle ends with zero blocks only")
            pos += len(chunk)
        self.reader.drain()


def detect_compression(f: IO[bytes]) -> str:
    head = f.read(4)
    f.seek(0)
    for magic, name in MAGIC.items():
        if head.startswith(magic):
            return name
    return "none"


def _corrupt_stream_errors(kind: str) -> tuple[type[BaseException], ...]:
    """What a damaged compressed stream raises (never a bug of ours)."""
    if kind == "gzip":
        return zlib.error, gzip.BadGzipFile
    if kind == "zstd":
        import zstandard

        return (zstandard.ZstdError,)
    return ()


@contextmanager
def open_bundle(tarball: Path, advance: Callable[[int], None] = lambda n: None,
                expected_sha256: str | None = None,
                bufsize: int = BUFSIZE) -> Iterator[BundleStream]:
    """The one way a bundle is read (verify's integrity check and inspect): the file,
    decompressed by its magic, as a tar stream whose headers are read strictly.

    Every failure of the data (an unreadable header, a corrupt or truncated stream, bytes
    after the end) becomes one IntegrityError naming the tarball; with ``expected_sha256``
    (the sidecar's), a file whose digest differs is reported as such, the likelier truth.
    Anything else raised inside is left alone: a bug must not read as a corrupt bundle.
    ``bufsize``: the read-ahead (small for a reader that stops early, like inspect).
    """
    try:
        raw = open_raw(tarball)  # the file, or one stream across its parts
        kind = detect_compression(raw)
    except OSError as exc:
        raise IntegrityError(tarball.name, f"cannot read: {exc.strerror or exc}") from None
    with raw:
        reader = HashingReader(raw, advance)
        stream: Any = io.BufferedReader(reader, bufsize)
        if kind == "gzip":
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        elif kind == "zstd":
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
        # ReadError, not TarError: StreamError (a backward seek) would be a bug of ours.
        refused: tuple[type[BaseException], ...] = (
            _NotTar, tarfile.ReadError, EOFError, *_corrupt_stream_errors(kind))
        try:
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictInfo) as tar:
                yield BundleStream(tarball.name, kind, reader, tar)
        except _ReadFailed as exc:
            raise IntegrityError(tarball.name, f"cannot read: {exc}") from None
        except refused as exc:
            error = _refusal(tarball.name, kind, reader, exc, expected_sha256)
            if error.problem.startswith("sha256 does not match"):
                name_bad_part(tarball)  # a split bundle: which part is damaged or misplaced
            raise error from None
        finally:
            reader.hash.close()  # stops the hashing thread on every path


def _refusal(name: str, kind: str, reader: HashingReader, exc: BaseException,
             expected_sha256: str | None) -> IntegrityError:
    problem = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, _NotTar):
        problem = f"byte {exc.offset} of the tar stream: {exc.problem}"
    if expected_sha256 is not None:
        try:
            reader.drain()
        except _ReadFailed:
            pass
        if reader.hash.hexdigest() != expected_sha256:
            return IntegrityError(name, "sha256 does not match the sidecar "
                                  f"{name}{SIDECAR_SUFFIX} ({_TAMPERED}): {problem}")
    if (isinstance(exc, EOFError) or getattr(exc, "truncated", False)
            or "end of data" in problem):
        return IntegrityError(name, "truncated: the tarball ends early (an incomplete copy "
                              "or download; copy it again)")
    if isinstance(exc, _NotTar):
        return IntegrityError(name, f"{problem}; refused ({_TAMPERED})")
    if isinstance(exc, tarfile.ReadError):
        return IntegrityError(name, f"not a readable bundle tarball ({kind}): {problem}")
    return IntegrityError(name, f"corrupt {kind} stream: {problem}")


def check_and_extract(tarball: Path, work: Path, limits: Limits = Limits(),
                      hash_members: bool = False, sidecar: Sidecar | None = None) -> Integrity:
    """Stream ``tarball`` once into ``work``; raise IntegrityError on the first problem.

    The archive's digest is computed on a second core while members are unpacked. With a
    sidecar, that one digest covers every byte of every member, so members are checked
    against SHA256SUMS through it; without a sidecar (or with ``hash_members``) each
    member is hashed as well and compared with its SHA256SUMS line. ``sidecar``: the one
    already read (and its signature checked over its bytes); else it is read here.
    """
    if sidecar is None:
        expected_outer = read_sidecar(whole(tarball))  # a part's or the list: the bundle's
    else:
        expected_outer = sidecar.sha256
    each = hash_members or expected_outer is None
    try:
        size = total_size(tarball)  # of the parts together, for a split bundle
    except OSError as exc:
        raise IntegrityError(tarball.name, f"cannot open: {exc.strerror}") from None
    with task(f"integrity: {tarball.name}", size) as advance, \
            open_bundle(tarball, advance, expected_outer) as bundle:
        hashes, top, total = _extract(bundle, work, limits, each)
        bundle.read_to_end()
        outer = bundle.reader.hash.hexdigest()
    if expected_outer is not None and outer != expected_outer:
        name_bad_part(tarball)  # a split bundle: which part is damaged or out of place
        raise IntegrityError(tarball.name, f"sha256 {outer} does not match the sidecar "
                             f"{tarball.name}{SIDECAR_SUFFIX} ({expected_outer}): "
                             "damaged or tampered")
    root = work / top
    manifest = _check_lists(root, hashes)
    return Integrity(root, top, "match" if expected_outer else "absent", outer,
                     len(hashes), total, manifest,
                     "sha256 of each member" if each else "the sidecar's digest of the tarball")


def _extract(bundle: BundleStream, work: Path, limits: Limits,
             each: bool) -> tuple[dict[str, str | None], str, int]:
    hashes: dict[str, str | None] = {}
    dirs: set[str] = set()
    top: str | None = None
    total = 0
    count = 0
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(work, exc) from None
    tar = bundle.tar
    for member in bundle.members():
        count += 1
        name = member.name
        if count > limits.max_members:
            raise IntegrityError(name, f"more than {limits.max_members} members "
                                 "(limit; raise it with --max-members)")
        _data_filter(member, work)
        parts = PurePosixPath(name).parts
        if top is None:
            top = parts[0]
        elif parts[0] != top:
            raise IntegrityError(name, f"outside the bundle's single top folder '{top}'")
        rel = "/".join(parts[1:])
        if member.isdir():
            if rel in hashes:
                raise IntegrityError(name, "is both a file and a folder")
            dirs.add(rel)
            _mkdir(work, work / name)
            continue
        if not rel:
            raise IntegrityError(name, "a file where the top folder should be")
        if rel in hashes or rel in dirs:
            raise IntegrityError(name, "appears twice in the tarball")
        if member.size > limits.max_member_bytes:
            raise IntegrityError(name, f"{member.size} bytes is over the per-file limit "
                                 f"of {limits.max_member_bytes}")
        total += member.size
        if total > limits.max_bytes:
            raise IntegrityError(name, f"the bundle unpacks to more than "
                                 f"{limits.max_bytes} bytes (limit; raise it with "
                                 "--max-bytes)")
        src = tar.extractfile(member)
        assert src is not None
        dest = work / name
        _mkdir(work, dest.parent)
        h = hashlib.sha256() if each else None
        got = 0
        try:
            out = open(dest, "xb")
        except OSError as exc:
            raise _cannot_write(work, exc) from None
        with out:
            while chunk := src.read(BUFSIZE):
                if h is not None:
                    h.update(chunk)
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise _cannot_write(work, exc) from None
                got += len(chunk)
        if got != member.size:
            raise IntegrityError(name, f"truncated: {got} of {member.size} bytes")
        os.chmod(dest, 0o755 if rel in layout.EXECUTABLES else 0o644)
        hashes[rel] = h.hexdigest() if h is not None else None
    if top is None:
        raise IntegrityError("(tarball)", "empty: no members")
    return hashes, top, total


def _mkdir(work: Path, path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(work, exc) from None


def _cannot_write(work: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot unpack into {work.parent}: {exc.strerror or exc}; free space "
                       "there or set TMPDIR to a larger disk (nothing was installed)")


def _data_filter(member: tarfile.TarInfo, work: Path) -> None:
    """The second line after ``check_member``: PEP 706's ``data`` filter where the standard
    library has it (CPython 3.11.4+, 3.12+), else the same destination check done here.

    Debian 12 ships CPython 3.11.2, whose tarfile has neither ``data_filter`` nor
    ``FilterError``: a good bundle must not be called corrupt there. The filter's other
    refusals (links, devices, absolute and '..' paths) are ``check_member``'s already, and
    modes are set by ``_extract`` itself, so what is left to check is where the member lands.
    """
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is not None:
        try:
            data_filter(member, str(work))
        except tarfile.FilterError as exc:
            raise IntegrityError(member.name, f"unsafe member: {exc}") from None
        return
    root = os.path.realpath(work)
    dest = os.path.realpath(os.path.join(root, member.name))
    if os.path.commonpath([root, dest]) != root:
        raise IntegrityError(member.name, "unsafe member: it would be written outside the "
                             "destination folder")


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse a member no bundle holds, before its name is used for anything: a name that
    is not sane (UTF-8, no control characters, within NAME_MAX, PATH_MAX and MAX_DEPTH),
    anything but a regular file or a folder, a sparse file, an absolute or '..' path."""
    name = member.name
    _check_name(name)
    if member.issparse() or any(k.startswith("GNU.sparse.") for k in member.pax_headers):
        raise IntegrityError(name, "is a sparse file: tar readers expand it differently, "
                             "and a bundle holds none")
    if not (member.isreg() or member.isdir()):
        kind = ("symlink" if member.issym() else "hardlink" if member.islnk()
                else "fifo" if member.isfifo() else "device" if member.isdev()
                else f"tar entry of type {member.type!r}")
        raise IntegrityError(name, f"is a {kind}: a bundle holds only regular files and "
                             "folders")
    if name.startswith("/") or "\\" in name:
        raise IntegrityError(name, "absolute or non-posix path")
    if member.size < 0:
        raise IntegrityError(name, f"a negative size ({member.size})")
    if member.isreg() and name.endswith("/"):
        raise IntegrityError(name, "a file whose name ends with '/'")
    if any(p in ("", ".", "..") for p in name.rstrip("/").split("/")):
        raise IntegrityError(name, "path has an empty, '.' or '..' component")


def _check_name(name: str) -> None:
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise IntegrityError(name, "name is not UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise IntegrityError(name, f"name is {size} bytes long, over the limit of "
                             f"{MAX_NAME_BYTES}")
    if not name.isprintable():  # control characters, and invisible ones (U+202E, U+2028)
        raise IntegrityError(name, "name holds a control or invisible character")
    parts = name.rstrip("/").split("/")
    if len(parts) > MAX_DEPTH:
        raise IntegrityError(name, f"path is {len(parts)} folders deep, over the limit of "
                             f"{MAX_DEPTH}")
    longest = max(len(p.encode("utf-8")) for p in parts)
    if longest > MAX_COMPONENT_BYTES:
        raise IntegrityError(name, f"a path component is {longest} bytes long, over the "
                             f"limit of {MAX_COMPONENT_BYTES}")


def _check_lists(root: Path, hashes: dict[str, str | None]) -> dict[str, Any]:
    """SHA256SUMS both ways, then manifest.json against SHA256SUMS."""
    if layout.CHECKSUMS not in hashes:
        raise IntegrityError(layout.CHECKSUMS, "missing: not a pyannote-bundle tarball, or "
                             "an incomplete one")
    try:
        listed = parse_checksums((root / layout.CHECKSUMS).read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(layout.CHECKSUMS, f"malformed: {exc}") from None
    for path, sha in sorted(listed.items()):
        if path not in hashes:
            raise IntegrityError(path, "listed in SHA256SUMS but missing from the tarball")
        if hashes[path] is not None and hashes[path] != sha:
            raise IntegrityError(path, f"sha256 {hashes[path]} does not match SHA256SUMS "
                                 f"({sha}): damaged or tampered")
    for path in sorted(hashes):
        if path != layout.CHECKSUMS and path not in listed:
            raise IntegrityError(path, "present in the tarball but not listed in SHA256SUMS")
    if layout.MANIFEST not in listed:
        raise IntegrityError(layout.MANIFEST, "missing from SHA256SUMS")
    try:
        manifest = json.loads((root / layout.MANIFEST).read_bytes())
    except ValueError:  # UnicodeDecodeError included
        raise IntegrityError(layout.MANIFEST, "not a pyannote-bundle manifest") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise IntegrityError(layout.MANIFEST, "not a pyannote-bundle manifest")
    for path, entry in sorted(files.items()):
        if listed.get(path) != (entry.get("sha256") if isinstance(entry, dict) else None):
            raise IntegrityError(path, "manifest.json and SHA256SUMS disagree about it")
    for path in listed:
        if path not in files and path != layout.MANIFEST:
            raise IntegrityError(path, "listed in SHA256SUMS but not in manifest.json")
    return dict(manifest)
