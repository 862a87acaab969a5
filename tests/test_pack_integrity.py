"""Pack and the offline integrity check, on small real files: round trip, determinism, refusals."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from bundler import layout
from bundler.errors import IntegrityError
from bundler.integrity import check_and_extract
from bundler.pack import Entry, pack
from bundler.render import manifest_json


def _entries(tmp: Path) -> list[Entry]:
    model = tmp / "model.bin"
    model.write_bytes(b"\x00weights" * 1000)
    files = [
        Entry.from_bytes(layout.INSTALL_SH, b"#!/bin/sh\necho hi\n"),
        Entry(f"{layout.MODELS_DIR}/pyannote_model_x.bin",
              hashlib.sha256(model.read_bytes()).hexdigest(), model.stat().st_size, source=model),
        Entry.from_bytes(f"{layout.WHEELS_DIR}/a-1-py3-none-any.whl", b"PK fake wheel"),
    ]
    manifest = {"files": {e.path: {"sha256": e.sha256, "size": e.size} for e in files}}
    return [*files, Entry.from_bytes(layout.MANIFEST, manifest_json(manifest))]


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_round_trip_and_byte_identical(tmp_path: Path, compression: str) -> None:
    entries = _entries(tmp_path)
    a = pack(entries, top="b-1", output_dir=tmp_path / "a", compression=compression, mtime=0)
    b = pack(entries, top="b-1", output_dir=tmp_path / "b", compression=compression, mtime=0)
    assert a.path.read_bytes() == b.path.read_bytes()
    digest = hashlib.sha256(a.path.read_bytes()).hexdigest()
    assert a.sidecar.read_text() == f"{digest}  {a.path.name}\n"
    result = check_and_extract(a.path, tmp_path / "work")
    assert result.sidecar == "match" and result.top == "b-1"
    assert (result.root / layout.MODELS_DIR / "pyannote_model_x.bin").read_bytes() == (
        tmp_path / "model.bin").read_bytes()
    assert not list((tmp_path / "a").glob(".*partial*"))


def test_tar_metadata_is_normalised(tmp_path: Path) -> None:
    p = pack(_entries(tmp_path), top="b-1", output_dir=tmp_path, compression="none", mtime=42)
    with tarfile.open(p.path) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "b-1" and "b-1/SHA256SUMS" in names
    assert all(m.mtime == 42 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    assert {m.mode for m in members if m.isreg()} == {0o644, 0o755}


def test_flipped_byte_is_refused_by_the_sidecar(tmp_path: Path) -> None:
    p = pack(_entries(tmp_path), top="b-1", output_dir=tmp_path, compression="none", mtime=0)
    data = bytearray(p.path.read_bytes())
    data[2000] ^= 1
    p.path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sidecar"):
        check_and_extract(p.path, tmp_path / "work")


def _tar(tmp: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    path = tmp / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _reg(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("info,reason", [
    (_reg("b/../../escape.txt"), "'..'"),
    (_reg("/etc/evil"), "absolute"),
    (_link("b/link", tarfile.SYMTYPE, "/etc/passwd"), "symlink"),
    (_link("b/hard", tarfile.LNKTYPE, "/etc/passwd"), "hardlink"),
    (_link("b/dev", tarfile.CHRTYPE, ""), "device"),
])
def test_hostile_members_are_refused_and_nothing_escapes(tmp_path: Path, info: tarfile.TarInfo,
                                                         reason: str) -> None:
    evil = _tar(tmp_path, [(_reg("b/SHA256SUMS"), b""), (info, b"x")])
    with pytest.raises(IntegrityError, match=reason):
        check_and_extract(evil, tmp_path / "work" / "inner")
    assert not (tmp_path / "work" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


def test_file_not_listed_in_checksums_is_refused(tmp_path: Path) -> None:
    evil = _tar(tmp_path, [(_reg("b/SHA256SUMS"), b""), (_reg("b/extra.txt"), b"x")])
    with pytest.raises(IntegrityError, match="not listed in SHA256SUMS"):
        check_and_extract(evil, tmp_path / "work")


def test_missing_checksums_is_refused(tmp_path: Path) -> None:
    evil = _tar(tmp_path, [(_reg("b/manifest.json"), json.dumps({"files": {}}).encode())])
    with pytest.raises(IntegrityError, match="SHA256SUMS: missing"):
        check_and_extract(evil, tmp_path / "work")


def test_truncated_tarball_is_refused(tmp_path: Path) -> None:
    p = pack(_entries(tmp_path), top="b-1", output_dir=tmp_path, compression="none", mtime=0)
    p.sidecar.unlink()
    p.path.write_bytes(p.path.read_bytes()[:3000])
    with pytest.raises(IntegrityError):
        check_and_extract(p.path, tmp_path / "work")


def test_members_are_covered_by_the_sidecar_or_hashed_each(tmp_path: Path) -> None:
    p = pack(_entries(tmp_path), top="b-1", output_dir=tmp_path, compression="none", mtime=0)
    assert check_and_extract(p.path, tmp_path / "w1").members_checked_by.startswith("the sidecar")
    forced = check_and_extract(p.path, tmp_path / "w2", hash_members=True)
    assert forced.members_checked_by == "sha256 of each member"
    p.sidecar.unlink()
    alone = check_and_extract(p.path, tmp_path / "w3")
    assert alone.members_checked_by == "sha256 of each member" and alone.sidecar == "absent"


def test_unpacks_where_tarfile_has_no_pep_706_filter(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 12's CPython 3.11.2 has no tarfile.data_filter/FilterError: a good bundle
    still unpacks there, and the destination check is still made."""
    from bundler import integrity

    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    monkeypatch.delattr(tarfile, "FilterError", raising=False)
    p = pack(_entries(tmp_path), top="b-1", output_dir=tmp_path / "a", compression="none",
             mtime=0)
    result = check_and_extract(p.path, tmp_path / "work")
    assert result.files == 5 and (result.root / layout.INSTALL_SH).is_file()
    outside = tarfile.TarInfo("b-1/../../escaped")
    with pytest.raises(IntegrityError, match="outside the destination"):
        integrity._data_filter(outside, tmp_path / "work2")


# --- what GNU tar would read differently: refused, not passed over -------------------------
def _block(info: tarfile.TarInfo, fmt: int, **patch: bytes) -> bytes:
    """The header block tarfile writes for ``info``, with fields overwritten at the byte
    offsets named ``at<offset>`` and its checksum recomputed: a header tarfile cannot write."""
    block = bytearray(info.tobuf(fmt)[-tarfile.BLOCKSIZE:])
    for key, data in patch.items():
        at = int(key[2:])
        block[at:at + len(data)] = data
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _raw_bundle(tmp: Path, *pieces: bytes, end: bytes = b"\0" * 1024) -> Path:
    """A small valid bundle with ``pieces`` spliced in before its end-of-archive marker,
    and no sidecar: the stream itself is judged."""
    p = pack(_entries(tmp), top="b-1", output_dir=tmp / "src", compression="none", mtime=0)
    with tarfile.open(p.path) as tar:
        last = tar.getmembers()[-1]
    cut = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    path = tmp / "b-1.tar"
    path.write_bytes(p.path.read_bytes()[:cut] + b"".join(pieces) + end)
    return path


def _gnu_tar_names(path: Path) -> list[str]:
    return subprocess.run(["tar", "-tf", str(path)], capture_output=True,
                          text=True).stdout.splitlines()


def _pax_member(name: str, data: bytes = b"x") -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.PAX_FORMAT) + data.ljust(tarfile.BLOCKSIZE, b"\0")


def test_several_extended_headers_for_one_member_are_refused(tmp_path: Path) -> None:
    """Two PAX headers naming one member: each tar reader picks its own name."""
    first = _pax_member("b-1/" + "a" * 120)[:-2 * tarfile.BLOCKSIZE]  # its PAX header only
    path = _raw_bundle(tmp_path, first, _pax_member("b-1/" + "b" * 120))
    with pytest.raises(IntegrityError, match="several extended headers for one member"):
        check_and_extract(path, tmp_path / "work")


def test_a_prefix_under_the_gnu_magic_is_refused(tmp_path: Path) -> None:
    """Under the old GNU magic, GNU tar ignores the ustar prefix field; Python's tarfile
    prepends it: the two would unpack the member under different names."""
    info = tarfile.TarInfo("install.sh")
    info.size = 1
    path = _raw_bundle(tmp_path, _block(info, tarfile.GNU_FORMAT, at345=b"b-1/evil"),
                       b"x".ljust(tarfile.BLOCKSIZE, b"\0"))
    with tarfile.open(path) as tar:
        assert "b-1/evil/install.sh" in tar.getnames()
    assert "install.sh" in _gnu_tar_names(path)
    with pytest.raises(IntegrityError, match="prefix under a non-POSIX magic"):
        check_and_extract(path, tmp_path / "work")


def test_a_global_header_is_refused(tmp_path: Path) -> None:
    glob = tarfile.TarInfo.create_pax_global_header({"path": "b-1/install.sh"})
    path = _raw_bundle(tmp_path, glob, _pax_member("b-1/other"))
    with pytest.raises(IntegrityError, match="a global PAX header"):
        check_and_extract(path, tmp_path / "work")


def test_a_negative_size_is_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("b-1/neg")
    path = _raw_bundle(tmp_path, _block(info, tarfile.GNU_FORMAT, at124=b"\xff" * 12))
    with pytest.raises(IntegrityError, match="negative size|unreadable tar header"):
        check_and_extract(path, tmp_path / "work")


def test_only_zeros_may_follow_the_end_of_archive_marker(tmp_path: Path) -> None:
    padded = _raw_bundle(tmp_path, end=b"\0" * 30_000)  # a copy padded to a block device
    assert check_and_extract(padded, tmp_path / "ok").files == 5
    junk = _raw_bundle(tmp_path, end=b"\0" * 1024 + b"\0" * 700 + b"!")
    with pytest.raises(IntegrityError, match="byte .* data after the end-of-archive marker"):
        check_and_extract(junk, tmp_path / "work")
    lone = _raw_bundle(tmp_path, end=b"\0" * 512 + _pax_member("b-1/hidden") + b"\0" * 1024)
    with pytest.raises(IntegrityError, match="data after the end-of-archive marker"):
        check_and_extract(lone, tmp_path / "work2")


def test_a_tarball_without_its_end_of_archive_marker_is_truncated(tmp_path: Path) -> None:
    path = _raw_bundle(tmp_path, end=b"")
    with pytest.raises(IntegrityError, match="truncated"):
        check_and_extract(path, tmp_path / "work")


def test_a_bug_is_not_reported_as_a_corrupt_bundle(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An error of our own while unpacking escapes as itself (exit 1, a traceback with
    --debug), never as IntegrityError (exit 10: 'the bundle is bad')."""
    from bundler import integrity

    def broken(member: tarfile.TarInfo, work: Path) -> None:
        raise ValueError("a bug in the filter")

    monkeypatch.setattr(integrity, "_data_filter", broken)
    p = pack(_entries(tmp_path), top="b-1", output_dir=tmp_path, compression="gzip", mtime=0)
    with pytest.raises(ValueError, match="a bug in the filter"):
        check_and_extract(p.path, tmp_path / "work")
    monkeypatch.setattr(integrity, "_data_filter", lambda m, w: None)
    monkeypatch.setattr(integrity.os, "chmod", lambda *a: (_ for _ in ()).throw(OSError(1, "x")))
    with pytest.raises(OSError):
        check_and_extract(p.path, tmp_path / "work2")
