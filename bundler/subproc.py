"""Every child process goes through here: pip, venv, unshare. Each runs with a time limit
by kind (``kind_of``) and its output is decoded leniently, so neither a hang nor a stray byte
becomes a traceback.

pip is always a subprocess (never ``pip._internal``), isolated from the build machine's
pip configuration: only the index options a spec or the command line names are used.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bundler.errors import EXIT_INSTALL, EXIT_INTERNAL, EXIT_WHEELS, ChildTimeout, InputError

log = logging.getLogger("bundler")

# Environment variables that carry secrets: never passed to children that don't need them.
SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")
# TLS settings are kept: a build host behind a corporate CA needs them.
_PIP_KEEP = ("PIP_CERT", "PIP_CLIENT_CERT")


@dataclass(frozen=True)
class Completed:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Kind:
    """A kind of child process: how long it may run, and which exit code a hang ends in."""

    name: str
    timeout_s: float
    exit_code: int
    advice: str


# Generous: each bounds a hang, not a slow run. pip's own --timeout already gives up on a
# stalled connection; these catch what it cannot (a resolver loop, a lock held forever, a
# child waiting on a prompt that never comes).
LOCK = Kind("lock", 1800, EXIT_WHEELS, "check the network and the index options")
DOWNLOAD = Kind("download", 3600, EXIT_WHEELS, "check the network and the index options")
INSTALL = Kind("install", 1800, EXIT_INSTALL, "check that the disk is not full or stalled")
OTHER = Kind("child", 600, EXIT_INTERNAL, "rerun with --debug to see the command")
# Seconds every child may run instead of its kind's default: for a slow link or disk.
TIMEOUT_ENV = "PYANNOTE_BUNDLE_TIMEOUT"


def kind_of(args: Sequence[str]) -> Kind:
    """The kind of the command ``args``, from what it runs (pip, uv, venv, ...)."""
    words = [Path(a).name if i == 0 else a for i, a in enumerate(args)]
    if "compile" in words and ("piptools" in words or words[0] == "uv"):
        return LOCK
    if any(w in ("download", "wheel") for w in words) and "pip" in words:
        return DOWNLOAD
    if (("pip" in words and "install" in words) or "venv" in words
            or "ensurepip" in words):
        return INSTALL
    return OTHER


def default_timeout(kind: Kind) -> float:
    """The kind's time limit, or the one ``$PYANNOTE_BUNDLE_TIMEOUT`` sets for every kind."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return kind.timeout_s
    try:
        limit = float(raw)
    except ValueError:
        limit = 0.0
    if not limit > 0:
        raise InputError(f"{TIMEOUT_ENV}={raw!r}: want a number of seconds above 0")
    return limit


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without pip configuration and without secrets."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("PIP_") and k not in _PIP_KEEP) and k not in SECRET_VARS
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if extra:
        env.update(extra)
    return env


def run(args: Sequence[str], *, env: Mapping[str, str] | None = None,
        cwd: str | None = None, timeout: float | None = None,
        stdin: Path | bytes | None = None) -> Completed:
    """Run a command, capturing its output; never raises on a non-zero status.

    ``timeout``: seconds, else the default for the command's kind (``kind_of``); past it
    the child is killed and ChildTimeout raised. Output is decoded as UTF-8, an invalid
    byte replaced (pip relays whatever a build or a server prints).
    ``stdin``: a file, or bytes, fed to the command's standard input (else nothing: no
    prompts). Bytes go through an unnamed temporary file: no other process can change them."""
    kind = kind_of(args)
    limit = timeout if timeout is not None else default_timeout(kind)
    log.debug("run: %s (%s, at most %.0f s)", " ".join(args), kind.name, limit)
    with _feed(stdin) as feed:
        try:
            proc = subprocess.run(list(args), env=dict(env) if env is not None else clean_env(),
                                  cwd=cwd, capture_output=True, encoding="utf-8",
                                  errors="replace", timeout=limit, stdin=feed)
        except subprocess.TimeoutExpired:
            raise ChildTimeout(args, kind.name, limit, kind.exit_code,
                               f"{kind.advice}, or set {TIMEOUT_ENV}=SECONDS to allow longer"
                               ) from None
    return Completed(tuple(args), proc.returncode, proc.stdout, proc.stderr)


def _feed(stdin: Path | bytes | None) -> IO[bytes]:
    """The file a child reads as its standard input (see ``run``)."""
    if stdin is None:
        return open(os.devnull, "rb")
    if isinstance(stdin, bytes):
        f = tempfile.TemporaryFile()
        f.write(stdin)
        f.seek(0)
        return f
    return open(stdin, "rb")


_UNREACHABLE = re.compile(r"(Failed to establish a new connection: [^')]*|Name or service not "
                          r"known|Temporary failure in name resolution|Connection refused|"
                          r"Could not fetch URL \S+)")
_NOT_FOUND = re.compile(r"No matching distribution found for (\S+)")


def pip_problem(output: str) -> str | None:
    """What pip (or pip-compile) says went wrong, in one line: the requirement it could not
    find, and an index it could not reach; None when neither is in ``output``."""
    missing, unreachable = _NOT_FOUND.search(output), _UNREACHABLE.search(output)
    if missing is None and unreachable is None:
        return None
    parts = []
    if missing:
        parts.append(f"no distribution found for {missing.group(1)}")
    if unreachable:
        parts.append(f"an index could not be reached ({unreachable.group(1).strip()}): check "
                     "the network and the index options (--index-url, --extra-index-url, "
                     "--find-links, or the spec's [index])")
    return "; ".join(parts)


def run_pip(args: Sequence[str], *, python: str | None = None,
            extra_env: Mapping[str, str] | None = None, timeout: float | None = None
            ) -> Completed:
    """``python -m pip ARGS`` in an isolated environment."""
    return run([python or sys.executable, "-m", "pip", *args], env=clean_env(extra_env),
               timeout=timeout)


def last_lines(text: str, n: int = 3) -> str:
    """The informative tail of a child's output, for one-line error messages."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])
