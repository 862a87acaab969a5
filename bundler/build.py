"""The orchestrator of the build side: spec -> wheels -> models -> render -> pack.

No stage calls another; this module chains them (the manifest is assembled by
bundler.manifest from what they return).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bundler import __version__, layout, render
from bundler.data import data_dir
from bundler.errors import HostMismatch, InputError
from bundler.manifest import BundleInfo, asr_entry, assemble
from bundler.models import FetchedModel, fetch_models
from bundler.native import host_requirements
from bundler.offline_install import check_interpreter, find_python, run_installer
from bundler.pack import Entry, Packed, pack
from bundler.runtime.install import TOLERANCE_S
from bundler.sbom import sbom_json
from bundler.signing import sign
from bundler.spec import IndexOptions, Spec
from bundler.traps import check_pins, check_pipeline
from bundler.wheelcache import WheelFile
from bundler.wheels import bundle_lock, fetch_wheels

log = logging.getLogger("bundler")

# Without SOURCE_DATE_EPOCH, a fixed epoch keeps two builds of the same inputs identical.
DEFAULT_EPOCH = 946684800  # 2000-01-01T00:00:00Z


@dataclass(frozen=True)
class BuildOptions:
    output_dir: Path
    cache_dir: Path
    index: IndexOptions = field(default_factory=IndexOptions)
    compression: str = "none"
    endpoint: str | None = None
    token: str | None = None
    lockfile: Path | None = None
    source_date_epoch: int | None = None
    self_test: bool = False  # install the staged bundle here, smoke it, ship the result
    sign_key: Path | None = None  # an SSH private key: <tarball>.sha256.sig beside the sidecar
    python: str | None = None  # the self-test's interpreter (default: found for the target)
    # rebuild: fetch each repo at the commit a bundle records, whatever its branch says now;
    # the manifest still records the revision the spec asks for.
    model_commits: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildResult:
    bundle_name: str
    packed: Packed
    manifest: dict[str, Any]


def source_date_epoch(value: int | None = None) -> int:
    if value is not None:
        return value
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None:
        return DEFAULT_EPOCH
    if not raw.isdigit():
        raise InputError(f"SOURCE_DATE_EPOCH='{raw}' is not a whole number of seconds")
    return int(raw)


def find_lockfile(spec: Spec) -> Path:
    name = f"{spec.lockfile}-{spec.target.slug}.txt"
    path = data_dir("lockfiles").joinpath(name)
    if not path.is_file():
        raise InputError(f"no lockfile {name} for recipe {spec.name} and target "
                         f"{spec.target.slug}; pass --lockfile or lock one first")
    return Path(str(path))


def build(spec: Spec, opts: BuildOptions) -> BuildResult:
    """Build the bundle for ``spec``; returns where it is and its manifest."""
    epoch = source_date_epoch(opts.source_date_epoch)
    lockfile = opts.lockfile or find_lockfile(spec)
    index = spec.index(opts.index)
    wheels, host = _wheels(spec, lockfile, index, opts, epoch)
    models = fetch_models(tuple(replace(m, revision=opts.model_commits.get(m.repo_id,
                                                                           m.revision))
                                for m in spec.models),
                          endpoint=opts.endpoint, token=opts.token,
                          cache_dir=opts.cache_dir / "hub")
    asr = asr_entry(spec, models)
    version = {w.name: w.version for w in wheels}.get("pyannote-audio", "0")
    bundle_name = f"{spec.name}-{version}-{spec.target.slug}"
    entries = [*_fetched(wheels, models),
               *_rendered(spec, bundle_name, models, wheels, with_dialogue=asr is not None)]
    info = BundleInfo(bundle_name, spec, epoch, opts.compression, index, lockfile, version,
                      host, asr)
    manifest = assemble(info, wheels, models, entries)
    entries.append(Entry.from_bytes(layout.SBOM, sbom_json(manifest)))
    if opts.self_test:
        expected, manifest["self_test"] = self_test(entries, manifest, spec, opts.python)
        if expected is not None:
            entries.append(Entry.from_bytes(layout.EXPECTED, expected))
    manifest["files"] = {e.path: {"sha256": e.sha256, "size": e.size} for e in entries}
    entries.append(Entry.from_bytes(layout.MANIFEST, render.manifest_json(manifest)))
    packed = pack(entries, top=bundle_name, output_dir=opts.output_dir,
                  compression=opts.compression, mtime=epoch)
    if opts.sign_key is not None:
        try:
            sign(packed.sidecar, opts.sign_key)
        except BaseException:
            # An unsigned bundle under the final name would pass for a finished one.
            packed.path.unlink(missing_ok=True)
            packed.sidecar.unlink(missing_ok=True)
            raise
    return BuildResult(bundle_name, packed, manifest)


def _wheels(spec: Spec, lockfile: Path, index: IndexOptions, opts: BuildOptions,
            epoch: int) -> tuple[list[WheelFile], dict[str, Any]]:
    """The locked wheels, checked against pyannote's traps, and what they need of the host."""
    wheels = fetch_wheels(lockfile, spec.target, index, opts.cache_dir / "wheels", epoch)
    pins = {w.name: w.version for w in wheels}
    check_pins(pins, asr=spec.asr is not None)
    host = host_requirements(wheels, opts.cache_dir / "wheels")
    if "pyannote-audio" in pins:
        check_pipeline(spec.pipeline, pins["pyannote-audio"])
    return wheels, host


def _fetched(wheels: list[WheelFile], models: list[FetchedModel]) -> list[Entry]:
    """The bulk: every wheel and model file, packed from the caches."""
    entries = [Entry(f"{layout.WHEELS_DIR}/{w.filename}", w.sha256, w.size, source=w.path)
               for w in wheels]
    for m in models:
        for f in m.files:
            entries.append(Entry(f"{layout.MODELS_DIR}/{f.bundle_path}", f.sha256, f.size,
                                 source=f.local))
    return entries


def _config(spec: Spec, models: list[FetchedModel]) -> str:
    """models/config.yaml: the recipe's config with the model paths set (3.1), or the
    pipeline repo's own config spelled out (community-1)."""
    model_paths: dict[str, str] = {}
    repo_config: tuple[str, str] | None = None  # (text, folder) of a pipeline repo's config
    for m in models:
        for f in m.files:
            path = f"{layout.MODELS_DIR}/{f.bundle_path}"
            if m.role in ("segmentation", "embedding"):
                model_paths[m.role] = path
            if m.role == "pipeline" and f.path == "config.yaml":
                repo_config = (f.local.read_text(), posixpath.dirname(path))
    if spec.pipeline == "pyannote-3.1":
        return render.config_yaml(spec, model_paths)
    if repo_config is not None:
        return render.config_yaml_from_repo(spec, *repo_config)
    raise InputError(f"recipe {spec.name}: its pipeline model must list config.yaml")


def _rendered(spec: Spec, bundle_name: str, models: list[FetchedModel],
              wheels: list[WheelFile], with_dialogue: bool) -> list[Entry]:
    """The small files: config, install.sh, README, the programs, the smoke samples, the
    bundle's own lock."""
    return [
        Entry.from_bytes(layout.CONFIG, _config(spec, models).encode()),
        Entry.from_bytes(layout.INSTALL_SH,
                         render.install_sh(bundle_name, spec).encode()),
        Entry.from_bytes(layout.README,
                         render.readme_txt(bundle_name, spec, __version__).encode()),
        *(Entry.from_bytes(path, render.runtime_bytes(name))
          for path, name in layout.PROGRAMS.items()),
        *(Entry.from_bytes(path, render.sample_bytes(fmt))
          for fmt, path in layout.SAMPLES.items()),
        *([Entry.from_bytes(layout.DIALOGUE, render.asset_bytes("dialogue.flac"))]
          if with_dialogue else []),
        Entry.from_bytes(layout.LOCK, bundle_lock(wheels).encode()),
    ]


def self_test(entries: list[Entry], manifest: dict[str, Any], spec: Spec,
              python: str | None = None) -> tuple[bytes | None, dict[str, Any]]:
    """Install the staged bundle on this host with the target's interpreter (``python``, or
    the one found for it: this tool's own, or ``python3.X`` on PATH), run the smoke
    diarization with the network disabled, and return its result as ``smoke/expected.json``
    (plus what the manifest says about it). Skipped, with a warning, when this host cannot
    run the bundle's target."""
    chosen = find_python(spec.target.python, python)
    try:
        if chosen is None:
            raise HostMismatch(f"no python{spec.target.python} on this host (pass --python)")
        check_interpreter({"target": spec.target.as_dict()}, chosen)
    except HostMismatch as exc:
        if python is not None:
            raise  # asked for explicitly: a wrong interpreter is an error, not a skip
        log.warning("self-test: skipped: %s", exc)
        return None, {"ran": False, "reason": str(exc)}
    stage = Path(tempfile.mkdtemp(prefix="pyannote-bundle-selftest-"))
    try:
        root = stage / "bundle"
        for e in entries:
            dst = root / e.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            if e.data is not None:
                dst.write_bytes(e.data)
            else:
                assert e.source is not None
                os.symlink(e.source.resolve(), dst)
        (root / layout.MANIFEST).write_bytes(render.manifest_json(manifest))
        log.info("self-test: installing the staged bundle on this host, as install.sh does")
        # No SHA256SUMS yet (the stage links the cached wheels): the entries were hashed as
        # they were made, so the installer skips only its integrity step here.
        report = run_installer(root, stage / "prefix", chosen, skip_integrity=True,
                               compile_bytecode=False,  # the stage is removed right after
                               throwaway=True)
        result = report["smoke"]
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    expected = {"segments": result["segments"], "speakers": result["speakers"],
                "formats": {fmt: {"segments": f["segments"], "speakers": f["speakers"]}
                            for fmt, f in result.get("formats", {}).items()},
                "tolerance_s": TOLERANCE_S, "pyannote_audio": result.get("pyannote_audio"),
                "torch": result.get("torch")}
    if result.get("transcript"):
        heard = result["transcript"]
        expected["transcript"] = {k: heard.get(k) for k in ("text", "words", "speakers",
                                                             "language")}
    log.info("self-test: %d segments, %d speakers", len(result["segments"]), result["speakers"])
    return (json.dumps(expected, indent=2, sort_keys=True).encode() + b"\n",
            # Not the isolation the build host offered: the manifest must not depend on the
            # host, so that a rebuild elsewhere gives the same bytes.
            {"ran": True})
