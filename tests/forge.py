"""Helpers the tests share.

A self-consistent forgery of a bundle: one member changed (by default its middle byte
flipped), and every sum that covers it made again (manifest.json, the SBOM, SHA256SUMS, the
sidecar) with the tool's own packer, so that every integrity check passes and only a rebuild
can tell. And what the refusal tests run: `verify` with its own TMPDIR and the check that it
refused cleanly, the loopback Hub with a gated repo, and a build's command line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import EMB, SEG, TINY_LOCK
from hubfaults import FaultyHub

from bundler import layout, render
from bundler.demo.hub import HubRepo
from bundler.hashing import sha256_file
from bundler.pack import Entry, pack
from bundler.sbom import sbom_json


def extract(bundle: Path, dest: Path) -> None:
    """Unpack a bundle the tests made, with PEP 706's filter where this Python has it
    (3.11.4 and newer; Debian 12's 3.11.2 runs this suite too)."""
    with tarfile.open(bundle) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


def flip_byte(path: Path, offset: int) -> None:
    """A damaged copy: one bit of the byte at ``offset`` changed in place (flipping it again
    restores the file)."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def _flip_middle(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0xFF
    return bytes(changed)


def forge(bundle: Path, member: str, output_dir: Path,
          change: Callable[[bytes], bytes] = _flip_middle) -> Path:
    """``bundle`` with ``member``'s bytes changed by ``change`` and re-summed, written to
    ``output_dir`` under the same name; returns its path."""
    work = Path(tempfile.mkdtemp(prefix="forge-", dir=output_dir.parent))
    try:
        extract(bundle, work)
        (root,) = work.iterdir()
        manifest = json.loads((root / layout.MANIFEST).read_text())
        # The SBOM is made from the manifest before its file list and self-test: check that
        # this is still how the build makes it, so the forgery stays self-consistent.
        before = {k: v for k, v in manifest.items() if k not in ("files", "self_test")}
        assert sbom_json(before) == (root / layout.SBOM).read_bytes(), "SBOM recipe changed"

        target = root / member
        data = change(target.read_bytes())
        target.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        for model in manifest["models"]:
            for f in model["files"]:
                if f["bundle_path"] == member:
                    f["sha256"] = sha
        for w in manifest["wheels"]:
            if f"{layout.WHEELS_DIR}/{w['filename']}" == member:
                w["sha256"] = sha
        for program in manifest.get("programs", []):
            if program["path"] == member:
                program["sha256"], program["size"] = sha, len(data)
        manifest["files"][member] = {**manifest["files"][member], "sha256": sha,
                                     "size": len(data)}
        sbom = sbom_json({k: v for k, v in manifest.items() if k not in ("files", "self_test")})
        (root / layout.SBOM).write_bytes(sbom)
        manifest["files"][layout.SBOM] = {"sha256": hashlib.sha256(sbom).hexdigest(),
                                          "size": len(sbom)}
        entries = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            if rel in (layout.MANIFEST, layout.CHECKSUMS):
                continue
            digest, size = sha256_file(path)
            entries.append(Entry(rel, digest, size, source=path))
        entries.append(Entry.from_bytes(layout.MANIFEST, render.manifest_json(manifest)))
        packed = pack(entries, top=root.name, output_dir=output_dir, compression="none",
                      mtime=manifest["build"]["source_date_epoch"])
        return packed.path
    finally:
        shutil.rmtree(work, ignore_errors=True)


TOKEN = "hf_canary_SECRET_7f3a9c"


def _verify(tarball: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str],
                                                                 Path]:
    """Run `pyannote-bundle verify` with its own TMPDIR; return the process and the prefix."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    prefix = tmp_path / "prefix"
    proc = subprocess.run(["pyannote-bundle", "-q", "verify", str(tarball), "--prefix", str(prefix),
                           *extra], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(tmp)})
    return proc, prefix


def _assert_refused(proc: subprocess.CompletedProcess[str], prefix: Path, code: int,
                    *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not prefix.exists(), "nothing may be installed"
    assert not any((prefix.parent / "tmpdir").iterdir()), "the work folder must be removed"


def _hub(**kw: Any) -> FaultyHub:
    return FaultyHub([HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG},
                                gated=True),
                        HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM",
                                {"pytorch_model.bin": EMB})], tokens=[TOKEN], **kw)


def _build_argv(out: Path, cache: Path) -> list[str]:
    return ["pyannote-bundle", "-q", "build", "--output", str(out), "--lockfile", str(TINY_LOCK),
            "--cache-dir", str(cache)]
