"""`lock`: a hashed lockfile for a recipe and target, from its committed ``.in``, and the
check that a lockfile is not stale against that ``.in``.

This host's target is locked with pip-tools (``pip-compile --generate-hashes``) in a
subprocess, isolated from the machine's pip configuration. pip-compile resolves only for
the interpreter that runs it, so another CPython version or architecture is locked with
``uv pip compile --python-version --python-platform`` (uv resolves for a target without
running on it; about 7 s for the 3.1 recipe). An existing lockfile seeds the resolution:
pins that still fit are kept. A package with no wheel for the target fails the lock with
the resolver's own line naming the package and the platform.

The lockfile records the sha256 of the ``.in`` it was made from. A relock that changes no
pin keeps the ``# pyannote-bundle: built ...`` lines of the lockfile it replaces (in
``build-backend.txt``: the wheels that backend must make from sdists, see bundler.sdist);
a changed backend drops them, and the next build prints the lines to record.

``--check`` is offline and fast: the lockfile is stale when the ``.in`` changed since, or
when a requirement of the ``.in`` is missing from the lockfile or not satisfied by its pin.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from bundler.data import data_dir
from bundler.errors import CannotWrite, InputError, LockError
from bundler.lockfile import parse_built_records, parse_lockfile
from bundler.spec import IndexOptions, Spec, Target
from bundler.subproc import clean_env, last_lines, pip_problem, run

log = logging.getLogger("bundler")

HEADER = "# pyannote-bundle: locked from {name} sha256={digest}\n"
_HEADER = re.compile(r"^# pyannote-bundle: locked from (\S+) sha256=([0-9a-f]{64})$", re.M)


@dataclass(frozen=True)
class LockPaths:
    source: Path  # the .in
    lockfile: Path  # the .txt


def default_paths(spec: Spec, output: Path | None = None, source: Path | None = None
                  ) -> LockPaths:
    src = source or Path(str(data_dir("lockfiles").joinpath(f"{spec.lockfile}.in")))
    if not src.is_file():
        raise InputError(f"no {src.name} for recipe {spec.name}; pass --input FILE")
    out = output or Path("lockfiles") / f"{spec.lockfile}-{spec.target.slug}.txt"
    return LockPaths(src, out)


def input_digest(source: Path) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()


def lock(paths: LockPaths, target: Target, index: IndexOptions,
         upgrade: bool = False) -> list[str]:
    """Write ``paths.lockfile``; return the pinned ``name==version`` lines.

    This host's target is locked by pip-compile (pip-tools); another Python version or
    architecture by ``uv pip compile --python-version --python-platform``, which resolves
    for a target without running on it (pip-compile cannot).
    """
    try:
        paths.lockfile.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _raise_if_cannot_write(paths, exc)
        raise
    with tempfile.TemporaryDirectory(prefix="pyannote-bundle-lock-") as tmp:
        out = Path(tmp) / paths.lockfile.name
        # The .in beside the output, by its bare name: "# via -r <name>.in", no local paths.
        (Path(tmp) / paths.source.name).write_bytes(paths.source.read_bytes())
        if paths.lockfile.is_file() and not upgrade:
            out.write_text(paths.lockfile.read_text())  # seed: keep the pins that still fit
        if target.matches_host():
            tool = "pip-compile"
            argv = [sys.executable, "-m", "piptools", "compile", "--quiet", "--generate-hashes",
                    "--allow-unsafe", "--strip-extras", "--no-emit-index-url",
                    "--no-emit-find-links", "--no-config", *index.pip_args(),
                    "--output-file", str(out), paths.source.name]
            if upgrade:
                argv.insert(argv.index("--generate-hashes"), "--upgrade")
            env = clean_env({"CUSTOM_COMPILE_COMMAND":
                             f"pyannote-bundle lock ({paths.source.name})"})
            # Nor anything on the caller's PYTHONPATH: a source tree's build.py shadows the
            # `build` package pip-tools imports (PYTHONPATH=. python -m bundler lock).
            env.pop("PYTHONPATH", None)
        else:
            tool = "uv pip compile"
            argv = [_uv(), "pip", "compile", "--quiet", "--generate-hashes", "--no-config",
                    "--python-version", target.python, "--python-platform", target.uv_platform,
                    "--no-emit-index-url", *index.pip_args(), "--output-file", str(out),
                    paths.source.name]
            if upgrade:
                argv.append("--upgrade")
            # UV_PYTHON_DOWNLOADS=never: without a local python3.X, uv would try to fetch one.
            env = clean_env({"UV_NATIVE_TLS": "1", "UV_PYTHON_DOWNLOADS": "never",
                             "UV_CUSTOM_COMPILE_COMMAND":
                             f"pyannote-bundle lock --target {target.slug} "
                             f"({paths.source.name})"})
        log.info("lock: %s %s for %s", tool, paths.source.name, target.slug)
        # cwd: a folder of our own, so nothing in the caller's folder shadows a module.
        res = run(argv, cwd=tmp, env=env)
        if res.returncode != 0:
            raise LockError(f"{tool} could not lock {paths.source.name} for {target.slug}: "
                            f"{_why(res.stderr or res.stdout)}")
        text = out.read_text()
    text = HEADER.format(name=paths.source.name, digest=input_digest(paths.source)) + text
    pins = {(r.name, r.version) for r in parse_lockfile(text, str(paths.lockfile))}
    text = text.rstrip("\n") + "\n" + _kept_records(paths.lockfile, pins)
    parse_lockfile(text, str(paths.lockfile))  # pinned and hashed, or refuse to write it
    tmp_out = paths.lockfile.with_name(f".{paths.lockfile.name}.partial")
    try:
        tmp_out.write_text(text)
        tmp_out.replace(paths.lockfile)
    except BaseException as exc:
        tmp_out.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            _raise_if_cannot_write(paths, exc)
        raise
    return [f"{r.name}=={r.version}" for r in parse_lockfile(text, str(paths.lockfile))]


def _kept_records(lockfile: Path, pins: set[tuple[str, str]]) -> str:
    """The built-wheel records of the lockfile being replaced, when it pins the same
    versions: the backend did not change, so neither did the wheels it must make."""
    try:
        old = lockfile.read_text()
        before = {(r.name, r.version) for r in parse_lockfile(old, str(lockfile))}
    except (OSError, InputError):
        return ""
    kept = [r.line() + "\n" for r in parse_built_records(old).values()]
    if not kept or before != pins:
        return ""
    return ("# Wheels built on the build host from sdists, and the sha256 each must have:\n"
            + "".join(sorted(kept)))


def _raise_if_cannot_write(paths: LockPaths, exc: OSError) -> None:
    if CannotWrite.matches(exc):
        raise CannotWrite("the lockfile", paths.lockfile.parent, exc, "--output") from None


def _uv() -> str:
    try:
        from uv import find_uv_bin
    except ImportError:
        raise LockError("locking for another target needs uv (pip install uv)") from None
    return str(find_uv_bin())


def _why(output: str) -> str:
    """The line of a resolver's output that says why, else its last lines."""
    problem = pip_problem(output)
    if problem:
        return problem
    for line in output.splitlines():
        text = line.strip().removeprefix("cause:").strip()
        if "has no wheels with a matching platform tag" in text or "unsatisfiable" in text:
            return text
    return last_lines(output)


def check(paths: LockPaths, target: Target) -> list[str]:
    """Problems that make ``paths.lockfile`` stale against ``paths.source`` (empty: fresh)."""
    try:
        text = paths.lockfile.read_text()
    except OSError as exc:
        raise InputError(f"{paths.lockfile}: cannot read lockfile: {exc.strerror}") from None
    pins = {r.name: r.version for r in parse_lockfile(text, str(paths.lockfile))}
    problems: list[str] = []
    env = {"python_version": target.python, "python_full_version": f"{target.python}.0",
           "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": target.arch, "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix"}
    for lineno, raw in enumerate(paths.source.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise InputError(f"{paths.source}: line {lineno}: {exc}") from None
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name} is required by {paths.source.name} but not locked")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}=={pins[name]} does not satisfy '{req}' in "
                            f"{paths.source.name}")
    m = _HEADER.search(text)
    digest = input_digest(paths.source)
    if m is None:
        problems.append(f"{paths.lockfile.name} does not record which .in it was locked from")
    elif m.group(2) != digest:
        problems.append(f"{paths.source.name} changed since {paths.lockfile.name} was locked "
                        f"(sha256 {m.group(2)[:12]}..., now {digest[:12]}...)")
    return problems
