"""What the wheels need from the host: read from real ELF files, checked on the host.

The shared objects are this interpreter's own ``_ctypes`` extension (a real ELF file that
links ``libffi.so.8`` and ``libc.so.6``), with its ``libffi.so.8`` entry renamed in place to
the library a case needs, so the scanner reads what the dynamic loader would.
"""

from __future__ import annotations

import _ctypes
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from bundler import layout, native
from bundler.hashing import sha256_file
from bundler.runtime import install as installer
from bundler.wheelcache import WheelFile

REAL_SO = Path(_ctypes.__file__)
HOSTLIBS = Path(native.__file__).parent / "runtime" / "hostlibs.py"


def elf_needing(soname: str) -> bytes:
    """A real shared object whose first DT_NEEDED entry reads ``soname``."""
    data = REAL_SO.read_bytes()
    old = b"libffi.so.8\0"
    assert data.count(old) == 1 and len(soname) < len(old)
    return data.replace(old, soname.encode().ljust(len(old), b"\0"))


def wheel(folder: Path, filename: str, members: dict[str, bytes]) -> WheelFile:
    path = folder / filename
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    digest, size = sha256_file(path)
    return WheelFile(filename.split("-")[0], filename.split("-")[1], filename, digest, size,
                     path)


def test_a_wheel_names_the_libraries_it_links_and_those_it_brings(tmp_path: Path) -> None:
    w = wheel(tmp_path, "a-1.0-cp311-cp311-manylinux_2_28_x86_64.whl", {
        "a/_ext.cpython-311-x86_64-linux-gnu.so": elf_needing("libqqq.so.8"),
        "a.libs/libffi-1234abcd.so.8": REAL_SO.read_bytes(),
        "a/__init__.py": b"",
        "a/not-elf.so": b"#!/bin/sh\n",  # a file named .so that is no ELF: skipped
    })
    scan = native.scan_wheel(w.path, tmp_path / "scratch")
    assert scan["needed"] == ["libc.so.6", "libffi.so.8", "libqqq.so.8"]
    assert "libffi-1234abcd.so.8" in scan["provided"] and "_ext" not in scan["needed"]
    assert not list((tmp_path / "scratch").iterdir())  # no scratch copy left behind


def test_requirements_leave_out_what_wheels_and_glibc_provide(tmp_path: Path) -> None:
    wheels = [
        wheel(tmp_path, "a-1.0-cp311-cp311-manylinux_2_28_x86_64.whl",
              {"a/_x.so": elf_needing("libqqq.so.8"), "a/_y.so": elf_needing("libsox.so"),
               "a/_z.so": elf_needing("libown.so")}),
        wheel(tmp_path, "b-1.0-py3-none-manylinux2014_x86_64.whl",
              {"b/libown.so": REAL_SO.read_bytes()}),
        wheel(tmp_path, "c-1.0-py3-none-any.whl", {"c/__init__.py": b""}),
    ]
    req = native.host_requirements(wheels, tmp_path / "cache")
    libs = {lib["soname"]: lib for lib in req["libraries"]}
    # libffi.so.8 is needed by b's copy of _ctypes and provided by no wheel.
    assert set(libs) == {"libqqq.so.8", "libsox.so", "libffi.so.8"}
    assert libs["libqqq.so.8"]["required"] and libs["libqqq.so.8"]["needed_by"] == ["a"]
    assert not libs["libsox.so"]["required"] and libs["libsox.so"]["optional_for"] == "sox"
    assert "sox" in req["optional_for"] and libs["libsox.so"]["debian"] == "libsox-dev"
    assert req["glibc"] == "2.28"  # the newest any wheel's tag asks for


def test_a_scanned_wheel_is_read_once_per_cache(tmp_path: Path) -> None:
    w = wheel(tmp_path, "a-1.0-cp311-cp311-manylinux_2_28_x86_64.whl",
              {"a/_x.so": elf_needing("libqqq.so.8")})
    first = native.host_requirements([w], tmp_path / "cache")
    w.path.write_bytes(b"gone")  # a second scan would fail on this
    assert native.host_requirements([w], tmp_path / "cache") == first


@pytest.mark.parametrize(("names", "floor"), [
    (["x-1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
      "y-1-cp311-cp311-manylinux_2_28_aarch64.whl", "z-1-py3-none-any.whl"], "2.28"),
    (["x-1-cp311-cp311-manylinux2014_x86_64.whl"], "2.17"),
    (["z-1-py3-none-any.whl"], None),
])
def test_the_glibc_floor_is_the_newest_any_wheel_needs(names: list[str],
                                                       floor: str | None) -> None:
    assert native.glibc_floor(names) == floor


def test_packages_are_named_for_both_families() -> None:
    assert native.packages("libgomp.so.1") == ("libgomp1", "libgomp")
    assert native.packages("libavcodec.so.59") == ("ffmpeg", "ffmpeg-free")
    assert native.packages("libpython3.12.so.1.0") == ("libpython3.12", "python3-libs")
    assert native.packages("libunheard-of.so.3") == ("", "")


# --- the host side: runtime/hostlibs.py, with the host's python ---------------------------
def lib(soname: str, required: bool = True, **kw: Any) -> dict[str, Any]:
    return {"soname": soname, "required": required, "needed_by": ["torch"],
            "debian": kw.get("debian", ""), "rhel": kw.get("rhel", "")}


def hostlibs(tmp_path: Path, requirements: dict[str, Any], *args: str
             ) -> subprocess.CompletedProcess[str]:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"host_requirements": requirements}))
    return subprocess.run([sys.executable, "-I", str(HOSTLIBS), str(manifest), *args],
                          capture_output=True, text=True)


def test_a_host_with_every_required_library_passes(tmp_path: Path) -> None:
    proc = hostlibs(tmp_path, {"glibc": "2.17", "libraries": [
        lib("libm.so.6"), lib("libqqq.so.8", required=False)]}, "--json")
    assert proc.returncode == 0, proc.stdout
    result = json.loads(proc.stdout)
    assert result["ok"] and result["checked"] == ["libm.so.6"]
    assert result["optional_missing"] == ["libqqq.so.8"]
    assert hostlibs(tmp_path, {"libraries": [lib("libm.so.6")]}).stdout == ""


def test_a_missing_library_is_named_with_its_packages(tmp_path: Path) -> None:
    proc = hostlibs(tmp_path, {"libraries": [
        lib("libm.so.6"), lib("libqqq.so.8", debian="libqqq8", rhel="qqq-libs"),
        lib("libzzz.so.1")]})
    assert proc.returncode == 1
    (line,) = proc.stdout.splitlines()
    assert "libqqq.so.8 (needed by torch; install Debian/Ubuntu: libqqq8; RHEL: qqq-libs)" in line
    assert "libzzz.so.1 (needed by torch; install the package that provides it)" in line
    assert "libm.so.6" not in line


def test_a_glibc_older_than_the_wheels_need_is_refused(tmp_path: Path) -> None:
    proc = hostlibs(tmp_path, {"glibc": "99.0", "libraries": []})
    assert proc.returncode == 1 and "need glibc 99.0 or newer; this host has 2." in proc.stdout


def test_the_installer_refuses_the_host_with_the_bundles_own_check(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "runtime").mkdir(parents=True)
    (bundle / layout.HOSTLIBS_SCRIPT).write_bytes(HOSTLIBS.read_bytes())
    import platform
    manifest = {"target": {"python": f"{sys.version_info[0]}.{sys.version_info[1]}",
                           "arch": platform.machine()},
                "host_requirements": {"libraries": [lib("libqqq.so.8", debian="libqqq8")]}}
    (bundle / layout.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(installer.Failure, match=r"lacks .*libqqq\.so\.8 .*libqqq8.*nothing was") \
            as refused:
        installer.check_host(bundle, manifest)
    assert refused.value.code == 11
    manifest["host_requirements"] = {"libraries": [lib("libm.so.6")]}
    (bundle / layout.MANIFEST).write_text(json.dumps(manifest))
    assert installer.check_host(bundle, manifest)["libraries"]["checked"] == ["libm.so.6"]
