"""Base images: the one a site gives (``--base``), or the default, a minimal Debian made by
mmdebstrap from Debian's packages and kept in a cache by its inputs (under a lock)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bundler.errors import HostMismatch, ImageError, InputError, IntegrityError
from bundler.hashing import sha256_file
from bundler.oci.archive import (
    DOCKER_LAYERS,
    LAYER_EPOCH,
    MT_LAYER,
    MT_LAYER_GZIP,
    OCI_ARCH,
    Blob,
    canonical,
    file_blob,
)
from bundler.oci.reader import check_blob, check_layer, open_layout, unpack_archive
from bundler.oci.rootfs import member_name
from bundler.subproc import last_lines

log = logging.getLogger("bundler")

DEFAULT_MIRROR = "http://deb.debian.org/debian"
# The Debian release whose python3 is the target's, for the default base.
DEBIAN_SUITES = {"3.11": "bookworm", "3.13": "trixie"}


@dataclass(frozen=True)
class Base:
    """The base image: its layers (files and digests), config, name and packages."""

    layers: list[Blob]
    layer_files: list[Path]
    config: dict[str, Any]
    name: str
    digest: str  # the base's manifest digest, or its layer's for the default base
    packages: list[dict[str, str]]


def given_base(spec: str, work: Path, arch: str) -> Base:
    """``oci-archive:FILE`` or an OCI layout folder (``oci:DIR`` too)."""
    kind, _, rest = spec.partition(":")
    if kind == "oci-archive" and rest:
        archive = Path(rest.split(":")[0])
        if not archive.is_file():
            raise InputError(f"--base {spec}: {archive} is not a file")
        root = work / "base-layout"
        root.mkdir()
        unpack_archive(archive, root)
        what = archive.name
    else:
        root = Path(rest.split(":")[0] if kind == "oci" and rest else spec)
        if not root.is_dir():
            raise InputError(f"--base {spec}: give oci-archive:FILE or an OCI layout folder")
        what = str(root)
    image = open_layout(root, what, arch)
    blobs, files = [], []
    layers = image.manifest["layers"]
    diff_ids = (image.config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise IntegrityError(what, f"its config lists {len(diff_ids or [])} diff_ids for "
                             f"{len(layers)} layers: the base is damaged or was altered")
    for i, desc in enumerate(layers):
        if not isinstance(desc, dict):
            raise InputError(f"{what}: layer {i} is not a descriptor")
        media = DOCKER_LAYERS.get(str(desc.get("mediaType")), str(desc.get("mediaType")))
        if media not in (MT_LAYER, MT_LAYER_GZIP):
            raise InputError(f"{what}: layer {i} is {media}: only tar and tar+gzip layers "
                             "can be read")
        path = image.blob(str(desc.get("digest")))
        if not path.is_file():
            raise InputError(f"{what}: layer {desc.get('digest')} is missing")
        digest = str(desc["digest"]).split(":", 1)[1]
        diff = check_layer(path, what, i, desc, str(diff_ids[i]), media == MT_LAYER_GZIP)
        blobs.append(file_blob(path, str(media), digest, path.stat().st_size, diff,
                               "base", f"base image {what}, layer {i + 1}"))
        files.append(path)
    return Base(blobs, files, image.config, what, image.manifest_digest, [])


def default_base(target_python: str, arch: str, cache_dir: Path, mirror: str,
                 packages: list[str]) -> Base:
    """A minimal Debian with the target's python3, built by mmdebstrap from Debian's
    packages with a fixed SOURCE_DATE_EPOCH, and kept in the cache by its inputs."""
    suite = DEBIAN_SUITES.get(target_python)
    if suite is None:
        raise HostMismatch(f"no Debian release ships Python {target_python} as python3 (the "
                           f"default base knows {', '.join(sorted(DEBIAN_SUITES))}): pass "
                           f"--base with an image that has python{target_python}")
    darch = OCI_ARCH.get(arch)
    if darch is None:
        raise HostMismatch(f"no Debian architecture for {arch}")
    include = sorted({"python3", *packages})
    inputs = {"tool": "mmdebstrap", "variant": "apt", "suite": suite, "arch": darch,
              "mirror": mirror, "include": include, "epoch": LAYER_EPOCH, "format": 1}
    key = hashlib.sha256(canonical(inputs)).hexdigest()[:24]
    folder = cache_dir / "image-bases" / f"{suite}-{darch}-{key}"
    layer, meta = folder / "layer.tar", folder / "base.json"
    if not meta.is_file():
        if shutil.which("mmdebstrap") is None:
            raise ImageError("the default base is made with mmdebstrap, which is not "
                             "installed (Debian/Ubuntu: apt-get install mmdebstrap), or pass "
                             "--base oci-archive:FILE")
        with _cache_lock(folder):
            if not meta.is_file():  # not made by another build while this one waited
                log.info("image: building the %s base (%s, %s) with mmdebstrap, about 90 s; "
                         "cached in %s", suite, darch, " ".join(include), folder)
                _make_default_base(folder, inputs, suite, darch, include, mirror)
    info = json.loads(meta.read_text())
    digest, size = info["digest"], info["size"]
    # The cache is a folder anyone with that user's rights may have changed since.
    check_blob(f"the cached base {folder}", "layer", f"sha256:{digest}", size,
               *sha256_file(layer))
    blob = file_blob(layer, MT_LAYER, digest, size, digest, "base",
                     f"Debian {suite} {darch} (mmdebstrap --variant=apt: "
                     f"{', '.join(include)})")
    config = {"architecture": darch, "os": "linux",
              "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                                 "/sbin:/bin"]}}
    return Base([blob], [layer], config, f"debian:{suite} (mmdebstrap, {mirror})",
                f"sha256:{digest}", info["packages"])


@contextlib.contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder``'s cache entry: two builds at once wait for each
    other instead of writing the same files (the second then finds the entry made)."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _make_default_base(folder: Path, inputs: dict[str, Any], suite: str, darch: str,
                       include: list[str], mirror: str) -> None:
    """mmdebstrap's Debian as ``folder`` (layer.tar, base.json), made under a unique name
    beside it and renamed into place whole: a reader sees no entry or a complete one."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        raw = tmp / "raw.tar"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "SOURCE_DATE_EPOCH": str(LAYER_EPOCH),
               "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
        try:
            res = subprocess.run(["mmdebstrap", "--quiet", "--variant=apt",
                                  f"--architectures={darch}", f"--include={','.join(include)}",
                                  "--format=tar", suite, str(raw), mirror],
                                 env=env, capture_output=True, text=True, errors="replace",
                                 stdin=subprocess.DEVNULL, timeout=1800)
        except subprocess.TimeoutExpired:
            raise ImageError("mmdebstrap did not finish in 30 min") from None
        if res.returncode != 0:
            raise ImageError(f"mmdebstrap could not build the {suite} base from {mirror} "
                             f"(exit {res.returncode}): "
                             f"{last_lines(res.stderr, 2) or 'no message'}")
        with open(tmp / "layer.tar", "wb") as out:
            packages_found = normalise_base(raw, out)
        raw.unlink()
        digest, size = sha256_file(tmp / "layer.tar")
        (tmp / "base.json").write_text(json.dumps({"inputs": inputs, "digest": digest,
                                                   "size": size, "packages": packages_found},
                                                  indent=1))
        os.chmod(tmp, 0o755)
        if folder.exists():  # a half entry of a build from before this lock existed
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def normalise_base(raw: Path, out: IO[bytes]) -> list[dict[str, str]]:
    """mmdebstrap's tar as a layer: its order, owners and modes; no device nodes (a runtime
    mounts /dev), mtimes clamped to LAYER_EPOCH, no PAX headers. Returns dpkg's packages."""
    status = b""
    with tarfile.open(raw, "r:") as src, \
            tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as dst:
        for m in src:
            if m.ischr() or m.isblk() or m.isfifo():
                continue
            m.mtime = min(int(m.mtime), LAYER_EPOCH)
            m.pax_headers = {}
            m.uname = m.gname = ""
            if m.isfile():
                f = src.extractfile(m)
                assert f is not None
                if member_name(m.name) == "var/lib/dpkg/status":
                    status = f.read()
                    f = io.BytesIO(status)
                dst.addfile(m, f)
            else:
                dst.addfile(m)
    return dpkg_packages(status)


def dpkg_packages(status: bytes) -> list[dict[str, str]]:
    """The installed packages of a dpkg status file: name, version, architecture."""
    out = []
    for para in status.decode("utf-8", "replace").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in para.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            out.append({"name": fields["Package"], "version": fields.get("Version", ""),
                        "arch": fields.get("Architecture", "")})
    return sorted(out, key=lambda p: (p["name"], p["arch"]))
