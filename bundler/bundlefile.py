"""The bundle on disk: one tarball or its volumes, with its sidecar and signature beside it.

Every verb that reads or writes a bundle file goes through here (pack, split, verify,
inspect, rebuild, delta); nothing here knows what is inside the tarball (that is
``layout``'s and ``integrity``'s).

Beside a tarball ``BUNDLE``: ``BUNDLE.sha256`` (the sidecar: the digest of every byte, one
line in ``sha256sum -c`` form) and, when signed, ``BUNDLE.sha256.sig`` (``ssh-keygen -Y``
over the sidecar, bundler.signing). ``publishing`` is the one way such files are written:
under temporary names beside the final ones, renamed only when all are written, and none
left under a final name on failure.

Volumes for removable media: ``split`` writes ``BUNDLE.part-000``, ``-001``, ... (each at
most the size asked), the parts' checksums in ``sha256sum -c`` form
(``BUNDLE.parts.sha256``) and the bundle's own sidecar beside them, so
``cat BUNDLE.part-* > BUNDLE && sha256sum -c BUNDLE.sha256`` works with coreutils alone.

``open_raw`` gives integrity's reader one stream over the parts, without joining them on
disk. A missing part is named before any reading. With the bundle's sidecar beside the
parts, its digest covers every byte, so the parts are not hashed again on the way; only
when the check fails (the digest differs, or a swapped part is garbage to tar) are they
hashed, to name the one at fault. Without it, each part is hashed as it is read (on another
core) and checked against its line when it ends.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bundler.checksums import checksum_line
from bundler.errors import BundlerError, InputError, IntegrityError, OutputError
from bundler.hashing import BackgroundSha256
from bundler.progress import task
from bundler.runtime import apply as _apply

# --- beside the tarball ------------------------------------------------------------------
SIDECAR_SUFFIX = ".sha256"
SIGNATURE_SUFFIX = ".sig"  # beside the sidecar: <tarball>.sha256.sig
PART_INFIX = ".part-"  # BUNDLE.part-000, -001, ...: `cat BUNDLE.part-* > BUNDLE` joins them
PARTS_LIST_SUFFIX = ".parts.sha256"  # the parts' sha256, in `sha256sum -c` form


def sidecar_path(tarball: Path) -> Path:
    """``<tarball>.sha256``: the digest of every byte of the tarball, beside it."""
    return tarball.with_name(tarball.name + SIDECAR_SUFFIX)


def signature_path(sidecar: Path) -> Path:
    """``<tarball>.sha256.sig``: the signature over the sidecar, beside it."""
    return sidecar.with_name(sidecar.name + SIGNATURE_SUFFIX)


@dataclass(frozen=True)
class Sidecar:
    """A sidecar read once: its bytes (what a signature covers) and the digest they give."""

    path: Path
    raw: bytes
    sha256: str


def load_sidecar(tarball: Path) -> Sidecar | None:
    """``<tarball>.sha256``, read once and parsed by apply.py's reader (the one a delta
    ships), or None when there is none. It must name ``tarball`` itself: a sidecar, and the
    signature over it, vouch for one file name."""
    sidecar = sidecar_path(tarball)
    try:
        raw = _apply.read_sidecar(tarball)
    except OSError as exc:
        raise IntegrityError(sidecar.name, f"cannot read the sidecar: {exc}") from None
    if raw is None:
        return None
    try:
        return Sidecar(sidecar, raw, _apply.sidecar_digest(raw, tarball.name))
    except ValueError as exc:
        raise IntegrityError(sidecar.name, str(exc)) from None


def read_sidecar(tarball: Path) -> str | None:
    """The expected sha256 from ``<tarball>.sha256``, or None when there is none."""
    found = load_sidecar(tarball)
    return None if found is None else found.sha256


# --- writing: nothing under a final name until everything is written -----------------------
@dataclass
class Publication:
    """Files being written under temporary names beside their final ones (``publishing``)."""

    written: list[tuple[Path, Path]] = field(default_factory=list)  # (temporary, final)
    published: list[Path] = field(default_factory=list)  # finals renamed so far

    def temporary(self, final: Path) -> Path:
        """The name to write ``final``'s bytes under, removed if anything fails."""
        tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
        self.written.append((tmp, final))
        return tmp

    def write_text(self, final: Path, text: str) -> None:
        self.temporary(final).write_text(text)

    def sidecar(self, tarball: Path, sha256: str) -> Path:
        """Write the sidecar of the tarball that will be published as ``tarball``."""
        final = sidecar_path(tarball)
        self.write_text(final, checksum_line(sha256, tarball.name))
        return final

    def _commit(self) -> None:
        for tmp, final in self.written:
            os.replace(tmp, final)
            self.published.append(final)

    def _discard(self) -> None:
        # A rename that failed half-way (the sidecar's name taken by a folder) must not
        # leave a tarball without its sidecar under the final names either.
        for path in [*(tmp for tmp, _ in self.written), *self.published]:
            path.unlink(missing_ok=True)


@contextmanager
def publishing(output_dir: Path, what: str, names: str) -> Iterator[Publication]:
    """Write files beside their final names in ``output_dir``, then rename them all, in the
    order they were begun (a tarball before its sidecar). On any failure every temporary
    file is removed; an OSError becomes one OutputError line: ``cannot write <what>: ...;
    nothing was left under <names>``."""
    pub = Publication()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        yield pub
        pub._commit()
    except OSError as exc:
        pub._discard()
        raise OutputError(f"cannot write {what}: {exc.strerror or exc}; nothing was left "
                          f"under {names}") from None
    except BaseException:
        pub._discard()
        raise


# --- volumes -------------------------------------------------------------------------------
BUFSIZE = 1 << 20
MAX_PARTS = 1000  # three digits: the names sort as they must be joined
_PART = re.compile(r"^(?P<bundle>.+)" + re.escape(PART_INFIX) + r"(?P<n>\d{3})$")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4,
          "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}


def parse_size(text: str) -> int:
    """``4G``, ``650M``, ``1G``, ``4095M``, ``4GB`` -> bytes (K, M, G are powers of 1024 and
    KB, MB, GB powers of 1000, as in split(1))."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?B?)\s*", text.upper())
    if m is None or m.group(2) == "B" or int(m.group(1)) == 0:
        raise InputError(f"size '{text}': give a number of bytes with K, M, G (powers of 1024) "
                         "or KB, MB, GB (powers of 1000), e.g. 650M or 4095M")
    return int(m.group(1)) * _UNITS[m.group(2)]


def part_name(bundle_name: str, n: int) -> str:
    return f"{bundle_name}{PART_INFIX}{n:03d}"


def whole(path: Path) -> Path:
    """The joined bundle's path for a part or the parts' list; ``path`` itself otherwise."""
    if path.name.endswith(PARTS_LIST_SUFFIX):
        return path.with_name(path.name[:-len(PARTS_LIST_SUFFIX)])
    m = _PART.match(path.name)
    return path.with_name(m.group("bundle")) if m else path


def is_parts(path: Path) -> bool:
    return whole(path) != path


@dataclass(frozen=True)
class Split:
    parts: list[Path]
    listing: Path
    sidecar: Path
    sha256: str


def split(bundle: Path, size: int, output_dir: Path) -> Split:
    """Write the parts, their list and the bundle's sidecar; nothing under their names on
    failure. A bundle whose sidecar is beside it must match it: a damaged bundle is not cut
    into damaged parts."""
    total = bundle.stat().st_size
    count = max(1, -(-total // size))
    if count > MAX_PARTS:
        raise InputError(f"--size {size} would cut {bundle.name} into {count} parts; at most "
                         f"{MAX_PARTS}: give a larger size")
    published = read_sidecar(bundle)
    finals = [output_dir / part_name(bundle.name, i) for i in range(count)]
    listing = output_dir / (bundle.name + PARTS_LIST_SUFFIX)
    whole_hash = BackgroundSha256()
    try:
        with publishing(output_dir, f"the parts in {output_dir}", "their names") as pub:
            lines = []
            with open(bundle, "rb") as src, task(f"split: {bundle.name}", total) as advance:
                for final in finals:
                    part_hash = BackgroundSha256()
                    left = size
                    with open(pub.temporary(final), "xb") as out:
                        while left and (chunk := src.read(min(BUFSIZE, left))):
                            out.write(chunk)
                            part_hash.update(chunk)
                            whole_hash.update(chunk)
                            left -= len(chunk)
                            advance(len(chunk))
                        out.flush()
                        os.fsync(out.fileno())
                    lines.append(checksum_line(part_hash.hexdigest(), final.name))
            digest = whole_hash.hexdigest()
            if published is not None and digest != published:
                raise IntegrityError(bundle.name, f"sha256 {digest} does not match its sidecar "
                                     f"({published}): damaged; nothing was split")
            pub.write_text(listing, "".join(lines))
            sidecar = pub.sidecar(output_dir / bundle.name, digest)
            signature = signature_path(sidecar_path(bundle))
            if signature.is_file() and published is not None:
                shutil.copyfile(signature, pub.temporary(signature_path(sidecar)))
    finally:
        whole_hash.close()
    return Split(finals, listing, sidecar, digest)


def _read_listing(listing: Path, bundle_name: str) -> list[tuple[str, str]]:
    """(sha256, part name) in order, as ``split`` wrote them."""
    try:
        text = listing.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise IntegrityError(listing.name, f"cannot read: {exc}") from None
    out = []
    for n, line in enumerate(text.splitlines()):
        sha, sep, name = line.partition("  ")
        if not sep or len(sha) != 64 or name.lstrip("*") != part_name(bundle_name, n):
            raise IntegrityError(listing.name, f"line {n + 1} is not '<sha256>  "
                                 f"{part_name(bundle_name, n)}'")
        out.append((sha, name.lstrip("*")))
    if not out:
        raise IntegrityError(listing.name, "lists no part")
    return out


def find_parts(path: Path) -> list[tuple[Path, str | None]]:
    """The parts in order, each with its sha256 from the list (None without a list)."""
    bundle = whole(path)
    listing = bundle.with_name(bundle.name + PARTS_LIST_SUFFIX)
    if listing.is_file():
        parts: list[tuple[Path, str | None]] = [(bundle.with_name(name), sha) for sha, name in
                 _read_listing(listing, bundle.name)]
        for p, _ in parts:
            if not p.is_file():
                raise IntegrityError(p.name, f"missing: {listing.name} lists it; copy every "
                                     "part into one folder")
        return parts
    found = sorted(p for p in bundle.parent.glob(bundle.name + PART_INFIX + "*")
                   if _PART.match(p.name))
    for i, p in enumerate(found):
        if p.name != part_name(bundle.name, i):
            raise IntegrityError(part_name(bundle.name, i), "missing: the parts found go on "
                                 f"with {p.name}; copy every part into one folder")
    if not found:
        raise IntegrityError(path.name, f"no {part_name(bundle.name, 0)} beside it")
    return [(p, None) for p in found]


class PartsReader(io.RawIOBase):
    """One read-only stream over the parts, each checked against its sha256 when it ends."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.bundle = whole(path)
        self.parts = find_parts(path)
        # The sidecar's digest covers every byte: hash the parts only to name a bad one.
        self.hash_parts = not sidecar_path(self.bundle).is_file()
        self.size = sum(p.stat().st_size for p, _ in self.parts)
        self._index = 0
        self._file: IO[bytes] | None = None
        self._hash: BackgroundSha256 | None = None
        self._checked: set[int] = set()
        self._open(0)

    @property
    def listing(self) -> str:
        return self.bundle.name + PARTS_LIST_SUFFIX

    def _open(self, i: int) -> None:
        self._index = i
        path = self.parts[i][0]
        try:
            self._file = open(path, "rb")
        except OSError as exc:
            raise IntegrityError(path.name, f"cannot open: {exc.strerror}") from None
        self._hash = BackgroundSha256() if self.hash_parts else None

    def _end_part(self) -> None:
        """The current part is read whole: check it, move to the next."""
        assert self._file is not None
        self._file.close()
        self._file = None
        if self._hash is not None:
            digest, (path, want) = self._hash.hexdigest(), self.parts[self._index]
            self._hash = None
            if want is not None and digest != want:
                raise IntegrityError(path.name, f"sha256 {digest} does not match "
                                     f"{self.listing} ({want}): damaged, or parts swapped; "
                                     "copy it again")
            self._checked.add(self._index)
        if self._index + 1 < len(self.parts):
            self._open(self._index + 1)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._file is not None:
            n = self._file.readinto(b)  # type: ignore[attr-defined]
            if n:
                if self._hash is not None:
                    self._hash.update(memoryview(b)[:n])
                return int(n)
            self._end_part()
        return 0

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        """Back to the start only (to sniff the compression); reading restarts there."""
        if (pos, whence) != (0, 0):
            raise io.UnsupportedOperation("parts are read from the start only")
        self._drop()
        self._checked.clear()
        self._open(0)
        return 0

    def _drop(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._hash is not None:
            self._hash.close()
        self._file = self._hash = None

    def close(self) -> None:
        self._drop()
        super().close()

    def diagnose(self) -> IntegrityError | None:
        """Hash the parts not yet checked; the first that does not match its line."""
        for i, (path, want) in enumerate(self.parts):
            if i in self._checked or want is None:
                continue
            h = BackgroundSha256()
            with open(path, "rb") as f:
                while chunk := f.read(BUFSIZE):
                    h.update(chunk)
            if h.hexdigest() != want:
                return IntegrityError(path.name, f"sha256 {h.hexdigest()} does not match "
                                      f"{self.listing} ({want}): damaged, or parts swapped; "
                                      "copy it again")
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
        if isinstance(exc, BundlerError) and not (isinstance(exc, IntegrityError) and
                                                  exc.member.startswith(self.bundle.name +
                                                                        PART_INFIX)):
            found = self.diagnose()
            if found is not None:
                raise found from None


def name_bad_part(path: Path) -> None:
    """For a split bundle whose digest did not match: raise naming the first part that does
    not match its line in the parts' list (nothing for a whole tarball)."""
    if is_parts(path):
        reader = PartsReader(path)
        reader.close()
        found = reader.diagnose()
        if found is not None:
            raise found


def open_raw(path: Path) -> IO[bytes]:
    """The bundle's bytes: the file itself, or one stream across its parts (integrity's
    ``open_bundle`` reads a bundle through this)."""
    if is_parts(path):
        return PartsReader(path)  # type: ignore[return-value]
    return open(path, "rb")


def total_size(path: Path) -> int:
    """The joined bundle's size, from its parts when ``path`` names one."""
    if is_parts(path):
        return sum(p.stat().st_size for p, _ in find_parts(path))
    return path.stat().st_size
