"""Rebuild a new bundle from the bundle you have and a delta, offline, byte for byte.

    tar -xf NEW.from-XXXXXXXXXXXX.delta.tar
    python3 NEW.from-XXXXXXXXXXXX.delta/apply.py --base OLD.tar --output DIR

``pyannote-bundle apply DELTA --base OLD.tar --output DIR`` runs this very file's code on
the delta tarball. Standard library only, Python 3.9 and newer. ``delta.json`` lists each
member of the new bundle in order: its tar bytes before the data, and where the data comes
from (an offset in the base, or ``payload/<sha256>`` in the delta). It is checked as data
before anything is written; the bytes go to a temporary name beside the output, hashed on a
second thread, renamed (with a ``.sha256`` sidecar) only when the result is the new bundle.
On any failure nothing is left in the output folder.

This file comes from the delta: authenticate the delta first (its signed sidecar, as
docs/installing.md shows), or let pyannote-bundle do it (``apply --allowed-signers``) with
its own copy of this code. SECURITY.md says what each check proves.

Exit codes (pyannote-bundle's): 0 rebuilt, 2 bad usage, 5 cannot write the output (disk
full, permissions), 10 damaged delta, or a base that is not the one the delta needs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import queue
import stat
import sys
import tarfile
import threading
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Union

FORMAT = "pyannote-bundle-delta/1"
DELTA_JSON = "delta.json"
CHECKSUMS = "SHA256SUMS"
PAYLOAD = "payload"
SIDECAR_SUFFIX = ".sha256"
BUFSIZE = 1 << 20
SIDECAR_MAX = 4096  # one line: 64 hex digits, two spaces, a file name

EXIT_USAGE, EXIT_OUTPUT, EXIT_INTEGRITY = 2, 5, 10


class ApplyError(Exception):
    """Why the new bundle could not be rebuilt; carries its exit code."""

    exit_code = EXIT_INTEGRITY


class DeltaDamaged(ApplyError):
    exit_code = EXIT_INTEGRITY


class WrongBase(ApplyError):
    exit_code = EXIT_INTEGRITY


class CannotWrite(ApplyError):
    exit_code = EXIT_OUTPUT


class UsageError(ApplyError):
    exit_code = EXIT_USAGE


class Delta:
    """A delta as a folder (unpacked with tar) or as its tarball, read the same way. A
    tarball is opened once and everything is read from that open file (``_index``); payload
    files are checked against the sha256 its lists give: a file swapped or rewritten after
    the hash can make nothing but a refusal."""

    def __init__(self, path: Path, expected_sha256: Optional[str] = None) -> None:
        self.path = path
        self._file: Optional[IO[bytes]] = None
        self._root: Optional[Path] = None
        self._members: Dict[str, tarfile.TarInfo] = {}
        self._lists: Dict[str, bytes] = {}
        if path.is_dir():
            self._root = path
            return
        try:
            self._file = open(path, "rb")
        except OSError as exc:
            raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            self._index(expected_sha256)
        except BaseException:
            self.close()
            raise

    def _index(self, expected_sha256: Optional[str]) -> None:
        """Hash the tarball, index it and keep its lists, all from the one open file."""
        assert self._file is not None
        if expected_sha256 is not None:
            # Authenticated before one header is parsed: a forged file is refused unread.
            first = _HashingReader(self._file)
            self._drain(first)
            self._check(first.hash.hexdigest(), expected_sha256)
            self._file.seek(0)
        # Parsing hashes again: the lists kept are what the sidecar vouches for, rewritten or not.
        reader = _HashingReader(self._file)
        problem = None
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for info in tar:
                    rel = info.name.partition("/")[2]
                    if not (info.isfile() and rel):
                        continue
                    self._members[rel] = info
                    if rel in (CHECKSUMS, DELTA_JSON):
                        f = tar.extractfile(info)
                        self._lists[rel] = f.read(16 * 1024 * 1024) if f else b""
        except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
            problem = exc  # said below, unless the digest says more: the file is not the one
        self._drain(reader)
        if expected_sha256 is not None:
            self._check(reader.hash.hexdigest(), expected_sha256)
        if problem is not None:
            raise DeltaDamaged(f"{self.path.name}: not a readable delta tarball ({problem}); "
                               "copy it again")

    def _drain(self, reader: "_HashingReader") -> None:
        try:
            reader.drain()
        except OSError as exc:
            raise UsageError(f"{self.path}: cannot read: {exc.strerror}") from None

    def _check(self, digest: str, expected_sha256: str) -> None:
        if digest != expected_sha256:
            raise DeltaDamaged(f"{self.path.name}: sha256 {digest} does not match its sidecar "
                               f"({expected_sha256}): damaged; copy it again")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def open(self, rel: str) -> "Union[IO[bytes], _Range]":
        """A member of the delta, streamed."""
        try:
            if self._root is not None:
                return open(self._root / rel, "rb")
            info = self._members[rel]
            if self._file is None:
                raise KeyError(rel)
            return _Range(self._file, info.offset_data, info.size)
        except (OSError, KeyError):
            raise DeltaDamaged(f"{self.path.name}: {rel} is missing; copy it again") from None

    def read_small(self, rel: str) -> bytes:
        if self._root is None:
            if rel not in self._lists:
                raise DeltaDamaged(f"{self.path.name}: {rel} is missing; copy it again")
            return self._lists[rel]
        with self.open(rel) as f:
            return f.read(16 * 1024 * 1024)

    def load(self) -> Dict[str, Any]:
        """delta.json, checked against the delta's SHA256SUMS."""
        sums: Dict[str, str] = {}
        try:
            for line in self.read_small(CHECKSUMS).decode().splitlines():
                sha, _, name = line.partition("  ")
                sums[name] = sha
            raw = self.read_small(DELTA_JSON)
        except (UnicodeDecodeError, tarfile.TarError, EOFError, OSError) as exc:
            raise DeltaDamaged(f"{self.path.name}: cannot read its lists ({exc}); copy the "
                               "delta again") from None
        if hashlib.sha256(raw).hexdigest() != sums.get(DELTA_JSON):
            raise DeltaDamaged(f"{self.path.name}: {DELTA_JSON} does not match its "
                               f"{CHECKSUMS}: damaged; copy the delta again")
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: hostile nesting
            raise DeltaDamaged(f"{self.path.name}: {DELTA_JSON} is not JSON "
                               f"({_shown(str(exc), 200)}): damaged; copy the delta "
                               "again") from None
        if not isinstance(meta, dict):
            raise DeltaDamaged(f"{self.path.name}: {DELTA_JSON} is {type(meta).__name__}, "
                               "not an object: damaged; copy the delta again")
        if meta.get("format") != FORMAT:
            raise DeltaDamaged(f"{self.path.name}: format {_shown(repr(meta.get('format')), 80)}"
                               f" is not {FORMAT}; use the pyannote-bundle that made it")
        try:
            check_meta(meta, self.payload_size)
        except _Malformed as exc:
            raise DeltaDamaged(f"{self.path.name}: {DELTA_JSON} is malformed ({exc}): "
                               "damaged or forged; copy the delta again") from None
        return meta

    def payload_size(self, sha256: str) -> Optional[int]:
        """The size of ``payload/<sha256>`` in the delta, None when it is not there."""
        rel = f"{PAYLOAD}/{sha256}"
        if self._root is not None:
            try:
                st = os.stat(self._root / rel)
            except OSError:
                return None
            return st.st_size if stat.S_ISREG(st.st_mode) else None
        info = self._members.get(rel)
        return info.size if info is not None else None


class _HashingReader:
    """A file as tarfile's stream reader sees it, every byte handed out hashed."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.hash = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        chunk = self._f.read(n)
        self.hash.update(chunk)
        return chunk

    def drain(self) -> None:
        """Hash what tarfile left unread (the end-of-archive blocks and beyond)."""
        while self.read(BUFSIZE):
            pass


class _Range:
    """A member's data, read from the delta's one open file by offset (never by name)."""

    def __init__(self, f: IO[bytes], start: int, size: int) -> None:
        self._f, self._pos, self._left = f, start, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        if n <= 0:
            return b""
        self._f.seek(self._pos)
        chunk = self._f.read(n)
        self._pos += len(chunk)
        self._left -= len(chunk)
        return chunk

    def __enter__(self) -> "_Range":
        return self

    def __exit__(self, *exc: object) -> None:
        self._left = 0


class _Malformed(Exception):
    """Where delta.json is not what make_delta writes (the message names the field)."""


def _shown(text: str, limit: int = 200) -> str:
    """Text from the delta as it may appear in a message: escaped, and cut short."""
    text = ascii(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


def _field(obj: Dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise _Malformed(f"{where}.{key} is missing")
    value = obj[key]
    # bool is an int to Python, never a size or an offset
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Malformed(f"{where}.{key} is {type(value).__name__}, not {kind.__name__}")
    return value


def _count(obj: Dict[str, Any], key: str, where: str) -> int:
    """A size or an offset: an int, not below 0."""
    value: int = _field(obj, key, int, where)
    if value < 0:
        raise _Malformed(f"{where}.{key} is {value}, below 0")
    return value


def _sha_field(obj: Dict[str, Any], where: str) -> str:
    sha = _field(obj, "sha256", str, where)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _Malformed(f"{where}.sha256 is not 64 lowercase hex digits")
    return sha


def _b64_size(obj: Dict[str, Any], key: str, where: str) -> int:
    try:
        return len(base64.b64decode(_field(obj, key, str, where), validate=True))
    except ValueError:  # binascii.Error
        raise _Malformed(f"{where}.{key} is not base64") from None


def _plain_name(name: str) -> bool:
    """A file name the output folder can hold and a sidecar line can name: no folder, no
    hidden or dot name, no NUL or other control character (a newline would forge a line
    of the sidecar that sha256sum -c reads)."""
    return bool(name) and "/" not in name and not name.startswith(".") and \
        all(" " <= c != "\x7f" for c in name)


def check_meta(meta: Dict[str, Any], payload_size: Callable[[str], Optional[int]]) -> None:
    """delta.json as data, before one byte is written: types and keys, base ranges inside
    the base, payloads present at their size, a plain target name, and sizes adding up to
    the target's (else a hostile list could write until the disk is full). _Malformed."""
    for side in ("base", "target"):
        if not isinstance(meta.get(side), dict):
            raise _Malformed(f"{side} is missing or not an object")
        _field(meta[side], "name", str, side)
        _sha_field(meta[side], side)
        _count(meta[side], "size", side)
    base_size, target_size = meta["base"]["size"], meta["target"]["size"]
    if not _plain_name(meta["target"]["name"]):
        raise _Malformed(f"target.name '{_shown(meta['target']['name'], 80)}' is not a "
                         "plain file name")
    members = meta.get("members")
    if not isinstance(members, list):
        raise _Malformed("members is missing or not a list")
    total = _b64_size(meta, "tail", "delta")
    for i, m in enumerate(members):
        where = f"members[{i}]"
        if not isinstance(m, dict):
            raise _Malformed(f"{where} is not an object")
        _field(m, "name", str, where)
        size = _count(m, "size", where)
        total += _b64_size(m, "lead", where) + size
        source = m.get("from")
        if source == "base":
            _sha_field(m, where)
            offset = _count(m, "offset", where)
            if offset + size > base_size:
                raise _Malformed(f"{where} takes bytes {offset}..{offset + size} of a base of "
                                 f"{base_size} bytes")
        elif source == "delta":
            sha = _sha_field(m, where)
            have = payload_size(sha)
            if have != size:
                raise _Malformed(f"{where} needs {PAYLOAD}/{sha[:12]}... of {size} bytes; the "
                                 "delta has " + ("none" if have is None else f"{have} bytes"))
        elif source is not None:
            raise _Malformed(f"{where}.from is {_shown(repr(source), 40)}, not base or delta")
        elif size:
            raise _Malformed(f"{where} has {size} bytes of data and no source")
        if total > target_size:  # stop early: a hostile list may be long
            break
    if total != target_size:
        raise _Malformed(f"its members make {'more than ' if total > target_size else ''}"
                         f"{total} bytes, not the target's {target_size}")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(BUFSIZE), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sidecar(path: Path) -> Optional[bytes]:
    """The bytes of ``<path>.sha256`` (None: none), read once: a signature is checked over
    these very bytes and the digest taken from them, never from a second read."""
    try:
        with open(path.with_name(path.name + SIDECAR_SUFFIX), "rb") as f:
            return f.read(SIDECAR_MAX + 1)
    except FileNotFoundError:
        return None


def sidecar_digest(raw: bytes, name: str) -> str:
    """The sha256 a sidecar's bytes give for the file ``name`` (ValueError: what is wrong).
    It must name that very file: a signature vouches for one name, not another delta's."""
    try:
        text = raw.decode() if len(raw) <= SIDECAR_MAX else ""
    except UnicodeDecodeError:
        text = ""
    sha, _, named = text.strip().partition("  ")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError("is not '<sha256>  <file name>'")
    if named.lstrip("*") != name:  # sha256sum marks a binary-mode line with '*'
        raise ValueError(f"names '{_shown(named)}', not {_shown(name)}: it is another "
                         "file's sidecar, and its signature vouches for that file only")
    return sha


def _published(path: Path) -> Optional[str]:
    """The digest in the base's sidecar, None when unusable (it only fails a base early)."""
    try:
        raw = read_sidecar(path)
        return None if raw is None else sidecar_digest(raw, path.name)
    except (OSError, ValueError):
        return None


def open_delta(path: Path) -> Delta:
    """The delta as ``apply.py`` is given it: a tarball checked against its sidecar, when
    beside it; a folder, member by member as it is read."""
    expected = None
    if not path.is_dir():
        sidecar = path.name + SIDECAR_SUFFIX
        try:
            raw = read_sidecar(path)
        except OSError as exc:
            raise DeltaDamaged(f"{sidecar}: cannot read: {exc.strerror}") from None
        if raw is not None:
            try:
                expected = sidecar_digest(raw, path.name)
            except ValueError as exc:
                raise DeltaDamaged(f"{_shown(sidecar)}: {exc}") from None
    return Delta(path, expected)


def apply_delta(delta_path: Path, base: Path, output_dir: Path,
                progress: Callable[[int], None] = lambda n: None) -> Dict[str, Any]:
    """``apply.py``'s run: ``open_delta``, then ``rebuild`` (ApplyError on failure)."""
    delta = open_delta(delta_path)
    try:
        return rebuild(delta, base, output_dir, progress)
    finally:
        delta.close()


def rebuild(delta: Delta, base: Path, output_dir: Path,
            progress: Callable[[int], None] = lambda n: None) -> Dict[str, Any]:
    """Write ``output_dir/<new bundle>`` and its sidecar from an opened delta; return what
    was made. ApplyError (with its exit code) leaves nothing in ``output_dir``."""
    meta = delta.load()
    want_base, target = meta["base"], meta["target"]
    need = f"the delta needs {_shown(want_base['name'])} with sha256 {want_base['sha256']}"
    try:
        base_size = base.stat().st_size
    except OSError as exc:
        raise UsageError(f"--base {base}: {exc.strerror}") from None
    if base_size != want_base["size"]:
        raise WrongBase(f"--base {base.name} is {base_size} bytes, not {want_base['size']}: "
                        f"{need}")
    published = _published(base)
    if published is not None and published != want_base["sha256"]:
        raise WrongBase(f"--base {base.name}: its sidecar says sha256 {published}: {need}")

    final = output_dir / target["name"]
    sidecar = final.with_name(final.name + SIDECAR_SUFFIX)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    tmp_sidecar = sidecar.with_name(f".{sidecar.name}.partial-{os.getpid()}")
    if final.exists() and os.path.samefile(final, base):
        raise UsageError(f"the delta makes {final.name}, which is --base itself: writing it "
                         "would replace the base; choose another --output")
    made_dir = not output_dir.exists()
    created: List[Path] = []  # removed on failure: only what this run made itself
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        out = open(tmp, "xb")  # exclusive: a link planted at this name is never followed
        created.append(tmp)
        with out, open(base, "rb") as src:
            digest = _write(out, src, delta, meta, progress)
            out.flush()
            os.fsync(out.fileno())
        if digest != target["sha256"]:
            # Every byte from the delta was checked on the way: the base is the suspect, and
            # only on this failure path is it worth reading whole to say so.
            base_digest = _file_sha256(base)
            if base_digest != want_base["sha256"]:
                raise WrongBase(f"--base {base.name} has sha256 {base_digest}: {need}")
            raise DeltaDamaged(f"the rebuilt {final.name} has sha256 {digest}, not "
                               f"{target['sha256']}: the delta is damaged; copy it again")
        side = open(tmp_sidecar, "x")  # exclusive, as above: root may be running this
        created.append(tmp_sidecar)
        with side:
            side.write(f"{digest}  {final.name}\n")
        os.replace(tmp, final)
        os.replace(tmp_sidecar, sidecar)
    except OSError as exc:
        _cleanup(created, output_dir if made_dir else None)
        raise CannotWrite(f"cannot write {final}: {exc.strerror or exc}; nothing was "
                          "left in the output folder") from None
    except BaseException:
        _cleanup(created, output_dir if made_dir else None)
        raise
    return {"path": str(final), "sidecar": str(sidecar), "sha256": digest,
            "size": target["size"], "base": want_base["sha256"],
            "from_base": sum(m["size"] for m in meta["members"] if m.get("from") == "base"),
            "from_delta": sum(m["size"] for m in meta["members"] if m.get("from") == "delta")}


def _cleanup(paths: List[Path], made: Optional[Path]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    if made is not None:
        with contextlib.suppress(OSError):
            made.rmdir()


class _StreamHasher:
    """sha256 of what ``update`` is given, on another thread (at most 16 chunks queued)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: "queue.Queue[Optional[bytes]]" = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._run, name="sha256-new", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            self._hash.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        return self._hash.hexdigest()


def _write(out: IO[bytes], src: IO[bytes], delta: Delta, meta: Dict[str, Any],
           progress: Callable[[int], None]) -> str:
    """Write the new bundle; return its sha256."""
    h = _StreamHasher()

    def emit(b: bytes) -> None:
        h.update(b)
        out.write(b)
        progress(len(b))

    try:
        _copy(emit, src, delta, meta)
    finally:
        digest = h.hexdigest()  # also stops the thread on errors
    return digest


def _chunks(f: Any, size: int) -> Iterator[bytes]:
    """``size`` bytes of ``f`` from where it stands, in chunks; fewer where it ends."""
    while size:
        chunk = f.read(min(BUFSIZE, size))
        if not chunk:
            return
        size -= len(chunk)
        yield chunk


def _copy(emit: Callable[[bytes], None], src: IO[bytes], delta: Delta,
          meta: Dict[str, Any]) -> None:
    try:
        for m in meta["members"]:
            emit(base64.b64decode(m["lead"], validate=True))
            got, mh = 0, hashlib.sha256()
            if m.get("from") == "base":
                src.seek(m["offset"])
                for chunk in _chunks(src, m["size"]):
                    emit(chunk)
                    got += len(chunk)
                if got != m["size"]:
                    raise WrongBase("--base ends before the data the delta needs from it")
            elif m.get("from") == "delta":
                with delta.open(f"{PAYLOAD}/{m['sha256']}") as f:
                    for chunk in _chunks(f, m["size"]):
                        mh.update(chunk)
                        emit(chunk)
                        got += len(chunk)
                if got != m["size"] or mh.hexdigest() != m["sha256"]:
                    raise DeltaDamaged(f"{delta.path.name}: {PAYLOAD}/{m['sha256']} "
                                       f"(for {_shown(m['name'])}) is damaged; copy the delta "
                                       "again")
        emit(base64.b64decode(meta["tail"], validate=True))
    except (KeyError, TypeError, ValueError, tarfile.TarError, EOFError) as exc:
        raise DeltaDamaged(f"{delta.path.name}: unreadable ({type(exc).__name__}: {exc}); "
                           "copy the delta again") from None


def main(argv: Optional[List[str]] = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(
        prog="apply.py",
        description="Rebuild the new bundle from the bundle you have (--base) and this delta, "
                    "byte for byte, checked against its published sha256.",
        epilog="Exit codes: 0 rebuilt, 2 bad usage, 5 cannot write the output, "
               "10 damaged delta or wrong base. Nothing is left in --output on failure.")
    p.add_argument("--base", required=True, type=Path, help="the bundle the delta was made from")
    p.add_argument("--output", required=True, type=Path, help="folder for the new bundle")
    p.add_argument("--delta", type=Path, default=here,
                   help="the delta folder or tarball [default: this file's folder]")
    args = p.parse_args(argv)
    try:
        res = apply_delta(args.delta, args.base, args.output)
    except ApplyError as exc:
        print(f"apply.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(res["path"])
    print(res["sidecar"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
