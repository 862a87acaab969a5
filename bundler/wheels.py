"""Stage: exactly the locked wheels for a target, from the hash-keyed cache or the index.

``fetch_wheels`` reads the lockfile (``lockfile.py``), takes each wheel from the cache or
downloads it (``wheelcache.py``), and builds the ones published only as sdists
(``sdist.py``, reproducibly). ``bundle_lock`` writes the bundle's own lock of the wheels it
ships; ``wheel_license`` reads the licence each declares, for the manifest and the SBOM.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from bundler.errors import CannotWrite, InputError
from bundler.lockfile import BuildLock, load_build_lock, parse_lockfile
from bundler.progress import task
from bundler.sdist import build_from_sdist
from bundler.spec import IndexOptions, Target
from bundler.wheelcache import WheelCache, WheelFile, download_locked

log = logging.getLogger("bundler")


def fetch_wheels(lockfile: Path, target: Target, index: IndexOptions, cache_dir: Path,
                 source_date_epoch: int, build_lock: Path | None = None) -> list[WheelFile]:
    """Every locked requirement as a wheel for ``target``, from the cache or the index.

    A requirement with only an sdist is built here with the backend ``build_lock`` pins
    (default: the shipped ``lockfiles/build-backend.txt``), at the fixed ``sdist.WHEEL_EPOCH``
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
                wheel = build_from_sdist(req, target, index, cache, tags, backend)
            out.append(wheel)
    except OSError as exc:
        if CannotWrite.matches(exc):
            raise CannotWrite("the wheel cache", cache_dir, exc, "--cache-dir") from None
        raise
    return out


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
