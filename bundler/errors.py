"""One root exception, one subclass per failure; each carries its exit code.

Only the CLI turns these into a message and an exit status. Messages are built
from data and say what is wrong and what to do, in one line.
"""

from __future__ import annotations

from pathlib import Path

# Exit codes: a public contract, documented in `--help` and the README.
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
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: rerun with --debug and report it)",
    EXIT_USAGE: "bad usage, spec or input file",
    EXIT_HUB: "model download failed (gated, missing, unreachable, checksum mismatch)",
    EXIT_WHEELS: "lock failed or stale, or wheel download failed "
                 "(no wheel for the target, hash mismatch)",
    EXIT_OUTPUT: "cannot write the bundle, the work folder or the install prefix (disk full, "
                 "permissions)",
    EXIT_INTEGRITY: "bundle integrity check failed "
                    "(checksum, unsafe member, missing or extra file)",
    EXIT_HOST: "this host does not match the bundle's target (Python, platform, glibc, "
               "or a shared library the wheels need)",
    EXIT_INSTALL: "offline install failed",
    EXIT_SMOKE: "smoke diarization failed or differs from the expected result",
    EXIT_TRAP: "the pipeline config hits a known pyannote trap",
    EXIT_NETWORK: "the smoke diarization tried to reach the network (a connection attempt "
                  "or name lookup)",
    EXIT_PREFIX: "the install prefix holds files that no install of ours made (nothing was "
                 "touched), or another install into it is running",
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


# --- output ------------------------------------------------------------------
class OutputError(BundlerError):
    """The bundle could not be written."""

    exit_code = EXIT_OUTPUT


# --- offline side ------------------------------------------------------------
class IntegrityError(BundlerError):
    """The bundle is not what its checksums say: nothing was installed."""

    exit_code = EXIT_INTEGRITY

    def __init__(self, member: str, problem: str) -> None:
        self.member, self.problem = member, problem
        super().__init__(f"{member}: {problem}")


class HostMismatch(BundlerError):
    exit_code = EXIT_HOST


class InstallError(BundlerError):
    exit_code = EXIT_INSTALL


class SmokeError(BundlerError):
    exit_code = EXIT_SMOKE


class NetworkAttempted(BundlerError):
    """The diarizing process tried to connect or look a name up: an isolated host would
    see a timeout per run and a line in a firewall log."""

    exit_code = EXIT_NETWORK

    def __init__(self, attempts: int, first: str) -> None:
        self.attempts, self.first = attempts, first
        super().__init__(f"the smoke diarization made {attempts} connection attempt(s) with "
                         f"the network disabled (first: {first[:200]}); an isolated host "
                         "must see none")

    @classmethod
    def from_message(cls, message: str) -> NetworkAttempted:
        """The installer's own line, as it said it."""
        exc = cls.__new__(cls)
        exc.attempts, exc.first = -1, ""
        BundlerError.__init__(exc, message)
        return exc


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


def describe_path(path: Path) -> str:
    """A path as users should see it in messages."""
    return str(path)


class DeltaError(BundlerError):
    """A delta cannot rebuild its bundle: the delta is damaged, or the base given is not the
    bundle it was made from. Nothing was written."""

    exit_code = EXIT_INTEGRITY
