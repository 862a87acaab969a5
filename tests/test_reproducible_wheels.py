"""Wheels built on the build host from sdists are the same bytes on every build host.

Real parts: real zip files, a real sdist (docopt's, from PyPI, by its locked hash), the real
locked build backend, and the tool's own code run under another CPython (3.12) with another
umask, time zone, locale and cache folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from e2e import pyenv_python

from bundler.errors import BuiltWheelMismatch
from bundler.lockfile import (
    BuiltRecord,
    LockedRequirement,
    build_lock_path,
    load_build_lock,
    parse_built_records,
)
from bundler.sdist import normalize_wheel
from bundler.spec import IndexOptions, Target
from bundler.wheelcache import WheelCache
from bundler.wheels import fetch_wheels

EPOCH = 1700000000
DOCOPT_SDIST = "49b3a825280bd66b3aa83585ef59c4a8c82f2c8a522dbe754a8bc8d08c85c491"


def _zip(path: Path, entries: list[tuple[str, int, tuple[int, ...], bytes]],
         compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, mode, date, data in entries:
            info = zipfile.ZipInfo(name, date_time=date)  # type: ignore[arg-type]
            info.external_attr = mode << 16
            info.compress_type = compression
            zf.writestr(info, data)
    return path


ENTRIES = [
    ("pkg/__init__.py", 0o100600, (2024, 5, 1, 10, 0, 0), b"x = 1\n"),
    ("pkg-1.0.dist-info/RECORD", 0o100664, (2023, 1, 1, 0, 0, 0), b"pkg/__init__.py,,\n"),
    ("pkg/run.sh", 0o100700, (2022, 1, 1, 0, 0, 0), b"#!/bin/sh\n"),
    ("pkg-1.0.dist-info/METADATA", 0o100640, (2021, 1, 1, 0, 0, 0), b"Name: pkg\n"),
    ("pkg-1.0.dist-info/WHEEL", 0o100644, (2021, 1, 1, 0, 0, 0), b"Wheel-Version: 1.0\n"),
]


def test_normalisation_fixes_order_times_modes_and_compression(tmp_path: Path) -> None:
    a = _zip(tmp_path / "a.whl", ENTRIES)
    b = _zip(tmp_path / "b.whl", [(n, 0o100644 if m & 0o111 == 0 else 0o100755,
                                   (2030, 1, 1, 0, 0, 0), d) for n, m, _, d in
                                  reversed(ENTRIES)], compression=zipfile.ZIP_STORED)
    assert a.read_bytes() != b.read_bytes()
    normalize_wheel(a, EPOCH)
    normalize_wheel(b, EPOCH)
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == [
            "pkg/__init__.py", "pkg/run.sh", "pkg-1.0.dist-info/METADATA",
            "pkg-1.0.dist-info/WHEEL", "pkg-1.0.dist-info/RECORD"]  # RECORD last
        modes = {i.filename: i.external_attr >> 16 for i in infos}
        assert modes["pkg/run.sh"] == 0o100755 and modes["pkg/__init__.py"] == 0o100644
        assert modes["pkg-1.0.dist-info/RECORD"] == 0o100644
        assert {i.date_time for i in infos} == {(2023, 11, 14, 22, 13, 20)}  # EPOCH, UTC
        assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
        assert zf.read("pkg/__init__.py") == b"x = 1\n"  # contents untouched
    assert (a.stat().st_mode & 0o777) == 0o644


def test_normalisation_clamps_times_before_1980(tmp_path: Path) -> None:
    a = _zip(tmp_path / "a.whl", ENTRIES)
    normalize_wheel(a, 0)
    with zipfile.ZipFile(a) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_normalisation_gives_the_same_bytes_under_another_python(tmp_path: Path) -> None:
    py312 = pyenv_python(12)
    if py312 is None or sys.version_info[:2] == (3, 12):
        pytest.skip("needs a CPython 3.12 beside this one")
    a = _zip(tmp_path / "a.whl", ENTRIES)
    b = tmp_path / "b.whl"
    shutil.copy(a, b)
    normalize_wheel(a, EPOCH)
    # normalize_wheel uses only the standard library: run its source under 3.12.
    import inspect

    from bundler import sdist

    code = ("import os, time, zipfile\nfrom pathlib import Path\nZIP_EPOCH = 315532800\n"
            + inspect.getsource(sdist.normalize_wheel)
            + f"\nnormalize_wheel(Path({str(b)!r}), {EPOCH})\n")
    proc = subprocess.run([str(py312), "-I", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(a.read_bytes()).hexdigest() == hashlib.sha256(
        b.read_bytes()).hexdigest()


def test_built_records_parse_and_round_trip() -> None:
    rec = BuiltRecord("docopt", "0.6.2", "a" * 64, "docopt-0.6.2-py2.py3-none-any.whl", "b" * 64)
    parsed = parse_built_records("setuptools==1 --hash=sha256:" + "c" * 64 + "\n"
                                 + rec.line() + "\n# pyannote-bundle: built junk\n")
    assert parsed == {"a" * 64: rec}


def test_the_shipped_build_lock_pins_the_backend_and_records_docopt() -> None:
    lock = load_build_lock()
    assert [r.name for r in lock.requirements] == ["setuptools"]
    assert all(len(r.hashes) >= 1 for r in lock.requirements)
    (record,) = [r for r in lock.built.values() if r.name == "docopt"]
    assert record.sdist_sha256 == DOCOPT_SDIST
    assert record.filename == "docopt-0.6.2-py2.py3-none-any.whl"


# --- a real sdist built by the real backend ------------------------------------------------

DOCOPT_LOCK = f"docopt==0.6.2 --hash=sha256:{DOCOPT_SDIST}\n"
HOST = Target.from_slug("py311-linux-x86_64")


@pytest.fixture(scope="module")
def docopt_lock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lock") / "docopt.lock"
    path.write_text(DOCOPT_LOCK)
    return path


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory: pytest.TempPathFactory, docopt_lock: Path) -> Path:
    """docopt built once, here, under a umask that would leave its files unreadable to
    others (the umask reaches the backend's files unless the build fixes it)."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.umask(0o077)
    try:
        fetch_wheels(docopt_lock, HOST, IndexOptions(), cache, EPOCH)
    finally:
        os.umask(old)
    return cache


def test_docopt_builds_to_the_recorded_wheel(built_cache: Path, docopt_lock: Path) -> None:
    """The recorded bytes, from a build whose SOURCE_DATE_EPOCH and umask are not the ones
    the record was made with (CPython 3.12 under umask 077, TZ=Asia/Tokyo and LANG=C made
    it too: tests/test_e2e_rebuild.py builds whole bundles that way)."""
    (w,) = fetch_wheels(docopt_lock, HOST, IndexOptions(), built_cache, EPOCH + 1)
    record = load_build_lock().built[DOCOPT_SDIST]
    assert (w.sha256, w.filename, w.built_from) == (record.sha256, record.filename,
                                                    DOCOPT_SDIST)
    with zipfile.ZipFile(w.path) as zf:
        assert {i.external_attr >> 16 for i in zf.infolist()} == {0o100644}
        wheel_meta = zf.read("docopt-0.6.2.dist-info/WHEEL").decode()
    assert "Generator: setuptools (84.2.1)" in wheel_meta  # the locked backend, no other


def test_a_build_that_cannot_reproduce_the_recorded_wheel_names_the_package(
        tmp_path: Path, built_cache: Path, docopt_lock: Path) -> None:
    # The same backend, and a record that the wheel it makes cannot match.
    text = build_lock_path().read_text()
    wrong = load_build_lock().built[DOCOPT_SDIST]
    text = text.replace(wrong.sha256, "0" * 64)
    lock = tmp_path / "build-backend.txt"
    lock.write_text(text)
    with pytest.raises(BuiltWheelMismatch) as err:
        fetch_wheels(docopt_lock, HOST, IndexOptions(), built_cache, EPOCH, build_lock=lock)
    msg = str(err.value)
    assert msg.startswith("docopt==0.6.2: the wheel built from its sdist has sha256 "
                          f"{wrong.sha256}, not the {'0' * 64}")
    assert "setuptools==" in msg and "\n" not in msg
    assert err.value.exit_code == 4


def test_the_built_wheel_is_cached_per_backend(built_cache: Path, docopt_lock: Path) -> None:
    cache = built_cache
    (w,) = fetch_wheels(docopt_lock, HOST, IndexOptions(), cache, EPOCH)
    key = load_build_lock().key
    assert w.path.parent == cache / "sdist-builds" / DOCOPT_SDIST / key
    # A wheel left by an older tool under the old layout is never picked up.
    stale = cache / "built" / DOCOPT_SDIST / w.filename
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not this")
    assert WheelCache(cache).lookup(LockedRequirement("docopt", "0.6.2",
                                                      frozenset([DOCOPT_SDIST])),
                                    Target.host().supported_tags()) is None
    (again,) = fetch_wheels(docopt_lock, HOST, IndexOptions(), cache, EPOCH)
    assert again.path == w.path and again.sha256 == w.sha256


def test_a_cached_wheel_that_is_not_the_recorded_one_is_built_again(
        built_cache: Path, docopt_lock: Path) -> None:
    (w,) = fetch_wheels(docopt_lock, HOST, IndexOptions(), built_cache, EPOCH)
    good = w.path.read_bytes()
    w.path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # an older tool's, or bit rot
    (again,) = fetch_wheels(docopt_lock, HOST, IndexOptions(), built_cache, EPOCH)
    assert again.sha256 == load_build_lock().built[DOCOPT_SDIST].sha256
    assert again.path.read_bytes() == good
