"""manifest.json: what a bundle holds and how it was made, assembled in one place.

The build chains the stages (bundler.build); what their results say about the bundle is put
together here: the recipe and its source, the target, the tool, the time, the index options
(no credentials), the lockfile, the backend that built wheels from sdists, the host
libraries the wheels need, every wheel, program and model file with its sha256, and the ASR
model's entry. ``rebuild`` reads the same record to make the bundle again; the SBOM and the
installer read it too. ``files`` and ``self_test`` are added by the build as it packs.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bundler import __version__, layout
from bundler.asr import inspect_whisper
from bundler.lockfile import load_build_lock
from bundler.models import FetchedModel
from bundler.pack import Entry
from bundler.spec import ASR_ROLE, IndexOptions, Spec
from bundler.wheelcache import WheelFile
from bundler.wheels import wheel_license


@dataclass(frozen=True)
class BundleInfo:
    """What the build decided about a bundle, besides its wheels, models and files."""

    name: str
    spec: Spec
    source_date_epoch: int
    compression: str
    index: IndexOptions
    lockfile: Path
    pyannote_audio: str
    host_requirements: dict[str, Any]
    asr: dict[str, Any] | None


def assemble(info: BundleInfo, wheels: list[WheelFile], models: list[FetchedModel],
             entries: list[Entry]) -> dict[str, Any]:
    """The manifest of a bundle made of ``entries`` (its programs are named with their
    sha256, as in the SBOM); each model with the revision its spec asks for."""
    spec, epoch = info.spec, info.source_date_epoch
    asked = {m.repo_id: m.revision for m in spec.models}
    # The programs that run on the isolated host, named in the manifest and the SBOM too.
    programs = [e for e in entries if e.path in layout.HOST_PROGRAMS]
    manifest: dict[str, Any] = {
        "format": 1,
        "bundle": info.name,
        # What `rebuild` needs to make the same bundle again: a shipped recipe by name, a
        # spec file by its own text.
        "recipe": {"name": spec.name, "pipeline": spec.pipeline, **_spec_source(spec),
                   # --asr-model, which rebuild passes again
                   **({"asr_model": spec.asr_override} if spec.asr_override else {})},
        "target": spec.target.as_dict(),
        "tool": {"name": "pyannote-bundle", "version": __version__},
        "build": {"source_date_epoch": epoch,
                  "time": datetime.fromtimestamp(epoch, UTC).isoformat(),
                  "compression": info.compression},
        "index": info.index.redacted(),
        "lockfile": info.lockfile.name,
        "lockfile_sha256": hashlib.sha256(info.lockfile.read_bytes()).hexdigest(),
        # The backend that built the wheels made here from sdists (none: null).
        "build_backend": _build_backend(wheels),
        "pyannote_audio": info.pyannote_audio,
        # What the wheels need from the host; runtime/hostlibs.py checks it before install.
        "host_requirements": info.host_requirements,
        "wheels": [{"name": w.name, "version": w.version, "filename": w.filename,
                    "sha256": w.sha256, "size": w.size, "built_from_sdist": w.built_from,
                    "license": wheel_license(w.path)}
                   for w in wheels],
        "programs": [{"path": e.path, "sha256": e.sha256, "size": e.size}
                     for e in sorted(programs, key=lambda e: e.path)],
        "models": [{"repo": m.repo_id, "revision": asked.get(m.repo_id, m.revision),
                    "commit": m.commit,
                    "role": m.role, "license": m.license,
                    "files": [{"path": f.path,
                               "bundle_path": f"{layout.MODELS_DIR}/{f.bundle_path}",
                               "sha256": f.sha256, "size": f.size} for f in m.files]}
                   for m in models],
    }
    if info.asr:
        manifest["asr"] = info.asr
    return manifest


def asr_entry(spec: Spec, models: list[FetchedModel]) -> dict[str, Any] | None:
    """The manifest's ``asr``: where the ASR model lies, what it is (read from its own files:
    bundler.asr refuses the traps), and how bin/transcribe runs it."""
    fetched = next((m for m in models if m.role == ASR_ROLE), None)
    if fetched is None:
        return None
    with tempfile.TemporaryDirectory(prefix="pyannote-bundle-asr-") as tmp:
        # The model as faster-whisper will see it: one folder, the repo's file names.
        for f in fetched.files:
            os.symlink(f.local, Path(tmp) / f.path)
        info = inspect_whisper(Path(tmp))
    folder = posixpath.dirname(fetched.files[0].bundle_path)
    return {"repo": fetched.repo_id, "commit": fetched.commit,
            "path": f"{layout.MODELS_DIR}/{folder}",
            "compute_type": spec.asr_compute_type,
            "multilingual": info.multilingual, "n_mels": info.n_mels,
            "vocab_size": info.vocab_size,
            "files": sorted(f.path for f in fetched.files)}


def _spec_source(spec: Spec) -> dict[str, Any]:
    """A shipped recipe by name; a spec file by its text (None when it cannot be read)."""
    if spec.source == f"recipe {spec.name}":
        return {"source": "recipe", "spec": None}
    try:
        text: str | None = Path(spec.source).read_text()
    except (OSError, UnicodeDecodeError):
        text = None
    return {"source": "spec", "spec": text}


def _build_backend(wheels: list[WheelFile]) -> dict[str, Any] | None:
    if not any(w.built_from for w in wheels):
        return None
    backend = load_build_lock()
    return {"lockfile": backend.path.name,
            "sha256": hashlib.sha256(backend.path.read_bytes()).hexdigest(),
            "requires": backend.pins}
