"""Rebuild a new bundle from the bundle you have and a delta, offline, byte for byte.

    tar -xf NEW.from-XXXXXXXXXXXX.delta.tar
    python3 NEW.from-XXXXXXXXXXXX.delta/apply.py --base OLD.tar --output DIR

``pyannote-bundle apply DELTA --base OLD.tar --output DIR`` runs this very file's code, on
the delta tarball itself. Standard library only, Python 3.9 and newer.

A delta holds ``delta.json`` and the members of the new bundle whose bytes the base lacks
(``payload/<sha256>``). ``delta.json`` records, for each member of the new bundle in order,
the tar bytes before its data (header, and the padding of the member before) and where its
data comes from: the base (an offset in it) or the payload. This program writes those bytes
in order to a temporary name beside the output, hashing them on a second thread as it goes.
Only when the result is the new bundle (its sha256, recorded in the delta) is it renamed to
its final name and its ``.sha256`` sidecar written beside it, in ``sha256sum -c`` form.

The base is checked for what the result needs from it: its size and, when its sidecar is
beside it, the digest there, before anything is written; then every byte taken from it,
through the result's sha256. When that does not match, the base is hashed whole to say
which side is wrong: a base that is not the one the delta names (exit 10), or a damaged
delta. On any failure nothing is left in the output folder.

Exit codes (pyannote-bundle's): 0 rebuilt, 2 bad usage, 5 cannot write the output (disk
full, permissions), 10 damaged delta, or a base that is not the one the delta needs.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import queue
import sys
import tarfile
import threading
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Optional

FORMAT = "pyannote-bundle-delta/1"
DELTA_JSON = "delta.json"
CHECKSUMS = "SHA256SUMS"
PAYLOAD = "payload"
SIDECAR_SUFFIX = ".sha256"
BUFSIZE = 1 << 20

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
    """A delta as a folder (unpacked with tar) or as its tarball, read the same way."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: Optional[tarfile.TarFile] = None
        self._root: Optional[Path] = None
        self._members: Dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            self._root = path
        else:
            try:
                self._tar = tarfile.open(path, "r:")
                for info in self._tar.getmembers():
                    top, _, rel = info.name.partition("/")
                    if info.isfile() and rel:
                        self._members[rel] = info
            except (OSError, tarfile.TarError, EOFError) as exc:
                self.close()
                raise DeltaDamaged(f"{path.name}: not a readable delta tarball ({exc}); "
                                   "copy it again") from None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def open(self, rel: str) -> IO[bytes]:
        """A member of the delta, streamed."""
        try:
            if self._root is not None:
                return open(self._root / rel, "rb")
            f = self._tar.extractfile(self._members[rel]) if self._tar else None
            if f is None:
                raise KeyError(rel)
            return f
        except (OSError, KeyError):
            raise DeltaDamaged(f"{self.path.name}: {rel} is missing; copy the delta "
                               "again") from None

    def read_small(self, rel: str) -> bytes:
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
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise DeltaDamaged(f"{self.path.name}: format {meta.get('format')!r} is not "
                               f"{FORMAT}; use the pyannote-bundle that made it")
        _check_meta(self.path.name, meta)
        return meta


def _check_meta(name: str, meta: Dict[str, Any]) -> None:
    """Names that become paths must stay plain names: a damaged list cannot write elsewhere."""
    hexdigits = set("0123456789abcdef")
    try:
        ok = all(len(d["sha256"]) == 64 and set(d["sha256"]) <= hexdigits
                 for d in (meta["base"], meta["target"]))
        target = meta["target"]["name"]
        ok = ok and "/" not in target and not target.startswith(".") and bool(target)
        for m in meta["members"]:
            if m.get("from") == "delta":
                ok = ok and len(m["sha256"]) == 64 and set(m["sha256"]) <= hexdigits
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise DeltaDamaged(f"{name}: {DELTA_JSON} is not a delta's list; use the "
                           "pyannote-bundle that made it")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(BUFSIZE)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def _sidecar_digest(path: Path) -> Optional[str]:
    try:
        text = path.with_name(path.name + SIDECAR_SUFFIX).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    sha = text.strip().partition("  ")[0]
    return sha if len(sha) == 64 else None


def _check_delta_sidecar(path: Path) -> None:
    """A delta tarball with its sidecar beside it is checked whole first (it is small)."""
    published = _sidecar_digest(path)
    if published is None:
        return
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(BUFSIZE)
                if not chunk:
                    break
                h.update(chunk)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    if h.hexdigest() != published:
        raise DeltaDamaged(f"{path.name}: sha256 {h.hexdigest()} does not match its sidecar "
                           f"({published}): damaged; copy it again")


def apply_delta(delta_path: Path, base: Path, output_dir: Path,
                progress: Callable[[int], None] = lambda n: None) -> Dict[str, Any]:
    """Write ``output_dir/<new bundle>`` and its sidecar; return what was made.

    Raises ApplyError (with its exit code); nothing is left in ``output_dir`` then.
    """
    if delta_path.is_file():
        _check_delta_sidecar(delta_path)
    delta = Delta(delta_path)
    try:
        return _apply(delta, base, output_dir, progress)
    finally:
        delta.close()


def _apply(delta: Delta, base: Path, output_dir: Path,
           progress: Callable[[int], None]) -> Dict[str, Any]:
    meta = delta.load()
    want_base, target = meta["base"], meta["target"]
    need = f"the delta needs {want_base['name']} with sha256 {want_base['sha256']}"
    try:
        base_size = base.stat().st_size
    except OSError as exc:
        raise UsageError(f"--base {base}: {exc.strerror}") from None
    if base_size != want_base["size"]:
        raise WrongBase(f"--base {base.name} is {base_size} bytes, not {want_base['size']}: "
                        f"{need}")
    published = _sidecar_digest(base)
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
    created: List[Path] = []  # removed on failure: only what this run made, never a file
    # (or a link) someone else put at one of these names
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        out = open(tmp, "xb")  # exclusive: a link planted at this name is never followed
        created.append(tmp)
        with out, open(base, "rb") as src:
            digest = _write(out, src, delta, meta, progress)
            out.flush()
            os.fsync(out.fileno())
        if digest != target["sha256"]:
            # Every byte taken from the delta was checked on the way (its list against its
            # SHA256SUMS, each payload file against its sha256): the base is the suspect,
            # and only now, on this failure path, is it worth reading whole to say so.
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
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    if made is not None:
        try:
            made.rmdir()
        except OSError:
            pass


class _StreamHasher:
    """sha256 of the bytes handed to ``update``, computed on another thread so that hashing
    the new bundle runs beside writing it (bounded: at most 16 chunks in flight)."""

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


def _copy(emit: Callable[[bytes], None], src: IO[bytes], delta: Delta,
          meta: Dict[str, Any]) -> None:
    try:
        for m in meta["members"]:
            emit(base64.b64decode(m["lead"], validate=True))
            size = m["size"]
            if m.get("from") == "base":
                src.seek(m["offset"])
                left = size
                while left:
                    chunk = src.read(min(BUFSIZE, left))
                    if not chunk:
                        raise WrongBase("--base ends before the data the delta needs from it")
                    emit(chunk)
                    left -= len(chunk)
            elif m.get("from") == "delta":
                mh = hashlib.sha256()
                with delta.open(f"{PAYLOAD}/{m['sha256']}") as f:
                    left = size
                    while left:
                        chunk = f.read(min(BUFSIZE, left))
                        if not chunk:
                            break
                        mh.update(chunk)
                        emit(chunk)
                        left -= len(chunk)
                if left or mh.hexdigest() != m["sha256"]:
                    raise DeltaDamaged(f"{delta.path.name}: {PAYLOAD}/{m['sha256']} "
                                       f"(for {m['name']}) is damaged; copy the delta again")
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
