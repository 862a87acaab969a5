"""Staging a root file system from layer tars: the only place that resolves a layer's
members inside a root.

Nothing a layer holds reaches outside the root: every path is resolved as a chroot would
(``_inside``), entries are made with O_EXCL/O_NOFOLLOW and their mode set through the
descriptor, a link is never followed by chmod or chown, a hard link must name a regular
file already in the root, and whiteouts remove only inside it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
from pathlib import Path, PurePosixPath

from bundler.errors import InputError
from bundler.oci.archive import CHUNK

# Who the staged root belongs to and who the installer runs as when this tool runs as
# root: one id no account, no subordinate range (/etc/subuid starts at 100000) and no
# rootless container uses, mapped to root inside the installer's user namespace. Code from
# a bundle or a base then has no more rights over the build host than "nobody".
STAGE_ID = 0x7FFE_0000
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


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


def remove(path: Path) -> None:
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
                remove(child)
        return
    if base.startswith(".wh."):
        if base[4:] in ("", ".", ".."):
            raise InputError(f"whiteout {m.name!r} names no file")
        remove(_inside(root, f"{head}/{base[4:]}"))
        return
    if base == "..":
        raise InputError(f"member {m.name!r} ends in ..")
    if not (m.isdir() or m.issym() or m.islnk() or m.isfile()):
        return  # devices, fifos: not needed to install
    parent = _inside(root, head, follow_last=True)
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / base
    if m.isdir():
        if not stat.S_ISDIR(lmode(target)):
            remove(target)
            target.mkdir()
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
        try:
            _own(fd, m.mode)
        finally:
            os.close(fd)
        return
    remove(target)
    if m.issym():
        os.symlink(m.linkname, target)
        if os.geteuid() == 0:
            os.lchown(target, STAGE_ID, STAGE_ID)
    elif m.islnk():
        source = _inside(root, m.linkname)
        if not stat.S_ISREG(lmode(source)):
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


def lmode(path: Path) -> int:
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
