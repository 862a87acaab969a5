"""Offline stage: install an unpacked bundle into a prefix, by running the bundle's own
installer (``runtime/install.py``, the program ``install.sh`` runs on the isolated host).
Named apart from it: this is the tool's side, which runs that program (``verify``, the
build's self-test, ``demo``), never a second installer.

This module only chooses the interpreter, runs that program and turns its exit status into
the tool's errors: there is one installer, and what ``verify`` proves is what the sysadmin
runs. ``make_venv`` (used by ``demo`` for its helper venv) is the installer's own function.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bundler import layout
from bundler.errors import (
    BundlerError,
    HostMismatch,
    InputError,
    InstallError,
    IntegrityError,
    NetworkAttempted,
    OutputError,
    PrefixNotOurs,
    SmokeError,
)
from bundler.runtime import install as runtime
from bundler.subproc import clean_env, last_lines, run

log = logging.getLogger("bundler")

TIMEOUT_S = 3 * 3600  # the installer bounds each of its own children; this bounds it

_ERRORS: dict[int, type[BundlerError]] = {
    runtime.EXIT_USAGE: InputError, runtime.EXIT_OUTPUT: OutputError,
    runtime.EXIT_HOST: HostMismatch,
    runtime.EXIT_INSTALL: InstallError, runtime.EXIT_SMOKE: SmokeError,
    runtime.EXIT_PREFIX: PrefixNotOurs, runtime.EXIT_NETWORK: NetworkAttempted,
}


def interpreter(python: str) -> tuple[str, str]:
    """``(version "3.X", machine)`` of the interpreter at ``python``; HostMismatch when it
    does not run (a pyenv shim outside pyenv's environment, a broken install)."""
    if python == sys.executable:
        return f"{sys.version_info[0]}.{sys.version_info[1]}", platform.machine()
    try:
        res = run([python, "-c", "import platform, sys; print('%d.%d' % sys.version_info[:2], "
                   "platform.machine())"], env=clean_env(), timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostMismatch(f"cannot run {python}: {exc}") from None
    parts = res.stdout.split()
    if res.returncode != 0 or len(parts) != 2:
        raise HostMismatch(f"{python} does not run: {last_lines(res.stderr, 1) or 'no output'} "
                           "(point --python at the interpreter itself)")
    return parts[0], parts[1]


def find_python(version: str, explicit: str | None = None) -> str | None:
    """The interpreter to install a bundle for CPython ``version`` with: ``explicit`` when
    given, else the one running this tool if it is that version, else ``python<version>``
    on PATH (as install.sh looks for it); None when there is none that runs."""
    if explicit is not None:
        return explicit
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return sys.executable
    found = shutil.which(f"python{version}")
    if found is None:
        return None
    try:
        return found if interpreter(found)[0] == version else None
    except HostMismatch:
        return None


def check_interpreter(manifest: dict[str, Any], python: str = sys.executable) -> dict[str, Any]:
    """Refuse before installing when ``python`` or this platform is not the target's, with
    the tool's own advice (``--python``); the installer checks again, with the libraries."""
    target = manifest.get("target", {})
    want_py, want_arch = str(target.get("python")), str(target.get("arch"))
    have_py, have_arch = interpreter(python)
    if sys.platform != "linux" or have_arch != want_arch:
        raise HostMismatch(f"this bundle is for linux {want_arch}; this host is "
                           f"{sys.platform} {have_arch}")
    if have_py != want_py:
        raise HostMismatch(f"this bundle is for CPython {want_py}; {python} is Python "
                           f"{have_py} (pass --python /path/to/python{want_py}, or run "
                           f"pyannote-bundle with a python{want_py})")
    return {"python": have_py, "platform": f"linux_{have_arch}", "interpreter": python}


def installer_knows(installer: Path, option: str) -> bool:
    """Whether the bundle's installer takes ``option`` (a bundle made by an older
    pyannote-bundle ships an installer without it)."""
    try:
        return f'"{option}"' in installer.read_text(errors="replace")
    except OSError:
        return False


def run_installer(bundle: Path, prefix: Path, python: str, *, smoke: bool = True,
                  use_pip: bool = False, skip_integrity: bool = False,
                  compile_bytecode: bool = True, throwaway: bool = False,
                  export: bool = True) -> dict[str, Any]:
    """Run ``bundle/runtime/install.py PREFIX --json`` with ``python`` (as install.sh runs
    it) and return its report; raise the error its exit status stands for. Its progress
    lines are passed on as they come. ``compile_bytecode=False`` for an install that is
    removed once it has been proven; ``throwaway`` too: no service user will run it, so
    whether one could is not asked. ``export=False``: no onnx export (``--no-export``), for
    an install nothing will run."""
    argv = [python, "-I", str(bundle / layout.INSTALLER), str(prefix), "--json"]
    if not smoke:
        argv.append("--no-smoke")
    if use_pip:
        argv.append("--pip")
    if skip_integrity:
        argv.append("--skip-integrity")
    if not compile_bytecode:
        argv.append("--no-compile")
    if throwaway:
        argv.append("--no-user-check")
    if not export and installer_knows(bundle / layout.INSTALLER, "--no-export"):
        argv.append("--no-export")  # a bundle's older installer exports only with its smoke
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.Popen(argv, env=clean_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace")
    except OSError as exc:
        raise HostMismatch(f"cannot run {python}: {exc}") from None
    lines: list[str] = []
    assert proc.stderr is not None and proc.stdout is not None  # both are pipes
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            log.info("%s", line.rstrip("\n"))
        out = proc.stdout.read()
        code = proc.wait(timeout=TIMEOUT_S)
    except KeyboardInterrupt:
        # Ctrl-C reached the installer too (one process group): let it remove its release.
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    try:
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = {"ok": False, "error": last_lines("\n".join(lines), 1) or f"exit {code}"}
    if code == 0 and report.get("ok"):
        return report
    message = str(report.get("error") or f"the installer exited {code}")
    if code == runtime.EXIT_INTEGRITY:
        raise IntegrityError(bundle.name, message)
    raise _ERRORS.get(code, InstallError)(message)


def make_venv(python: str, venv: Path, wheels: Path, lock: Path,
              compile_bytecode: bool = True) -> str:
    """A venv with ``lock`` installed from ``wheels`` alone, made the way the installer
    makes the one it installs (it is the installer's function); returns the method."""
    try:
        return runtime.make_venv(python, venv, wheels, lock, compile_bytecode=compile_bytecode)
    except runtime.Failure as exc:
        raise InstallError(str(exc)) from None
