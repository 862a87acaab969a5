"""`image`: a bundle installed into a reproducible OCI image archive, with no daemon.

    pyannote-bundle image BUNDLE --output DIR [--base oci-archive:FILE | --base DIR]

The bundle is checked and unpacked as ``verify`` does, then installed by its own installer
(``runtime/install.py``, what ``install.sh`` runs) into ``/opt/diarization`` inside the base
image's root file system, run there with ``chroot`` in user, mount, PID and network
namespaces of its own (``sandbox``; SECURITY.md says what it can and cannot reach): the
venv is made by the base's own ``python3.X``, so every absolute path it writes (shebangs,
``pyvenv.cfg``) is right inside the image. The result is cut into layers that change at
different rates:

=========  ===================================================================  ==========
layer      holds                                                                 changes
=========  ===================================================================  ==========
base       the base image's layers, as they are (default: Debian from mmdebstrap)  rarely
venv       ``releases/image/venv``: the Python environment (GBs)                   wheels
models     ``releases/image/models`` but its ``*.yaml``: the weights               a model
config     everything else: configs, runtime, samples, receipt, stable links       anything
=========  ===================================================================  ==========

Each layer is an uncompressed tar, written deterministically: entries sorted, every mtime
``LAYER_EPOCH``, owner 0:0 with no names, GNU long names (no PAX headers, which carry
times), modes as the installer made them (it forces umask 022). The release is always
named ``image`` (``install.py --release image``), so a parameter or a model update leaves
the venv layer byte-identical: a registry already holding it transfers only the rest.
The layer mtimes are one constant rather than the bundle's SOURCE_DATE_EPOCH for the same
reason: a release built on another day must not change 7 GB of unchanged files. The
bundle's time is the image's ``created``.

Why uncompressed: gzip's bytes depend on the zlib build (zlib and zlib-ng give different
streams at the same level), so a compressed layer would not have the same digest on every
build host; and gzip is slow (``gzip -6`` of the 210 MB Debian base layer took 43 s here,
``-1`` 14 s: minutes for a venv of GBs). ``skopeo copy --preserve-digests`` pushes the
layers as they are.

The archive (``<bundle>.oci.tar``) is an OCI image layout in a tar (podman's, skopeo's and
buildah's ``oci-archive`` transport), itself deterministic. Layers are streamed twice from
the staged files (once to hash them, once into the archive, hashed again and compared), and
a layer's staged files are removed once it is in the archive: at the peak the disk holds
about one copy of the installed image beside the base, not two.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

from bundler import __version__
from bundler.errors import (
    BundlerError,
    CannotWrite,
    HostMismatch,
    InputError,
    InstallError,
    IntegrityError,
    SmokeError,
)
from bundler.hashing import sha256_file
from bundler.integrity import Limits, check_and_extract
from bundler.offline_install import installer_knows
from bundler.subproc import last_lines

log = logging.getLogger("bundler")

PREFIX = "opt/diarization"  # inside the image, without the leading slash
RELEASE = "image"  # install.py --release: the same release path in every image
ENTRYPOINT = f"/{PREFIX}/bin/diarize"
TRANSCRIBE = f"/{PREFIX}/bin/transcribe"
USER = "65534:65534"  # nobody:nogroup on Debian; the image runs as any UID all the same
WORKDIR = "work"  # an empty folder owned by root: nothing needs to write there
SOURCE_DIR = ".pyannote-bundle-src"  # the unpacked bundle inside the staged root, removed
LAYER_EPOCH = 946684800  # 2000-01-01T00:00:00Z: every mtime in every layer we write
OFFLINE_PTH = "pyannote_bundle_offline.pth"  # configure.py's, in the venv: config layer
PROJECT_URL = "https://github.com/pyannote-bundle/pyannote-bundle"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# The Debian release whose python3 is the target's, for the default base.
DEBIAN_SUITES = {"3.11": "bookworm", "3.13": "trixie"}
OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
# Who the staged root belongs to and who the installer runs as when this tool runs as
# root: one id no account, no subordinate range (/etc/subuid starts at 100000) and no
# rootless container uses, mapped to root inside the installer's user namespace. Code from
# a bundle or a base then has no more rights over the build host than "nobody".
STAGE_ID = 0x7FFE_0000
STAGE_IDS = 65536  # ids 0-65535 inside the installer's namespace (nobody is 65534)

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYERS = {"application/vnd.docker.image.rootfs.diff.tar.gzip": MT_LAYER_GZIP,
                 "application/vnd.docker.image.rootfs.diff.tar": MT_LAYER}
LABEL = "io.github.pyannote-bundle"
BLOCK = 512
RECORD = 20 * BLOCK
CHUNK = 1 << 20


class ImageError(BundlerError):
    """The image cannot be made: the default base cannot be built (mmdebstrap, the Debian
    mirror), or the installer failed inside the base."""

    exit_code = InstallError.exit_code


# --- data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageOptions:
    """What ``build_image`` needs beside the bundle."""

    output_dir: Path
    cache_dir: Path
    base: str | None = None  # oci-archive:FILE, or an OCI layout folder; None: Debian
    tag: str | None = None  # org.opencontainers.image.ref.name in index.json
    mirror: str = DEFAULT_MIRROR  # for the default base (a snapshot.debian.org URL pins it)
    allowed_signers: Path | None = None  # the sidecar's signature, as verify checks it


@dataclass(frozen=True)
class Blob:
    """One blob of the archive: its digest and size known before it is written."""

    digest: str  # sha256 hex
    size: int
    media_type: str
    write: Callable[[IO[bytes]], None] = field(repr=False, compare=False)
    # Called once the blob is in the archive: a layer's staged files are removed then, so
    # the disk holds about one copy of the image, not the staged root and the archive both.
    written: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    diff_id: str = ""  # sha256 of the uncompressed tar (layers)
    role: str = ""  # base, venv, models, config
    holds: str = ""


@dataclass(frozen=True)
class ImageResult:
    """What was written, for the CLI to render."""

    path: Path
    digest: str  # "sha256:<hex>" of the manifest: what a registry calls the image
    config_digest: str
    tag: str
    bundle: str
    bundle_sha256: str
    base: dict[str, Any]
    layers: list[dict[str, Any]]
    size: int
    entrypoint: list[str]
    transcribe: bool
    signer: str | None = None  # who signed the bundle, with --allowed-signers

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "digest": self.digest,
                "config_digest": self.config_digest, "tag": self.tag, "bundle": self.bundle,
                "bundle_sha256": self.bundle_sha256, "base": self.base,
                "layers": self.layers, "size": self.size, "entrypoint": self.entrypoint,
                "transcribe": TRANSCRIBE if self.transcribe else None,
                "signature": {"ok": True, "signer": self.signer} if self.signer else None}


# --- deterministic tar -------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """A file system entry of a layer we write (path relative to the root, no slash)."""

    name: str
    kind: str  # "dir", "file", "symlink"
    mode: int
    size: int = 0
    source: Path | None = None
    target: str = ""


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.mtime = LAYER_EPOCH
    info.mode = entry.mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif entry.kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, entry.target
    else:
        info.size = entry.size
    return info


class _Sink(io.RawIOBase):
    """Counts and hashes what is written, and passes it on to ``out`` when there is one."""

    def __init__(self, out: IO[bytes] | None = None) -> None:
        super().__init__()
        self.hash = hashlib.sha256()
        self.size = 0
        self.out = out

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += len(view)
        if self.out is not None:
            self.out.write(view)
        return len(view)


def write_layer(entries: list[Entry], out: IO[bytes] | _Sink) -> None:
    """The layer tar of ``entries``, in their (sorted) order, to ``out``."""
    with tarfile.open(fileobj=cast(IO[bytes], out), mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for entry in entries:
            info = _tarinfo(entry)
            if entry.kind == "file":
                assert entry.source is not None
                with open(entry.source, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def layer_blob(entries: list[Entry], role: str, holds: str) -> Blob:
    """Hash the layer once; the archive writer streams it again and checks the digest."""
    sink = _Sink()
    write_layer(entries, sink)
    digest, size = sink.hash.hexdigest(), sink.size

    def write(out: IO[bytes]) -> None:
        again = _Sink(out)
        write_layer(entries, again)
        if again.hash.hexdigest() != digest or again.size != size:
            raise IntegrityError(f"{role} layer", "a staged file changed while the image "
                                 "was written; build again")

    def written() -> None:
        for entry in entries:
            if entry.kind == "file" and entry.source is not None:
                entry.source.unlink(missing_ok=True)

    return Blob(digest, size, MT_LAYER, write, written, diff_id=digest, role=role,
                holds=holds)


def bytes_blob(data: bytes, media_type: str) -> Blob:
    def write(out: IO[bytes]) -> None:
        out.write(data)

    return Blob(hashlib.sha256(data).hexdigest(), len(data), media_type, write)


def file_blob(path: Path, media_type: str, digest: str, size: int, diff_id: str, role: str,
              holds: str) -> Blob:
    def write(out: IO[bytes]) -> None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != digest:
            raise IntegrityError(path.name, f"sha256 {h.hexdigest()} is not the {digest} "
                                 "its manifest records: the base is damaged")

    return Blob(digest, size, media_type, write, diff_id=diff_id, role=role, holds=holds)


def _header(name: str, size: int, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.mtime = LAYER_EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.size = 0 if directory else size
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def write_archive(path: Path, blobs: list[Blob], index: bytes) -> int:
    """The oci-archive tar at ``path`` (written beside it, renamed when whole): the layout's
    folders, every blob by digest, index.json and oci-layout, in sorted order."""
    layout = json.dumps({"imageLayoutVersion": "1.0.0"}, separators=(",", ":")).encode()
    unique = {b.digest: b for b in blobs}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            out = _Sink(f)
            out.write(_header("blobs/", 0, True))
            out.write(_header("blobs/sha256/", 0, True))
            for digest in sorted(unique):
                blob = unique[digest]
                out.write(_header(f"blobs/sha256/{digest}", blob.size))
                start = out.size
                blob.write(cast(IO[bytes], out))
                if out.size - start != blob.size:
                    raise IntegrityError(f"blob {digest}", "its size changed while the image "
                                         "was written; build again")
                out.write(b"\0" * (-blob.size % BLOCK))
                if blob.written is not None:
                    blob.written()
            for name, data in (("index.json", index), ("oci-layout", layout)):
                out.write(_header(name, len(data)))
                out.write(data)
                out.write(b"\0" * (-len(data) % BLOCK))
            out.write(b"\0" * (2 * BLOCK))
            out.write(b"\0" * (-out.size % RECORD))
            f.flush()
            os.fsync(f.fileno())
            size = out.size
        os.replace(tmp, path)
        return size
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def canonical(data: Any) -> bytes:
    """JSON as the image's digests cover it: sorted keys, no spaces."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


# --- reading an OCI image (a base given with --base, an archive for inspect) -------------
@dataclass(frozen=True)
class OciImage:
    """An image in an OCI layout folder: its manifest, config and layer files."""

    root: Path
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    name: str

    def blob(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
            raise InputError(f"{self.name}: blob digest {digest!r} is not sha256")
        return self.root / "blobs" / "sha256" / hexd


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{what}: cannot read {path.name} ({exc}): not an OCI image "
                         "layout") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path.name} is not a JSON object: not an OCI image")
    return data


def _blob_json(image: OciImage, desc: Any, what: str, kind: str) -> dict[str, Any]:
    """A small blob (index, manifest, config) named by the descriptor ``desc``, read only
    once its bytes match the descriptor's digest (and size)."""
    if not isinstance(desc, dict):
        raise InputError(f"{what}: its {kind} descriptor is not a JSON object")
    digest = str(desc.get("digest"))
    path = image.blob(digest)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{what}: its {kind} {digest} cannot be read ({exc.strerror}): not "
                         "a whole OCI image layout") from None
    check_blob(what, kind, digest, desc.get("size"), hashlib.sha256(data).hexdigest(),
               len(data))
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise InputError(f"{what}: its {kind} {digest} is not a JSON object")
    return doc


def check_blob(what: str, kind: str, digest: str, size: Any, actual: str,
               actual_size: int) -> None:
    """Raise IntegrityError unless a blob's bytes are the ones its descriptor names."""
    if digest.partition(":")[2] != actual:
        raise IntegrityError(what, f"its {kind} {digest} has sha256 {actual}: the base is "
                             "damaged or was altered")
    if isinstance(size, int) and size != actual_size:
        raise IntegrityError(what, f"its {kind} {digest} is {actual_size} bytes, not the "
                             f"{size} its descriptor says: the base is damaged or was altered")


def open_layout(root: Path, what: str, arch: str | None = None) -> OciImage:
    """The image of an OCI layout folder (an index may hold several platforms: the one for
    ``arch`` is taken). Every blob read (nested index, manifest, config) is checked against
    its digest first; the layers are checked by ``given_base``."""
    if not (root / "oci-layout").is_file() or not (root / "index.json").is_file():
        raise InputError(f"{what}: no oci-layout and index.json: not an OCI image layout "
                         "(give oci-archive:FILE or a folder written by skopeo copy oci:DIR)")
    index = _read_json(root / "index.json", what)
    manifests = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    if not manifests:
        raise InputError(f"{what}: index.json names no image")
    probe = OciImage(root, "", {}, {}, what)
    desc = manifests[0]
    doc = _blob_json(probe, desc, what, "manifest")
    if doc.get("mediaType") == MT_INDEX or "manifests" in doc:
        wanted = OCI_ARCH.get(arch or "", arch)
        choices = [m for m in doc.get("manifests") or [] if isinstance(m, dict)
                   and (m.get("platform") or {}).get("architecture") == wanted]
        if not choices:
            have = sorted({str((m.get("platform") or {}).get("architecture"))
                           for m in doc.get("manifests") or [] if isinstance(m, dict)})
            raise HostMismatch(f"{what}: no image for {wanted} in its index (it has "
                               f"{', '.join(have)})")
        desc = choices[0]
        doc = _blob_json(probe, desc, what, "manifest")
    if doc.get("mediaType") not in (None, MT_MANIFEST, DOCKER_MANIFEST) \
            or not isinstance(doc.get("layers"), list):
        raise InputError(f"{what}: {desc.get('digest')} is not an image manifest")
    config = _blob_json(probe, doc.get("config"), what, "config")
    return OciImage(root, str(desc.get("digest")), doc, config, what)


def unpack_archive(archive: Path, dest: Path) -> None:
    """An oci-archive's members into ``dest``: only the layout's own names, regular files
    and folders (the archive may come from anywhere)."""
    try:
        with tarfile.open(archive, "r:") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                parts = [p for p in name.parts if p not in (".", "")]
                if not parts or name.is_absolute() or ".." in parts \
                        or parts[0] not in ("blobs", "index.json", "oci-layout"):
                    raise InputError(f"{archive.name}: member {member.name!r} is not part of "
                                     "an OCI image layout")
                target = dest.joinpath(*parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    assert src is not None
                    with open(target, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                else:
                    raise InputError(f"{archive.name}: member {member.name!r} is not a "
                                     "regular file or folder")
    except tarfile.TarError as exc:
        raise InputError(f"{archive.name}: not a tar archive ({exc})") from None


# --- the root file system ----------------------------------------------------------------
def _inside(root: Path, rel: str, follow_last: bool = False) -> Path:
    """``rel`` under ``root`` as a chroot would resolve it: a symbolic link on the way is
    followed inside ``root`` (an absolute target means ``root``'s), and ``..`` stops at
    ``root``, so no layer member can reach a file outside the staged root."""
    parts = [p for p in PurePosixPath(rel).parts if p not in ("/", ".", "")]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        if (parts or follow_last) and here.is_symlink():
            hops += 1
            if hops > 40:
                raise InputError(f"{rel}: too many levels of symbolic links in the base")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            parts = [p for p in PurePosixPath(target).parts if p not in ("/", ".", "")] + parts
            continue
        done.append(part)
    return root.joinpath(*done)


def _remove(path: Path) -> None:
    # lstat, never stat: a link is removed itself, never what it points at.
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # fd-based: it does not follow links inside either
    else:
        path.unlink()


def member_name(name: str) -> str:
    """A layer member's path relative to the root: ``./``, ``/`` and ``.`` components
    dropped (``./.wh.x`` is ``.wh.x``; a plain ``lstrip("./")`` would make it ``wh.x``)."""
    return "/".join(p for p in PurePosixPath(name).parts if p not in ("/", "."))


NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _own(fd: int, mode: int) -> None:
    """Mode and owner of an entry we just made, through its descriptor (never a path a
    link could redirect). The staged root is scaffolding, never shipped (the image carries
    the base's own layer blobs), so it gets no setuid or setgid bit and, as root, one
    unprivileged owner: the id the installer runs as."""
    os.fchmod(fd, mode & 0o1777)
    if os.geteuid() == 0:
        os.fchown(fd, STAGE_ID, STAGE_ID)


def apply_layer(layer: Path, root: Path) -> None:
    """Apply one layer tar (gzip or not) to ``root``: whiteouts remove, the rest is written
    with the base's modes. Device nodes are skipped (the installer gets a minimal /dev).

    Nothing a layer holds reaches outside ``root``: every path is resolved as a chroot
    would (``_inside``), entries are made with O_EXCL/O_NOFOLLOW and their mode set through
    the descriptor, a link is never followed by chmod or chown, and a hard link must name
    a regular file already in the root (a hard link to a link would be the link itself)."""
    if os.geteuid() == 0:
        os.chown(root, STAGE_ID, STAGE_ID)
    try:
        with tarfile.open(layer, "r:*") as tar:
            for m in tar:
                try:
                    _apply_member(tar, m, root)
                except OSError as exc:
                    raise InputError(f"{layer.name}: a base layer's member {m.name!r} cannot "
                                     f"be unpacked: {exc.strerror or exc}") from None
    except tarfile.TarError as exc:
        raise InputError(f"{layer.name}: a base layer is not a tar archive ({exc})") from None


def _apply_member(tar: tarfile.TarFile, m: tarfile.TarInfo, root: Path) -> None:
    rel = member_name(m.name)
    if not rel:
        return
    head, _, base = rel.rpartition("/")
    if base == ".wh..wh..opq":
        folder = _inside(root, head, follow_last=True)
        if folder.is_dir() and not folder.is_symlink():
            for child in list(folder.iterdir()):
                _remove(child)
        return
    if base.startswith(".wh."):
        if base[4:] in ("", ".", ".."):
            raise InputError(f"whiteout {m.name!r} names no file")
        _remove(_inside(root, f"{head}/{base[4:]}"))
        return
    if base == "..":
        raise InputError(f"member {m.name!r} ends in ..")
    if not (m.isdir() or m.issym() or m.islnk() or m.isfile()):
        return  # devices, fifos: not needed to install
    parent = _inside(root, head, follow_last=True)
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / base
    if m.isdir():
        if not stat.S_ISDIR(_lmode(target)):
            _remove(target)
            target.mkdir()
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
        try:
            _own(fd, m.mode)
        finally:
            os.close(fd)
        return
    _remove(target)
    if m.issym():
        os.symlink(m.linkname, target)
        if os.geteuid() == 0:
            os.lchown(target, STAGE_ID, STAGE_ID)
    elif m.islnk():
        source = _inside(root, m.linkname)
        if not stat.S_ISREG(_lmode(source)):
            raise InputError(f"hard link {m.name!r} -> {m.linkname!r} does not name a regular "
                             "file of the layer (a link, a folder or nothing)")
        os.link(source, target, follow_symlinks=False)  # the inode keeps its own mode
    else:
        src = tar.extractfile(m)
        assert src is not None
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
            _own(out.fileno(), m.mode)


def _lmode(path: Path) -> int:
    try:
        return path.lstat().st_mode
    except FileNotFoundError:
        return 0


def find_python(root: Path, version: str) -> str | None:
    """The path, inside the image, of ``python<version>``, if the base has one that is a
    file (a link is followed inside the root)."""
    for folder in ("usr/local/bin", "usr/bin", "bin"):
        path = _inside(root, f"{folder}/python{version}", follow_last=True)
        if path.is_file():
            return f"/{folder}/python{version}"
    return None


def pythons_in(root: Path) -> list[str]:
    found = set()
    for folder in ("usr/local/bin", "usr/bin"):
        d = _inside(root, folder)
        if d.is_dir():
            found |= {p.name for p in d.iterdir() if re.fullmatch(r"python\d\.\d+", p.name)}
    return sorted(found)


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


# --- the bases ---------------------------------------------------------------------------
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


def check_layer(path: Path, what: str, i: int, desc: dict[str, Any], diff_id: str,
                gzipped: bool) -> str:
    """Hash a base layer before it is unpacked: its blob against the manifest's digest and
    size, its uncompressed tar against the config's ``diff_ids`` (what the image's
    ``base.digest`` label stands for). Returns the diff_id's hex."""
    import gzip
    import zlib

    blob, size = sha256_file(path)
    check_blob(what, f"layer {i}", str(desc.get("digest")), desc.get("size"), blob, size)
    actual = blob
    if gzipped:
        diff = hashlib.sha256()
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    diff.update(chunk)
        except (OSError, EOFError, zlib.error) as exc:
            raise IntegrityError(what, f"layer {i} is not the gzip stream its media type "
                                 f"says ({exc})") from None
        actual = diff.hexdigest()
    if diff_id.partition(":")[2] != actual or not diff_id.startswith("sha256:"):
        raise IntegrityError(what, f"layer {i} unpacks to sha256:{actual}, not the diff_id "
                             f"{diff_id} its config lists: the base is damaged or was altered")
    return actual


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


# --- install inside the base -------------------------------------------------------------
def installer_names_release(installer: Path) -> bool:
    """Whether the bundle's installer takes ``--release`` (bundles made before it did not:
    their image's venv layer then carries the bundle's digest in its paths)."""
    return installer_knows(installer, "--release")


# Run inside the installer's namespaces, in the staged root (the working folder): a /dev of
# four nodes bound from the host's (a user namespace cannot make device nodes), never the
# host's whole /dev, then chroot.
SANDBOX_SH = """set -e
mount -t tmpfs -o mode=0755,nosuid,size=64m pyannote-bundle-dev dev
for n in null zero random urandom; do : > "dev/$n"; mount --bind "/dev/$n" "dev/$n"; done
mkdir -m 1777 dev/shm
ln -s /proc/self/fd dev/fd
ln -s /proc/self/fd/0 dev/stdin
ln -s /proc/self/fd/1 dev/stdout
ln -s /proc/self/fd/2 dev/stderr
exec "$@"
"""


def _no_user_namespace(why: str) -> ImageError:
    return ImageError(f"this host cannot make a user namespace ({why or 'unshare failed'}): "
                      "the bundle's installer is never run as the host's root; enable them "
                      "(sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone) "
                      "and run again")


@contextlib.contextmanager
def user_namespace(root: Path, unshare: str) -> Iterator[list[str]]:
    """The command prefix that puts a program in a user namespace of its own.

    As root: a namespace is made by a holder process running as ``STAGE_ID``, and this
    tool (privileged in the parent namespace, so no /etc/subuid is needed) maps ids
    0-65535 inside to ``STAGE_ID`` and the ids after it; ``nsenter`` then enters it as its
    root. Root inside is ``STAGE_ID`` outside, and the installer can still make itself
    ``nobody`` to check that other users can run the install. Otherwise: the caller's own
    id as root, the only mapping an unprivileged caller can make alone."""
    if os.geteuid() != 0:
        probe = subprocess.run([unshare, "--user", "--map-root-user", "true"],
                               capture_output=True, text=True, errors="replace",
                               stdin=subprocess.DEVNULL)
        if probe.returncode != 0:
            raise _no_user_namespace(last_lines(probe.stderr, 1))
        yield [unshare, "--user", "--map-root-user"]
        return
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise ImageError("nsenter (util-linux) is needed to install into the image")
    os.chown(root, STAGE_ID, STAGE_ID)
    for folder, dirs, files in os.walk(root / SOURCE_DIR):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.lchown(name, STAGE_ID, STAGE_ID)
    holder = subprocess.Popen([unshare, "--user", "sh", "-c", "read -r _"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, user=STAGE_ID, group=STAGE_ID,
                              extra_groups=[])
    try:
        ns, own = f"/proc/{holder.pid}/ns/user", os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 10
        while True:  # until the holder's unshare has made its namespace
            if holder.poll() is not None or time.monotonic() > deadline:
                holder.kill()
                _, err = holder.communicate()
                raise _no_user_namespace(last_lines(err.decode(errors="replace"), 1))
            try:
                if os.readlink(ns) != own:
                    break
            except OSError:  # exiting: poll() says so next
                pass
            time.sleep(0.01)
        for kind in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{kind}", "w") as f:
                f.write(f"0 {STAGE_ID} {STAGE_IDS}\n")
        yield [nsenter, f"--user={ns}"]
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()


def sandbox(root: Path, argv: list[str], env: dict[str, str],
            timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` chrooted into ``root`` with no network, in user, mount and PID namespaces
    of its own (all gone with it), with a minimal /dev.

    Always a user namespace (``user_namespace``), also when this tool runs as root: the
    code that runs there (the bundle's installer, the base's python) is root only inside
    it. Where user namespaces are disabled this refuses, never falls back to real root."""
    unshare = shutil.which("unshare")
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    if unshare is None:
        raise ImageError("unshare (util-linux) is needed to install into the image")
    for name in ("proc", "dev"):  # mount points: real folders, never a base's link
        if not stat.S_ISDIR(_lmode(root / name)):
            _remove(root / name)
            (root / name).mkdir()
    # --kill-child: if this tool is stopped, the installer and everything it started (a
    # namespace of their own) go with it, and the staged root can be removed. Paths are
    # relative to the working folder: the work folder above it is private to this tool.
    inner = [unshare, "--mount", "--net", "--pid", "--fork", "--kill-child",
             "--mount-proc=proc", "sh", "-c", SANDBOX_SH, "sh", chroot, ".", *argv]
    with user_namespace(root, unshare) as enter:
        return subprocess.run([*enter, *inner], env=env, capture_output=True, text=True,
                              errors="replace", stdin=subprocess.DEVNULL, timeout=timeout,
                              cwd=root)


def install_in_root(root: Path, bundle_dir: str, python: str, release: str | None) -> None:
    """Run the bundle's installer in ``root`` (``sandbox``: chroot, no network, a user
    namespace)."""
    argv = [python, "-I", f"/{SOURCE_DIR}/{bundle_dir}/runtime/install.py", f"/{PREFIX}",
            "--no-smoke", "--json", *(["--release", release] if release else [])]
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8", "TZ": "UTC",
           # py_compile writes hash-checked bytecode under SOURCE_DATE_EPOCH: the same
           # bytes on every build, and valid whatever the files' mtimes in the image.
           "SOURCE_DATE_EPOCH": str(LAYER_EPOCH)}
    log.info("image: installing the bundle into /%s inside the base (chroot, user "
             "namespace, no network)", PREFIX)
    try:
        res = sandbox(root, argv, env, 3 * 3600)
    except subprocess.TimeoutExpired:
        raise ImageError("the installer did not finish in 3 h inside the base") from None
    if res.returncode != 0:
        try:
            message = json.loads(res.stdout.strip().splitlines()[-1]).get("error")
        except (ValueError, IndexError, AttributeError):
            message = None
        raise ImageError(f"the bundle's installer failed inside the base (exit "
                         f"{res.returncode}): {message or last_lines(res.stderr, 2)}")


def capture(root: Path, release: str) -> dict[str, list[Entry]]:
    """The install's entries under /opt/diarization (and the working folder), by layer."""
    rel_root = f"{PREFIX}/releases/{release}/"
    entries: dict[str, Entry] = {}

    def add(path: Path) -> None:
        name = path.relative_to(root).as_posix()
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            entries[name] = Entry(name, "symlink", 0o777, target=os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            entries[name] = Entry(name, "dir", stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode):
            entries[name] = Entry(name, "file", stat.S_IMODE(st.st_mode), st.st_size, path)
        else:
            raise ImageError(f"/{name} is not a file, folder or link: the install made "
                             "something an image cannot carry")

    for anc in PurePosixPath(PREFIX).parents:
        if str(anc) != ".":
            add(root / str(anc))
    venv = root / PREFIX / "releases" / release / "venv"
    for folder, dirs, files in os.walk(root / PREFIX):
        if Path(folder) != venv and not Path(folder).is_relative_to(venv):
            # Bytecode configure.py left by loading runtime/offline.py and common.py: it records
            # the staged file's mtime, so it differs per build, and the image's fixed
            # mtimes would make Python ignore it anyway. (The venv's is hash-checked.)
            dirs[:] = [d for d in dirs if d != "__pycache__"]
        add(Path(folder))
        for name in dirs + files:
            p = Path(folder, name)
            if p.is_symlink() or not p.is_dir():
                add(p)
    work = root / WORKDIR
    work.mkdir(exist_ok=True)
    os.chmod(work, 0o755)
    add(work)

    def role(name: str) -> str:
        if name.startswith(rel_root + "venv/") and not name.endswith("/" + OFFLINE_PTH):
            return "venv"
        if name.startswith(rel_root + "models/") and not name.endswith((".yaml", ".yml")):
            return "models"
        if name.startswith(rel_root + "onnx/"):
            # The onnx engine's files (tens of MB), exported from the weights: they change
            # with them, not with a parameter, so a parameter update stays a small layer.
            return "models"
        return "config"

    layers: dict[str, dict[str, Entry]] = {"venv": {}, "models": {}, "config": {}}
    for name, entry in entries.items():
        r = role(name)
        if entry.kind == "dir" and r != "config":
            layers[r][name] = entry
            continue
        layers[r][name] = entry
        for anc in PurePosixPath(name).parents:  # each layer carries the folders it needs
            a = str(anc)
            if a != "." and a in entries:
                layers[r].setdefault(a, entries[a])
    # A folder in the config layer only when that layer holds something in it (or it is
    # one of its own): the venv's and models' own folders stay in their layers.
    cfg = layers["config"]
    for name, entry in list(cfg.items()):
        if entry.kind == "dir" and role(name) != "config":
            if not any(k.startswith(name + "/") for k in cfg if cfg[k].kind != "dir"):
                del cfg[name]
    return {r: sorted(es.values(), key=lambda e: e.name.split("/")) for r, es in
            layers.items()}


# --- the whole image ---------------------------------------------------------------------
def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_tag(bundle: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", bundle)[:128]


def image_config(base: Base, blobs: list[Blob], manifest: dict[str, Any], labels:
                 dict[str, str], created: str, offline_env: dict[str, str],
                 has_asr: bool) -> dict[str, Any]:
    base_cfg = base.config.get("config") or {}
    env = {k: v for k, v in (e.split("=", 1) for e in base_cfg.get("Env") or [] if "=" in e)}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update({"LANG": "C.UTF-8", "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
                "PYANNOTE_BUNDLE_CONFIG": f"/{PREFIX}/config.yaml"})
    env.update(offline_env)
    history = [h for h in base.config.get("history") or [] if isinstance(h, dict)]
    if sum(1 for h in history if not h.get("empty_layer")) != len(base.layers):
        history = [{"created": created, "created_by": f"base layer: {b.holds}"}
                   for b in base.layers]
    history += [{"created": created, "created_by": f"pyannote-bundle {__version__} image: "
                 f"{b.role} layer ({b.holds})"} for b in blobs]
    return {
        "created": created,
        "architecture": OCI_ARCH.get(str((manifest.get("target") or {}).get("arch"))),
        "os": "linux",
        "config": {
            "User": USER,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Entrypoint": [ENTRYPOINT],
            "Cmd": ["--help"],
            "WorkingDir": f"/{WORKDIR}",
            "Labels": labels,
        },
        "rootfs": {"type": "layers",
                   "diff_ids": [f"sha256:{b.diff_id}" for b in [*base.layers, *blobs]]},
        "history": history,
    }


def build_image(bundle: Path, opts: ImageOptions) -> ImageResult:
    """Install ``bundle`` into its base and write ``<bundle>.oci.tar`` in the output folder.

    Nothing is left in the output folder on failure: the staged root lives in a hidden
    work folder there (the same file system as the archive), removed in every case."""
    try:
        opts.output_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".pyannote-bundle-image-", dir=opts.output_dir))
    except OSError as exc:
        if CannotWrite.matches(exc):
            raise CannotWrite("the image", opts.output_dir, exc, "--output") from None
        raise
    import signal
    import threading

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # as Ctrl-C: the installer is killed, the work removed

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, stop)
    try:
        return _build(bundle, opts, work)
    except OSError as exc:
        if CannotWrite.matches(exc) or exc.errno == errno.ENOSPC:
            raise CannotWrite("the image", opts.output_dir, exc, "--output") from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work, ignore_errors=True)
        if work.exists():  # files the chroot made as another owner: one more try
            # --one-file-system: a mount the installer left (it cannot: its mounts go with
            # its namespace) is never descended into.
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(work)], check=False)


def _build(bundle: Path, opts: ImageOptions, work: Path) -> ImageResult:
    root = work / "root"
    root.mkdir()
    signer = sidecar = None
    if opts.allowed_signers is not None:  # before a byte of the bundle is read, as verify
        from bundler.bundlefile import whole
        from bundler.signing import verify_signature

        # the digest the bundle must match comes from the very bytes the signature covers
        sidecar, signer = verify_signature(whole(bundle), opts.allowed_signers)
    log.info("image: checking %s", bundle.name)
    integrity = check_and_extract(bundle, root / SOURCE_DIR, Limits(), sidecar=sidecar)
    manifest = integrity.manifest
    target = manifest.get("target") or {}
    want_py, arch = str(target.get("python")), str(target.get("arch"))
    name = str(manifest.get("bundle") or integrity.top)
    # The base: the site's, or Debian with the shared libraries the wheels need.
    if opts.base:
        base = given_base(opts.base, work, arch)
    else:
        libs = (manifest.get("host_requirements") or {}).get("libraries") or []
        pkgs = sorted({str(lib["debian"]) for lib in libs if isinstance(lib, dict)
                       and lib.get("required") and re.fullmatch(r"[a-z0-9][a-z0-9.+-]+",
                                                                str(lib.get("debian")))})
        base = default_base(want_py, arch, opts.cache_dir, opts.mirror, pkgs)
    base_arch = str(base.config.get("architecture"))
    if base_arch != OCI_ARCH.get(arch, arch):
        raise HostMismatch(f"the base {base.name} is for {base_arch}; the bundle {name} is "
                           f"for linux {arch} ({OCI_ARCH.get(arch, arch)}): use a base for "
                           f"{OCI_ARCH.get(arch, arch)}")
    log.info("image: unpacking the base %s", base.name)
    for layer in base.layer_files:
        apply_layer(layer, root)
    python = find_python(root, want_py)
    if python is None:
        have = pythons_in(root)
        raise HostMismatch(f"the base {base.name} has no python{want_py} (the bundle {name} "
                           f"is for CPython {want_py}; the base has "
                           f"{', '.join(have) or 'no Python'} in /usr/bin and /usr/local/bin): "
                           f"use a base with python{want_py}")
    installer = integrity.root / "runtime" / "install.py"
    release = RELEASE if installer_names_release(installer) else None
    if release is None:
        log.warning("image: this bundle's installer cannot name its release: the venv layer "
                    "will carry the bundle's digest in its paths and be shared with no other "
                    "bundle's image (rebuild the bundle with this pyannote-bundle)")
    install_in_root(root, integrity.top, python, release)
    shutil.rmtree(root / SOURCE_DIR)
    receipt = json.loads((root / PREFIX / ".pyannote-bundle-receipt.json").read_text())
    release = str(receipt["current"])
    onnx = (receipt.get("engines") or {}).get("onnx") or {}
    if onnx.get("ok") is not True:  # said, never silent: the image is about 3x slower
        log.warning("image: the onnx engine was not made inside the base (%s): the image "
                    "diarizes with the pytorch engine",
                    onnx.get("error") or onnx.get("skipped") or "this bundle's installer "
                    "exports it only with its smoke test: rebuild the bundle")
    parts = capture(root, release)
    from bundler.runtime.offline import OFFLINE_ENV

    has_asr = (root / PREFIX / "bin" / "transcribe").exists()
    holds = {"venv": f"/{PREFIX}/releases/{release}/venv: the Python environment",
             "models": f"/{PREFIX}/releases/{release}/models: the model weights (and "
                       "onnx/, the onnx engine exported from them)",
             "config": f"/{PREFIX}: configs, runtime, samples, bin/diarize"
                       + (", bin/transcribe" if has_asr else "")}
    log.info("image: hashing the layers")
    blobs = [layer_blob(parts[r], r, holds[r]) for r in ("venv", "models", "config")]
    epoch = int((manifest.get("build") or {}).get("source_date_epoch") or LAYER_EPOCH)
    created = _iso(epoch)
    tag = opts.tag or default_tag(name)
    annotations = {
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.source": PROJECT_URL,
        "org.opencontainers.image.version": name,
        "org.opencontainers.image.revision": integrity.sha256,
        "org.opencontainers.image.title": name,
        "org.opencontainers.image.description": "pyannote.audio speaker diarization, offline: "
                                                f"{ENTRYPOINT} FILE_OR_FOLDER --output-dir DIR",
        "org.opencontainers.image.base.digest": base.digest,
        "org.opencontainers.image.base.name": base.name,
    }
    labels = {**annotations,
              f"{LABEL}.bundle": name,
              f"{LABEL}.bundle.sha256": integrity.sha256,
              f"{LABEL}.tool": f"pyannote-bundle {__version__}",
              f"{LABEL}.layers": ",".join(["base"] * len(base.layers)
                                          + [b.role for b in blobs]),
              f"{LABEL}.transcribe": TRANSCRIBE if has_asr else ""}
    if base.packages:
        labels[f"{LABEL}.base.packages"] = " ".join(f"{p['name']}={p['version']}"
                                                    for p in base.packages)
    config = canonical(image_config(base, blobs, manifest, labels, created,
                                    dict(OFFLINE_ENV), has_asr))
    config_blob = bytes_blob(config, MT_CONFIG)
    all_layers = [*base.layers, *blobs]
    image_manifest = canonical({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": f"sha256:{config_blob.digest}",
                   "size": config_blob.size},
        "layers": [{"mediaType": b.media_type, "digest": f"sha256:{b.digest}",
                    "size": b.size} for b in all_layers],
        "annotations": annotations})
    manifest_blob = bytes_blob(image_manifest, MT_MANIFEST)
    index = canonical({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
        {"mediaType": MT_MANIFEST, "digest": f"sha256:{manifest_blob.digest}",
         "size": manifest_blob.size,
         "annotations": {"org.opencontainers.image.ref.name": tag}}]})
    path = opts.output_dir / f"{name}.oci.tar"
    log.info("image: writing %s", path)
    size = write_archive(path, [*all_layers, config_blob, manifest_blob], index)
    return ImageResult(
        path=path, digest=f"sha256:{manifest_blob.digest}",
        config_digest=f"sha256:{config_blob.digest}", tag=tag, bundle=name,
        bundle_sha256=integrity.sha256,
        base={"name": base.name, "digest": base.digest, "packages": len(base.packages)},
        layers=[{"role": b.role, "digest": f"sha256:{b.digest}", "size": b.size,
                 "holds": b.holds} for b in all_layers],
        size=size, entrypoint=[ENTRYPOINT], transcribe=has_asr, signer=signer)


def render_result(res: ImageResult) -> str:
    lines = [f"{res.path}", f"digest:  {res.digest}", f"tag:     {res.tag}",
             f"base:    {res.base['name']} ({res.base['digest']})", "layers:"]
    lines += [f"  {b['role']:<7} {b['size'] / 1e6:>10.1f} MB  {b['digest'][:19]}  {b['holds']}"
              for b in res.layers]
    lines.append(f"run:     podman run --rm --read-only --network none -v DIR:/{WORKDIR} "
                 f"oci-archive:{res.path} FILE_OR_FOLDER")
    return "\n".join(lines)


# --- inspect and the self-test -------------------------------------------------------------
def is_image(path: Path) -> bool:
    """Whether ``path`` is an oci-archive (its first members are the layout's) or an OCI
    layout folder (the archive unpacked, or ``skopeo copy ... oci:DIR``)."""
    if path.is_dir():
        return (path / "oci-layout").is_file() and (path / "index.json").is_file()
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
            return first is not None and first.name.split("/")[0] in (
                "blobs", "index.json", "oci-layout")
    except (tarfile.TarError, OSError):
        return False


def image_ref(path: Path) -> str:
    """The containers-image reference of an archive or a layout folder."""
    return f"{'oci' if path.is_dir() else 'oci-archive'}:{path.resolve()}"


def _layout_files(path: Path) -> Iterator[tuple[str, int, Callable[[], IO[bytes]]]]:
    """(name in the layout, size, opener) of every file of an archive or a layout folder."""
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and not p.is_symlink():
                yield (p.relative_to(path).as_posix(), p.stat().st_size,
                       lambda p=p: open(p, "rb"))  # type: ignore[misc]
        return
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if m.isfile():
                yield m.name, m.size, lambda m=m: tar.extractfile(m)  # type: ignore[misc]


def inspect_image(path: Path) -> dict[str, Any]:
    """An image archive's (or layout folder's) bundle, layers and digest, read from its
    small blobs only."""
    small: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    for name, size, opener in _layout_files(path):
        if size <= 4 << 20:
            with opener() as f:
                small[name] = f.read()
        sizes[name] = size
    try:
        index = json.loads(small["index.json"])
        desc = index["manifests"][0]
        mdigest = str(desc["digest"])
        mbytes = small["blobs/sha256/" + mdigest.split(":", 1)[1]]
        manifest = json.loads(mbytes)
        cdigest = str(manifest["config"]["digest"])
        cbytes = small["blobs/sha256/" + cdigest.split(":")[1]]
        config = json.loads(cbytes)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError):
        raise IntegrityError(path.name, "not an OCI image archive (no index.json, manifest "
                             "or config)") from None
    # The digest printed is the one of the bytes read, not only the name index.json gives.
    for kind, digest, data in (("manifest", mdigest, mbytes), ("config", cdigest, cbytes)):
        actual = hashlib.sha256(data).hexdigest()
        if digest != f"sha256:{actual}":
            raise IntegrityError(path.name, f"its {kind} {digest} has sha256 {actual}: the "
                                 "image is damaged or was altered")
    labels = (config.get("config") or {}).get("Labels") or {}
    roles = str(labels.get(f"{LABEL}.layers", "")).split(",")
    layers = []
    for i, layer in enumerate(manifest.get("layers") or []):
        layers.append({"role": roles[i] if i < len(roles) else "?",
                       "digest": layer.get("digest"), "size": layer.get("size"),
                       "media_type": layer.get("mediaType"),
                       "present": ("blobs/sha256/" + str(layer.get("digest")).split(":")[-1])
                       in sizes})
    return {"image": str(path), "digest": mdigest,
            "tag": (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name"),
            "bundle": labels.get(f"{LABEL}.bundle"),
            "bundle_sha256": labels.get(f"{LABEL}.bundle.sha256"),
            "created": config.get("created"), "architecture": config.get("architecture"),
            "base": {"name": labels.get("org.opencontainers.image.base.name"),
                     "digest": labels.get("org.opencontainers.image.base.digest"),
                     "packages": len(str(labels.get(f"{LABEL}.base.packages", "")).split())},
            "user": (config.get("config") or {}).get("User"),
            "entrypoint": (config.get("config") or {}).get("Entrypoint"),
            "transcribe": labels.get(f"{LABEL}.transcribe") or None,
            "layers": layers,
            "size": sum(sizes.values()) if path.is_dir() else path.stat().st_size}


def render_inspect(info: dict[str, Any]) -> str:
    from bundler.errors import shown

    lines = [f"image:    {info['image']}  ({info['size'] / 1e9:.2f} GB)",
             f"digest:   {info['digest']}  tag {info['tag']}",
             f"bundle:   {info['bundle']}  sha256 {info['bundle_sha256']}",
             f"created:  {info['created']}  {info['architecture']}, user {info['user']}, "
             f"entrypoint {' '.join(info['entrypoint'] or [])}",
             f"base:     {info['base']['name']} ({info['base']['digest']}, "
             f"{info['base']['packages']} packages)"]
    if info.get("transcribe"):
        lines.append(f"also:     --entrypoint {info['transcribe']}")
    lines.append("layers:")
    lines += [f"  {x['role']:<7} {int(x['size'] or 0) / 1e6:>10.1f} MB  {x['digest']}"
              + ("" if x["present"] else "  MISSING") for x in info["layers"]]
    return "\n".join(shown(line, 4000) for line in lines)


def check_engine(summary: dict[str, Any]) -> str:
    """The engine ``bin/diarize --json`` says it ran (its summary, ``summary``): an image
    must run the onnx engine, which its installer exported and checked inside the base;
    anything else is a SmokeError that names the engine and why (``engine_note``)."""
    engine = summary.get("engine")
    if engine != "onnx":
        note = summary.get("engine_note") or "bin/diarize gave no reason"
        raise SmokeError(f"the image's {ENTRYPOINT} runs the {engine} engine, not onnx "
                         f"(about 3x slower on a CPU): {note}")
    return engine


def self_test(archive: Path, runtime: str = "podman") -> dict[str, Any]:
    """Run the image's entrypoint on its bundled sample with no network, read-only, as
    65534, check that it ran the onnx engine (``check_engine``), and compare with the
    bundle's smoke/expected.json (when it has one)."""
    from bundler.runtime.install import compare

    exe = shutil.which(runtime)
    if exe is None:
        raise SmokeError(f"--self-test runs the image with {runtime}, which is not installed "
                         "(Debian/Ubuntu: apt-get install podman)")
    info = inspect_image(archive)
    ref = image_ref(archive)
    base = [exe, "run", "--rm", "--network", "none", "--read-only", "--user", USER]
    sample = f"/{PREFIX}/smoke/sample.wav"
    private = tempfile.mkdtemp(prefix="pyannote-bundle-image-test-")  # 0700
    try:
        # The container's user (65534, or a subordinate id under rootless podman) writes its
        # RTTM in ``out``, which it reaches through the bind mount; no other user of the
        # build host can reach it: its parent is private to this tool.
        out = Path(private) / "out"
        out.mkdir()
        os.chmod(out, 0o777)
        res = subprocess.run([*base, "-v", f"{out}:/out", ref,
                              sample, "--output-dir", "/out", "--json"],
                             capture_output=True, text=True, errors="replace",
                             stdin=subprocess.DEVNULL, timeout=1800)
        if res.returncode != 0:
            raise SmokeError(f"the image's {ENTRYPOINT} failed on its sample (exit "
                             f"{res.returncode}): {last_lines(res.stderr, 2)}")
        try:
            summary = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SmokeError(f"the image's {ENTRYPOINT} --json printed no summary: "
                             f"{last_lines(res.stdout or res.stderr, 2)}") from None
        engine = check_engine(summary if isinstance(summary, dict) else {})
        # The one file diarize writes for it (not any *.rttm the container left there),
        # never read through a link the container made.
        rttm = out / f"{PurePosixPath(sample).name}.rttm"
        text = rttm.read_text() if rttm.is_file() and not rttm.is_symlink() else ""
        segments: list[dict[str, Any]] = []
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 8 and f[0] == "SPEAKER":
                segments.append({"start": float(f[3]), "end": float(f[3]) + float(f[4]),
                                 "speaker": f[7]})
    finally:
        shutil.rmtree(private, ignore_errors=True)
    if not segments:
        raise SmokeError(f"the image's {ENTRYPOINT} wrote no speech segments for its sample")
    result: dict[str, Any] = {
        "segments": [{"start": round(s["start"], 3), "end": round(s["end"], 3)}
                     for s in segments],
              "speakers": len({s["speaker"] for s in segments})}
    matched = None
    # PREFIX/smoke is a link through current/ to the release: read the release's own file.
    expected = read_from_image(archive, f"{PREFIX}/releases/*/smoke/expected.json")
    if expected is not None:
        from bundler.runtime.install import Failure

        try:
            compare(result, {k: v for k, v in json.loads(expected).items()
                             if k in ("segments", "speakers")})
            matched = True
        except Failure as exc:
            raise SmokeError(f"the image's result differs from smoke/expected.json: "
                             f"{exc}") from None
    return {"ok": True, "image": info["digest"], "runtime": runtime, "engine": engine,
            "segments": len(segments), "speakers": result["speakers"],
            "expected": "match" if matched else "absent"}


def read_from_image(archive: Path, name: str) -> bytes | None:
    """A small file of the image, from the last layer that has it (whiteouts aside).
    ``name`` may hold ``*`` for one path component (the release's name)."""
    import fnmatch

    info = inspect_image(archive)
    wanted = {f"blobs/sha256/{str(x['digest']).split(':')[-1]}": i
              for i, x in enumerate(info["layers"])}
    found: dict[int, bytes] = {}
    for member, _, opener in _layout_files(archive):
        if member not in wanted:
            continue
        with opener() as f, tarfile.open(fileobj=f, mode="r|*") as layer:
            for m in layer:
                if m.isfile() and fnmatch.fnmatchcase(m.name, name) \
                        and m.name.count("/") == name.count("/"):
                    data = layer.extractfile(m)
                    if data is not None:
                        found[wanted[member]] = data.read()
    return found[max(found)] if found else None
