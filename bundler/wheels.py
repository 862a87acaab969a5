"""Stage: download exactly the locked wheels for a target, into a hash-keyed cache.

The cache is ``CACHE/wheels/<sha256>/<filename>``: a file is found by a hash the lockfile
allows, so a second build downloads nothing and a corrupt cache entry cannot pass. Pure
Python packages published only as sdists (docopt, for pyannote 3.x) are turned into wheels
here, on the build host, so the isolated host never builds anything.

Such a wheel is the same bytes on every build host: its build backend is installed from
``lockfiles/build-backend.txt`` (exact versions, by hash), it runs with a fixed umask, time
zone, locale and ``SOURCE_DATE_EPOCH``, and the wheel is then rewritten in a canonical form
(entry order, timestamps, permissions, no compression). The sha256 each such wheel must have
is recorded in that lockfile too: a build that makes anything else stops, naming the package.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import (
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

from bundler.data import data_dir
from bundler.errors import (
    BuiltWheelMismatch,
    CannotWrite,
    InputError,
    NoWheelForTarget,
    WheelError,
    WheelHashMismatch,
)
from bundler.hashing import sha256_file
from bundler.progress import task
from bundler.spec import IndexOptions, Target
from bundler.subproc import clean_env, last_lines, pip_problem, run, run_pip

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


# The build backend for wheels made here from sdists, locked like every other requirement.
BUILD_LOCK = "build-backend.txt"
# ``# pyannote-bundle: built NAME==VERSION sdist=SHA256 wheel=FILENAME sha256=SHA256``
BUILT_PREFIX = "# pyannote-bundle: built "
_BUILT = re.compile(r"^# pyannote-bundle: built ([A-Za-z0-9._-]+)==(\S+) sdist=([0-9a-f]{64}) "
                    r"wheel=(\S+\.whl) sha256=([0-9a-f]{64})\s*$", re.M)
# The oldest time a zip entry can hold (1980-01-01).
ZIP_EPOCH = 315532800
# SOURCE_DATE_EPOCH for every wheel built here: a wheel is a function of its sdist and the
# backend only, so one recorded sha256 holds for every build.
WHEEL_EPOCH = ZIP_EPOCH


@dataclass(frozen=True)
class BuiltRecord:
    """The wheel an sdist must build into, as recorded in the build lock."""

    name: str  # canonical
    version: str
    sdist_sha256: str
    filename: str
    sha256: str

    def line(self) -> str:
        return (f"{BUILT_PREFIX}{self.name}=={self.version} sdist={self.sdist_sha256} "
                f"wheel={self.filename} sha256={self.sha256}")


@dataclass(frozen=True)
class BuildLock:
    """The build backend (exact wheels, by hash) and the wheels it must build."""

    path: Path
    requirements: tuple[LockedRequirement, ...]
    built: dict[str, BuiltRecord]  # by sdist sha256

    @property
    def key(self) -> str:
        """What a built wheel depends on besides its sdist: the backend's exact files."""
        text = "".join(f"{r.name}=={r.version} {' '.join(sorted(r.hashes))}\n"
                       for r in sorted(self.requirements, key=lambda r: r.name))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def pins(self) -> list[str]:
        return [f"{r.name}=={r.version}" for r in self.requirements]


def build_lock_path() -> Path:
    """The shipped ``lockfiles/build-backend.txt``."""
    return Path(str(data_dir("lockfiles").joinpath(BUILD_LOCK)))


def parse_built_records(text: str) -> dict[str, BuiltRecord]:
    """The ``# pyannote-bundle: built ...`` lines of a build lock, by sdist sha256."""
    return {m.group(3): BuiltRecord(canonicalize_name(m.group(1)), m.group(2), m.group(3),
                                    m.group(4), m.group(5))
            for m in _BUILT.finditer(text)}


def load_build_lock(path: Path | None = None) -> BuildLock:
    path = path or build_lock_path()
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the build backend's lockfile: "
                         f"{exc.strerror}") from None
    return BuildLock(path, tuple(parse_lockfile(text, str(path))), parse_built_records(text))


class WheelCache:
    """``ROOT/wheels/<sha256>/<file>`` for downloads; wheels built here from sdists in
    ``ROOT/sdist-builds/<sdist sha256>/<build lock key>/<wheel>`` (a different backend is a
    different wheel)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def lookup(self, req: LockedRequirement, tags: frozenset[str]) -> WheelFile | None:
        for digest in sorted(req.hashes):
            for path in _files(self.root / "wheels" / digest):
                if path.name.endswith(".whl") and _fits(path.name, tags):
                    return WheelFile(req.name, req.version, path.name, digest,
                                     path.stat().st_size, path)
        return None

    def built(self, sdist_sha: str, key: str, tags: frozenset[str]) -> Path | None:
        for path in _files(self.root / "sdist-builds" / sdist_sha / key):
            if path.name.endswith(".whl") and _fits(path.name, tags):
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


def _fits(filename: str, tags: frozenset[str]) -> bool:
    try:
        _, _, _, wheel_tags = parse_wheel_filename(filename)
    except InvalidWheelFilename:  # a stray file in the cache: not a wheel for anyone
        return False
    return any(str(t) in tags for t in wheel_tags)


def fetch_wheels(lockfile: Path, target: Target, index: IndexOptions, cache_dir: Path,
                 source_date_epoch: int, build_lock: Path | None = None) -> list[WheelFile]:
    """Every locked requirement as a wheel for ``target``, from the cache or the index.

    A requirement with only an sdist is built here with the backend ``build_lock`` pins
    (default: the shipped ``lockfiles/build-backend.txt``), at the fixed ``WHEEL_EPOCH``
    rather than ``source_date_epoch``: its bytes, and so the sha256 recorded for it, are
    then the same for every bundle, whatever time the bundle records."""
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
                download_locked(missing, target, index, cache)
        else:
            log.info("wheels: all %d in the cache for %s", len(reqs), target.slug)
        out = []
        backend: BuildLock | None = None
        for req in reqs:
            wheel = cache.lookup(req, tags)
            if wheel is None:
                backend = backend or load_build_lock(build_lock)
                wheel = _build_from_sdist(req, target, index, cache, tags, backend)
            out.append(wheel)
    except OSError as exc:
        if CannotWrite.matches(exc):
            raise CannotWrite("the wheel cache", cache_dir, exc, "--cache-dir") from None
        raise
    return out


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


def _build_from_sdist(req: LockedRequirement, target: Target, index: IndexOptions,
                      cache: WheelCache, tags: frozenset[str],
                      backend: BuildLock) -> WheelFile:
    sdist = cache.sdist(req)
    if sdist is None:
        raise NoWheelForTarget(req.name, target.slug, "nothing was downloaded for it")
    sdist_sha, _ = sha256_file(sdist)
    record = backend.built.get(sdist_sha)
    path = cache.built(sdist_sha, backend.key, tags)
    if path is not None and record is not None and sha256_file(path)[0] != record.sha256:
        # Left by an older tool, or changed on disk: the cache is no authority, the record is.
        log.info("wheels: %s in the cache is not the recorded wheel; building it again",
                 path.name)
        path.unlink()
        path = None
    if path is None:
        log.info("wheels: %s has no wheel; building one from its sdist with %s", sdist.name,
                 ", ".join(backend.pins))
        path = _build_wheel(req, sdist, sdist_sha, target, index, cache, tags, backend)
    sha, size = sha256_file(path)
    if record is None:
        log.warning("wheels: %s: the wheel built from its sdist is not recorded in %s; add "
                    "this line there so that every build host must make the same one:\n%s",
                    req.name, backend.path.name,
                    BuiltRecord(req.name, req.version, sdist_sha, path.name, sha).line())
    elif (record.filename, record.sha256) != (path.name, sha):
        raise BuiltWheelMismatch(req.name, req.version, record.sha256, sha, backend.pins)
    name, version = parse_sdist_filename(sdist.name)
    return WheelFile(req.name, str(version), path.name, sha, size, path, sdist_sha)


# Runs the sdist's PEP 517 backend in a child: ``python -S`` (no site-packages of the tool's
# own environment, so only the locked backend on PYTHONPATH is importable) and a fixed umask,
# so the files it writes do not follow the builder's.
_HOOK = """\
import importlib, os, sys
os.umask(0o022)
src, out, backend, backend_path = sys.argv[1:5]
os.chdir(src)
sys.path[:0] = [os.path.join(src, p) for p in backend_path.split(os.pathsep) if p]
mod, _, attr = backend.partition(":")
obj = importlib.import_module(mod)
for part in filter(None, attr.split(".")):
    obj = getattr(obj, part)
print(obj.build_wheel(out))
"""


def _build_wheel(req: LockedRequirement, sdist: Path, sdist_sha: str, target: Target,
                 index: IndexOptions, cache: WheelCache, tags: frozenset[str],
                 backend: BuildLock) -> Path:
    host = Target.host()
    host_tags = host.supported_tags()
    missing = [r for r in backend.requirements if cache.lookup(r, host_tags) is None]
    if missing:
        with task(f"wheels: downloading the build backend ({', '.join(backend.pins)})"):
            download_locked(missing, host, index, cache)
    backend_wheels = []
    for r in backend.requirements:
        found = cache.lookup(r, host_tags)
        if found is None:
            raise NoWheelForTarget(r.name, host.slug, f"the build backend in "
                                   f"{backend.path.name} needs a wheel of it")
        backend_wheels.append(found)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache.root) as tmp:
        work = Path(tmp)
        env_dir, src_root, out = work / "backend", work / "src", work / "out"
        out.mkdir()
        result = run_pip(["install", "--no-deps", "--no-index", "--no-compile",
                          "--disable-pip-version-check", "--target", str(env_dir),
                          *(str(w.path) for w in backend_wheels)])
        if result.returncode != 0:
            raise NoWheelForTarget(req.name, target.slug, "installing its build backend "
                                   f"failed: {last_lines(result.stderr, 1)}")
        src = _unpack_sdist(sdist, src_root)
        name, requires, backend_path = _build_system(src, req.name, target)
        locked = {r.name for r in backend.requirements}
        for need in requires:
            if need not in locked:
                raise NoWheelForTarget(req.name, target.slug,
                                       f"its build needs {need}, which {backend.path.name} "
                                       "does not lock")
        # The environment a builder brings (time zone, locale, hash seed) must not reach
        # the wheel; SOURCE_DATE_EPOCH sets the times the backend writes.
        env = clean_env({"PYTHONPATH": str(env_dir), "SOURCE_DATE_EPOCH": str(WHEEL_EPOCH),
                         "TZ": "UTC", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
                         "PYTHONUTF8": "1", "PYTHONHASHSEED": "0",
                         "PYTHONNOUSERSITE": "1", "SETUPTOOLS_USE_DISTUTILS": "local"})
        for var in ("PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH"):
            env.pop(var, None)
        result = run([sys.executable, "-S", "-c", _HOOK, str(src), str(out), name,
                      os.pathsep.join(backend_path)], env=env, cwd=str(src))
        if result.returncode != 0:
            raise NoWheelForTarget(req.name, target.slug,
                                   f"building its sdist failed: {last_lines(result.stderr, 1)}")
        built = [p for p in out.iterdir() if p.name.endswith(".whl")]
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
        normalize_wheel(wheel, WHEEL_EPOCH)
        return cache.add("sdist-builds", f"{sdist_sha}/{backend.key}", wheel)


def _unpack_sdist(sdist: Path, dest: Path) -> Path:
    """The sdist's top folder, unpacked under ``dest`` (nothing outside it, no links)."""
    dest.mkdir()
    if sdist.name.endswith(".zip"):
        with zipfile.ZipFile(sdist) as zf:
            for name in zf.namelist():
                if name.startswith("/") or ".." in name.split("/"):
                    raise NoWheelForTarget(sdist.name, "-", f"unsafe path in sdist: {name}")
            zf.extractall(dest)
    else:
        with tarfile.open(sdist) as tf:
            for member in tf.getmembers():
                parts = member.name.split("/")
                if member.name.startswith("/") or ".." in parts or not (
                        member.isfile() or member.isdir()):
                    raise NoWheelForTarget(sdist.name, "-",
                                           f"unsafe member in sdist: {member.name}")
                member.mode = 0o755 if member.isdir() or member.mode & 0o111 else 0o644
            # Checked above: plain files and folders inside ``dest``. (``filter`` arrived in
            # 3.11.4; older 3.11 releases take none.)
            if hasattr(tarfile, "fully_trusted_filter"):
                tf.extractall(dest, filter="fully_trusted")
            else:
                tf.extractall(dest)
    tops = [p for p in dest.iterdir()]
    return tops[0] if len(tops) == 1 and tops[0].is_dir() else dest


def _build_system(src: Path, package: str, target: Target) -> tuple[str, list[str], list[str]]:
    """The sdist's PEP 517 backend, the names it requires, and its in-tree backend path;
    setuptools' legacy backend when it has no ``pyproject.toml`` (PEP 517's fallback)."""
    pyproject = src / "pyproject.toml"
    system: dict[str, object] = {}
    if pyproject.is_file():
        try:
            system = tomllib.loads(pyproject.read_text()).get("build-system", {})
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise NoWheelForTarget(package, target.slug, f"its pyproject.toml: {exc}") from None
    backend = str(system.get("build-backend") or "setuptools.build_meta:__legacy__")
    raw = system.get("requires", ["setuptools>=40.8.0"])
    names: list[str] = []
    for item in raw if isinstance(raw, list) else []:
        try:
            names.append(canonicalize_name(Requirement(str(item)).name))
        except InvalidRequirement:
            raise NoWheelForTarget(package, target.slug,
                                   f"its build requirement '{item}' is invalid") from None
    if backend.startswith("setuptools.") and "setuptools" not in names:
        names.append("setuptools")
    path = system.get("backend-path", [])
    return backend, names, [str(p) for p in path] if isinstance(path, list) else []


def normalize_wheel(path: Path, source_date_epoch: int) -> None:
    """Rewrite a wheel in a canonical form, in place: entries sorted (``.dist-info`` last,
    its ``RECORD`` at the very end, as installers expect), every time set to
    ``SOURCE_DATE_EPOCH`` (no earlier than 1980, zip's first date), modes 0644 or 0755, no
    folder entries, and stored uncompressed: deflate's output depends on the zlib a Python
    was built with, stored bytes do not. The files' contents, and so RECORD, are unchanged."""
    date = time.gmtime(max(source_date_epoch, ZIP_EPOCH))[:6]
    with zipfile.ZipFile(path) as zf:
        items = [(info.filename, info.external_attr >> 16, zf.read(info))
                 for info in zf.infolist() if not info.is_dir()]

    def order(item: tuple[str, int, bytes]) -> tuple[bool, bool, str]:
        name = item[0]
        top = name.split("/", 1)[0]
        return (top.endswith(".dist-info"), top.endswith(".dist-info")
                and name.endswith("/RECORD"), name)

    tmp = path.with_name(f".{path.name}.normal")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as out:
        for name, mode, data in sorted(items, key=order):
            info = zipfile.ZipInfo(name, date_time=date)
            info.create_system = 3  # unix, so the mode bits below are read
            info.external_attr = (0o100755 if mode & 0o111 else 0o100644) << 16
            info.compress_type = zipfile.ZIP_STORED
            out.writestr(info, data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


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
