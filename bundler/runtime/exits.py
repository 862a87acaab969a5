"""The exit codes every program that processes recordings shares, and the two failures
behind them: one that stops the run (RunError) and one that is a single file's (FileFailed).

Standard library only, Python 3.9.
"""

from __future__ import annotations

# Exit codes (a contract: batch schedulers and scripts read them), the same for every program.
EXIT_OK = 0  # every file done, or already done
EXIT_INTERNAL = 1  # a bug: rerun with --debug
EXIT_USAGE = 2  # bad arguments, an input that does not exist, no audio files found
EXIT_CANNOT_RUN = 3  # nothing could run: config or model missing, pipeline or device unusable
EXIT_SOME_FAILED = 4  # some files could not be decoded or processed; the others are done
EXIT_OUTPUT = 5  # the output folder cannot be written
EXIT_INTERRUPTED = 130


def exit_codes(done: str) -> dict[int, str]:
    """Each exit code and its meaning, for a program whose work is ``done`` ("diarized")."""
    return {
        EXIT_OK: f"every file {done} (or already done)",
        EXIT_INTERNAL: "internal error (rerun with --debug)",
        EXIT_USAGE: "bad usage: arguments, a missing input, no audio files",
        EXIT_CANNOT_RUN: "nothing could run: config, model, pipeline or device unusable",
        EXIT_SOME_FAILED: "some files failed (each named on stderr); the others are done",
        EXIT_OUTPUT: "the output folder cannot be written",
        EXIT_INTERRUPTED: "interrupted",
    }


class RunError(Exception):
    """A failure that stops the run: one line for the operator, and its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class FileFailed(Exception):
    """One file could not be decoded or processed; the run goes on."""
