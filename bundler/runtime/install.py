"""Install an unpacked pyannote bundle into a prefix, offline: the one installer.

    python3 -I runtime/install.py PREFIX [--json] [--no-smoke] [--no-export] [--pip]

``install.sh`` runs this file after it has found the target's Python, and ``pyannote-bundle
verify`` runs the very same file from the unpacked bundle: what verify proves is what the
sysadmin runs. Standard library only, Python 3.9 and newer (it runs before the venv exists,
with the host's interpreter). In order:

1. integrity, before the prefix is touched: every file in ``SHA256SUMS`` matches (hashed on
   every core) and every file present is listed; no links, no special files;
2. the host: the target's Python and architecture, and the shared libraries the wheels
   need (``runtime/hostlibs.py``);
3. the prefix: new, empty, or holding our receipt (``.pyannote-bundle-receipt.json``, which
   lists every path this program created there). Anything else is refused, untouched. A
   prefix that is a link to a folder is that folder; a name with a control character
   (a newline) is refused before anything else;
4. a new release in ``PREFIX/releases/<id>/``: a venv made ``--without-pip``, the wheels
   installed offline with hashes by the bundled uv (or the bundled pip), models, samples,
   ``configure.py`` (absolute-path config, offline env file, ``bin/diarize``);
5. the onnx engine (``runtime/export.py``): the segmentation model and the embedding
   trunk exported to ONNX from the release's checkpoints and checked against PyTorch on the
   sample, network disabled; recorded by sha256 in ``engines.json`` and the receipt (a
   failure is a warning: ``bin/diarize`` then runs the pytorch engine, and its ``--json``
   says why in ``engine_note``; onnxruntime is imported alone first: where loading it
   kills the process, that is the recorded failure). Made with ``--no-smoke`` too
   (``pyannote-bundle image`` installs so); ``--no-export`` skips it, and ``engines.json``
   says so;
   then, unless ``--no-smoke``, the smoke test in that release, in a fresh network
   namespace where the host allows one: ``bin/diarize`` on the bundled sample as wav, mp3
   and m4a, compared with ``smoke/expected.json`` when the bundle carries it, and
   ``bin/serve`` on loopback in the same namespace answering one request with the sample;
6. only then the switch, in one rename: ``PREFIX/current`` points at the new release, and
   ``PREFIX/config.yaml``, ``pyannote.env``, ``bin/diarize``, ``venv``, ... point through
   ``current``, so the paths users know keep working across upgrades. The previous release
   is removed after the switch. A failure at any step removes the new release and nothing
   else: an upgrade that fails leaves the previous install as it was.

Exit codes (install.sh's, and pyannote-bundle's): 0 installed, 2 bad usage (a prefix with
a control character), 5 cannot write
the prefix (disk full, permissions), 10 damaged bundle, 11 wrong host, 12 install failed,
13 smoke failed or differs from the expected result, 15 the smoke run tried the network,
16 the prefix holds files that are not ours. ``--json`` prints one report on stdout.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

CHECKSUMS = "SHA256SUMS"
MANIFEST = "manifest.json"
LOCK = "requirements.lock"
WHEELS = "wheels"
CONFIGURE = "configure.py"
HOSTLIBS = "runtime/hostlibs.py"
SMOKE = "smoke/smoke.py"
EXPECTED = "smoke/expected.json"
# What a release holds beside its venv, copied from the bundle.
COPIED = ("models", "smoke", "runtime")

RECEIPT = ".pyannote-bundle-receipt.json"
LOCKFILE = ".pyannote-bundle.lock"
RELEASES = "releases"
CURRENT = "current"
# The paths users know, each a link through ``current`` (made once, valid across upgrades).
STABLE = ("venv", "models", "smoke", "runtime", "config.yaml", "pyannote.env",
          "manifest.json", "smoke-result.json", "bin/diarize", "bin/transcribe", "bin/serve",
          "bin/enroll", "share/systemd/pyannote-serve.service")
# Stable paths only some releases have (bin/transcribe: a bundle with an ASR model; bin/serve
# and its unit: releases made since the service exists; bin/enroll: since voiceprints exist):
# linked when the release has it, and our link removed when an upgrade drops it.
OPTIONAL = frozenset({"bin/transcribe", "bin/serve", "bin/enroll",
                      "share/systemd/pyannote-serve.service"})
SMOKE_RESULT = "smoke-result.json"

TOLERANCE_S = 0.5  # a smoke segment boundary may move this much against expected.json
TRANSCRIPT_TOLERANCE = 0.2  # the share of the smoke transcript's words that may differ
BUFSIZE = 1 << 20
TIMEOUTS = {"venv": 300, "uv": 3600, "pip": 3600, "configure": 300, "smoke": 1800,
            "check": 120, "export": 1800}
# The onnx engine's export and check (bin/diarize --engine onnx, chosen by auto on a CPU).
EXPORT = "runtime/export.py"  # the onnx engine's export and check
ENGINES_RECEIPT = "engines.json"

EXIT_USAGE, EXIT_OUTPUT, EXIT_INTEGRITY, EXIT_HOST = 2, 5, 10, 11
EXIT_INSTALL, EXIT_SMOKE, EXIT_NETWORK, EXIT_PREFIX = 12, 13, 15, 16


class Failure(Exception):
    """A failure meant for the operator: one line and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Failure(EXIT_USAGE, f"bad arguments: {message} (see --help)")


def say(message: str) -> None:
    print(f"install: {message}", file=sys.stderr, flush=True)


def shown(name: str, limit: int = 200) -> str:
    """A file name as it may appear in a message: escaped, and cut to a sane length."""
    text = ascii(name)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


# --- 1. integrity ------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
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


def check_integrity(bundle: Path) -> dict[str, Any]:
    """Every listed file matches its sha256, and every file present is listed."""
    started = time.monotonic()
    sums = bundle / CHECKSUMS
    if not sums.is_file():
        raise Failure(EXIT_INTEGRITY, f"{CHECKSUMS} is missing: not a complete bundle; "
                                      "nothing was installed")
    listed: dict[str, str] = {}
    for number, line in enumerate(sums.read_text(errors="replace").splitlines(), 1):
        sha, sep, name = line.partition("  ")
        if not sep or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha) \
                or not name or name.startswith("/") or ".." in name.split("/"):
            raise Failure(EXIT_INTEGRITY, f"{CHECKSUMS} line {number} is not "
                                          "'<sha256>  <path>': the bundle is damaged; "
                                          "nothing was installed")
        listed[name] = sha
    present = set()
    for folder, dirs, files in os.walk(bundle):
        for name in dirs + files:
            path = Path(folder, name)
            rel = path.relative_to(bundle).as_posix()
            if path.is_symlink():
                raise Failure(EXIT_INTEGRITY, f"{shown(rel)} is a symbolic link: a bundle "
                                              "holds only regular files; nothing was installed")
            if name in files:
                if not path.is_file():
                    raise Failure(EXIT_INTEGRITY, f"{shown(rel)} is not a regular file; "
                                                  "nothing was installed")
                present.add(rel)
    extra = sorted(present - set(listed) - {CHECKSUMS})
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise Failure(EXIT_INTEGRITY, f"not listed in {CHECKSUMS}: {shown(extra[0])}{more}: "
                                      "the bundle was altered; nothing was installed")
    missing = sorted(set(listed) - present)
    if missing:
        raise Failure(EXIT_INTEGRITY, f"{shown(missing[0])} is listed in {CHECKSUMS} but "
                                      "missing: the bundle is incomplete; nothing was installed")
    sizes = {n: (bundle / n).stat().st_size for n in listed}
    names = sorted(listed, key=lambda n: -sizes[n])  # big files first
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = dict(zip(names, pool.map(lambda n: sha256_of(bundle / n), names)))
    bad = sorted(n for n in names if digests[n] != listed[n])
    if bad:
        raise Failure(EXIT_INTEGRITY, f"{shown(bad[0])} does not match {CHECKSUMS}: the "
                                      "bundle is damaged or tampered; nothing was installed")
    return {"ok": True, "files": len(names), "bytes": sum(sizes.values()),
            "seconds": round(time.monotonic() - started, 2)}


# --- 2. the host -------------------------------------------------------------------------
def load_module(path: Path, name: str) -> Any:
    """A module of the bundle by its path (this runs with -I: nothing beside it is on
    sys.path, so a file slipped in next to it cannot shadow a standard module)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise Failure(EXIT_INTEGRITY, f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def check_host(bundle: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    target = manifest.get("target") or {}
    want_py, want_arch = str(target.get("python")), str(target.get("arch"))
    have_py = "%d.%d" % sys.version_info[:2]
    have_arch = platform.machine()
    if not sys.platform.startswith("linux") or have_arch != want_arch:
        raise Failure(EXIT_HOST, f"this bundle is for linux {want_arch}; this host is "
                                 f"{sys.platform} {have_arch}; nothing was installed")
    if have_py != want_py:
        raise Failure(EXIT_HOST, f"this bundle is for CPython {want_py}; {sys.executable} is "
                                 f"Python {have_py} (run this with python{want_py}); nothing "
                                 "was installed")
    report: dict[str, Any] = {"python": have_py, "platform": f"linux_{have_arch}",
                              "interpreter": sys.executable}
    if (bundle / HOSTLIBS).is_file():
        hostlibs = load_module(bundle / HOSTLIBS, "pyannote_bundle_hostlibs")
        libraries = hostlibs.check(manifest.get("host_requirements") or {})
        if not libraries["ok"]:
            raise Failure(EXIT_HOST, f"{libraries['message']}; nothing was installed")
        report["libraries"] = libraries
    return report


# --- 3. the prefix: ours only when our receipt says so ------------------------------------
def read_receipt(prefix: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((prefix / RECEIPT).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise Failure(EXIT_PREFIX, f"{prefix / RECEIPT} cannot be read ({exc}): fix or remove "
                                   "it yourself; nothing was changed") from None
    if not isinstance(data, dict) or data.get("tool") != "pyannote-bundle":
        raise Failure(EXIT_PREFIX, f"{prefix / RECEIPT} is not a pyannote-bundle receipt; "
                                   "nothing was changed")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write beside, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_prefix_name(prefix: Path) -> None:
    """A prefix is written into ``bin/diarize``'s comment line and the installer's messages:
    a newline (or any control character) in it would end that line, and sh would run the
    rest as a command. Refused before anything is touched."""
    bad = [c for c in str(prefix) if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0]
    if bad:
        raise Failure(EXIT_USAGE, f"the prefix {shown(str(prefix))} holds a control "
                                  f"character ({shown(bad[0])}): choose a name without one; "
                                  "nothing was changed")


def resolve_prefix(prefix: Path) -> Path:
    """A prefix that is a link to a folder is that folder (said in one line); the folder is
    then claimed as any other: empty or ours, else refused. A link to anything else is left
    for ``claim`` to refuse."""
    if not prefix.is_symlink():
        return prefix
    try:
        target = prefix.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, or a loop (RuntimeError before 3.13)
        return prefix
    if not target.is_dir():
        return prefix
    say(f"{shown(str(prefix))} is a link to {shown(str(target))}: installing there")
    return target


def claim(prefix: Path) -> dict[str, Any]:
    """The receipt of ``prefix``, made (and the folder too) when the prefix is new or empty.
    A prefix with anything else in it is refused before one byte changes."""
    if prefix.is_symlink() or (prefix.exists() and not prefix.is_dir()):
        raise Failure(EXIT_PREFIX, f"{prefix} exists and is not a folder; nothing was changed")
    receipt = read_receipt(prefix) if prefix.is_dir() else None
    if receipt is not None:
        return receipt
    created = not prefix.exists()
    if not created:
        entries = sorted(p.name for p in prefix.iterdir())
        if entries:
            more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
            raise Failure(EXIT_PREFIX, f"{prefix} is not empty and holds no pyannote-bundle "
                                       f"install (it has {shown(entries[0])}{more}): choose a "
                                       "new or empty folder; nothing was changed")
    prefix.mkdir(parents=True, exist_ok=True)
    receipt = {"tool": "pyannote-bundle", "format": 1, "prefix_created": created,
               "created": [RECEIPT], "releases": [], "current": None}
    write_json(prefix / RECEIPT, receipt)
    return receipt


def remove_ours(prefix: Path, receipt: dict[str, Any], release: str) -> None:
    """Remove a release this program made (its name is in our receipt), nothing else."""
    path = prefix / RELEASES / release
    if release in receipt["releases"] and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    receipt["releases"] = [r for r in receipt["releases"] if r != release]
    write_json(prefix / RECEIPT, receipt)


def abandon(prefix: Path, receipt: dict[str, Any]) -> None:
    """After a failed first install: the prefix as it was (gone if this program made it)."""
    if receipt.get("current") or receipt["releases"]:
        return
    releases = prefix / RELEASES
    if RELEASES in receipt["created"] and releases.is_dir() and not any(releases.iterdir()):
        releases.rmdir()
    for name in (LOCKFILE, RECEIPT):
        (prefix / name).unlink(missing_ok=True)
    if receipt.get("prefix_created") and not any(prefix.iterdir()):
        prefix.rmdir()


def link(prefix: Path, name: str, receipt: dict[str, Any]) -> None:
    """``PREFIX/name`` -> ``current/name``, made once; a path that is not ours is left."""
    path = prefix / name
    target = os.path.relpath(prefix / CURRENT / name, path.parent)
    if path.is_symlink() and os.readlink(path) == target:
        return
    if path.exists() or path.is_symlink():
        if name not in receipt["created"]:
            say(f"{path} exists and is not ours: left as it is (use {prefix / CURRENT / name})")
            return
        path.unlink()
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True)
        top = path.parent.relative_to(prefix).parts[0]
        if top not in receipt["created"]:
            receipt["created"].append(top)
    os.symlink(target, path)
    if name not in receipt["created"]:
        receipt["created"].append(name)


def unlink_ours(prefix: Path, name: str, receipt: dict[str, Any]) -> None:
    """Remove ``PREFIX/name`` when it is our link (the receipt says so); else leave it."""
    path = prefix / name
    if name in receipt["created"] and path.is_symlink():
        path.unlink()
    if name in receipt["created"]:
        receipt["created"].remove(name)


# --- 4. the release ----------------------------------------------------------------------
def run(argv: list[str], what: str, timeout_key: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                              errors="replace", stdin=subprocess.DEVNULL,
                              timeout=TIMEOUTS[timeout_key])
    except subprocess.TimeoutExpired:
        raise Failure(EXIT_INSTALL, f"{what} did not finish in {TIMEOUTS[timeout_key]} s") \
            from None
    except OSError as exc:
        raise Failure(EXIT_INSTALL, f"cannot run {what}: {exc}") from None


def exit_text(returncode: int) -> str:
    """How a child process ended, in words: ``exit 3``, or ``killed by signal 11 (SIGSEGV)``
    (subprocess reports a signal as a negative status, which ``exit -11`` would hide)."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown signal"
    return f"killed by signal {-returncode} ({name})"


def failed(what: str, proc: subprocess.CompletedProcess[str]) -> str:
    """One line for a child that failed: how it ended, and the last line it printed."""
    last = tail(proc.stderr, 1)
    return f"{what} failed: {exit_text(proc.returncode)}" + (f"; it said: {last}" if last else "")


def tail(text: str, n: int = 2) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(line[:300] for line in lines[-n:])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "UV_", "PYTHON")) and k not in (
               "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "VIRTUAL_ENV")}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    env.update(extra or {})
    return env


def make_venv(python: str, venv: Path, wheels: Path, lock: Path, use_pip: bool = False,
              compile_bytecode: bool = True) -> str:
    """The venv, made without pip (hosts without python3-venv/ensurepip work too), and the
    wheels installed offline with hashes: the bundled uv (fast: it links files from a cache
    beside the venv, dropped afterwards), else the bundled pip. Both compile bytecode, so a
    service user who cannot write the venv starts fast, unless ``compile_bytecode`` is
    False: for a venv removed right after its use (verify's, the self-test's), where
    compiling every module of torch would cost more than the smoke test imports."""
    res = run([python, "-m", "venv", "--without-pip", str(venv)], "python -m venv", "venv",
              child_env())
    if res.returncode != 0:
        raise Failure(EXIT_INSTALL, f"cannot create a venv with {python}: {tail(res.stderr)}")
    vpython = venv / "bin" / "python"
    uvs = sorted(wheels.glob("uv-*.whl"))
    if uvs and not use_pip:
        error = uv_install(uvs[-1], vpython, venv.parent / ".uv-install", wheels, lock,
                           compile_bytecode)
        if error is None:
            return "venv --without-pip + bundled uv"
        say(f"uv could not install the wheels ({error}); using pip")
    pips = sorted(wheels.glob("pip-*.whl"))
    if not pips:
        raise Failure(EXIT_INSTALL, "the bundle ships no pip wheel and uv could not install: "
                                    "rebuild the bundle")
    say("installing the wheels offline with the bundled pip")
    res = run([str(vpython), str(pips[-1] / "pip"), "install", "--quiet", "--no-index",
               "--no-cache-dir", "--disable-pip-version-check", "--find-links", str(wheels),
               "--require-hashes", "-r", str(lock),
               *([] if compile_bytecode else ["--no-compile"])], "pip install", "pip",
              child_env())
    if res.returncode != 0:
        raise Failure(EXIT_INSTALL, "pip could not install the bundled wheels offline: "
                                    f"{tail(res.stderr or res.stdout)}")
    return "venv --without-pip + bundled pip"


def uv_install(wheel: Path, vpython: Path, work: Path, wheels: Path, lock: Path,
               compile_bytecode: bool = True) -> str | None:
    """Install with the uv binary inside ``wheel``; None on success, else why not."""
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            name = next((n for n in zf.namelist() if n.endswith(".data/scripts/uv")), None)
            if name is None:
                return f"{wheel.name} holds no uv binary"
            binary = work / "uv"
            with zf.open(name) as src, open(binary, "wb") as dst:
                shutil.copyfileobj(src, dst, BUFSIZE)
        binary.chmod(0o755)
        say("installing the wheels offline with the bundled uv")
        # UV_NO_INSTALLER_METADATA: no INSTALLER, REQUESTED, direct_url.json (the wheel's
        # path) or uv_cache.json (stamped with the wheel file's mtime: the moment the bundle
        # was unpacked) in any dist-info, nor their lines in RECORD: the same venv on every
        # run and host, so an image's venv layer is the same blob (uv >= 0.5; pip writes
        # nothing of the moment).
        # Bytecode: py_compile's default, hash-checked when SOURCE_DATE_EPOCH is set (the
        # image sets it), else stamped with the sources' mtimes, as pip does.
        env = child_env({"UV_NO_CONFIG": "1", "UV_CACHE_DIR": str(work / "cache"),
                         "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1",
                         "UV_NO_INSTALLER_METADATA": "1"})
        res = run([str(binary), "pip", "install", "--offline", "--no-index", "--find-links",
                   str(wheels), "--require-hashes", "-r", str(lock), "--python", str(vpython),
                   "--link-mode", "hardlink", "--quiet",
                   *(["--compile-bytecode"] if compile_bytecode else [])], "uv", "uv", env)
        if res.returncode != 0:
            return tail(res.stderr or res.stdout, 1) or f"exit {res.returncode}"
        return None
    except (OSError, zipfile.BadZipFile) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        return str(exc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def normalise_modes(root: Path) -> None:
    """Folders 0755, files 0644, whatever the source's modes were."""
    os.chmod(root, 0o755)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)


def closed_to_others(release: Path) -> list[str]:
    """Why a service user could not run this release, when root installs it: the release's
    ``bin/diarize --help`` is run as ``nobody`` (setpriv), which needs the venv's real
    interpreter (a pyenv under /root: the venv links there), the runtime and the folders
    on the way to them. Empty when it runs, or when there is no way to try (not root, no
    setpriv, no nobody)."""
    setpriv = shutil.which("setpriv") or ("/usr/bin/setpriv"
                                          if os.access("/usr/bin/setpriv", os.X_OK) else None)
    if os.geteuid() != 0 or setpriv is None:
        return []
    try:
        import pwd

        nobody = pwd.getpwnam("nobody")
    except (ImportError, KeyError):
        return []
    try:
        res = run([setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                   "--clear-groups", str(release / "bin" / "diarize"), "--help"],
                  "bin/diarize as nobody", "check", {"PATH": "/usr/bin:/bin",
                                                      "LANG": "C.UTF-8"})
    except Failure:  # setpriv itself could not run: nothing learnt
        return []
    if res.returncode == 0:
        return []
    problems = [f"bin/diarize --help as nobody exits {res.returncode}: "
                f"{tail(res.stderr or res.stdout, 1)}"]
    python = Path(os.path.realpath(release / "venv" / "bin" / "python"))
    for target in (release, python):
        closed = next((f for f in target.parents if f.is_dir()
                       and not f.stat().st_mode & 0o001), None)
        if closed is not None:
            problems.append(f"{closed} is not searchable by other users ({target} is in it)")
    return problems


def reachable_by_others(path: Path) -> bool:
    """Whether every folder on the way to ``path`` (and it) lets other users through."""
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


def populate(bundle: Path, release: Path, use_pip: bool, compile_bytecode: bool) -> str:
    method = make_venv(sys.executable, release / "venv", bundle / WHEELS, bundle / LOCK,
                       use_pip, compile_bytecode)
    for name in COPIED:
        if (bundle / name).is_dir():
            # Modes of our own, not the source's: a bundle unpacked or copied under umask
            # 077 (tar -xf as a user, cp -r) has 0600/0700 files, which a service user
            # could not read. Nothing copied here is executed directly.
            shutil.copytree(bundle / name, release / name, copy_function=shutil.copyfile)
            normalise_modes(release / name)
    shutil.copyfile(bundle / MANIFEST, release / MANIFEST)
    os.chmod(release / MANIFEST, 0o644)
    res = run([sys.executable, "-I", str(bundle / CONFIGURE), str(release)], "configure.py",
              "configure", child_env())
    if res.returncode != 0:
        raise Failure(EXIT_INSTALL, f"cannot write {release / 'config.yaml'}: "
                                    f"{tail(res.stderr)}")
    return method


# --- 5. the smoke test -------------------------------------------------------------------
def isolation() -> tuple[str, list[str], bool]:
    """(name, argv prefix, socket guard): a fresh network namespace where the host allows
    one (``unshare -n`` as root, ``unshare -rn`` with user namespaces), else an in-process
    guard that makes every connect fail."""
    unshare = shutil.which("unshare") or next(
        (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.access(p, os.X_OK)), None)
    if unshare:
        for flags, name in (("-n", "network namespace (unshare -n)"),
                            ("-rn", "user and network namespace (unshare -rn)")):
            try:
                ok = subprocess.run([unshare, flags, "true"], capture_output=True,
                                    timeout=TIMEOUTS["check"]).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                return name, [unshare, flags], False
    return "in-process socket guard (no network namespace available)", [], True


def export_engines(release: Path) -> dict[str, Any]:
    """The onnx engine, made on this host from this release's own checkpoints:
    ``runtime/export.py`` writes ``onnx/*.onnx`` and ``engines.json`` (their
    sha256, and how they compared with PyTorch on the sample: scores and embeddings within
    1e-4, the same RTTM). Network disabled, like the smoke test. A failure is said and
    recorded, never fatal: bin/diarize then runs the pytorch engine, which needs nothing
    exported. Made here rather than at build: no bundle bytes, and the proof is on the host
    that will run it."""
    if not (release / EXPORT).is_file():
        return {"ok": None, "skipped": "this bundle has no runtime/export.py"}
    name, wrap, _guard = isolation()
    started = time.monotonic()
    home = tempfile.mkdtemp(prefix="pyannote-bundle-export-home-")
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"}
    onnx: dict[str, Any]
    proc = None
    try:
        why_not = onnxruntime_loads(release, wrap, env)
        if why_not is None:
            say(f"onnx engine: exporting the segmentation model and the embedding trunk, "
                f"checked against PyTorch on the sample (network disabled by {name})")
            proc = run([*wrap, str(release / "venv" / "bin" / "python"), "-I",
                        str(release / EXPORT), str(release)], "the ONNX export",
                       "export", env)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if proc is None:
        onnx = {"ok": False, "error": why_not, "onnxruntime_loads": False}
        write_json(release / ENGINES_RECEIPT, {"onnx": onnx})
    else:
        try:
            onnx = json.loads(proc.stdout.strip().splitlines()[-1])["onnx"]
        except (ValueError, IndexError, KeyError, TypeError):
            # A child killed by a signal (a native library's crash) printed nothing: say so.
            onnx = {"ok": False, "error": failed("the ONNX export", proc)}
            write_json(release / ENGINES_RECEIPT, {"onnx": onnx})
    if onnx.get("ok"):
        check = onnx.get("check") or {}
        say(f"onnx engine: ready in {time.monotonic() - started:.0f} s (embeddings within "
            f"{check.get('embedding_max_abs_diff', 0):.1e}, segmentation within "
            f"{check.get('segmentation_max_abs_diff', 0):.1e}, RTTM {check.get('rttm')})")
    else:
        say(f"warning: onnx engine not used on this host: {onnx.get('error')}; bin/diarize "
            "runs the pytorch engine")
    return onnx


def skip_export(release: Path, why: str) -> dict[str, Any]:
    """No onnx export, and ``engines.json`` says why: ``bin/diarize --json`` then reports
    the pytorch engine with that reason as its ``engine_note``."""
    onnx: dict[str, Any] = {"ok": None, "skipped": why}
    if (release / EXPORT).is_file():
        write_json(release / ENGINES_RECEIPT, {"onnx": onnx})
    say(f"onnx engine: not exported ({why}); bin/diarize runs the pytorch engine")
    return onnx


# The onnx engine's library, imported alone in the release's venv before the export.
ORT_PROBE = ("import importlib.metadata as m; print(m.version('onnxruntime'), flush=True); "
             "import onnxruntime")


def onnxruntime_loads(release: Path, wrap: list[str], env: dict[str, str]) -> str | None:
    """None when the release's venv imports onnxruntime, else why not (one line). Tried in
    a child of its own: onnxruntime probes the CPU when its library loads, and where that
    probe crashes the process dies of a signal (measured: SIGSEGV for onnxruntime 1.28 on
    aarch64 under qemu-user 7.2, which shows the guest the host's x86 ``/proc/cpuinfo``);
    the export would die the same way, only later. bin/diarize imports onnxruntime for the
    onnx engine alone (``engines.onnxruntime_deferred``), so the pytorch engine still runs."""
    try:
        proc = run([*wrap, str(release / "venv" / "bin" / "python"), "-I", "-c", ORT_PROBE],
                   "importing onnxruntime", "check", env)
    except Failure as exc:
        return str(exc)
    if proc.returncode == 0:
        return None
    version = proc.stdout.strip().splitlines()[:1]
    why = failed(" ".join(["importing onnxruntime", *version]), proc)
    if proc.returncode < 0 and platform.machine() in ("aarch64", "arm64") \
            and not arm_cpuinfo():
        why += ("; /proc/cpuinfo describes no ARM CPU (as under an emulator: qemu-user 7.2 "
                "shows the guest the host's), and onnxruntime's CPU probe reads it")
    return why


def arm_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether ``path`` describes ARM CPUs, as the kernel writes it on one."""
    try:
        return "CPU implementer" in path.read_text(errors="replace")
    except OSError:
        return False


def smoke(release: Path) -> dict[str, Any]:
    """``smoke/smoke.py`` (bin/diarize on the samples) in the new release, network disabled.

    The child also tries a loopback listener of ours: inside a fresh namespace even
    loopback is down, so a probe that gets through proves the isolation failed."""
    name, wrap, guard = isolation()
    listener = None
    argv = [*wrap, str(release / "venv" / "bin" / "python"), str(release / SMOKE),
            "--prefix", str(release)]
    try:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        argv += ["--probe", "127.0.0.1:%d" % listener.getsockname()[1]]
    except OSError:  # no loopback here: this process is already in an empty namespace
        if listener is not None:
            listener.close()
        listener = None
    if guard:
        argv.append("--guard-sockets")
    home = tempfile.mkdtemp(prefix="pyannote-bundle-smoke-home-")
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"}
    also = (", bin/transcribe on the dialogue" if (release / "bin" / "transcribe").exists()
            else "")
    if (release / "bin" / "enroll").exists():
        also += ", bin/enroll on one voice of the sample, then named by bin/diarize"
    if (release / "bin" / "serve").exists():
        also += ", bin/serve answering it on loopback"
    say(f"smoke test: bin/diarize on the sample as wav, mp3 and m4a{also}, network disabled "
        f"by {name}")
    try:
        proc = run(argv, "the smoke test", "smoke", env)
    finally:
        if listener is not None:
            listener.close()
        shutil.rmtree(home, ignore_errors=True)
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise Failure(EXIT_SMOKE, f"smoke.py printed no result (exit {proc.returncode}): "
                                  f"{tail(proc.stderr)}") from None
    result["network_isolation"] = name
    (release / SMOKE_RESULT).write_text(json.dumps(result, indent=2) + "\n")
    if result.get("network_attempts"):
        first = (result.get("network_attempt_details") or ["?"])[0]
        raise Failure(EXIT_NETWORK, f"the smoke diarization made {result['network_attempts']} "
                                    f"connection attempt(s) with the network disabled (first: "
                                    f"{str(first)[:200]}); an isolated host must see none")
    if not result.get("ok"):
        # The error names bin/serve when the service's part failed.
        what = "test" if (result.get("serve") or {}).get("ok") is False else "diarization"
        raise Failure(EXIT_SMOKE, f"smoke {what} failed: {result.get('error')}")
    if any(v != "blocked" for v in (result.get("network_probes") or {}).values()):
        raise Failure(EXIT_SMOKE, f"the smoke process reached the network through {name}: "
                                  "isolation failed")
    return result


def compare(result: dict[str, Any], expected: dict[str, Any]) -> None:
    """Fail when the result differs from the one recorded on the build host: the wav's
    segments, and each container's where the expected result has them; the transcript's
    words where the bundle transcribes; the enrolled voice named where it was named there."""
    _compare("sample", result, expected)
    for fmt, want in sorted((expected.get("formats") or {}).items()):
        _compare(f"sample.{fmt}", (result.get("formats") or {}).get(fmt) or {}, want)
    named = (expected.get("voiceprints") or {}).get("ok")
    if named and not (result.get("voiceprints") or {}).get("ok"):
        # The same models named the enrolled voice on the build host: here they must too.
        raise Failure(EXIT_SMOKE, "smoke voiceprints: the build host's install named the "
                                  "enrolled voice, this one did not: "
                                  f"{(result.get('voiceprints') or {}).get('not_shown')}")
    want = expected.get("transcript")
    if want is not None:
        got = result.get("transcript") or {}
        # CTranslate2 picks kernels by CPU (AVX2, AVX-512, NEON): a word may differ between
        # hosts, a different transcript may not.
        if got.get("speakers") != want.get("speakers"):
            raise Failure(EXIT_SMOKE, f"smoke transcript of the dialogue has "
                                      f"{got.get('speakers')} speakers, the build host's had "
                                      f"{want.get('speakers')}")
        changed = word_changes(str(want.get("text", "")), str(got.get("text", "")))
        total = max(1, len(words(str(want.get("text", "")))))
        if changed / total > TRANSCRIPT_TOLERANCE:
            raise Failure(EXIT_SMOKE, f"smoke transcript differs from the build host's in "
                                      f"{changed} of {total} words: got '{got.get('text')}', "
                                      f"expected '{want.get('text')}'")


def words(text: str) -> list[str]:
    """Words, lowercased, punctuation stripped ("don't" -> "dont", "well-known" -> "well
    known", "4,000." -> "4000")."""
    text = text.lower().replace("-", " ")
    return re.sub(r"[^\w\s]", "", text).split()


def word_changes(reference: str, hypothesis: str) -> int:
    """Word-level edit distance (substitutions, insertions, deletions) after ``words``: the
    numerator of a word error rate."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def _compare(what: str, result: dict[str, Any], expected: dict[str, Any]) -> None:
    got, want = result.get("segments") or [], expected.get("segments") or []
    if result.get("speakers") != expected.get("speakers") or len(got) != len(want):
        raise Failure(EXIT_SMOKE, f"smoke result for {what} differs from the build host's: "
                                  f"{len(got)} segments / {result.get('speakers')} speakers, "
                                  f"expected {len(want)} / {expected.get('speakers')}")
    for g, w in zip(got, want):
        if abs(g["start"] - w["start"]) > TOLERANCE_S or abs(g["end"] - w["end"]) > TOLERANCE_S:
            raise Failure(EXIT_SMOKE, f"smoke segment {g} of {what} differs from the expected "
                                      f"{w} by more than {TOLERANCE_S} s")


# --- the whole install -------------------------------------------------------------------
RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_release_name(name: str | None) -> None:
    """A release name given with ``--release``: one plain path component."""
    if name is not None and not RELEASE_NAME.fullmatch(name):
        raise Failure(EXIT_USAGE, f"--release {shown(name)}: a release name is 1-64 letters, "
                                  "digits, '.', '_' or '-', starting with a letter or digit; "
                                  "nothing was changed")


def install(bundle: Path, prefix: Path, *, do_smoke: bool = True, use_pip: bool = False,
            skip_integrity: bool = False, compile_bytecode: bool = True,
            user_check: bool = True, release_name: str | None = None,
            do_export: bool = True) -> dict[str, Any]:
    """Install ``bundle`` into ``prefix``, steps 1-6 of this module's docstring; the report
    that ``--json`` prints. Raises Failure (one line, an exit code)."""
    check_release_name(release_name)
    check_prefix_name(prefix)
    prefix = resolve_prefix(prefix)
    check_prefix_name(prefix)
    report: dict[str, Any] = {"ok": False, "prefix": str(prefix)}
    if skip_integrity:
        report["integrity"] = {"ok": None, "skipped": True}
    else:
        say(f"checking {bundle.name} against {CHECKSUMS}")
        report["integrity"] = check_integrity(bundle)
    try:
        manifest = json.loads((bundle / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise Failure(EXIT_INTEGRITY, f"{MANIFEST} cannot be read ({exc}); nothing was "
                                      "installed") from None
    report["host"] = check_host(bundle, manifest)
    receipt = claim(prefix)
    import fcntl

    lock_fd = os.open(prefix / LOCKFILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise Failure(EXIT_PREFIX, f"another install into {prefix} is running; nothing "
                                       "was changed") from None
        receipt = read_receipt(prefix) or receipt  # as the last install left it
        if LOCKFILE not in receipt["created"]:
            receipt["created"].append(LOCKFILE)
        try:
            for stale in [r for r in receipt["releases"] if r != receipt.get("current")]:
                say(f"removing {RELEASES}/{stale}, left by an install that did not finish")
                remove_ours(prefix, receipt, stale)
            report["install"] = _install_release(bundle, prefix, receipt, manifest, do_smoke,
                                                 use_pip, compile_bytecode, report,
                                                 user_check, release_name, do_export)
        except BaseException:
            abandon(prefix, receipt)
            raise
    finally:
        os.close(lock_fd)
    report["ok"] = True
    return report


def _install_release(bundle: Path, prefix: Path, receipt: dict[str, Any],
                     manifest: dict[str, Any], do_smoke: bool, use_pip: bool,
                     compile_bytecode: bool, report: dict[str, Any],
                     user_check: bool = True,
                     release_name: str | None = None,
                     do_export: bool = True) -> dict[str, Any]:
    started = time.monotonic()
    serial = int(receipt.get("serial", 0)) + 1
    digest = hashlib.sha256((bundle / CHECKSUMS).read_bytes()).hexdigest() \
        if (bundle / CHECKSUMS).is_file() else "0" * 64
    # A name of the caller's (``pyannote-bundle image``: the same path in every image, so
    # that the venv's absolute paths, and so its image layer, do not change with a model or
    # a parameter); by default the serial and the bundle's digest.
    name = release_name or f"r{serial}-{digest[:12]}"
    if name in receipt["releases"] or (prefix / RELEASES / name).exists() \
            or os.path.lexists(prefix / RELEASES / name):
        raise Failure(EXIT_PREFIX, f"{prefix / RELEASES / name} exists already: choose "
                                   "another --release; nothing was changed")
    receipt["serial"] = serial
    receipt["releases"].append(name)
    if RELEASES not in receipt["created"] and not (prefix / RELEASES).exists():
        receipt["created"].append(RELEASES)
    write_json(prefix / RECEIPT, receipt)  # before the folder exists: a crash leaves it ours
    release = prefix / RELEASES / name
    previous = receipt.get("current")
    try:
        release.mkdir(parents=True)
        say(f"installing into {release} with Python {sys.version_info[0]}."
            f"{sys.version_info[1]} ({sys.executable})"
            + (f"; the install in {prefix / RELEASES / previous} stays live until this one "
               "has passed its smoke test" if previous else ""))
        method = populate(bundle, release, use_pip, compile_bytecode)
        say(f"wheels installed offline with {method}")
        closed = closed_to_others(release) if user_check else []
        fix = ("use a python3 and a prefix other users can reach (PYTHON=/usr/bin/python3.X "
               "./install.sh PREFIX)")
        if closed and reachable_by_others(release):
            # The prefix is open to others, so it is meant for them; what they cannot run
            # (an interpreter under /root, which the venv links to) must not go live.
            raise Failure(EXIT_SMOKE, f"other users cannot run this install: "
                                      f"{'; '.join(closed)}; {fix}")
        if closed:
            # A prefix inside a private folder: root may mean to be its only user. Said,
            # never silent.
            say(f"warning: only root can use this install: {'; '.join(closed)}; {fix}")
        report["service_users"] = {"ok": not closed, "problems": closed} if user_check \
            else {"ok": None, "skipped": True}
        # The export is the install's, not the smoke test's: an install made without the
        # smoke run (an image's, a sysadmin's --no-smoke) gets the fast engine all the same.
        report["engines"] = {"onnx": export_engines(release) if do_export
                             else skip_export(release, "installed with --no-export")}
        if do_smoke:
            result = smoke(release)
            if (bundle / EXPECTED).is_file():
                compare(result, json.loads((bundle / EXPECTED).read_text()))
                result["expected"] = "match"
            report["smoke"] = result
        else:
            report["smoke"] = {"ok": None, "skipped": True}
        # The switch, in one rename: until here the previous install is untouched.
        tmp = prefix / f".{CURRENT}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(f"{RELEASES}/{name}", tmp)
        os.replace(tmp, prefix / CURRENT)
    except BaseException as exc:
        if previous:
            say(f"the new install failed; {prefix} still runs the previous one "
                f"({RELEASES}/{previous})")
        remove_ours(prefix, receipt, name)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES,
                                                      errno.EROFS, errno.EPERM):
            raise Failure(EXIT_OUTPUT, f"cannot write {release}: {exc.strerror}; free space "
                                       "or fix the permissions there, then re-run") from None
        raise
    if CURRENT not in receipt["created"]:
        receipt["created"].append(CURRENT)
    receipt["current"] = name
    receipt["bundle"] = manifest.get("bundle")
    receipt["sha256sums"] = digest
    if report.get("engines"):
        # What was exported on this host, and its proof: the files by sha256.
        receipt["engines"] = report["engines"]
    for stable in STABLE:
        if stable in OPTIONAL and not (release / stable).exists():
            unlink_ours(prefix, stable, receipt)
            continue
        link(prefix, stable, receipt)
    write_json(prefix / RECEIPT, receipt)
    if previous and previous != name:
        remove_ours(prefix, receipt, previous)
    return {"ok": True, "prefix": str(prefix), "release": str(release), "method": method,
            "bytecode_compiled": compile_bytecode,
            "packages": sum(1 for ln in (bundle / LOCK).read_text().splitlines()
                            if ln and not ln.startswith(("#", " "))),
            "seconds": round(time.monotonic() - started, 1),
            "replaced": f"{RELEASES}/{previous}" if previous else None}


def next_steps(prefix: Path) -> str:
    """What to run next, printed after an install: each line runs as printed."""
    p = str(prefix)
    api = (f'import soundfile, torch; from pyannote.audio import Pipeline; '
           f'p = Pipeline.from_pretrained("{p}/config.yaml"); '
           f'x, sr = soundfile.read("{p}/smoke/sample.wav", dtype="float32", always_2d=True); '
           'print(p({"waveform": torch.from_numpy(x.T).mean(0, keepdim=True), '
           '"sample_rate": sr}))')
    return "\n".join([
        f"Installed in {p}. Next, for a file or a folder of recordings (wav, flac, mp3, ogg, "
        "m4a, mp4, webm, ...):",
        f'  "{p}/bin/diarize" FILE_OR_FOLDER --output-dir DIR',
        f'  "{p}/bin/diarize" --help',
        "Try it on the bundled sample (writes ./diarization/sample.mp3.rttm):",
        f'  "{p}/bin/diarize" "{p}/smoke/sample.mp3"',
        "From Python, with the venv (offline by default), on audio decoded in memory:",
        f"  \"{p}/venv/bin/python\" -c '{api}'",
        *([] if not (prefix / "bin" / "transcribe").exists() else [
            "Who said what: a speaker-labelled transcript (JSON, SRT, WebVTT; --format adds "
            "txt, rttm):",
            f'  "{p}/bin/transcribe" FILE_OR_FOLDER --output-dir DIR',
            "Try it on the bundled dialogue (writes ./transcripts/dialogue.flac.srt, ...):",
            f'  "{p}/bin/transcribe" "{p}/smoke/dialogue.flac"',
        ]),
        *([] if not (prefix / "bin" / "serve").exists() else [
            "An OpenAI-compatible speech service for the network: a key for each client (printed "
            "once), then the server, which runs until stopped (on loopback only while no key "
            "exists):",
            f'  "{p}/bin/serve" keys add NAME',
            f'  "{p}/bin/serve" --host 0.0.0.0 --port 8000',
            "As a systemd service (how to enable it is in its first lines):",
            f"  {p}/share/systemd/pyannote-serve.service",
        ]),
    ])


def main(argv: list[str] | None = None) -> int:
    sys.dont_write_bytecode = True  # the bundle folder stays exactly as SHA256SUMS lists it
    as_json = False
    try:
        parser = _Parser(prog="install.py", description=__doc__.split("\n\n")[0])
        parser.add_argument("prefix", type=Path, help="where to install (made if new)")
        parser.add_argument("--json", action="store_true", help="print a report on stdout")
        parser.add_argument("--no-smoke", action="store_true",
                            help="install without the smoke test (the switch is not proven)")
        parser.add_argument("--no-export", action="store_true",
                            help="do not export the onnx engine (bin/diarize then runs the "
                                 "pytorch engine, and --json says why)")
        parser.add_argument("--pip", action="store_true",
                            help="install the wheels with the bundled pip instead of uv")
        parser.add_argument("--no-compile", action="store_true",
                            help="do not compile bytecode: for an install removed right after "
                                 "its smoke test (verify's, the build's self-test)")
        parser.add_argument("--no-user-check", action="store_true",
                            help="do not ask whether a service user could run the install "
                                 "(for one removed right after its smoke test)")
        parser.add_argument("--skip-integrity", action="store_true",
                            help="for a staged bundle on the build host (no SHA256SUMS yet)")
        parser.add_argument("--release", metavar="NAME",
                            help="name the new release NAME instead of r<serial>-<digest> "
                                 "(pyannote-bundle image: the same path in every image)")
        args = parser.parse_args(argv)
        as_json = args.json
        # The release is readable by every user, whatever the caller's umask (077 on a
        # hardened host), as dpkg and rpm install files: a service user must run it. Who may
        # use the install is the prefix folder's own mode, which we never change on a folder
        # we did not make.
        os.umask(0o022)
        bundle = Path(__file__).resolve().parent.parent
        prefix = Path(os.path.abspath(args.prefix))
        report = install(bundle, prefix, do_smoke=not args.no_smoke, use_pip=args.pip,
                         skip_integrity=args.skip_integrity,
                         compile_bytecode=not args.no_compile,
                         user_check=not args.no_user_check,
                         release_name=args.release, do_export=not args.no_export)
    except Failure as exc:
        say(str(exc))
        if as_json:
            print(json.dumps({"ok": False, "exit": exc.code, "error": str(exc)}), flush=True)
        return exc.code
    except KeyboardInterrupt:
        say("interrupted; the previous install, if any, is as it was")
        return 130
    except OSError as exc:
        code = EXIT_OUTPUT if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES,
                                            errno.EROFS, errno.EPERM) else EXIT_INSTALL
        message = f"cannot write {shown(str(exc.filename or 'the prefix'))}: {exc.strerror}"
        say(message)
        if as_json:
            print(json.dumps({"ok": False, "exit": code, "error": message}), flush=True)
        return code
    if as_json:
        print(json.dumps(report), flush=True)
        return 0
    smoke_result = report.get("smoke") or {}
    if smoke_result.get("ok"):
        served = smoke_result.get("serve") or {}
        print("install: ok - bin/diarize read %s: %d segments, %d speakers in %.1f s%s, %d "
              "connection attempts" % ("/".join(smoke_result.get("formats") or {}),
                                       len(smoke_result.get("segments") or []),
                                       smoke_result.get("speakers") or 0,
                                       smoke_result.get("seconds") or 0,
                                       "; bin/serve answered %s in %.1f s" % (
                                           served.get("endpoint"),
                                           served.get("request_seconds") or 0)
                                       if served.get("ok") else "",
                                       smoke_result.get("network_attempts") or 0))
    else:
        print("install: ok - installed without the smoke test (--no-smoke)")
    print(next_steps(Path(report["prefix"])), flush=True)  # a link's folder, resolved
    return 0


if __name__ == "__main__":
    sys.exit(main())
