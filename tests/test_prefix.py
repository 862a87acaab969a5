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


def test_an_open_prefix_with_an_interpreter_others_cannot_run_is_refused(
        tiny_bundle: TinyBundle, request_cleanup: list[Callable[[], object]]) -> None:
    """A prefix others can reach, installed with a python3 only root can reach (a pyenv
    under /root: the venv links to it): every service user would get exit 126. Refused
    before the switch, with the reason; nothing is left."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="pyannote-bundle-open-", dir="/tmp"))
    request_cleanup.append(lambda: shutil.rmtree(base, ignore_errors=True))
    base.chmod(0o755)
    private = base / "root-only"
    private.mkdir(mode=0o700)
    (private / "python3").symlink_to(sys.executable)
    root = _extracted(tiny_bundle(), base / "x")
    prefix = base / "diarization"
    proc = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"PYTHON={private}/python3", "sh",
                           "./install.sh", str(prefix), "--no-smoke"], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 13, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "other users cannot run this install" in last and "Traceback" not in proc.stderr
    assert "PYTHON=/usr/bin/python3" in last
    assert not prefix.exists()  # a first install that fails leaves nothing


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


# --- hostile prefix names, links ------------------------------------------------------------
@pytest.mark.parametrize("entry", ["install.sh", "verify"])
@pytest.mark.parametrize("char", ["\n", "\t", "\x1b"])
def test_a_prefix_with_a_control_character_is_refused_before_anything(
        tmp_path: Path, tiny_bundle: TinyBundle, entry: str, char: str) -> None:
    """The prefix is written into bin/diarize's comment line: after a newline, the rest of
    the name would be a command. Refused, exit 2, one line, nothing made or touched."""
    tarball = tiny_bundle()
    new = tmp_path / f"opt{char}touch pwned"
    given = tmp_path / f"given{char}touch pwned"  # an empty folder of the user's
    given.mkdir()
    for prefix in (new, given):
        if entry == "install.sh":
            proc = _install_sh(_extracted(tarball, tmp_path / f"x{len(list(tmp_path.iterdir()))}"),
                               prefix, "--no-smoke")
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        else:
            proc = _verify(tarball, prefix, "--no-smoke")
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert "holds a control character" in last and "nothing was changed" in last, last
        assert ascii(char)[1:-1] in last and char not in last
        assert "Traceback" not in proc.stderr
    assert not new.exists() and list(given.iterdir()) == []
    assert not list(tmp_path.rglob("pwned*"))


def test_the_wrapper_comment_cannot_run_a_prefixs_tail(tmp_path: Path) -> None:
    """configure.py on its own (the installer refuses such a prefix first): the comment line
    of bin/diarize escapes what is not printable, so the name cannot end it early (the
    exec line has it in single quotes, where a newline is only a character)."""
    from bundler.runtime import configure

    prefix = tmp_path / "p\ntouch pwned\r\x1b[2J"
    text = configure.wrapper(prefix, "diarize")
    lines = text.split("\n")
    assert lines[0] == "#!/bin/sh", lines
    assert lines[1].startswith("# diarize with the pyannote bundle installed in ")
    assert lines[1].isprintable() and "p\\ntouch pwned\\r\\x1b[2J" in lines[1]
    assert lines[2].startswith("exec '")
    script = tmp_path / "diarize"
    script.write_text(text)
    subprocess.run(["sh", str(script)], cwd=tmp_path, capture_output=True)
    assert not list(tmp_path.glob("pwned*"))
    # An ordinary prefix's comment is as it was, non-ASCII names included.
    plain = configure.wrapper(Path("/opt/diarisation-é"), "diarize").splitlines()[1]
    assert plain == "# diarize with the pyannote bundle installed in /opt/diarisation-é; " \
                    "--help for usage."


def test_a_prefix_that_links_to_an_empty_folder_installs_there(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    root = _extracted(tiny_bundle(), tmp_path / "x")
    real = tmp_path / "data" / "diarization"
    real.mkdir(parents=True)
    link = tmp_path / "opt-diarization"
    link.symlink_to(real)
    proc = _install_sh(root, link, "--no-smoke")
    assert proc.returncode == 0, proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if "is a link to" in ln]
    assert said == [f"install: {link} is a link to {real}: installing there"], proc.stderr
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / RECEIPT).is_file() and (real / "current").is_symlink()
    assert str(real / "releases") in (real / "bin" / "diarize").read_text()
    assert str(real) in proc.stdout
    check = subprocess.run([str(link / "venv/bin/python"), "-c", "import six"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # and again, through the link: an upgrade of what is there
    again = _install_sh(root, link, "--no-smoke")
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("to", ["not ours", "a file", "nothing"])
def test_a_prefix_that_links_elsewhere_is_still_refused(
        tmp_path: Path, tiny_bundle: TinyBundle, to: str) -> None:
    root = _extracted(tiny_bundle(), tmp_path / "x")
    target = tmp_path / "users"
    if to == "not ours":
        _users_prefix(target)
    elif to == "a file":
        target.write_text("mine\n")
    link = tmp_path / "prefix"
    link.symlink_to(target)
    before = _snapshot(tmp_path / "users") if target.is_dir() else None
    proc = _install_sh(root, link, "--no-smoke")
    assert proc.returncode == 16, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "nothing was changed" in last and "Traceback" not in proc.stderr
    if to == "not ours":
        assert "is not empty and holds no pyannote-bundle install" in last
        assert _snapshot(target) == before
    else:
        assert "exists and is not a folder" in last
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target.read_text() == "mine\n") if to == "a file" else True
    assert to != "nothing" or not target.exists()
