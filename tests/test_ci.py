"""CI installs its test tools from a hashed lock that matches what the project declares."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bundler.lockfile import parse_lockfile

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / ".ci" / "requirements-test.txt"


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["optional-dependencies"]["test"]]


def test_the_test_lock_pins_every_declared_test_tool_by_hash() -> None:
    pins = {r.name: r.version for r in parse_lockfile(LOCK.read_text(), str(LOCK))}
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} (pyproject's [test]) is not in {LOCK.name}: relock"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} breaks '{req}'"
    assert "pip" in pins, "pip itself is pinned too"


def test_the_lock_source_lists_what_pyproject_declares() -> None:
    source = (ROOT / ".ci" / "requirements-test.in").read_text()
    listed = {canonicalize_name(Requirement(line).name) for line in source.splitlines()
              if line.strip() and not line.startswith("#")}
    assert {canonicalize_name(r.name) for r in _declared()} | {"pip"} == listed


def test_ci_makes_fresh_venvs_and_installs_the_tools_by_hash_the_project_as_users_do() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert len(re.findall(r"-m venv --clear ", script)) == 2
    assert "--require-hashes" in script and "-r .ci/requirements-test.txt" in script
    assert "'.[test]'" not in script and "--upgrade pip" not in script
    assert re.search(r"pip install --quiet --index-url https://pypi.org/simple \.$", script,
                     re.M), "the project itself, with its dependencies resolved by pip"


def test_ci_installs_the_system_packages_the_slow_tests_run_and_starts_none() -> None:
    """The Slurm job array test (tests/slurm.py) fails, never skips, where Slurm is missing:
    CI installs it, with one index update for every package, and its services stay off
    (the test starts and stops its own daemons)."""
    script = (ROOT / ".ci" / "run").read_text()
    assert len(re.findall(r"apt-get update", script)) == 1
    assert re.search(r"^\s*apt_install --no-install-recommends slurm-wlm munge$", script, re.M)
    assert "exit 101" in script and "trap 'rm -f /usr/sbin/policy-rc.d' EXIT" in script
    assert not re.search(r"\b(systemctl|service|invoke-rc\.d) ", script)


def test_ci_installs_what_the_service_tests_run() -> None:
    """tests/test_e2e_serve.py posts with the real curl and brings loopback up in a fresh
    network namespace with ip: a host without them must get them, not a failed test."""
    script = (ROOT / ".ci" / "run").read_text()
    checked = re.search(r"^for tool in (.*); do$", script, re.M)
    assert checked and {"curl", "ip", "strace"} <= set(checked.group(1).split())
    installed = re.search(r"^\s*apt_install strace ((?:.|\\\n)*?)$(?<!\\)", script, re.M)
    assert installed and {"curl", "iproute2"} <= set(installed.group(1).replace("\\", " ")
                                                       .split())


def test_every_package_of_the_tool_is_in_the_wheel() -> None:
    """pyproject lists the packages by name (templates/ and lockfiles/ are mapped in): a
    new subpackage left out installs nowhere, and only a non-editable install shows it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "bundler").rglob("__init__.py")}
    assert on_disk - listed == set()
