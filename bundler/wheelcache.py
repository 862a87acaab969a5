"""The hash-keyed wheel cache, and pip downloads into it.

``CACHE/wheels/<sha256>/<filename>``: a file is found by a hash the lockfile allows, so a
second build downloads nothing and a corrupt cache entry cannot pass. Wheels built here from
sdists (``sdist.py``) are kept under ``CACHE/sdist-builds/<sdist sha256>/<backend key>/``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from bundler.errors import CannotWrite, NoWheelForTarget, WheelError, WheelHashMismatch
from bundler.hashing import sha256_file
from bundler.lockfile import LockedRequirement
from bundler.spec import IndexOptions, Target
from bundler.subproc import last_lines, pip_problem, run_pip


@dataclass(frozen=True)
class WheelFile:
    """A wheel ready to ship: where it lies and what it is."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int
    path: Path
    built_from: str | None = None  # sha256 of the sdist it was built from, if any


class WheelCache:
    """``ROOT/wheels/<sha256>/<file>`` for downloads; wheels built here from sdists in
    ``ROOT/sdist-builds/<sdist sha256>/<build lock key>/<wheel>`` (a different backend is a
    different wheel)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def lookup(self, req: LockedRequirement, tags: frozenset[str]) -> WheelFile | None:
        for digest in sorted(req.hashes):
            for path in _files(self.root / "wheels" / digest):
                if path.name.endswith(".whl") and fits(path.name, tags):
                    return WheelFile(req.name, req.version, path.name, digest,
                                     path.stat().st_size, path)
        return None

    def built(self, sdist_sha: str, key: str, tags: frozenset[str]) -> Path | None:
        for path in _files(self.root / "sdist-builds" / sdist_sha / key):
            if path.name.endswith(".whl") and fits(path.name, tags):
                return path
        return None

    def sdist(self, req: LockedRequirement) -> Path | None:
        for digest in sorted(req.hashes):
            for path in _files(self.root / "wheels" / digest):
                if not path.name.endswith(".whl"):
                    return path
        return None

    def add(self, kind: str, digest: str, src: Path) -> Path:
        """Move a file into the cache atomically (a reader never sees half a file)."""
        folder = self.root / kind / digest
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / src.name
        tmp = folder / f".{src.name}.tmp{os.getpid()}"
        shutil.move(str(src), tmp)
        os.replace(tmp, dest)
        return dest


def _files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        return []


def fits(filename: str, tags: frozenset[str]) -> bool:
    """Whether a wheel of this file name installs under one of ``tags``."""
    try:
        _, _, _, wheel_tags = parse_wheel_filename(filename)
    except InvalidWheelFilename:  # a stray file in the cache: not a wheel for anyone
        return False
    return any(str(t) in tags for t in wheel_tags)


def download_locked(reqs: Iterable[LockedRequirement], target: Target, index: IndexOptions,
                    cache: WheelCache) -> None:
    """Download ``reqs`` for ``target`` into ``cache`` (``wheels/<sha256>/<file>``); pip
    refuses a file whose sha256 none of its requirement's hashes allow (WheelHashMismatch),
    so nothing unchecked enters the cache."""
    cache.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache.root) as tmp:
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text("".join(
            f"{r.name}=={r.version} " + " ".join(f"--hash=sha256:{h}" for h in sorted(r.hashes))
            + "\n" for r in reqs))
        dest = Path(tmp) / "files"
        # --no-deps: the lockfile is the whole set. Without --only-binary an sdist is taken
        # when no wheel fits; it is built (pure Python only) below.
        args = ["download", "--no-deps", "--require-hashes", "--progress-bar", "off",
                "--prefer-binary", "-d", str(dest), "-r", str(req_file),
                *index.pip_args(), *target.pip_download_args()]
        result = run_pip(args)
        if result.returncode != 0:
            raise _pip_error(result.stderr + result.stdout, target, cache.root)
        for path in sorted(dest.iterdir()):
            digest, _ = sha256_file(path)
            cache.add("wheels", digest, path)


# pip's line for a write it could not make: "OSError: [Errno 28] No space left on device",
# then ": '/path'" when it names the file, or ": '/tmp/x' -> '/cache/x'" for a copy.
_PIP_OSERROR = re.compile(
    r"\[Errno (\d+)\] ([^:'\n]+?)(?:: '([^'\n]+)'(?: -> '([^'\n]+)')?)?\s*$", re.M)


def _pip_error(output: str, target: Target, cache_root: Path) -> WheelError | CannotWrite:
    for found in _PIP_OSERROR.finditer(output):
        exc = OSError(int(found.group(1)), found.group(2).strip(),
                      found.group(4) or found.group(3))
        if CannotWrite.matches(exc):
            return CannotWrite("the wheel cache", cache_root, exc, "--cache-dir")
    problem = pip_problem(output)
    if problem and "index could not be reached" in problem:
        return WheelError(f"pip download for {target.slug}: {problem}")
    if "incomplete-download" in output:
        # pip >= 25 says this of a failed write to its temporary file too, and blames the
        # network: say both.
        said = re.search(r"Download failed[^\n]*", output)
        return WheelError(f"pip download for {target.slug}: a download ended early (pip: "
                          f"{said.group(0).strip() if said else last_lines(output, 1)}); the "
                          "connection dropped, or the disk under TMPDIR "
                          f"({tempfile.gettempdir()}) is full: check both and retry")
    m = re.search(r"No matching distribution found for ([A-Za-z0-9._-]+)", output)
    if m:
        return NoWheelForTarget(canonicalize_name(m.group(1)), target.slug)
    if "DO NOT MATCH THE HASHES" in output:
        m = re.search(r"^\s+([A-Za-z0-9._-]+)==\S+ from ", output, re.M)
        return WheelHashMismatch(canonicalize_name(m.group(1)) if m else "a package")
    return WheelError(f"pip download failed for {target.slug}: {last_lines(output)}")
