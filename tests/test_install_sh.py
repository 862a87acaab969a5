"""install.sh on the offline host, with sh and coreutils only, and the tool's own search for
the target's Python.

A damaged bundle or a host that does not fit is refused before the prefix is touched; the
target's Python is found when python3 is another, and named when none fits.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import TinyBundle

from bundler import errors
from bundler.spec import Target


# --- offline side: install.sh, with sh and coreutils only ----------------------------------
def _extracted(tarball: Path, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(dest)], check=True)
    (root,) = dest.iterdir()
    return root


def _needs_a_missing_library(root: Path) -> None:
    """The manifest a build writes for wheels that link a library this host lacks."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["host_requirements"] = {"glibc": "2.17", "libraries": [
        {"soname": "libqqq.so.8", "required": True, "needed_by": ["torch"],
         "debian": "libqqq8", "rhel": "qqq-libs"}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    sums = [f"{hashlib.sha256((root / line[66:]).read_bytes()).hexdigest()}  {line[66:]}"
            for line in (root / "SHA256SUMS").read_text().splitlines()]
    (root / "SHA256SUMS").write_text("\n".join(sums) + "\n")


INSTALL_SH_CASES: dict[str, tuple[Callable[[Path], Any], int, str]] = {
    "host-library": (_needs_a_missing_library, 11, "libqqq.so.8 (needed by torch; install "
                     "Debian/Ubuntu: libqqq8; RHEL: qqq-libs)"),
    "changed": (lambda r: (r / "models/pyannote_model_segmentation-3.0.bin").write_bytes(b"x"),
                10, "does not match SHA256SUMS"),
    "extra": (lambda r: (r / "wheels/evil-1.0-py3-none-any.whl").write_bytes(b"PK"),
              10, "not listed in SHA256SUMS"),
    "symlink": (lambda r: (r / "models/link.bin").symlink_to("/etc/passwd"),
                10, "symbolic link"),
    "no-sums": (lambda r: (r / "SHA256SUMS").unlink(), 10, "SHA256SUMS is missing"),
}


@pytest.mark.parametrize("case", sorted(INSTALL_SH_CASES))
def test_install_sh_refuses_before_touching_the_prefix(tmp_path: Path, tiny_bundle: TinyBundle,
                                                       case: str) -> None:
    damage, code, words = INSTALL_SH_CASES[case]
    root = _extracted(tiny_bundle(), tmp_path / "x")
    damage(root)
    prefix = tmp_path / "prefix"
    proc = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "sh", "./install.sh", str(prefix)],
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode == code, proc.stderr
    assert words in proc.stderr and "nothing was installed" in proc.stderr
    assert not prefix.exists()


def test_a_module_slipped_in_beside_hostlibs_never_runs(tmp_path: Path,
                                                       tiny_bundle: TinyBundle) -> None:
    root = _extracted(tiny_bundle(), tmp_path / "x")
    ran = tmp_path / "shadow-ran"
    (root / "runtime/json.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    proc = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "sh", "./install.sh",
                           str(tmp_path / "prefix")], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 10 and "not listed in SHA256SUMS: runtime/json.py" in proc.stderr
    assert not ran.exists() and not (tmp_path / "prefix").exists()


def test_install_sh_refuses_another_python(tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    other = "3.12" if sys.version_info[:2] != (3, 12) else "3.11"
    root = _extracted(tiny_bundle(target=Target(python=other)), tmp_path / "x")
    prefix = tmp_path / "prefix"
    proc = subprocess.run(["env", "-i", f"PATH={Path(sys.executable).parent}:/usr/bin:/bin",
                           f"PYTHON={sys.executable}", "sh", "./install.sh", str(prefix)],
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode == 11, proc.stderr
    assert f"needs Python {other}" in proc.stderr
    assert not prefix.exists()


# --- interpreter discovery -----------------------------------------------------------------
def _interpreter(minor: int) -> Path:
    """A real CPython 3.<minor> binary (pyenv's, not its shim), or skip."""
    from e2e import pyenv_python

    found = pyenv_python(minor)
    if found is None:
        pytest.skip(f"no CPython 3.{minor} on this machine")
    return found


def _host_path(tmp_path: Path, **links: Path) -> str:
    """A PATH whose first folder offers exactly ``links`` (name -> interpreter)."""
    bin_dir = tmp_path / "host-bin"
    bin_dir.mkdir()
    for name, target in links.items():
        (bin_dir / name.replace("_", ".")).symlink_to(target)
    return f"{bin_dir}:/usr/bin:/bin"


def test_install_sh_finds_the_targets_python_when_python3_is_another(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    py312 = _interpreter(12)
    root = _extracted(tiny_bundle(target=Target(python="3.12")), tmp_path / "x")
    path = _host_path(tmp_path, python3=_interpreter(11), python3_12=py312)
    proc = subprocess.run(["env", "-i", f"PATH={path}", "sh", "./install.sh",
                           str(tmp_path / "prefix")], cwd=root, capture_output=True, text=True)
    assert "python3 is not Python 3.12; using python3.12" in proc.stderr, proc.stderr
    # Past every host check: the venv is 3.12 (the tiny bundle has no pyannote to smoke, and
    # a release that fails its smoke test is removed).
    assert "with Python 3.12 (" in proc.stderr
    assert proc.returncode == 13, proc.stderr
    assert not (tmp_path / "prefix").exists()


def test_install_sh_names_the_pythons_it_found_when_none_fits(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    root = _extracted(tiny_bundle(target=Target(python="3.13")), tmp_path / "x")
    path = _host_path(tmp_path, python3=_interpreter(11), python3_10=_interpreter(10))
    proc = subprocess.run(["env", "-i", f"PATH={path}", "sh", "./install.sh",
                           str(tmp_path / "prefix")], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 11, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "needs Python 3.13" in line and "python3 (3.11)" in line
    assert "python3.10 (3.10)" in line and "PYTHON=/path/to/python3.13" in line
    assert not (tmp_path / "prefix").exists()


def test_install_sh_blames_an_interpreter_that_does_not_run_not_the_bundle(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    root = _extracted(tiny_bundle(), tmp_path / "x")
    shim = tmp_path / "python3.11"  # what a pyenv shim does outside pyenv's environment
    shim.write_text("#!/bin/sh\necho 'pyenv: python3.11: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    proc = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"PYTHON={shim}", "sh",
                           "./install.sh", str(tmp_path / "prefix")], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 11, proc.stderr
    assert "does not run" in proc.stderr and "SHA256SUMS" not in proc.stderr
    assert not (tmp_path / "prefix").exists()


def test_the_tool_installs_with_the_targets_python_or_says_which_it_needs(
        tmp_path: Path) -> None:
    from bundler.offline_install import check_interpreter, find_python

    py312 = str(_interpreter(12))
    manifest = {"target": {"python": "3.12", "arch": os.uname().machine}}
    assert check_interpreter(manifest, py312)["interpreter"] == py312
    assert find_python("3.12", py312) == py312
    assert find_python(f"{sys.version_info[0]}.{sys.version_info[1]}") == sys.executable
    if sys.version_info[:2] != (3, 12):
        with pytest.raises(errors.HostMismatch, match="pass --python /path/to/python3.12"):
            check_interpreter(manifest, sys.executable)
    broken = tmp_path / "python3.12"
    broken.write_text("#!/bin/sh\nexit 127\n")
    broken.chmod(0o755)
    with pytest.raises(errors.HostMismatch, match="does not run"):
        check_interpreter(manifest, str(broken))
