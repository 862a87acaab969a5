"""Offline stage: install an unpacked bundle into a prefix, with no index and no network.

The venv is made ``--without-pip`` and pip runs from the bundled pip wheel, the same way
install.sh does it: hosts whose python3 lacks ensurepip (Debian without python3-venv)
install all the same. A marker file marks an install under way; an interrupted install
is detected and replaced on the next run, and a failed one is removed.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler import layout
from bundler.errors import HostMismatch, InstallError
from bundler.progress import task
from bundler.subproc import clean_env, last_lines, run

log = logging.getLogger("bundler")

# What a previous install of ours leaves in a prefix (and a re-run replaces).
OURS = (layout.PREFIX_VENV, layout.MODELS_DIR, layout.SMOKE_DIR, layout.RUNTIME_DIR,
        layout.PREFIX_DIARIZE, layout.PREFIX_CONFIG, layout.PREFIX_ENV, layout.PREFIX_MANIFEST,
        "smoke-result.json", layout.PREFIX_MARKER_INCOMPLETE, ".uv-install")


@dataclass(frozen=True)
class Installed:
    prefix: Path
    python: str  # the venv's interpreter
    seconds: float
    packages: int
    method: str

    def as_dict(self) -> dict[str, Any]:
        return {"ok": True, "prefix": str(self.prefix), "seconds": round(self.seconds, 1),
                "packages": self.packages, "method": self.method}


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


def check_host(manifest: dict[str, Any], python: str = sys.executable,
               bundle: Path | None = None) -> dict[str, Any]:
    """Refuse before installing when ``python`` or this platform is not the target's, or,
    given the unpacked ``bundle``, when the host lacks a library its wheels need (checked by
    the bundle's own ``runtime/hostlibs.py``, as install.sh does)."""
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
    report: dict[str, Any] = {"python": have_py, "platform": f"linux_{have_arch}",
                              "interpreter": python}
    if bundle is not None and (bundle / layout.HOSTLIBS_SCRIPT).is_file():
        report["libraries"] = _check_libraries(bundle, python)
    return report


def _check_libraries(bundle: Path, python: str) -> dict[str, Any]:
    res = run([python, "-I", str(bundle / layout.HOSTLIBS_SCRIPT),
               str(bundle / layout.MANIFEST), "--json"], env=clean_env())
    try:
        result: dict[str, Any] = json.loads(res.stdout)
    except ValueError:
        raise HostMismatch(f"cannot check this host's libraries with {python}: "
                           f"{last_lines(res.stderr, 1)}") from None
    if not result.get("ok"):
        raise HostMismatch(f"{result.get('message')}; nothing was installed")
    return result


def install(bundle: Path, prefix: Path, python: str = sys.executable) -> Installed:
    """Install the unpacked bundle at ``bundle`` into ``prefix``."""
    started = time.monotonic()
    prefix = prefix.resolve()
    created = _prepare(prefix)
    try:
        (prefix / layout.PREFIX_MARKER_INCOMPLETE).write_text("installing\n")
        method = make_venv(python, prefix / layout.PREFIX_VENV, bundle / layout.WHEELS_DIR,
                           bundle / layout.LOCK)
        for name in (layout.MODELS_DIR, layout.SMOKE_DIR, layout.RUNTIME_DIR):
            if (bundle / name).is_dir():
                shutil.copytree(bundle / name, prefix / name)
        shutil.copy2(bundle / layout.MANIFEST, prefix / layout.PREFIX_MANIFEST)
        res = run([python, str(bundle / layout.CONFIGURE), str(prefix)], env=clean_env())
        if res.returncode != 0:
            raise InstallError(f"cannot write {prefix / layout.PREFIX_CONFIG}: "
                               f"{last_lines(res.stderr, 1)}")
        (prefix / layout.PREFIX_MARKER_INCOMPLETE).unlink()
    except BaseException:
        remove_install(prefix, created)
        raise
    count = sum(1 for ln in (bundle / layout.LOCK).read_text().splitlines()
                if ln and not ln.startswith("#"))
    vpython = str(prefix / layout.PREFIX_VENV / "bin" / "python")
    return Installed(prefix, vpython, time.monotonic() - started, count, method)


def make_venv(python: str, venv: Path, wheels: Path, lock: Path) -> str:
    """Make ``venv`` and install ``lock`` into it from ``wheels`` alone; returns the method.

    The venv is made without pip (hosts without python3-venv/ensurepip work too). When the
    wheels hold uv, its binary is taken out of the wheel and installs them (faster than pip:
    it links files from a cache kept beside the venv, then drops the cache; it compiles the
    bytecode as pip does, so a service user who cannot write the venv starts fast);
    otherwise, or if uv cannot run on this host, pip runs from the newest pip wheel.
    """
    res = run([python, "-m", "venv", "--without-pip", str(venv)], env=clean_env())
    if res.returncode != 0:
        raise InstallError(f"cannot create a venv with {python}: {last_lines(res.stderr, 1)}")
    vpython = str(venv / "bin" / "python")
    uvs = sorted(wheels.glob("uv-*.whl"))
    if uvs:
        with task(f"install: uv pip install --offline into {venv}"):
            error = _uv_install(uvs[-1], vpython, venv, wheels, lock)
        if error is None:
            return "venv --without-pip + bundled uv"
        log.warning("install: uv could not install (%s); using pip", error)
    pips = sorted(wheels.glob("pip-*.whl"))
    if pips:
        pip_cmd, method = [vpython, str(pips[-1] / "pip")], "venv --without-pip + bundled pip"
    else:
        res = run([vpython, "-m", "ensurepip"], env=clean_env())
        if res.returncode != 0:
            raise InstallError("the bundle ships no pip wheel and this Python has no "
                               "ensurepip; install python3-venv or rebuild the bundle")
        pip_cmd, method = [vpython, "-m", "pip"], "venv + ensurepip"
    with task(f"install: pip install --no-index into {venv}"):
        res = run([*pip_cmd, "install", "--no-index", "--no-cache-dir", "--find-links",
                   str(wheels), "--require-hashes", "-r", str(lock),
                   "--progress-bar", "off", "--disable-pip-version-check"], env=clean_env())
    if res.returncode != 0:
        raise InstallError(f"offline pip install failed: {last_lines(res.stderr or res.stdout)}")
    return method


def _uv_install(wheel: Path, vpython: str, venv: Path, wheels: Path, lock: Path) -> str | None:
    """Install with the uv binary inside ``wheel``; None on success, else why not."""
    work = venv.parent / ".uv-install"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            name = next((n for n in zf.namelist() if n.endswith(".data/scripts/uv")), None)
            if name is None:
                return f"{wheel.name} holds no uv binary"
            binary = work / "uv"
            binary.write_bytes(zf.read(name))
        binary.chmod(0o755)
        env = clean_env({"UV_NO_CONFIG": "1", "UV_CACHE_DIR": str(work / "cache"),
                         "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"})
        env = {k: v for k, v in env.items()
               if not k.startswith("UV_") or k in ("UV_NO_CONFIG", "UV_CACHE_DIR",
                                                     "UV_PYTHON_DOWNLOADS", "UV_NO_PROGRESS")}
        res = run([str(binary), "pip", "install", "--offline", "--no-index", "--find-links",
                   str(wheels), "--require-hashes", "-r", str(lock), "--python", vpython,
                   "--link-mode", "hardlink", "--compile-bytecode", "--quiet"], env=env)
        if res.returncode != 0:
            return last_lines(res.stderr or res.stdout, 1) or f"exit {res.returncode}"
        return None
    except OSError as exc:
        return str(exc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare(prefix: Path) -> bool:
    """Make ``prefix`` ready; True if this call created it. Refuses a foreign, non-empty one."""
    if not prefix.exists():
        prefix.mkdir(parents=True)
        return True
    if not prefix.is_dir():
        raise InstallError(f"{prefix} exists and is not a folder")
    entries = {p.name for p in prefix.iterdir()}
    if entries and not entries & {layout.PREFIX_MARKER_INCOMPLETE, layout.PREFIX_MANIFEST}:
        raise InstallError(f"{prefix} is not empty and holds no earlier install; choose an "
                           "empty or new folder")
    if entries:
        log.info("install: replacing the earlier install in %s", prefix)
        remove_install(prefix, created=False)
    return False


def remove_install(prefix: Path, created: bool) -> None:
    """Remove what an install put in ``prefix`` (the whole folder if it made it)."""
    if created:
        shutil.rmtree(prefix, ignore_errors=True)
        return
    for name in OURS:
        path = prefix / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    bin_dir = (prefix / layout.PREFIX_DIARIZE).parent
    if bin_dir.is_dir() and not any(bin_dir.iterdir()):
        bin_dir.rmdir()  # only when it held nothing but ours
