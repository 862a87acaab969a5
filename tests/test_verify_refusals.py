"""Hostile and damaged bundles through `pyannote-bundle verify`: each refused cleanly.

Through the real CLI. Every refusal is asserted to be one line, a documented exit code,
no traceback, nothing installed, and an empty temporary folder afterwards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import TinyBundle
from forge import _assert_refused, _verify, flip_byte, forge

from bundler import errors
from bundler.spec import Target


# --- helpers -------------------------------------------------------------------------------
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
