"""Reading OCI images: a layout folder or an ``oci-archive`` tar, every blob checked.

Every blob read is checked against the digest (and size) of the descriptor that names it
before it is used: a base given with ``--base`` and an archive given to ``inspect`` may
come from anywhere.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from bundler.errors import HostMismatch, InputError, IntegrityError
from bundler.hashing import sha256_file
from bundler.oci.archive import CHUNK, DOCKER_MANIFEST, MT_INDEX, MT_MANIFEST, OCI_ARCH


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


@dataclass(frozen=True)
class ImageView:
    """An image archive's (or layout folder's) index entry, manifest and config, each read
    from its small blob and checked against its digest; and the size of every file."""

    index_entry: dict[str, Any]
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    sizes: dict[str, int]


def read_image(path: Path) -> ImageView:
    """The image of an archive or a layout folder, read from its small blobs only."""
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
    return ImageView(desc, mdigest, manifest, config, sizes)


def read_from_image(archive: Path, name: str) -> bytes | None:
    """A small file of the image, from the last layer that has it (whiteouts aside).
    ``name`` may hold ``*`` for one path component (the release's name)."""
    import fnmatch

    view = read_image(archive)
    wanted = {f"blobs/sha256/{str(x.get('digest')).split(':')[-1]}": i
              for i, x in enumerate(view.manifest.get("layers") or [])}
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
