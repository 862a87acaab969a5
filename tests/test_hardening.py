"""Hostile bundles, faults in the middle, secrets: each refused cleanly, nothing left behind.

Offline side through the real CLI and the real install.sh; build side against the loopback
Hub and PyPI. Every refusal is asserted to be one line, a documented exit code, no
traceback, nothing installed, and an empty temporary folder afterwards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import EMB, SEG, TINY_LOCK, TinyBundle
from forge import flip_byte, forge
from hubfaults import FaultyHub

from bundler import errors
from bundler.build import BuildOptions, build
from bundler.hub import HubRepo, LoopbackHub
from bundler.models import fetch_models
from bundler.spec import IndexOptions, Target, load_recipe
from bundler.wheels import fetch_wheels

TOKEN = "hf_canary_SECRET_7f3a9c"


# --- helpers -------------------------------------------------------------------------------
def _verify(tarball: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str],
                                                                 Path]:
    """Run `pyannote-bundle verify` with its own TMPDIR; return the process and the prefix."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    prefix = tmp_path / "prefix"
    proc = subprocess.run(["pyannote-bundle", "-q", "verify", str(tarball), "--prefix", str(prefix),
                           *extra], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(tmp)})
    return proc, prefix


def _assert_refused(proc: subprocess.CompletedProcess[str], prefix: Path, code: int,
                    *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not prefix.exists(), "nothing may be installed"
    assert not any((prefix.parent / "tmpdir").iterdir()), "the work folder must be removed"


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _pax(info: tarfile.TarInfo, headers: dict[str, str]) -> tarfile.TarInfo:
    info.pax_headers = headers
    return info


def _sums(files: dict[str, bytes]) -> bytes:
    return "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(files.items())
                   ).encode()


def _bundle_files(tarball: Path) -> tuple[str, dict[str, bytes]]:
    with tarfile.open(tarball) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read()  # type: ignore[union-attr]
                 for m in tar.getmembers() if m.isfile()}
    return top, files


def _write_bundle(path: Path, top: str, files: dict[str, bytes]) -> Path:
    return _tar(path, [(_info(f"{top}/{n}"), d) for n, d in sorted(files.items())])


# --- offline side: hostile tarballs through `verify` ---------------------------------------
HOSTILE: dict[str, tuple[list[tuple[tarfile.TarInfo, bytes]], str]] = {
    "dotdot": ([(_info("b/SHA256SUMS"), b""), (_info("b/../../escape.txt"), b"x")], "'..'"),
    "absolute": ([(_info("/tmp/evil-abs.txt"), b"x")], "absolute"),
    "symlink": ([(_info("b/SHA256SUMS"), b""), (_info("b/l", tarfile.SYMTYPE, "/etc/passwd"),
                                                 b"")], "symlink"),
    "hardlink": ([(_info("b/SHA256SUMS"), b""), (_info("b/h", tarfile.LNKTYPE, "/etc/passwd"),
                                                  b"")], "hardlink"),
    "device": ([(_info("b/SHA256SUMS"), b""), (_info("b/d", tarfile.CHRTYPE), b"")], "device"),
    "fifo": ([(_info("b/SHA256SUMS"), b""), (_info("b/f", tarfile.FIFOTYPE), b"")], "fifo"),
    "duplicate": ([(_info("b/SHA256SUMS"), b""), (_info("b/x"), b"1"), (_info("b/x"), b"2")],
                  "appears twice"),
    "two-tops": ([(_info("b/SHA256SUMS"), b""), (_info("c/x"), b"1")], "single top folder"),
    "no-sums": ([(_info("b/manifest.json"), b'{"files": {}}')], "SHA256SUMS: missing"),
    "bad-sums": ([(_info("b/SHA256SUMS"), b"this is not a checksum line\n")],
                 "SHA256SUMS: malformed"),
    # Names: each refused before it is used for a path or printed raw.
    "long-component": ([(_info("b/SHA256SUMS"), b""), (_info("b/" + "x" * 256), b"x")],
                       "a path component is 256 bytes long, over the limit of 255"),
    "long-name": ([(_info("b/SHA256SUMS"), b""),
                   (_info("b/" + "/".join(["d" * 250] * 17)), b"x")],
                  "name is 4268 bytes long, over the limit of 4096"),
    "megabyte-name": ([(_info("b/SHA256SUMS"), b""), (_info("b/" + "m" * (1 << 20)), b"x")],
                      "over the limit of 4096"),
    "deep": ([(_info("b/SHA256SUMS"), b""), (_info("b/" + "a/" * 1500 + "f"), b"x")],
             "path is 1502 folders deep, over the limit of 32"),
    "newline": ([(_info("b/SHA256SUMS"), b""),
                 (_info("b/x\npyannote-bundle: verified OK (3 files)"), b"x")],
                "b/x\\x0apyannote-bundle: verified OK (3 files): name holds a control"),
    "bidi-override": ([(_info("b/SHA256SUMS"), b""), (_info("b/install\u202ehs.sh"), b"x")],
                      "b/install\\u202ehs.sh: name holds a control or invisible character"),
    "terminal-escape": ([(_info("b/SHA256SUMS"), b""), (_info("b/\x1b[2J\x1b[Hx"), b"x")],
                        "b/\\x1b[2J\\x1b[Hx: name holds a control or invisible character"),
    "not-utf8": ([(_info("b/SHA256SUMS"), b""), (_info("b/caf\udce9"), b"x")],
                 "b/caf\\xe9: name is not UTF-8"),
    "sparse-gnu": ([(_info("b/SHA256SUMS"), b""), (_info("b/s", tarfile.GNUTYPE_SPARSE), b"")],
                   "b/s: is a sparse file"),
    "sparse-pax": ([(_info("b/SHA256SUMS"), b""),
                    (_pax(_info("b/s"), {"GNU.sparse.map": "0,1", "GNU.sparse.size": "1"}),
                     b"x")], "b/s: is a sparse file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tarball_is_refused_and_nothing_escapes(tmp_path: Path, case: str) -> None:
    members, reason = HOSTILE[case]
    evil = _tar(tmp_path / "evil.tar", members)
    proc, prefix = _verify(evil, tmp_path)
    _assert_refused(proc, prefix, 10, reason)
    line = proc.stderr.strip()
    assert line.isprintable() and len(line) < 1500, line[:300]  # escaped and cut
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar", "tmpdir"]
    assert not Path("/tmp/evil-abs.txt").exists()


def test_manifest_disagreeing_with_sha256sums_is_refused(tmp_path: Path,
                                                         tiny_bundle: TinyBundle) -> None:
    top, files = _bundle_files(tiny_bundle())
    manifest = json.loads(files["manifest.json"])
    model = "models/pyannote_model_segmentation-3.0.bin"
    manifest["files"][model]["sha256"] = "0" * 64
    files["manifest.json"] = json.dumps(manifest).encode()
    files["SHA256SUMS"] = _sums({n: d for n, d in files.items() if n != "SHA256SUMS"})
    proc, prefix = _verify(_write_bundle(tmp_path / "b.tar", top, files), tmp_path)
    _assert_refused(proc, prefix, 10, model, "disagree")


def test_verify_refuses_a_host_without_a_library_the_wheels_need(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    top, files = _bundle_files(tiny_bundle())
    manifest = json.loads(files["manifest.json"])
    manifest["host_requirements"] = {"glibc": "2.17", "libraries": [
        {"soname": "libqqq.so.8", "required": True, "needed_by": ["torch"],
         "debian": "libqqq8", "rhel": "qqq-libs"}]}
    files["manifest.json"] = json.dumps(manifest).encode()
    files["SHA256SUMS"] = _sums({n: d for n, d in files.items() if n != "SHA256SUMS"})
    proc, prefix = _verify(_write_bundle(tmp_path / "b.tar", top, files), tmp_path)
    _assert_refused(proc, prefix, 11, "libqqq.so.8 (needed by torch; install "
                    "Debian/Ubuntu: libqqq8; RHEL: qqq-libs)", "nothing was installed")


def test_member_longer_than_its_checksum_says_is_refused(tmp_path: Path,
                                                         tiny_bundle: TinyBundle) -> None:
    top, files = _bundle_files(tiny_bundle())
    model = "models/pyannote_model_wespeaker-voxceleb-resnet34-LM.bin"
    files[model] += b"appended payload"
    proc, prefix = _verify(_write_bundle(tmp_path / "b.tar", top, files), tmp_path)
    _assert_refused(proc, prefix, 10, model, "does not match SHA256SUMS")


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_corrupt_compressed_stream_is_refused(tmp_path: Path, tiny_bundle: TinyBundle,
                                              compression: str) -> None:
    tarball = tiny_bundle(compression)
    tarball.with_name(tarball.name + ".sha256").unlink()  # the stream itself must be judged
    data = bytearray(tarball.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0x55
    tarball.write_bytes(bytes(data))
    proc, prefix = _verify(tarball, tmp_path)
    _assert_refused(proc, prefix, 10, tarball.name if "stream" in proc.stderr else "")


@pytest.mark.parametrize(("option", "words"), [
    (["--max-bytes", "100000"], "unpacks to more than 100000 bytes"),
    (["--max-members", "5"], "more than 5 members"),
])
def test_limits_refuse_before_the_disk_fills(tmp_path: Path, tiny_bundle: TinyBundle,
                                             option: list[str], words: str) -> None:
    tarball = tiny_bundle()
    proc, prefix = _verify(tarball, tmp_path, *option)
    _assert_refused(proc, prefix, 10, words)


def test_host_mismatch_names_both_before_installing(tmp_path: Path,
                                                    tiny_bundle: TinyBundle) -> None:
    other = "3.12" if sys.version_info[:2] != (3, 12) else "3.11"
    tarball = tiny_bundle(target=Target(python=other))
    proc, prefix = _verify(tarball, tmp_path, "--no-smoke")
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    _assert_refused(proc, prefix, 11, f"CPython {other}", f"Python {here}")


def test_no_install_checks_a_bundle_for_another_host_and_installs_nothing(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    # A staging host checks the copy it is about to carry across: its Python does not matter.
    other = "3.12" if sys.version_info[:2] != (3, 12) else "3.11"
    tarball = tiny_bundle(target=Target(python=other))
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["pyannote-bundle", "-q", "verify", str(tarball), "--no-install",
                               *extra], capture_output=True, text=True,
                              env={**os.environ, "TMPDIR": str(tmp)})

    proc = verify("--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["integrity"]["sidecar"] == "match"
    assert report["integrity"]["files"] > 10
    assert report["target"]["python"] == other and "host" not in report
    assert report["install"] == {"skipped": True} and report["smoke"]["skipped"] is True
    text = verify()
    assert text.returncode == 0, text.stderr
    assert "install:   skipped (--no-install)" in text.stdout
    assert f"py{other.replace('.', '')}-linux-" in text.stdout
    assert not any(tmp.iterdir()), "the work folder must be removed"
    # An option that installs is a usage error, before anything is read.
    prefix = tmp_path / "prefix"
    bad = verify("--prefix", str(prefix), "--pip")
    assert bad.returncode == 2 and "--no-install installs nothing: drop --prefix, --pip" \
        in bad.stderr and not prefix.exists()
    # A damaged copy is refused all the same.
    flip_byte(tarball, tarball.stat().st_size // 2)
    damaged = verify()
    assert damaged.returncode == 10 and "does not match the sidecar" in damaged.stderr
    assert "Traceback" not in damaged.stderr and not any(tmp.iterdir())


def test_a_smoke_that_tries_the_network_is_exit_15_in_the_installers_words(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    # A self-consistent bundle whose smoke reports connection attempts, as a pipeline that
    # phones home would: the installer refuses it, and the tool keeps its words and code.
    report = {"ok": True, "segments": [], "speakers": 0, "network_attempts": 2,
              "network_attempt_details": ["connect 192.0.2.1:443"]}
    forged = forge(tiny_bundle(), "smoke/smoke.py", tmp_path / "forged",
                   change=lambda _: f"print({json.dumps(json.dumps(report))})\n".encode())
    proc, prefix = _verify(forged, tmp_path)
    _assert_refused(proc, prefix, errors.EXIT_NETWORK, "2 connection attempt(s)",
                    "192.0.2.1:443", "an isolated host must see none")


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


# --- build side: Hub faults ----------------------------------------------------------------
def _hub(**kw: Any) -> FaultyHub:
    return FaultyHub([HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG},
                                gated=True),
                        HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM",
                                {"pytorch_model.bin": EMB})], tokens=[TOKEN], **kw)


def _fetch(hub: LoopbackHub, tmp_path: Path, token: str | None = TOKEN,
           sleeps: list[float] | None = None) -> Any:
    return fetch_models(load_recipe("speaker-diarization-3.1").models, endpoint=hub.url,
                        token=token, cache_dir=tmp_path / "hub",
                        sleep=(sleeps.append if sleeps is not None else lambda s: None))


@pytest.mark.parametrize(("faults", "error", "words"), [
    (["401"], errors.GatedRepo, "is gated"),
    (["403"], errors.HubError, "access denied (HTTP 403)"),
    (["404"], errors.HubError, "repository not found"),
])
def test_hub_faults_end_in_one_clear_error(tmp_path: Path, faults: list[str],
                                           error: type[Exception], words: str) -> None:
    with _hub() as hub:
        hub.inject("pyannote/segmentation-3.0", None, *faults)
        with pytest.raises(error) as exc:
            _fetch(hub, tmp_path)
    assert words in str(exc.value) and TOKEN not in str(exc.value)


def test_gated_build_without_a_token_leaves_no_bundle(tmp_path: Path, wheel_cache: Path,
                                                     tiny_bundle: TinyBundle) -> None:
    tiny_bundle()  # warm the wheel cache
    out = tmp_path / "gated"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HOME")}
    with _hub() as hub:
        proc = subprocess.run(_build_argv(out, wheel_cache), capture_output=True, text=True,
                              env={**env, "HF_ENDPOINT": hub.url,
                                   "HF_HOME": str(tmp_path / "hf-home")})
    assert proc.returncode == 3, proc.stderr
    assert "pyannote/segmentation-3.0 is gated" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_wrong_token_is_gated_and_never_echoed(tmp_path: Path) -> None:
    with _hub() as hub, pytest.raises(errors.GatedRepo) as exc:
        _fetch(hub, tmp_path, token="hf_wrong_SECRET_1234")
    assert "hf_wrong_SECRET_1234" not in str(exc.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    repos = [HubRepo("pyannote/segmentation-3.0", {"other.bin": SEG}),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB})]
    with LoopbackHub(repos) as hub, pytest.raises(errors.EntryNotFound,
                                                  match="'pytorch_model.bin' not found"):
        _fetch(hub, tmp_path, token=None)


@pytest.mark.parametrize("faults", [["429", "503"], ["500", "502"], ["drop"], ["drop", "drop"]])
def test_transient_faults_are_retried_or_resumed(tmp_path: Path, faults: list[str]) -> None:
    with _hub() as hub:
        hub.inject("pyannote/segmentation-3.0", "pytorch_model.bin", *faults)
        got = _fetch(hub, tmp_path)
        tries = [r for r in hub.requests if r["path"].endswith("/pytorch_model.bin")
                 and "segmentation" in r["path"]]
    assert got[0].files[0].local.read_bytes() == SEG
    assert len(tries) > len(faults), "each fault cost one request, then one succeeded"


def test_persistent_5xx_gives_up_after_backoff(tmp_path: Path) -> None:
    sleeps: list[float] = []
    with _hub() as hub:
        hub.inject("pyannote/segmentation-3.0", None, *["503"] * 40)
        with pytest.raises(errors.HubError, match="after .* attempts") as exc:
            _fetch(hub, tmp_path, sleeps=sleeps)
    assert len(sleeps) >= 2 and sleeps == sorted(sleeps) and sleeps[-1] > sleeps[0]
    assert TOKEN not in str(exc.value)


# --- build side: pip faults ----------------------------------------------------------------
def test_wheel_hash_mismatch_names_the_package(tmp_path: Path) -> None:
    lock = tmp_path / "bad.lock"
    lock.write_text(f"six==1.16.0 --hash=sha256:{'ab' * 32}\n")
    with pytest.raises(errors.WheelHashMismatch, match="^six: "):
        fetch_wheels(lock, Target(), IndexOptions(), tmp_path / "cache", 0)
    assert not list((tmp_path / "cache").rglob("*.whl"))


def test_no_wheel_for_the_target_names_package_and_target(tmp_path: Path) -> None:
    lock = tmp_path / "torch.lock"
    lock.write_text(f"torch==2.8.0 --hash=sha256:{'cd' * 32}\n")
    target = Target(python="3.14", arch="aarch64")
    with pytest.raises(errors.NoWheelForTarget) as exc:
        fetch_wheels(lock, target, IndexOptions(), tmp_path / "cache", 0)
    assert "torch" in str(exc.value) and "py314-linux-aarch64" in str(exc.value)


# --- build side: disk full, Ctrl-C ---------------------------------------------------------
def _build_argv(out: Path, cache: Path) -> list[str]:
    return ["pyannote-bundle", "-q", "build", "--output", str(out), "--lockfile", str(TINY_LOCK),
            "--cache-dir", str(cache)]


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


# --- secrets -------------------------------------------------------------------------------
def test_token_never_reaches_a_file_an_argv_or_a_child_env(tmp_path: Path, wheel_cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    seen: list[tuple[list[str], dict[str, str]]] = []
    real_run = subprocess.run

    def spy(args: Any, *a: Any, **kw: Any) -> Any:
        seen.append((list(args), dict(kw.get("env") or os.environ)))
        return real_run(args, *a, **kw)

    monkeypatch.setattr(subprocess, "run", spy)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level("DEBUG", logger="bundler")
    with _hub() as hub:
        result = build(load_recipe("speaker-diarization-3.1"),
                       BuildOptions(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                                    endpoint=hub.url, token=TOKEN, lockfile=TINY_LOCK))
    assert any("pip" in " ".join(args) for args, _ in seen), "the spy saw the pip children"
    for args, env in seen:
        assert not any(TOKEN in a for a in args), args
        assert TOKEN not in env.values()
    assert TOKEN not in caplog.text
    for path in [*(tmp_path / "out").iterdir(), *(tmp_path / "cache").rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in json.dumps(result.manifest)


# --- signatures (ssh-keygen -Y) ------------------------------------------------------------
def _keypair(tmp_path: Path, name: str) -> tuple[Path, str]:
    key = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
                   check=True)
    return key, key.with_suffix(".pub").read_text().strip()


def test_a_signed_sidecar_proves_who_built_the_bundle(tmp_path: Path, wheel_cache: Path,
                                                      tiny_bundle: TinyBundle) -> None:
    tiny_bundle()
    key, pub = _keypair(tmp_path, "release")
    _, other_pub = _keypair(tmp_path, "someone-else")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"release@example.org {pub}\n")
    out = tmp_path / "signed"
    with _hub() as hub:
        proc = subprocess.run([*_build_argv(out, wheel_cache), "--sign-key", str(key)],
                              capture_output=True, text=True,
                              env={**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    tarball = Path(proc.stdout.splitlines()[0])
    sidecar = tarball.with_name(tarball.name + ".sha256")
    assert sidecar.with_name(sidecar.name + ".sig").is_file()
    ok = subprocess.run(["pyannote-bundle", "-q", "verify", str(tarball), "--no-smoke", "--json",
                         "--allowed-signers", str(allowed)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["signature"] == {"ok": True, "signer": "release@example.org"}

    # Split for removable media: the signature travels beside the volumes and is checked
    # from them, as they are.
    usb = tmp_path / "usb"
    split = subprocess.run(["pyannote-bundle", "split", str(tarball), "--size",
                            f"{tarball.stat().st_size // 3 // 1024 + 1}K", "--output", str(usb)],
                           capture_output=True, text=True)
    assert split.returncode == 0, split.stderr
    assert (usb / sidecar.name).with_name(sidecar.name + ".sig").is_file()
    first = usb / f"{tarball.name}.part-000"
    parts = subprocess.run(["pyannote-bundle", "-q", "verify", str(first), "--no-smoke",
                            "--json", "--allowed-signers", str(allowed)],
                           capture_output=True, text=True)
    assert parts.returncode == 0, parts.stderr
    assert json.loads(parts.stdout)["signature"] == {"ok": True, "signer": "release@example.org"}
    allowed_other = tmp_path / "allowed_other"
    allowed_other.write_text(f"other@example.org {other_pub}\n")
    proc, prefix = _verify(first, tmp_path, "--allowed-signers", str(allowed_other))
    _assert_refused(proc, prefix, 10, "not signed by any key in")

    # Someone rewrites the tarball and its sidecar consistently: checksums alone pass, the
    # signature does not.
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 1
    tarball.write_bytes(bytes(data))
    sidecar.write_text(f"{hashlib.sha256(bytes(data)).hexdigest()}  {tarball.name}\n")
    proc, prefix = _verify(tarball, tmp_path, "--allowed-signers", str(allowed))
    _assert_refused(proc, prefix, 10, ".sha256.sig", "does not verify")

    # A bundle signed by a key that is not allowed.
    allowed.write_text(f"other@example.org {other_pub}\n")
    proc, prefix = _verify(tarball, tmp_path, "--allowed-signers", str(allowed))
    _assert_refused(proc, prefix, 10, "not signed by any key in")


def test_a_failed_signature_leaves_no_unsigned_bundle(tmp_path: Path, wheel_cache: Path,
                                                      tiny_bundle: TinyBundle) -> None:
    tiny_bundle()
    not_a_key = tmp_path / "not-a-key"
    not_a_key.write_text("hello\n")
    out = tmp_path / "unsigned"
    with _hub() as hub:
        proc = subprocess.run([*_build_argv(out, wheel_cache), "--sign-key", str(not_a_key)],
                              capture_output=True, text=True,
                              env={**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN})
    assert proc.returncode == 2 and "could not sign" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == [], "no tarball, sidecar or signature under the final names"


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
    from bundler.install import check_host, find_python

    py312 = str(_interpreter(12))
    manifest = {"target": {"python": "3.12", "arch": os.uname().machine}}
    assert check_host(manifest, py312)["interpreter"] == py312
    assert find_python("3.12", py312) == py312
    assert find_python(f"{sys.version_info[0]}.{sys.version_info[1]}") == sys.executable
    if sys.version_info[:2] != (3, 12):
        with pytest.raises(errors.HostMismatch, match="pass --python /path/to/python3.12"):
            check_host(manifest, sys.executable)
    broken = tmp_path / "python3.12"
    broken.write_text("#!/bin/sh\nexit 127\n")
    broken.chmod(0o755)
    with pytest.raises(errors.HostMismatch, match="does not run"):
        check_host(manifest, str(broken))
