"""Offline stage: prove a tarball is the bundle its checksums describe, and unpack it safely.

One streaming pass over the file: the outer bytes are hashed for the sidecar while each
member is checked (PEP 706's ``data`` filter, plus: regular files and folders only, one
top-level folder, no duplicates, size and count limits) and written, hashed, into the work
folder. Then SHA256SUMS is checked in both directions and manifest.json against it. On
any failure the caller removes the work folder: nothing is installed from a bad bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from bundler import layout
from bundler.errors import IntegrityError, OutputError
from bundler.hashing import BackgroundSha256
from bundler.progress import task
from bundler.render import parse_checksums

BUFSIZE = 1 << 20
MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}


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


class HashingReader(io.RawIOBase):
    def __init__(self, raw: IO[bytes], advance: Callable[[int], None] = lambda n: None) -> None:
        self.raw, self.hash, self.count, self.advance = raw, BackgroundSha256(), 0, advance

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.raw.readinto(b)  # type: ignore[attr-defined]
        if n:
            self.hash.update(memoryview(b)[:n])  # copied: the buffer is reused
            self.count += n
            self.advance(n)
        return n or 0

    def drain(self) -> None:
        """Hash whatever follows the tar's end blocks: the digest covers the whole file."""
        buf = bytearray(BUFSIZE)
        while self.readinto(buf):
            pass


def read_sidecar(tarball: Path) -> str | None:
    """The expected sha256 from ``<tarball>.sha256``, or None when there is none."""
    sidecar = tarball.with_name(tarball.name + layout.SIDECAR_SUFFIX)
    try:
        text = sidecar.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IntegrityError(sidecar.name, f"cannot read the sidecar: {exc}") from None
    sha, _, name = text.strip().partition("  ")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise IntegrityError(sidecar.name, "is not '<sha256>  <file name>'")
    if name.lstrip("*") != tarball.name:
        raise IntegrityError(sidecar.name, f"names '{name}', not {tarball.name}")
    return sha


def detect_compression(f: IO[bytes]) -> str:
    head = f.read(4)
    f.seek(0)
    for magic, name in MAGIC.items():
        if head.startswith(magic):
            return name
    return "none"


def check_and_extract(tarball: Path, work: Path, limits: Limits = Limits(),
                      hash_members: bool = False) -> Integrity:
    """Stream ``tarball`` once into ``work``; raise IntegrityError on the first problem.

    The archive's digest is computed on a second core while members are unpacked. With a
    sidecar, that one digest covers every byte of every member, so members are checked
    against SHA256SUMS through it; without a sidecar (or with ``hash_members``) each
    member is hashed as well and compared with its SHA256SUMS line.
    """
    from bundler.parts import bundle_size, name_bad_part, open_bundle, whole

    expected_outer = read_sidecar(whole(tarball))  # a part's or the parts' list: the bundle's
    each = hash_members or expected_outer is None
    try:
        raw = open_bundle(tarball)  # the file, or one stream across its parts
    except OSError as exc:
        raise IntegrityError(tarball.name, f"cannot open: {exc.strerror}") from None
    with raw, task(f"integrity: {tarball.name}", bundle_size(raw)) as advance:
        reader = HashingReader(raw, advance)
        try:
            hashes, top, total = _stream(tarball, raw, reader, work, limits, each,
                                         expected_outer)
        finally:
            outer = reader.hash.hexdigest()  # also stops the hashing thread on errors
    if expected_outer is not None and outer != expected_outer:
        name_bad_part(tarball)  # a split bundle: which part is damaged or out of place
        raise IntegrityError(tarball.name, f"sha256 {outer} does not match the sidecar "
                             f"{tarball.name}{layout.SIDECAR_SUFFIX} ({expected_outer}): "
                             "damaged or tampered")
    root = work / top
    manifest = _check_lists(root, hashes)
    return Integrity(root, top, "match" if expected_outer else "absent", outer,
                     len(hashes), total, manifest,
                     "sha256 of each member" if each else "the sidecar's digest of the tarball")


def _stream(tarball: Path, raw: IO[bytes], reader: HashingReader, work: Path, limits: Limits,
            each: bool, expected_outer: str | None
            ) -> tuple[dict[str, str | None], str, int]:
    kind = detect_compression(raw)
    stream: Any = io.BufferedReader(reader, BUFSIZE)
    if kind == "gzip":
        import gzip

        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    elif kind == "zstd":
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    try:
        hashes, top, total = _extract(stream, work, limits, each)
        # Read to the end so the digest covers every byte.
        while stream.read(BUFSIZE):
            pass
    except (IntegrityError, OutputError):
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        problem = " ".join(str(exc).split()) or type(exc).__name__
        if expected_outer is not None:
            reader.drain()
            if reader.hash.hexdigest() != expected_outer:
                raise IntegrityError(tarball.name, "sha256 does not match the sidecar "
                                     f"{tarball.name}{layout.SIDECAR_SUFFIX} (damaged or "
                                     f"tampered): {problem}") from None
        if isinstance(exc, EOFError) or "end of data" in problem:
            raise IntegrityError(tarball.name, "truncated: the tarball ends early (an "
                                 "incomplete copy or download; copy it again)") from None
        raise IntegrityError(tarball.name, f"not a readable bundle tarball ({kind}): "
                             f"{problem}") from None
    except Exception as exc:
        # A corrupt stream raises zlib.error (gzip) or zstandard's own ZstdError; anything
        # else is a bug of ours (exit 1, traceback with --debug), never "a corrupt bundle".
        if not isinstance(exc, zlib.error) and type(exc).__name__ != "ZstdError":
            raise
        raise IntegrityError(tarball.name, f"corrupt {kind} stream: {exc}") from None
    reader.drain()
    return hashes, top, total


def _extract(stream: IO[bytes], work: Path, limits: Limits,
             each: bool) -> tuple[dict[str, str | None], str, int]:
    hashes: dict[str, str | None] = {}
    dirs: set[str] = set()
    top: str | None = None
    total = 0
    count = 0
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            count += 1
            name = member.name
            if count > limits.max_members:
                raise IntegrityError(name, f"more than {limits.max_members} members "
                                     "(limit; raise it with --max-members)")
            _check_member(member)
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
                (work / name).mkdir(parents=True, exist_ok=True)
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
            dest.parent.mkdir(parents=True, exist_ok=True)
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


def _cannot_write(work: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot unpack into {work.parent}: {exc.strerror or exc}; free space "
                       "there or set TMPDIR to a larger disk (nothing was installed)")


def _data_filter(member: tarfile.TarInfo, work: Path) -> None:
    """The second line after ``_check_member``: PEP 706's ``data`` filter where the standard
    library has it (CPython 3.11.4+, 3.12+), else the same destination check done here.

    Debian 12 ships CPython 3.11.2, whose tarfile has neither ``data_filter`` nor
    ``FilterError``: a good bundle must not be called corrupt there. The filter's other
    refusals (links, devices, absolute and '..' paths) are ``_check_member``'s already, and
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


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    if not (member.isreg() or member.isdir()):
        kind = ("symlink" if member.issym() else "hardlink" if member.islnk()
                else "fifo" if member.isfifo() else "device" if member.isdev() else "special")
        raise IntegrityError(name, f"is a {kind}: a bundle holds only regular files and "
                             "folders")
    if name.startswith("/") or "\\" in name:
        raise IntegrityError(name, "absolute or non-posix path")
    if any(p in ("", ".", "..") for p in name.rstrip("/").split("/")):
        raise IntegrityError(name, "path has an empty, '.' or '..' component")


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
        manifest = json.loads((root / layout.MANIFEST).read_text())
        files = manifest["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, AssertionError, TypeError):
        raise IntegrityError(layout.MANIFEST, "not a pyannote-bundle manifest") from None
    for path, entry in sorted(files.items()):
        if listed.get(path) != (entry.get("sha256") if isinstance(entry, dict) else None):
            raise IntegrityError(path, "manifest.json and SHA256SUMS disagree about it")
    for path in listed:
        if path not in files and path != layout.MANIFEST:
            raise IntegrityError(path, "listed in SHA256SUMS but not in manifest.json")
    return dict(manifest)
