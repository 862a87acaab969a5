"""A full disk and interrupts (Ctrl-C, a kill) in the middle of a build or an install.

Each ends with a documented exit code and no traceback, leaves no bundle or partial
install behind, and a killed install is detected and replaced by a rerun.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

from conftest import EMB, TinyBundle
from forge import TOKEN, _assert_refused, _build_argv, _hub

from bundler.demo.hub import HubRepo, LoopbackHub


# --- build side: disk full, Ctrl-C ---------------------------------------------------------
def test_disk_full_while_packing_leaves_no_bundle(tmp_path: Path, tiny_bundle: TinyBundle,
                                                  wheel_cache: Path) -> None:
    tiny_bundle()  # fills the wheel cache, so only the pack writes big files
    out = tmp_path / "full"

    def small_disk() -> None:
        # Every write past 1 MiB fails with EFBIG, as a full disk fails with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    with _hub() as hub:
        proc = subprocess.run(_build_argv(out, wheel_cache), capture_output=True, text=True,
                              preexec_fn=small_disk,
                              env={**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN})
    assert proc.returncode == 5, proc.stderr
    assert "nothing was left under the bundle's name" in proc.stderr
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr
    assert list(out.iterdir()) == [], "no bundle, no partial file"


def test_disk_full_while_unpacking_is_said_so_and_installs_nothing(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    tarball = tiny_bundle()

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))  # the pip wheel is 1.8 MB

    (tmp_path / "tmpdir").mkdir()
    proc = subprocess.run(["pyannote-bundle", "-q", "verify", str(tarball), "--prefix",
                           str(tmp_path / "prefix")], capture_output=True, text=True,
                          preexec_fn=small_disk,
                          env={**os.environ, "TMPDIR": str(tmp_path / "tmpdir")})
    _assert_refused(proc, tmp_path / "prefix", 5, "cannot unpack into", "TMPDIR")


def test_ctrl_c_during_a_build_leaves_no_bundle(tmp_path: Path, wheel_cache: Path,
                                                tiny_bundle: TinyBundle) -> None:
    tiny_bundle()
    out = tmp_path / "int"
    big = os.urandom(1 << 20) * 48  # long enough to catch the pack in the act
    repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": big}),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB})]
    with LoopbackHub(repos) as hub:
        proc = subprocess.Popen(_build_argv(out, wheel_cache), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_ENDPOINT": hub.url})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and any(".partial" in p.name for p in out.iterdir()):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not out.exists() or list(out.iterdir()) == []


# --- offline side: a killed install --------------------------------------------------------
def test_interrupted_install_is_detected_and_a_rerun_succeeds(tmp_path: Path,
                                                              tiny_bundle: TinyBundle) -> None:
    tarball = tiny_bundle()
    prefix = tmp_path / "prefix"
    work = tmp_path / "tmpdir"  # a killed verify cannot remove its work folder: keep it here
    work.mkdir()
    proc = subprocess.Popen(["pyannote-bundle", "-q", "verify", str(tarball), "--no-smoke",
                             "--prefix", str(prefix)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(work)})
    deadline = time.monotonic() + 60
    while not list(prefix.glob("releases/*/venv")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the tool and its installer: no cleanup code runs
    proc.wait()
    # Killed mid-install: the receipt, written before the release folder, claims it.
    (stale,) = prefix.glob("releases/*")
    receipt = json.loads((prefix / ".pyannote-bundle-receipt.json").read_text())
    assert receipt["releases"] == [stale.name] and receipt["current"] is None
    rerun = subprocess.run(["pyannote-bundle", "-q", "verify", str(tarball), "--no-smoke",
                            "--prefix", str(prefix)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not stale.exists()
    assert (prefix / "venv" / "bin" / "python").exists()
