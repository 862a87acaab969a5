"""What a lockfile says: pinned requirements with the sha256 of each file the index may serve.

``parse_lockfile`` reads a pip-compile ``--generate-hashes`` lockfile (every entry pinned and
hashed); ``BuildLock`` is ``lockfiles/build-backend.txt``: the backend that builds wheels
from sdists, locked the same way, and the sha256 each wheel built here must have. Making a
lockfile is ``lock.py``'s job; downloading what one pins, ``wheels.py``'s.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from bundler.data import data_dir
from bundler.errors import InputError


@dataclass(frozen=True)
class LockedRequirement:
    """One ``name==version --hash=...`` entry of a lockfile."""

    name: str  # canonical
    version: str
    hashes: frozenset[str]


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
