"""Deltas: ship an update as the few members the old bundle lacks, rebuilt byte for byte.

``make_delta(OLD, NEW)`` writes ``<NEW stem>.from-<12 hex of OLD's sha256>.delta.tar`` (a
bundle-like tarball written by ``pack``, with SHA256SUMS inside and a sidecar beside it)
holding ``delta.json``, the stdlib-only ``apply.py`` and ``payload/<sha256>`` for each member
of NEW whose bytes are in no member of OLD (matched by sha256, whatever the name).

``apply`` runs ``bundler/runtime/apply.py``, the very file shipped inside the delta: the
tool and ``python3 apply.py`` on the isolated host cannot disagree.

Both bundles must be uncompressed tarballs (the default): a compressed bundle cannot be
rebuilt byte for byte by the standard library alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler import layout
from bundler.bundlefile import read_sidecar, sidecar_path
from bundler.checksums import parse_checksums
from bundler.errors import DeltaError, InputError, IntegrityError, OutputError
from bundler.integrity import detect_compression, open_bundle
from bundler.pack import Entry, pack
from bundler.progress import task
from bundler.runtime import apply as _apply

log = logging.getLogger("bundler")

BUFSIZE = 1 << 20
APPLY_SOURCE = Path(_apply.__file__)


@dataclass(frozen=True)
class DeltaResult:
    path: Path
    sidecar: Path
    sha256: str
    size: int
    new_size: int
    payload_files: int
    payload_bytes: int
    signature: Path | None = None


@dataclass(frozen=True)
class _Member:
    name: str  # full name in the tar
    offset: int  # of its header (a PAX header first, when there is one)
    offset_data: int
    size: int
    is_file: bool
    mtime: int


@dataclass(frozen=True)
class _Scan:
    """An uncompressed bundle as the delta needs it, read once by integrity's reader."""

    members: list[_Member]
    sums: dict[str, str]  # its SHA256SUMS: path -> sha256
    size: int
    sha256: str  # of every byte, checked against its sidecar when it has one
    mtime: int  # its first member's: the time the bundle was built with


def _scan(path: Path) -> _Scan:
    """The members of an uncompressed bundle, its SHA256SUMS, its size and its digest."""
    try:
        with open(path, "rb") as f:
            kind = detect_compression(f)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    if kind != "none":
        raise InputError(f"{path.name} is {kind}-compressed: deltas need uncompressed bundles "
                         "(build --compression none, the default)")
    published = read_sidecar(path)
    members: list[_Member] = []
    sums: dict[str, str] = {}
    with open_bundle(path, expected_sha256=published) as bundle:
        for info in bundle.members():
            members.append(_Member(info.name, info.offset, info.offset_data, info.size,
                                   info.isfile(), int(info.mtime)))
            if _rel(info.name) == layout.CHECKSUMS and info.isfile():
                listing = bundle.tar.extractfile(info)
                assert listing is not None
                try:
                    sums = parse_checksums(listing.read())
                except (UnicodeDecodeError, ValueError) as exc:
                    raise IntegrityError(path.name, f"not a readable bundle ({exc})") from None
        bundle.read_to_end()
        digest = bundle.reader.hash.hexdigest()
    if not members or not sums:
        raise IntegrityError(path.name, f"no {layout.CHECKSUMS}: not a pyannote bundle")
    if published is not None and published != digest:
        raise IntegrityError(path.name, f"sha256 {digest} does not match its sidecar "
                             f"({published}): damaged; copy it again")
    first = members[0]
    return _Scan(members, sums, path.stat().st_size, digest, first.mtime)


def _rel(name: str) -> str:
    return name.partition("/")[2]


def _scan_both(old: Path, new: Path) -> tuple[_Scan, _Scan]:
    """Both bundles read side by side (each hashed on a core of its own)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        scans = [pool.submit(_scan, old), pool.submit(_scan, new)]
        return scans[0].result(), scans[1].result()


def delta_name(new: Path, old_sha256: str) -> str:
    """``<NEW stem>.from-<12 hex of OLD's sha256>.delta`` (the tarball adds ``.tar``)."""
    stem = new.name[:-len(".tar")] if new.name.endswith(".tar") else new.name
    return f"{stem}.from-{old_sha256[:12]}.delta"


def make_delta(old: Path, new: Path, output_dir: Path,
               sign_key: Path | None = None) -> DeltaResult:
    """Write the delta that rebuilds ``new`` from ``old``; nothing under its name on failure."""
    old_scan, new_scan = _scan_both(old, new)
    old_members, old_sums, old_size = old_scan.members, old_scan.sums, old_scan.size
    new_members, new_sums, new_size = new_scan.members, new_scan.sums, new_scan.size
    old_sha, new_sha = old_scan.sha256, new_scan.sha256

    in_old: dict[str, int] = {}  # sha256 -> data offset in OLD
    for m in old_members:
        sha = old_sums.get(_rel(m.name))
        if m.is_file and sha is not None:
            in_old.setdefault(sha, m.offset_data)

    top = delta_name(new, old_sha)
    work = output_dir / f".{top}.work-{os.getpid()}"
    records: list[dict[str, Any]] = []
    payload: dict[str, Entry] = {}
    try:
        with open(new, "rb") as src:
            pos = 0
            for m in new_members:
                src.seek(pos)
                lead = src.read(m.offset_data - pos)
                record: dict[str, Any] = {"name": m.name, "size": m.size,
                                          "lead": base64.b64encode(lead).decode()}
                pos = m.offset_data + m.size
                if m.is_file and m.size:
                    sha = new_sums.get(_rel(m.name))
                    if sha is not None and sha in in_old:
                        record.update({"from": "base", "sha256": sha,
                                       "offset": in_old[sha]})
                    else:
                        entry = _extract(src, m, work, sha)
                        payload.setdefault(entry.sha256, entry)
                        record.update({"from": "delta", "sha256": entry.sha256})
                records.append(record)
            src.seek(pos)
            tail = src.read()
        if len(tail) > 1 << 20:
            raise IntegrityError(new.name, f"{len(tail)} bytes after the last member: not "
                                 "a bundle written by pyannote-bundle")
        meta = {
            "format": _apply.FORMAT,
            "base": {"name": old.name, "sha256": old_sha, "size": old_size},
            "target": {"name": new.name, "sha256": new_sha, "size": new_size},
            "members": records,
            "tail": base64.b64encode(tail).decode(),
        }
        entries = [Entry.from_bytes(_apply.DELTA_JSON,
                                    json.dumps(meta, indent=1, sort_keys=True).encode()),
                   Entry.from_bytes("apply.py", APPLY_SOURCE.read_bytes()),
                   *payload.values()]
        # the delta takes NEW's recorded time
        packed = pack(entries, top=top, output_dir=output_dir, compression="none",
                      mtime=new_scan.mtime)
    except OSError as exc:
        raise OutputError(f"cannot write the delta in {output_dir}: {exc.strerror or exc}; "
                          "nothing was left under its name") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    signature = None
    if sign_key is not None:
        from bundler.signing import sign

        signature = sign(packed.sidecar, sign_key)
    payload_bytes = sum(e.size for e in payload.values())
    log.info("delta: %s (%d bytes: %d new members, %d bytes of them; %.3f %% of %s)",
             packed.path.name, packed.size, len(payload), payload_bytes,
             100 * packed.size / max(new_size, 1), new.name)
    return DeltaResult(packed.path, packed.sidecar, packed.sha256, packed.size, new_size,
                       len(payload), payload_bytes, signature)


def _extract(src: Any, m: _Member, work: Path, sha: str | None) -> Entry:
    """Copy one member of NEW out to the work folder, hashed; the payload is packed from it."""
    payload_dir = work / _apply.PAYLOAD
    payload_dir.mkdir(parents=True, exist_ok=True)
    tmp = payload_dir / f"member-{m.offset}"
    h = hashlib.sha256()
    src.seek(m.offset_data)
    left = m.size
    with open(tmp, "wb") as out:
        while left:
            chunk = src.read(min(BUFSIZE, left))
            if not chunk:
                raise IntegrityError(m.name, "truncated: the bundle ends inside it")
            h.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    digest = h.hexdigest()
    if sha is not None and sha != digest:
        raise IntegrityError(m.name, f"sha256 {digest} does not match its {layout.CHECKSUMS} "
                             f"line ({sha}): the bundle is damaged")
    final = payload_dir / digest
    os.replace(tmp, final)
    return Entry(f"{_apply.PAYLOAD}/{digest}", digest, m.size, source=final)


def apply(delta: Path, base: Path, output_dir: Path,
          allowed_signers: Path | None = None) -> dict[str, Any]:
    """Rebuild the new bundle with the apply.py code a delta ships; map its failures.

    With ``allowed_signers``, the delta is authenticated before any of it is used: the
    signature over its sidecar (``ssh-keygen -Y``, as verify checks a bundle's; the sidecar
    read once and naming this very delta), then that sidecar's sha256 over every byte of
    the tarball, in the one pass that opens it; what is applied is read from that open file.
    """
    signature: dict[str, Any] | None = None
    try:
        if allowed_signers is not None:
            if delta.is_dir():
                raise InputError(f"{delta}: --allowed-signers checks the signed sidecar of "
                                 "the delta tarball; give the .delta.tar, not an unpacked "
                                 "folder")
            from bundler.signing import verify_signature

            sidecar, signer = verify_signature(delta, allowed_signers)
            signature = {"ok": True, "signer": signer}
            d = _apply.Delta(delta, sidecar.sha256)
        else:
            d = _apply.open_delta(delta)
        try:
            size = int(d.load()["target"]["size"])  # for the progress bar only
            with task(f"apply: {delta.name}", size) as advance:
                res = _apply.rebuild(d, base, output_dir, advance)
        finally:
            d.close()
    except _apply.CannotWrite as exc:
        raise OutputError(str(exc)) from None
    except _apply.UsageError as exc:
        raise InputError(str(exc)) from None
    except _apply.ApplyError as exc:
        raise DeltaError(str(exc)) from None
    return res if signature is None else {**res, "signature": signature}


def is_delta(path: Path) -> bool:
    """True when ``path`` is a delta tarball (its second member is ``<top>/delta.json``)."""
    # A sniff, not a reading: tarfile seeks past members (a hostile size costs nothing here),
    # and what is not a delta is read by inspect's strict reader, which says what it is.
    try:
        with tarfile.open(path, "r:") as tar:
            for _, info in zip(range(8), tar, strict=False):
                if _rel(info.name) == _apply.DELTA_JSON:
                    return True
    except (OSError, tarfile.TarError, EOFError, ValueError):
        # Not a tar tarfile can walk (ValueError: a hostile header's negative offset): not a
        # delta; inspect's strict reader says what it is instead.
        return False
    return False


def inspect_delta(path: Path) -> dict[str, Any]:
    """What a delta needs (its base) and what it makes, from its delta.json."""
    d = _apply.Delta(path)
    try:
        meta = d.load()
    except _apply.ApplyError as exc:
        raise DeltaError(str(exc)) from None
    finally:
        d.close()
    members = meta["members"]
    return {
        "kind": "delta",
        "delta": path.name,
        "size": path.stat().st_size,
        "sidecar": sidecar_path(path).is_file(),
        "needs": meta["base"],
        "makes": meta["target"],
        "members": len(members),
        "from_base": {"files": sum(m.get("from") == "base" for m in members),
                      "bytes": sum(m["size"] for m in members if m.get("from") == "base")},
        "from_delta": {"files": sum(m.get("from") == "delta" for m in members),
                       "bytes": sum(m["size"] for m in members if m.get("from") == "delta"),
                       "names": [_rel(m["name"]) for m in members if m.get("from") == "delta"]},
    }


def render_delta(info: dict[str, Any]) -> str:
    """inspect's text for a delta."""
    need, make = info["needs"], info["makes"]
    lines = [
        f"delta:   {info['delta']} ({info['size']} bytes, sidecar "
        f"{'present' if info['sidecar'] else 'absent'})",
        f"needs:   {need['name']} ({need['size']} bytes)",
        f"         sha256 {need['sha256']}",
        f"makes:   {make['name']} ({make['size']} bytes)",
        f"         sha256 {make['sha256']}",
        f"reuses:  {info['from_base']['files']} files, {info['from_base']['bytes']} bytes "
        "from the base",
        f"carries: {info['from_delta']['files']} files, {info['from_delta']['bytes']} bytes:",
        *(f"         {n}" for n in info["from_delta"]["names"]),
        f"apply:   pyannote-bundle apply {info['delta']} --base {need['name']} --output DIR",
    ]
    return "\n".join(lines)
