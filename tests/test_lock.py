"""`lock` really runs pip-compile against PyPI; `lock --check` is offline and names the drift."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
IN = ROOT / "lockfiles" / "speaker-diarization-3.1.in"
LOCK = ROOT / "lockfiles" / "speaker-diarization-3.1-py311-linux-x86_64.txt"


def _bundle(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pyannote-bundle", *argv], capture_output=True, text=True)


def test_the_shipped_lockfile_is_up_to_date() -> None:
    proc = _bundle("lock", "--check")
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace("torch==2.8.0", "torch==2.9.0"),
     "torch==2.8.0 does not satisfy 'torch==2.9.0'"),
    (lambda t: t + "six>=1.16\n", "six is required by speaker-diarization-3.1.in but not locked"),
    (lambda t: t + "# a comment only\n", "speaker-diarization-3.1.in changed since"),
])
def test_check_names_what_made_the_lockfile_stale(tmp_path: Path, edit, message: str) -> None:
    source = tmp_path / IN.name
    source.write_text(edit(IN.read_text()))
    proc = _bundle("lock", "--check", "--input", str(source), "--output", str(LOCK))
    assert proc.returncode == 4
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_lock_resolves_with_hashes_and_check_follows_the_input(tmp_path: Path) -> None:
    source = tmp_path / "tiny.in"
    source.write_text("six==1.16.0\n")
    out = tmp_path / "lockfiles" / "tiny-py311-linux-x86_64.txt"
    proc = _bundle("lock", "--input", str(source), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith("# pyannote-bundle: locked from tiny.in sha256=")
    assert "six==1.16.0" in text and "--hash=sha256:" in text
    assert str(tmp_path) not in text, "no local path of the build machine in a lockfile"
    assert _bundle("lock", "--check", "--input", str(source), "--output",
                   str(out)).returncode == 0
    source.write_text("six==1.17.0\n")
    stale = _bundle("lock", "--check", "--input", str(source), "--output", str(out))
    assert stale.returncode == 4 and "six==1.16.0 does not satisfy" in stale.stderr
