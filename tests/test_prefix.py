"""A prefix is ours only when our receipt says so; an upgrade keeps the live install until
the new one has proven itself. Through the entry points users run: ``install.sh`` (sh, as
the sysadmin runs it) and ``pyannote-bundle verify --prefix``, on small real bundles (the
tiny bundle has no pyannote, so its smoke test fails: a real failed upgrade)."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TINY_LOCK, TinyBundle

RECEIPT = ".pyannote-bundle-receipt.json"


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Every path under ``root`` with its mode and content (or link target)."""
    out: dict[str, tuple[int, bytes | str | None]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[str(path.relative_to(root))] = (st.st_mode, os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            out[str(path.relative_to(root))] = (st.st_mode, path.read_bytes())
        else:
            out[str(path.relative_to(root))] = (st.st_mode, None)
    return out


def _users_prefix(prefix: Path) -> None:
    """A folder of someone else's, holding the names an install of ours would use."""
    (prefix / "venv" / "bin").mkdir(parents=True)
    (prefix / "venv" / "bin" / "python").write_text("not ours\n")
    (prefix / "manifest.json").write_text('{"mine": true}\n')
    (prefix / "config.yaml").write_text("mine: true\n")
    (prefix / "notes.txt").write_bytes(os.urandom(1000))


def _extracted(tarball: Path, dest: Path) -> Path:
    dest.mkdir()
    with tarfile.open(tarball) as tf:
        (top,) = {m.name.split("/")[0] for m in tf.getmembers()}
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(dest)], check=True)
    return dest / top


def _install_sh(root: Path, prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"PYTHON={sys.executable}", "sh",
                           "./install.sh", str(prefix), *args], cwd=root, capture_output=True,
                          text=True)


def _verify(tarball: Path, prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pyannote-bundle", "-q", "verify", str(tarball), "--prefix",
                           str(prefix), *args], capture_output=True, text=True)


@pytest.mark.parametrize("entry", ["install.sh", "verify"])
def test_a_prefix_that_is_not_ours_is_refused_and_left_byte_for_byte(
        tmp_path: Path, tiny_bundle: TinyBundle, entry: str) -> None:
    tarball = tiny_bundle()
    prefix = tmp_path / "prefix"
    _users_prefix(prefix)
    before = _snapshot(prefix)
    if entry == "install.sh":
        proc = _install_sh(_extracted(tarball, tmp_path / "x"), prefix)
    else:
        proc = _verify(tarball, prefix, "--no-smoke")
    assert proc.returncode == 16, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "is not empty and holds no pyannote-bundle install" in last
    assert "choose a new or empty folder; nothing was changed" in last
    assert "Traceback" not in proc.stderr
    assert _snapshot(prefix) == before


def test_a_failed_first_install_leaves_an_empty_folder_as_it_was(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    prefix = tmp_path / "given"
    prefix.mkdir(mode=0o750)
    proc = _install_sh(_extracted(tiny_bundle(), tmp_path / "x"), prefix)
    assert proc.returncode == 13, proc.stderr  # no pyannote to smoke in the tiny bundle
    assert prefix.is_dir() and not any(prefix.iterdir())
    assert stat.S_IMODE(prefix.stat().st_mode) == 0o750


def test_an_upgrade_switches_in_one_step_and_never_touches_the_users_files(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    root = _extracted(tiny_bundle(), tmp_path / "x")
    prefix = tmp_path / "opt" / "diarization"
    first = _install_sh(root, prefix, "--no-smoke")
    assert first.returncode == 0, first.stderr
    old = (prefix / "current").resolve()
    links = {name: os.readlink(prefix / name) for name in
             ("venv", "config.yaml", "pyannote.env", "bin/diarize", "manifest.json")}
    (prefix / "notes.txt").write_text("mine\n")
    (prefix / "bin" / "my-tool").write_text("#!/bin/sh\n")
    second = _install_sh(root, prefix, "--no-smoke")
    assert second.returncode == 0, second.stderr
    new = (prefix / "current").resolve()
    assert new != old and not old.exists() and new.parent == prefix / "releases"
    # The paths users know did not change: they point through current/.
    assert {name: os.readlink(prefix / name) for name in links} == links
    assert str(new) in (prefix / "bin" / "diarize").read_text()
    assert (prefix / "notes.txt").read_text() == "mine\n"
    assert (prefix / "bin" / "my-tool").is_file()
    receipt = json.loads((prefix / RECEIPT).read_text())
    assert receipt["current"] == new.name and receipt["releases"] == [new.name]
    assert "notes.txt" not in receipt["created"] and "bin/diarize" in receipt["created"]


@pytest.mark.parametrize("entry", ["install.sh", "verify"])
def test_a_failed_upgrade_keeps_the_live_install_and_the_users_files(
        tmp_path: Path, tiny_bundle: TinyBundle, entry: str) -> None:
    tarball = tiny_bundle()
    root = _extracted(tarball, tmp_path / "x")
    prefix = tmp_path / "prefix"
    assert _install_sh(root, prefix, "--no-smoke").returncode == 0
    (prefix / "notes.txt").write_text("mine\n")
    before = _snapshot(prefix)
    # With its smoke test, the tiny bundle fails (no pyannote): a real failed upgrade.
    proc = _install_sh(root, prefix) if entry == "install.sh" else _verify(tarball, prefix)
    assert proc.returncode == 13, proc.stderr
    assert "Traceback" not in proc.stderr
    if entry == "install.sh":
        assert f"{prefix} still runs the previous one" in proc.stderr
    after = _snapshot(prefix)
    # Only the receipt's bookkeeping moved; every other path is as it was, byte for byte.
    assert {k: v for k, v in after.items() if k != RECEIPT} == \
        {k: v for k, v in before.items() if k != RECEIPT}
    check = subprocess.run([str(prefix / "venv/bin/python"), "-c", "import six"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_an_install_under_a_strict_umask_is_usable_by_a_service_user(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    root = _extracted(tiny_bundle(), tmp_path / "x")
    for path in [tmp_path, *tmp_path.rglob("*")]:  # the bundle itself, readable by all
        path.chmod(0o755 if path.is_dir() else 0o644)
    prefix = tmp_path / "opt" / "diarization"
    (tmp_path / "opt").mkdir(mode=0o755)
    proc = subprocess.run(["sh", "-c", 'umask 077 && exec "$@"', "sh", "env", "-i",
                           "PATH=/usr/bin:/bin", f"PYTHON={sys.executable}", "sh",
                           "./install.sh", str(prefix), "--no-smoke"], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for path in [prefix, *prefix.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        need = 0o055 if path.is_dir() else 0o044
        assert mode & need == need, f"{path}: {oct(mode)}"
    # As nobody: the venv's interpreter starts and imports the installed wheel.
    check = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                            str(prefix / "venv/bin/python"), "-c", "import six"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.fixture
def request_cleanup() -> Iterator[list[Callable[[], object]]]:
    done: list[Callable[[], object]] = []
    yield done
    for step in done:
        step()


def test_a_bundle_unpacked_under_umask_077_installs_usable_by_a_service_user(
        tiny_bundle: TinyBundle, request_cleanup: list[Callable[[], object]]) -> None:
    """tar -xf as a user with umask 077 (or cp -r of such a copy): every file of the bundle
    is 0600, every folder 0700. The release is written with modes of its own."""
    import shutil
    import tempfile

    # A folder others can reach (pytest's own tmp_path lies in a 0700 folder).
    base = Path(tempfile.mkdtemp(prefix="pyannote-bundle-umask-", dir="/tmp"))
    request_cleanup.append(lambda: shutil.rmtree(base, ignore_errors=True))
    base.chmod(0o755)
    tarball = tiny_bundle()
    # --no-same-permissions: what tar does for a user who is not root (root keeps the modes
    # recorded in the archive unless told otherwise).
    subprocess.run(["sh", "-c", 'umask 077 && tar --no-same-permissions -xf "$1" -C "$2"',
                    "sh", str(tarball), str(base)], check=True)
    (root,) = base.iterdir()
    assert stat.S_IMODE((root / "runtime/diarize.py").stat().st_mode) == 0o600
    root.chmod(0o755)  # the top folder only, so that nobody could reach it at all
    prefix = base / "diarization"
    # The distribution's python3, which every user can run (this test's own interpreter may
    # live under /root: the next test shows what the installer says then).
    system = Path("/usr/bin/python3")
    version = subprocess.run([str(system), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"{system} is not this test's Python {sys.version_info[:2]}")
    proc = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"PYTHON={system}", "sh",
                           "./install.sh", str(prefix), "--no-smoke"], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "only root can use this install" not in proc.stderr
    release = (prefix / "current").resolve()
    for path in [release / "runtime", *(release / "runtime").rglob("*"),
                 *(release / "smoke").rglob("*"), release / "manifest.json"]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"
    check = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                            str(prefix / "bin/diarize"), "--help"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr


def test_an_install_others_cannot_reach_is_said_not_silent(tmp_path: Path,
                                                           tiny_bundle: TinyBundle) -> None:
    """A prefix inside a folder only root can enter: root's install works, a service user's
    bin/diarize cannot; the installer says so, and why, and reports it."""
    root = _extracted(tiny_bundle(), tmp_path / "x")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    proc = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"PYTHON={sys.executable}", "sh",
                           "./install.sh", str(private / "diarization"), "--no-smoke",
                           "--json"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    warning = [ln for ln in proc.stderr.splitlines() if "only root can use" in ln]
    assert len(warning) == 1 and f"{private} is not searchable by other users" in warning[0]
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["service_users"]["ok"] is False


def test_a_second_install_at_the_same_time_is_refused(tmp_path: Path,
                                                      tiny_bundle: TinyBundle) -> None:
    root = _extracted(tiny_bundle(), tmp_path / "x")
    prefix = tmp_path / "prefix"
    assert _install_sh(root, prefix, "--no-smoke").returncode == 0
    before = _snapshot(prefix)
    with open(prefix / ".pyannote-bundle.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = _install_sh(root, prefix, "--no-smoke")
    assert proc.returncode == 16, proc.stderr
    assert "another install into" in proc.stderr and "nothing was changed" in proc.stderr
    assert _snapshot(prefix) == before


def test_a_receipt_that_is_not_ours_is_not_trusted(tmp_path: Path,
                                                   tiny_bundle: TinyBundle) -> None:
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / RECEIPT).write_text('{"tool": "something-else"}\n')
    (prefix / "data.bin").write_bytes(b"x" * 10)
    before = _snapshot(prefix)
    proc = _install_sh(_extracted(tiny_bundle(), tmp_path / "x"), prefix, "--no-smoke")
    assert proc.returncode == 16 and "is not a pyannote-bundle receipt" in proc.stderr
    assert _snapshot(prefix) == before


@pytest.mark.parametrize("minor", [9, 10, 12, 13])
def test_the_installer_runs_on_every_targets_python(tmp_path: Path, tiny_bundle: TinyBundle,
                                                    minor: int) -> None:
    """runtime/install.py runs with the host's own interpreter, RHEL 9's 3.9 included: the
    whole install (integrity, host, release, switch) with each, and an upgrade over it."""
    from e2e import pyenv_python

    python = pyenv_python(minor)
    if python is None:
        pytest.skip(f"no CPython 3.{minor} on this machine")
    from bundler.spec import Target

    # pip 26 has no wheel for 3.9: RHEL 9's bundles ship pip 25.2, as this lock does.
    lock = TINY_LOCK.with_name("tiny-py39.lock") if minor == 9 else TINY_LOCK
    root = _extracted(tiny_bundle(target=Target(python=f"3.{minor}"), lockfile=lock),
                      tmp_path / "x")
    prefix = tmp_path / "prefix"
    for _ in range(2):
        proc = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"PYTHON={python}", "sh",
                               "./install.sh", str(prefix), "--no-smoke"], cwd=root,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert (prefix / f"venv/lib/python3.{minor}/site-packages/six.py").is_file()
    assert len(list((prefix / "releases").iterdir())) == 1
