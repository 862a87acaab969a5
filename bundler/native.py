"""Stage: what the bundled wheels need from the host that no wheel brings.

Every shared object in a wheel names the libraries it links against (its ELF ``DT_NEEDED``
entries, read with pyelftools). Those that some wheel provides itself (by file name or
``DT_SONAME``) and those that are part of glibc are left out; the rest must come from the
host. They are recorded in the manifest, with the packages that provide them, and the
isolated host checks them before anything is installed (``runtime/hostlibs.py``).

Not every such library is needed for diarization: torchaudio and torchcodec link one build
per FFmpeg major version and load the one the host has, if any; torch links the NVIDIA
driver for GPUs. Those are recorded as optional, each with the reason; every other library is
required, so a library this table does not know is checked rather than assumed.

Reading an ELF file needs its end (the section headers), and a wheel member is compressed:
each shared object is streamed once into a scratch file beside the cache. The result is
cached by the wheel's sha256, so a wheel is read once per cache.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from bundler.errors import WheelError
from bundler.progress import task
from bundler.wheelcache import WheelFile

log = logging.getLogger("bundler")

CACHE_FORMAT = 1

# Part of glibc itself: a host that runs the interpreter has them.
GLIBC = frozenset({
    "libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0", "libutil.so.1",
    "libresolv.so.2", "libnsl.so.1", "libanl.so.1", "libmvec.so.1", "libBrokenLocale.so.1",
    "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "ld-linux.so.2",
})

# Linked, but loaded only for a feature bin/diarize does not use: recorded, not required.
OPTIONAL: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"^lib(avcodec|avdevice|avfilter|avformat|avutil|swresample|swscale|postproc)"
                r"\.so\.\d+$"), "ffmpeg",
     "torchaudio and torchcodec load the host's FFmpeg only when it has one; bin/diarize "
     "decodes with soundfile and PyAV, which bring their own"),
    (re.compile(r"^libsox\.so"), "sox", "torchaudio's optional SoX backend"),
    (re.compile(r"^libpython3\.\d+\.so"), "torchcodec",
     "torchcodec's custom ops, loaded only with FFmpeg"),
    (re.compile(r"^libcuda\.so\.1$"), "nvidia-driver",
     "only for --device cuda, which bin/diarize checks when it runs"),
    (re.compile(r"^lib(ibverbs|mlx5|rdmacm)\.so\.\d+$"), "rdma",
     "RDMA for GPUDirect Storage (cuFile), which pyannote does not use"),
]

# soname -> (Debian/Ubuntu package, RHEL/Fedora package)
PACKAGES: dict[str, tuple[str, str]] = {
    "libgomp.so.1": ("libgomp1", "libgomp"),
    "libstdc++.so.6": ("libstdc++6", "libstdc++"),
    "libgcc_s.so.1": ("libgcc-s1", "libgcc"),
    "libatomic.so.1": ("libatomic1", "libatomic"),
    "libgfortran.so.5": ("libgfortran5", "libgfortran"),
    "libquadmath.so.0": ("libquadmath0", "libquadmath"),
    "libz.so.1": ("zlib1g", "zlib"),
    "libcrypt.so.1": ("libcrypt1", "libxcrypt"),
    "libasound.so.2": ("libasound2", "alsa-lib"),
    "libcuda.so.1": ("libcuda1 (NVIDIA driver)", "nvidia-driver-cuda-libs"),
    "libsox.so": ("libsox-dev", "sox-devel"),
    "libibverbs.so.1": ("libibverbs1", "libibverbs"),
    "libmlx5.so.1": ("ibverbs-providers", "libibverbs"),
    "librdmacm.so.1": ("librdmacm1", "librdmacm"),
}
_FFMPEG = re.compile(r"^lib(av|sw|postproc)")
_LIBPYTHON = re.compile(r"^libpython(3\.\d+)\.so")


def packages(soname: str) -> tuple[str, str]:
    """The Debian/Ubuntu and RHEL/Fedora packages that provide ``soname``."""
    if soname in PACKAGES:
        return PACKAGES[soname]
    if _FFMPEG.match(soname):
        return "ffmpeg", "ffmpeg-free"
    m = _LIBPYTHON.match(soname)
    if m:
        return f"libpython{m.group(1)}", "python3-libs"
    return "", ""


def optional(soname: str) -> tuple[str, str] | None:
    """(feature, why it is not needed for diarization) when ``soname`` is optional."""
    return next(((key, why) for pattern, key, why in OPTIONAL if pattern.match(soname)), None)


def host_requirements(wheels: Iterable[WheelFile], cache_dir: Path) -> dict[str, Any]:
    """The manifest's ``host_requirements``: the glibc the wheels' tags need, and every
    library they link that neither a wheel nor glibc provides."""
    wheels = sorted(wheels, key=lambda w: w.filename)
    platform = [w for w in wheels if not w.filename.endswith("-any.whl")]
    cache = cache_dir / "elf"
    with task(f"native: the host libraries {len(platform)} platform wheels need"):
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            scans = list(pool.map(lambda w: (w, _scan_cached(w, cache)), platform))
    provided: set[str] = set()
    needed: dict[str, set[str]] = {}
    for w, scan in scans:
        provided.update(scan["provided"])
        for soname in scan["needed"]:
            needed.setdefault(soname, set()).add(w.name)
    libraries = []
    reasons: dict[str, str] = {}
    for soname in sorted(set(needed) - provided - GLIBC):
        debian, rhel = packages(soname)
        feature = optional(soname)
        if feature is not None:
            reasons[feature[0]] = feature[1]
        libraries.append({"soname": soname, "required": feature is None,
                          "optional_for": None if feature is None else feature[0],
                          "needed_by": sorted(needed[soname]), "debian": debian, "rhel": rhel})
    return {"glibc": glibc_floor(w.filename for w in wheels), "libraries": libraries,
            "optional_for": reasons}

_MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_")
_LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def glibc_floor(filenames: Iterable[str]) -> str | None:
    """The newest glibc a wheel's platform tag asks for (each wheel needs only its oldest)."""
    floor: tuple[int, int] | None = None
    for name in filenames:
        platform_tag = name[:-len(".whl")].split("-")[-1]
        versions = [(int(a), int(b)) for a, b in _MANYLINUX.findall(platform_tag + "_")]
        versions += [v for legacy, v in _LEGACY.items() if platform_tag.startswith(legacy)]
        if versions:
            need = min(versions)
            floor = need if floor is None else max(floor, need)
    return None if floor is None else f"{floor[0]}.{floor[1]}"


def _scan_cached(wheel: WheelFile, cache: Path) -> dict[str, list[str]]:
    path = cache / f"{wheel.sha256}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("format") == CACHE_FORMAT:
            return {"needed": data["needed"], "provided": data["provided"]}
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    scan = scan_wheel(wheel.path, scratch=cache)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps({"format": CACHE_FORMAT, **scan}, sort_keys=True))
    tmp.replace(path)
    return scan


def scan_wheel(wheel: Path, scratch: Path) -> dict[str, list[str]]:
    """The sonames a wheel's shared objects need and those it provides."""
    scratch.mkdir(parents=True, exist_ok=True)
    needed: set[str] = set()
    provided: set[str] = set()
    try:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                base = info.filename.rsplit("/", 1)[-1]
                if not (base.endswith(".so") or ".so." in base) or info.is_dir():
                    continue
                provided.add(base)
                with archive.open(info) as member, \
                        tempfile.TemporaryFile(dir=scratch, prefix=".elf-") as copy:
                    if member.read(4) != b"\x7fELF":
                        continue
                    copy.write(b"\x7fELF")
                    shutil.copyfileobj(member, copy, 1 << 20)
                    copy.seek(0)
                    try:
                        _dynamic(ELFFile(copy), needed, provided)
                    except ELFError as exc:
                        raise WheelError(f"{wheel.name}: {info.filename} is not a readable "
                                         f"ELF file ({exc})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise WheelError(f"{wheel.name}: not a readable wheel ({exc})") from None
    return {"needed": sorted(needed), "provided": sorted(provided)}


def _dynamic(elf: ELFFile, needed: set[str], provided: set[str]) -> None:
    for section in elf.iter_sections():
        if isinstance(section, DynamicSection):
            for tag in section.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.add(tag.needed)  # type: ignore[attr-defined]
                elif tag.entry.d_tag == "DT_SONAME":
                    provided.add(tag.soname)  # type: ignore[attr-defined]
