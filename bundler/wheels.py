"""Stage: download exactly the locked wheels for a target, into a hash-keyed cache.

The cache is ``CACHE/wheels/<sha256>/<filename>``: a file is found by a hash the lockfile
allows, so a second build downloads nothing and a corrupt cache entry cannot pass. Pure
Python packages published only as sdists (docopt, for pyannote 3.x) are turned into wheels
here, on the build host, so the isolated host never builds anything.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import (
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

from bundler.errors import (
    CannotWrite,
    InputError,
    NoWheelForTarget,
    WheelError,
    WheelHashMismatch,
)
from bundler.hashing import sha256_file
from bundler.progress import task
from bundler.spec import IndexOptions, Target
from bundler.subproc import last_lines, pip_problem, run_pip

log = logging.getLogger("bundler")


@dataclass(frozen=True)
class LockedRequirement:
    """One ``name==version --hash=...`` entry of a lockfile."""

    name: str  # canonical
    version: str
    hashes: frozenset[str]


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


_REQ = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def parse_lockfile(text: str, source: str = "lockfile") -> list[LockedRequirement]:
    """Parse a pip-compile ``--generate-hashes`` lockfile. Every entry must be pinned and hashed."""
    joined = re.sub(r"\\\n", " ", text)
    reqs: list[LockedRequirement] = []
    for lineno, raw in enumerate(joined.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise InputError(f"{source}: line {lineno}: options are not allowed in a lockfile "
                             f"('{line.split()[0]}'); index options are given to the build")
        m = _REQ.match(line)
        if not m:
            raise InputError(f"{source}: line {lineno}: '{line[:60]}' is not pinned with '=='")
        hashes = frozenset(_HASH.findall(line))
        if not hashes:
            raise InputError(f"{source}: {m.group(1)} has no --hash=sha256: (lock with "
                             "--generate-hashes)")
        reqs.append(LockedRequirement(canonicalize_name(m.group(1)), m.group(2), hashes))
    if not reqs:
        raise InputError(f"{source}: no requirements")
    return reqs


class WheelCache:
    """``ROOT/wheels/<sha256>/<file>`` for downloads, ``ROOT/built/<sdist sha256>/<wheel>``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def lookup(self, req: LockedRequirement, tags: frozenset[str]) -> WheelFile | None:
        for digest in sorted(req.hashes):
            for path in _files(self.root / "wheels" / digest):
                if path.name.endswith(".whl") and _fits(path.name, tags):
                    return WheelFile(req.name, req.version, path.name, digest,
                                     path.stat().st_size, path)
            for path in _files(self.root / "built" / digest):
                if _fits(path.name, tags):
                    sha, size = sha256_file(path)
                    return WheelFile(req.name, req.version, path.name, sha, size, path, digest)
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


def _fits(filename: str, tags: frozenset[str]) -> bool:
    try:
        _, _, _, wheel_tags = parse_wheel_filename(filename)
    except InvalidWheelFilename:  # a stray file in the cache: not a wheel for anyone
        return False
    return any(str(t) in tags for t in wheel_tags)


def fetch_wheels(lockfile: Path, target: Target, index: IndexOptions, cache_dir: Path,
                 source_date_epoch: int) -> list[WheelFile]:
    """Every locked requirement as a wheel for ``target``, from the cache or the index."""
    try:
        text = lockfile.read_text()
    except OSError as exc:
        raise InputError(f"{lockfile}: cannot read lockfile: {exc.strerror}") from None
    reqs = parse_lockfile(text, str(lockfile))
    tags = target.supported_tags()
    cache = WheelCache(cache_dir)
    try:
        missing = [r for r in reqs if cache.lookup(r, tags) is None and cache.sdist(r) is None]
        if missing:
            with task(f"wheels: downloading {len(missing)} of {len(reqs)} for {target.slug}"):
                _download(missing, target, index, cache)
        else:
            log.info("wheels: all %d in the cache for %s", len(reqs), target.slug)
        out = []
        for req in reqs:
            wheel = cache.lookup(req, tags)
            if wheel is None:
                wheel = _build_from_sdist(req, target, index, cache, source_date_epoch, tags)
            out.append(wheel)
    except OSError as exc:
        if CannotWrite.matches(exc):
            raise CannotWrite("the wheel cache", cache_dir, exc, "--cache-dir") from None
        raise
    return out


def _download(reqs: Iterable[LockedRequirement], target: Target, index: IndexOptions,
              cache: WheelCache) -> None:
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


def _build_from_sdist(req: LockedRequirement, target: Target, index: IndexOptions,
                      cache: WheelCache, source_date_epoch: int,
                      tags: frozenset[str]) -> WheelFile:
    sdist = cache.sdist(req)
    if sdist is None:
        raise NoWheelForTarget(req.name, target.slug, "nothing was downloaded for it")
    sdist_sha, _ = sha256_file(sdist)
    log.info("wheels: %s has no wheel; building one from its sdist", sdist.name)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache.root) as tmp:
        # SOURCE_DATE_EPOCH makes the wheel's zip timestamps, and so its hash, reproducible.
        result = run_pip(["wheel", "--no-deps", "--progress-bar", "off", "-w", tmp,
                          *index.pip_args(), str(sdist)],
                         extra_env={"SOURCE_DATE_EPOCH": str(source_date_epoch)})
        if result.returncode != 0:
            raise NoWheelForTarget(req.name, target.slug,
                                   f"building its sdist failed: {last_lines(result.stderr, 1)}")
        built = [p for p in Path(tmp).iterdir() if p.name.endswith(".whl")]
        if len(built) != 1:
            raise NoWheelForTarget(req.name, target.slug, "its sdist did not build one wheel")
        wheel = built[0]
        _, _, _, wheel_tags = parse_wheel_filename(wheel.name)
        pure = all(t.abi == "none" and t.platform == "any" for t in wheel_tags)
        if not pure and not target.matches_host():
            raise NoWheelForTarget(req.name, target.slug,
                                   "only an sdist with compiled code exists; build on a host "
                                   "of the target's kind")
        if not _fits(wheel.name, tags):
            raise NoWheelForTarget(req.name, target.slug, f"built {wheel.name}, which does not fit")
        path = cache.add("built", sdist_sha, wheel)
    sha, size = sha256_file(path)
    name, version = parse_sdist_filename(sdist.name)
    return WheelFile(req.name, str(version), path.name, sha, size, path, sdist_sha)


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


def wheel_license(path: Path) -> str | None:
    """The licence a wheel declares in its METADATA: License-Expression (PEP 639), else a
    one-line License field, else the OSI classifiers; None when it declares none."""
    import email.parser
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist()
                         if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
            if name is None:
                return None
            meta = email.parser.BytesHeaderParser().parsebytes(zf.read(name))
    except (OSError, zipfile.BadZipFile):
        return None
    expression = meta.get("License-Expression")
    if expression:
        return str(expression).strip()
    text = str(meta.get("License") or "").strip()
    if text and "\n" not in text and len(text) <= 80 and text.upper() != "UNKNOWN":
        return text
    classifiers = [str(c).rsplit("::", 1)[1].strip() for c in meta.get_all("Classifier") or []
                   if str(c).startswith("License ::") and "::" in str(c)[10:]]
    return " OR ".join(classifiers) or None


def bundle_lock(wheels: Iterable[WheelFile]) -> str:
    """The bundle's own lock: the exact wheel files shipped, by hash (for --require-hashes)."""
    lines = ["# The exact wheels in wheels/, by sha256: pip install --no-index "
             "--require-hashes -r requirements.lock\n"]
    for w in sorted(wheels, key=lambda w: w.name):
        lines.append(f"{w.name}=={w.version} --hash=sha256:{w.sha256}\n")
    return "".join(lines)
