"""Public hostile tar files through the commands users run: each refused, none read past.

The corpus is thirty tar files from public test suites (snyk zip-slip, jwilk's
traversal-archives, exarch's CVE fixtures, CPython's and Go's archive test data, node-tar,
libarchive), each with its origin and attack in the SOURCES.md beside it, used as they are.
Each is fed to ``pyannote-bundle verify`` raw, and spliced into a valid bundle: before its
end-of-archive marker, where GNU tar unpacks what follows a header Python's tarfile cannot
read, and after the whole bundle. The sidecar is recomputed over each spliced file, as anyone
without the signing key would, so only verify's own reading can catch them.

Every refusal: exit 10, one line on stderr naming the problem, escaped and bounded, no
traceback, nothing installed and nothing left in the work folder; ``inspect`` never crashes
on the same input. GNU tar is run on the spliced files to show it does see members there.
No torch, no network. The corpus runs through the CLI's entry point in this process (a
subprocess each would cost minutes); the differential itself through the installed command.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from bundler import bundlefile, layout
from bundler.cli import main
from bundler.pack import Entry, pack
from bundler.render import manifest_json

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("PYANNOTE_BUNDLE_HOSTILE_CORPUS",
                             ROOT.parent / "shared" / "hostile-archives"))
SAMPLES = sorted(p.name for p in CORPUS.glob("*.tar*")) if CORPUS.is_dir() else []
COMPRESSED = {".gz": gzip.decompress, ".bz2": bz2.decompress}
TOP = "b-1"
EVIL = b"#!/bin/sh\necho 'not the install.sh that SHA256SUMS lists'\n"
MAX_LINE = 1500  # a name is cut to 160 characters, a problem to 1000

pytestmark = pytest.mark.skipif(not SAMPLES, reason=f"no hostile tar corpus at {CORPUS} "
                                "(set PYANNOTE_BUNDLE_HOSTILE_CORPUS)")


# --- helpers -------------------------------------------------------------------------------
def _plain(name: str) -> bytes:
    """The sample's tar bytes (the two compressed samples decompressed: a bundle is never
    bzip2, and a tar inside a tar is spliced uncompressed)."""
    data = (CORPUS / name).read_bytes()
    return COMPRESSED[Path(name).suffix](data) if Path(name).suffix in COMPRESSED else data


def _with_sidecar(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.with_name(path.name + bundlefile.SIDECAR_SUFFIX).write_text(
        f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    return path


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small bundle that passes the integrity check (made by the real pack)."""
    out = tmp_path_factory.mktemp("valid")
    files = [Entry.from_bytes(layout.INSTALL_SH, b"#!/bin/sh\necho the real one\n"),
             Entry.from_bytes(f"{layout.MODELS_DIR}/pyannote_model_x.bin", b"\0weights" * 500),
             Entry.from_bytes(f"{layout.WHEELS_DIR}/a-1-py3-none-any.whl", b"PK fake wheel")]
    manifest = {"files": {e.path: {"sha256": e.sha256, "size": e.size} for e in files}}
    entries = [*files, Entry.from_bytes(layout.MANIFEST, manifest_json(manifest))]
    return pack(entries, top=TOP, output_dir=out, compression="none", mtime=0).path


def _members_end(tarball: Path) -> int:
    """Where the bundle's end-of-archive marker starts."""
    with tarfile.open(tarball) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


Run = Callable[..., subprocess.CompletedProcess[str]]


def _subprocess(*argv: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """``pyannote-bundle -q ARGV`` as users run it, with its own TMPDIR."""
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    return subprocess.run(["pyannote-bundle", "-q", *argv], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(tmpdir)}, timeout=120)


@pytest.fixture
def in_process(capsys: pytest.CaptureFixture[str],
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    """The same entry point (``bundler.cli:main``) in this process: its exit status and
    output. An exception other than SystemExit escapes and fails the test (a traceback)."""
    log = logging.getLogger("bundler")
    saved = log.handlers[:], log.level, log.propagate

    def run(*argv: str, tmp: Path) -> subprocess.CompletedProcess[str]:
        tmpdir = tmp / "tmpdir"
        tmpdir.mkdir(exist_ok=True)
        monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
        with pytest.raises(SystemExit) as exit_:
            main(["-q", *argv])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, int(exit_.value.code or 0), out, err)

    yield run
    log.handlers[:], log.level, log.propagate = saved  # setup_logging bound the capture


def _assert_refused(proc: subprocess.CompletedProcess[str], tmp: Path, *words: str) -> str:
    """Exit 10, one escaped and bounded line, no traceback, nothing left behind."""
    assert proc.returncode == 10, proc.stderr[:2000]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()  # also splits at \x0b, \x1c, \x85, \u2028 ...
    assert len(lines) == 1 and proc.stderr.endswith("\n"), proc.stderr[:2000]
    line = lines[0]
    assert line.startswith("pyannote-bundle: error: ")
    assert line.isprintable(), f"a raw control character in {line[:300]!r}"
    assert len(line) <= MAX_LINE, f"{len(line)} characters: {line[:300]}"
    for word in words:
        assert word in line, line
    assert not (tmp / "prefix").exists(), "nothing may be installed"
    assert not any((tmp / "tmpdir").iterdir()), "the work folder must be removed"
    return line


def _verify_refuses(run: Run, tarball: Path, tmp: Path, *words: str) -> str:
    proc = run("verify", str(tarball), "--no-smoke", "--prefix", str(tmp / "prefix"), tmp=tmp)
    return _assert_refused(proc, tmp, *words)


def _inspect_does_not_crash(run: Run, tarball: Path, tmp: Path) -> None:
    """inspect is a look, not a proof: it may report, or refuse with exit 10; never crash."""
    proc = run("inspect", str(tarball), tmp=tmp)
    assert proc.returncode in (0, 10), proc.stderr[:2000]
    if proc.returncode == 10:
        _assert_refused(proc, tmp)
    else:
        assert proc.stderr == "" and all(line.isprintable() for line in
                                         proc.stdout.splitlines())


def _tar_names(path: Path, *options: str) -> list[str]:
    """What GNU tar lists (it goes on past errors, then exits 2)."""
    proc = subprocess.run(["tar", *options, "-tf", str(path)], capture_output=True,
                          timeout=60)
    return proc.stdout.decode("utf-8", "surrogateescape").splitlines()


# --- the corpus ------------------------------------------------------------------------------
@pytest.mark.parametrize("sample", SAMPLES)
def test_sample_is_refused_as_it_is(tmp_path: Path, in_process: Run, sample: str) -> None:
    _verify_refuses(in_process, CORPUS / sample, tmp_path)
    _inspect_does_not_crash(in_process, CORPUS / sample, tmp_path)


@pytest.mark.parametrize("sample", [s for s in SAMPLES if Path(s).suffix in COMPRESSED])
def test_decompressed_sample_is_refused(tmp_path: Path, in_process: Run, sample: str) -> None:
    """go-pax-bad-hdr-large's 1 MiB PAX path: refused by name (exit 10), not by the disk."""
    plain = tmp_path / Path(sample).stem
    plain.write_bytes(_plain(sample))
    line = _verify_refuses(in_process, plain, tmp_path)
    if "bad-hdr-large" in sample:
        assert "name is 1048563 bytes long, over the limit of 4096" in line
    _inspect_does_not_crash(in_process, plain, tmp_path)


@pytest.mark.parametrize("where", ["before-the-end", "after-the-end"])
@pytest.mark.parametrize("sample", SAMPLES)
def test_sample_spliced_into_a_valid_bundle_is_refused(tmp_path: Path, in_process: Run,
                                                       valid: Path, sample: str,
                                                       where: str) -> None:
    good = valid.read_bytes()
    head = good[:_members_end(valid)] if where == "before-the-end" else good
    spliced = _with_sidecar(tmp_path / f"{TOP}.tar", head + _plain(sample))
    _verify_refuses(in_process, spliced, tmp_path)
    _inspect_does_not_crash(in_process, spliced, tmp_path)
    # GNU tar does see members where verify refuses: it reads past an unreadable header on
    # its own, and past the end-of-archive marker with --ignore-zeros.
    raw = tmp_path / "sample.tar"
    raw.write_bytes(_plain(sample))
    if _tar_names(raw, "--ignore-zeros"):
        options = () if where == "before-the-end" else ("--ignore-zeros",)
        assert len(_tar_names(spliced, *options)) > len(_tar_names(valid))


def test_the_valid_bundle_passes_the_integrity_check(tmp_path: Path, valid: Path) -> None:
    """The refusals above are the splice's doing: the bundle alone is intact (its manifest
    names no target, so verify stops at the host check, after integrity)."""
    proc = _subprocess("verify", str(valid), "--no-smoke", "--json", tmp=tmp_path)
    assert proc.returncode == 11 and '"integrity": {"ok": true, "sidecar": "match"' in proc.stdout


# --- the differential the corpus exposed ---------------------------------------------------
def _member(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


COMPRESS = {"none": lambda b: b, "gzip": lambda b: gzip.compress(b, mtime=0),
            "zstd": lambda b: zstandard.ZstdCompressor().compress(b)}
# GNU tar reads zstd through the zstd program
NEEDS_ZSTD = pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd program for tar")


@pytest.mark.parametrize("compression", ["gzip", "none", pytest.param("zstd", marks=NEEDS_ZSTD)])
@pytest.mark.parametrize("sample,problem", [
    ("go-neg-size.tar", "an unreadable tar header (invalid header)"),
    ("cpython-recursion.tar", "a global PAX header"),
])
def test_a_second_install_sh_behind_a_bad_header_is_refused(
        tmp_path: Path, valid: Path, sample: str, problem: str, compression: str) -> None:
    """A valid bundle, a header Python's tarfile cannot read, then another install.sh:
    tarfile ends the archive at the bad header, GNU tar skips it and unpacks the second
    install.sh over the first. verify must refuse it, not pass what tarfile saw."""
    bad = _plain(sample)
    bad += b"\0" * (-len(bad) % tarfile.BLOCKSIZE)  # keep the next header on a block
    end = _members_end(valid)
    plain = valid.read_bytes()[:end] + bad + _member(f"{TOP}/{layout.INSTALL_SH}", EVIL)
    spliced = _with_sidecar(tmp_path / f"{TOP}.tar", COMPRESS[compression](plain))

    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:  # the standard library's own reader
        assert [m.name for m in tar][-1] == f"{TOP}/wheels/a-1-py3-none-any.whl"
    out = tmp_path / "untarred"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(spliced), "-C", str(out)], capture_output=True)
    assert (out / TOP / layout.INSTALL_SH).read_bytes() == EVIL

    _verify_refuses(_subprocess, spliced, tmp_path, f"byte {end} of the tar stream", problem)


@pytest.mark.parametrize("compression", ["gzip", pytest.param("zstd", marks=NEEDS_ZSTD)])
def test_a_second_compressed_stream_after_the_end_is_refused(tmp_path: Path, valid: Path,
                                                             compression: str) -> None:
    """Another gzip member or zstd frame appended to a compressed bundle: the decompressor
    reads on into it, and only zeros may follow the end-of-archive marker."""
    tail = _member(f"{TOP}/{layout.INSTALL_SH}", EVIL)
    compress = COMPRESS[compression]
    spliced = _with_sidecar(tmp_path / f"{TOP}.tar",
                            compress(valid.read_bytes()) + compress(tail))
    assert f"{TOP}/{layout.INSTALL_SH}" in _tar_names(spliced, "--ignore-zeros")[-1:]
    _verify_refuses(_subprocess, spliced, tmp_path, "data after the end-of-archive marker")


def test_inspect_refuses_a_member_it_would_spin_past(tmp_path: Path, in_process: Run) -> None:
    """A header claiming 1 PiB before the wheels: passing over it is reading it, and past
    the end tarfile's stream keeps 'reading' empty blocks; refused at once instead."""
    info = tarfile.TarInfo(f"{TOP}/{layout.MODELS_DIR}/big")
    info.size = 1 << 50
    huge = tmp_path / "huge.tar"
    huge.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024)
    proc = in_process("inspect", str(huge), tmp=tmp_path)
    _assert_refused(proc, tmp_path, "1125899906842624 bytes is over the per-file limit")


@pytest.mark.parametrize("manifest", [
    b'{"files": {}, "models": ["x"], "wheels": [1, {"name": "torch"}], "target": "x", '
    b'"host_requirements": {"libraries": [{"required": true}], "optional_for": [1, "a"]}, '
    b'"recipe": [], "build": 3, "tool": null}',
    b'{"files": {}, "bundle": "b\\npyannote-bundle: verified OK", "models": [{"files": 7}]}',
])
def test_inspect_reports_a_manifest_of_another_shape_without_crashing(
        tmp_path: Path, in_process: Run, manifest: bytes) -> None:
    """Nothing inspect reads is verified: a field of another type is left out, and no field
    prints a line of its own."""
    odd = tmp_path / "odd.tar"
    with tarfile.open(odd, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"{TOP}/{layout.MANIFEST}")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    proc = in_process("inspect", str(odd), tmp=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert all(line.isprintable() for line in proc.stdout.splitlines())
    assert not any(line.startswith("pyannote-bundle:") for line in proc.stdout.splitlines())
