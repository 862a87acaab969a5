"""The small helpers every runtime module uses, each in one place: hash a file, write a
file atomically, show a name or an exception on one line, count the cores this process may
use.

Standard library only, Python 3.9: imported before the venv exists. ``install.py`` and
``apply.py`` must each run as one file and keep their own copies of what they need;
``tests/test_contract.py`` proves those copies equal to these.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
from pathlib import Path

# Read in blocks of this size: large enough that hashing, not the calls, takes the time.
BUFSIZE = 1 << 20


# --- hash a file ------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """The file's sha256, hex."""
    digest = hashlib.sha256()
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])  # hashlib lets go of the GIL: threads hash in parallel
    return digest.hexdigest()


# --- write a file atomically -------------------------------------------------------------------
def create_exclusive(folder: Path, name: str) -> tuple[int, Path]:
    """A new file in ``folder`` named ``.<name[:32]>.<random>.tmp``, opened for writing:
    ``(fd, path)``.

    Made with O_EXCL (never through a planted link) and mode 0666, which the kernel narrows
    by the user's umask (and the folder's default ACL) as for any file the user makes:
    outputs of private recordings are as private as the user asked, never widened to 0644
    and never narrowed behind the user's back. (mkstemp makes 0600, and reading the umask
    means setting it: a race with any other thread.) The name's length is bounded, so that
    an output whose own name just fits the file system's limit is not refused for it."""
    for _ in range(100):
        tmp = folder / f".{name[:32]}.{os.urandom(6).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(folder))


def write_atomic(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Write beside the target and rename: a reader never sees half a file. The file's
    mode is what the user's umask gives a new file (``create_exclusive``), or ``mode``
    when given: what the installer writes for every user of a prefix (``engines.json``,
    the ONNX files) is readable by all, whatever the umask of the one who installed it.

    Text that cannot be UTF-8 (a file name with undecodable bytes, carried as surrogates)
    is written escaped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_exclusive(path.parent, path.name)
    try:
        if isinstance(data, bytes):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- show a name, an exception ------------------------------------------------------------------
def shown(name: str, limit: int = 300) -> str:
    """A file name as it may appear on a terminal or in a log: control characters and
    undecodable bytes escaped (no forged line, no terminal escape), its length bounded."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in name)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    """An exception as one printable line of bounded length (no forged second line)."""
    text = str(exc) if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- the cores this process may use ------------------------------------------------------------
CGROUP = Path("/sys/fs/cgroup")


def usable_cores(cgroup_root: Path | None = None) -> int:
    """The cores this process may use: its CPU affinity (taskset, a cpuset), capped by a
    cgroup CPU quota (a container's ``--cpus``, a Kubernetes limit), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_quota(CGROUP if cgroup_root is None else cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def cgroup_quota(root: Path = CGROUP, membership: str | None = None) -> float | None:
    """The CPU quota in cores of this process's cgroup, the smallest of its own and those of
    the cgroups above it (a quota holds for everything below it), or None when there is
    none: cgroup v2 ``cpu.max``, else v1 ``cpu/cpu.cfs_quota_us`` / ``cfs_period_us``.

    ``membership`` is ``/proc/self/cgroup`` (read when None). A container sees its own
    cgroup at ``root``; a systemd service, a ``systemd-run -p CPUQuota=`` scope or a
    process put into a cgroup by hand sees the whole tree there and sits below it."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            membership = ""
    unified, cpu = _own_cgroups(membership)
    quotas = [q for level in _levels(root, unified) if (q := _v2_quota(level)) is not None]
    if not quotas:  # cgroup v1, or hybrid: the cpu controller's own hierarchy
        quotas = [q for level in _levels(root / "cpu", cpu)
                  if (q := _v1_quota(level)) is not None]
    return min(quotas) if quotas else None


def _own_cgroups(membership: str) -> tuple[str, str]:
    """This process's cgroup v2 path and its v1 ``cpu`` controller's path ("/" if none)."""
    unified = cpu = "/"
    for line in membership.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        if fields[0] == "0" and fields[1] == "":
            unified = fields[2]
        elif "cpu" in fields[1].split(","):
            cpu = fields[2]
    return unified, cpu


def _levels(mount: Path, path: str) -> list[Path]:
    """``mount`` and each folder below it down to ``path``, as far as they exist: a
    container whose mount is its own cgroup sees none of the path its host names."""
    levels = [mount]
    for part in path.split("/"):
        if part in ("", ".", ".."):
            continue
        below = levels[-1] / part
        if not below.is_dir():
            break
        levels.append(below)
    return levels


def _v2_quota(folder: Path) -> float | None:
    try:
        fields = (folder / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            quota, period = int(fields[0]), int(fields[1])
            return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError, IndexError):
        pass
    return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None

