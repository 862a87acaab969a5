"""Reproducible wheels from sdists, built on the build host so the isolated host never builds.

Pure Python packages published only as sdists (docopt, for pyannote 3.x) are turned into
wheels here. Such a wheel is the same bytes on every build host: its build backend is
installed from ``lockfiles/build-backend.txt`` (exact versions, by hash), it runs with a
fixed umask, time zone, locale and ``SOURCE_DATE_EPOCH``, and the wheel is then rewritten in
a canonical form (entry order, timestamps, permissions, no compression). The sha256 each
such wheel must have is recorded in that lockfile too: a build that makes anything else
stops, naming the package.
"""

from __future__ import annotations

import logging
import os
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

from bundler.errors import BuiltWheelMismatch, NoWheelForTarget
from bundler.hashing import sha256_file
from bundler.lockfile import BuildLock, BuiltRecord, LockedRequirement
from bundler.progress import task
from bundler.spec import IndexOptions, Target
from bundler.subproc import clean_env, last_lines, run, run_pip
from bundler.wheelcache import WheelCache, WheelFile, download_locked, fits

log = logging.getLogger("bundler")

# The oldest time a zip entry can hold (1980-01-01).
ZIP_EPOCH = 315532800
# SOURCE_DATE_EPOCH for every wheel built here: a wheel is a function of its sdist and the
# backend only, so one recorded sha256 holds for every build.
WHEEL_EPOCH = ZIP_EPOCH


def build_from_sdist(req: LockedRequirement, target: Target, index: IndexOptions,
                     cache: WheelCache, tags: frozenset[str],
                     backend: BuildLock) -> WheelFile:
    """The wheel of a requirement published only as an sdist: from the cache when it is the
    recorded one, else built with the locked backend; BuiltWheelMismatch when the build
    lock records another sha256 for it."""
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
        if not fits(wheel.name, tags):
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
