"""`rebuild`: make a bundle again from the inputs its manifest records, and compare.

The manifest names everything a build depends on: the recipe (or the spec's own text), the
target, the lockfile (by name and sha256), the backend that built wheels from sdists, the
index options, each model repo at its commit with the sha256 of every file, the tool's
version and SOURCE_DATE_EPOCH, and the compression. A second engineer who runs the same tool
version with the index and the Hub at hand gets the same tarball, byte for byte, or a list
of the members that differ, with their sizes and sha256s on both sides.

What it refuses, before building anything: another tool version (a different tool makes a
different bundle, and that proves nothing about the release), a lockfile or build backend
lock it does not have with the recorded sha256, a spec whose text the bundle does not
record, an index URL whose credentials the manifest left out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from bundler import __version__, layout
from bundler.build import BuildOptions, build
from bundler.bundlefile import open_raw
from bundler.data import data_dir
from bundler.errors import CannotRebuild, IntegrityError
from bundler.integrity import BUFSIZE, detect_compression, open_bundle
from bundler.lockfile import load_build_lock
from bundler.spec import (
    IndexOptions,
    Spec,
    Target,
    load_recipe,
    load_spec,
    recipe_names,
    with_asr_model,
)

log = logging.getLogger("bundler")

MAX_MANIFEST = 64 << 20


@dataclass(frozen=True)
class Member:
    """One tar member, as far as its bytes go: what it is, its header, its content's hash."""

    path: str  # relative to the bundle's top folder ("" for the folder itself)
    kind: str  # "file", "dir", or tar's type byte for anything else
    size: int
    sha256: str | None  # files only
    header: tuple[Any, ...]  # mode, mtime, uid, gid, uname, gname, linkname

    def side(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Tarball:
    """A bundle tarball read once: its digest, top folder, members in order, manifest."""

    path: Path
    sha256: str
    top: str
    members: dict[str, Member]
    manifest: bytes | None


@dataclass(frozen=True)
class Comparison:
    """What differs between two bundle tarballs; empty lists when they are identical."""

    identical: bool
    bundle_sha256: str
    rebuilt_sha256: str
    members: list[dict[str, Any]] = field(default_factory=list)  # content differs or missing
    headers: list[str] = field(default_factory=list)  # same content, another tar header
    order: bool = False  # same members, another order
    top: tuple[str, str] | None = None  # the top folders, when they differ

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"identical": self.identical,
                               "bundle_sha256": self.bundle_sha256,
                               "rebuilt_sha256": self.rebuilt_sha256,
                               "members": self.members, "headers": self.headers,
                               "order": self.order}
        if self.top is not None:
            out["top"] = {"bundle": self.top[0], "rebuilt": self.top[1]}
        return out


@dataclass(frozen=True)
class RebuildOptions:
    cache_dir: Path
    output_dir: Path | None = None  # keep the rebuilt tarball here (default: removed)
    lockfile: Path | None = None  # the lockfile, when the bundle's is not a shipped one
    endpoint: str | None = None
    token: str | None = None
    python: str | None = None  # the self-test's interpreter, when the bundle ran one


@dataclass(frozen=True)
class RebuildReport:
    bundle: Path
    rebuilt: Path | None  # kept with --output, else None
    comparison: Comparison
    inputs: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle),
                "rebuilt": str(self.rebuilt) if self.rebuilt else None,
                **self.comparison.as_dict(), "inputs": self.inputs}

    @property
    def differing(self) -> list[str]:
        return [m["path"] for m in self.comparison.members]


def read_tarball(path: Path) -> Tarball:
    """Every member of a bundle tarball (plain, gzip or zstd) with the sha256 of its bytes,
    in one streaming pass that also hashes the whole file: read the one way verify and
    inspect read a bundle (integrity.open_bundle: strict headers, nothing after the end)."""
    members: dict[str, Member] = {}
    manifest: bytes | None = None
    top = ""
    with open_bundle(path) as bundle:
        for info in bundle.members():
            parts = PurePosixPath(info.name).parts
            if not parts:
                continue
            top = top or parts[0]
            rel = "/".join(parts[1:]) if parts[0] == top else "../" + info.name
            sha = None
            if info.isfile():
                f = bundle.tar.extractfile(info)
                if f is None:
                    raise IntegrityError(path.name, f"cannot read the member {info.name}")
                h = hashlib.sha256()
                data = bytearray()
                while chunk := f.read(BUFSIZE):
                    h.update(chunk)
                    if rel == layout.MANIFEST and len(data) < MAX_MANIFEST:
                        data += chunk
                sha = h.hexdigest()
                if rel == layout.MANIFEST:
                    manifest = bytes(data)
            kind_name = ("file" if info.isfile() else "dir" if info.isdir()
                         else info.type.decode("latin-1"))
            members[rel] = Member(rel, kind_name, info.size, sha,
                                  (oct(info.mode), info.mtime, info.uid, info.gid,
                                   info.uname, info.gname, info.linkname))
        bundle.read_to_end()  # the digest covers whatever follows the tar's end blocks too
        digest = bundle.reader.hash.hexdigest()
    return Tarball(path, digest, top, members, manifest)


def compare(bundle: Tarball, rebuilt: Tarball) -> Comparison:
    """The members whose content differs (or that only one side has), with sizes and
    sha256s on both sides; then members whose tar header alone differs; then the order."""
    if bundle.sha256 == rebuilt.sha256:
        return Comparison(True, bundle.sha256, rebuilt.sha256)
    diffs: list[dict[str, Any]] = []
    headers: list[str] = []
    for path in sorted(set(bundle.members) | set(rebuilt.members)):
        a, b = bundle.members.get(path), rebuilt.members.get(path)
        if a is None or b is None or (a.kind, a.size, a.sha256) != (b.kind, b.size, b.sha256):
            diffs.append({"path": path, "bundle": a.side() if a else None,
                          "rebuilt": b.side() if b else None})
        elif a.header != b.header:
            headers.append(path)
    order = (not diffs and list(bundle.members) != list(rebuilt.members))
    top = (bundle.top, rebuilt.top) if bundle.top != rebuilt.top else None
    return Comparison(False, bundle.sha256, rebuilt.sha256, diffs, headers, order, top)


def parse_manifest(tarball: Tarball) -> dict[str, Any]:
    if tarball.manifest is None:
        raise IntegrityError(tarball.path.name, "no manifest.json: not a pyannote-bundle "
                             "tarball")
    try:
        manifest = json.loads(tarball.manifest)
        assert isinstance(manifest, dict)
    except (ValueError, AssertionError):
        raise IntegrityError(layout.MANIFEST, "not a pyannote-bundle manifest") from None
    return manifest


@dataclass(frozen=True)
class Plan:
    """The same inputs again: what ``build`` is given to remake a bundle."""

    spec: Spec
    lockfile: Path
    index: IndexOptions
    source_date_epoch: int
    compression: str
    model_commits: dict[str, str]
    self_test: bool
    spec_file: Path | None = None  # a spec's recorded text, written out for load_spec

    def describe(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return {"recipe": self.spec.name, "target": self.spec.target.slug,
                "lockfile": self.lockfile.name,
                "lockfile_sha256": manifest.get("lockfile_sha256"),
                "source_date_epoch": self.source_date_epoch,
                "compression": self.compression,
                "models": [{"repo": r, "commit": c} for r, c in self.model_commits.items()],
                "self_test": self.self_test, "tool_version": __version__}


def plan(manifest: dict[str, Any], compression: str, work: Path,
         lockfile: Path | None = None) -> Plan:
    """The build inputs a manifest records, checked against what this tool has; refuses
    (CannotRebuild, naming the input) what it cannot reproduce."""
    tool = manifest.get("tool") or {}
    built_by = tool.get("version") if isinstance(tool, dict) else None
    if built_by != __version__:
        raise CannotRebuild(f"the bundle was built by pyannote-bundle {built_by}, this is "
                            f"{__version__}: rebuild it with pyannote-bundle=={built_by} "
                            "(another version makes another bundle)")
    try:
        recipe = manifest["recipe"]
        target = Target.from_slug(manifest["target"]["slug"])
        epoch = int(manifest["build"]["source_date_epoch"])
        index_rec = manifest["index"]
        models = manifest["models"]
        lock_name = manifest["lockfile"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CannotRebuild(f"{layout.MANIFEST} does not record {exc}: it cannot be "
                            "rebuilt") from None
    recorded = manifest["build"].get("compression")
    if recorded is not None and recorded != compression:
        raise CannotRebuild(f"{layout.MANIFEST} says the tarball was {recorded}-compressed, "
                            f"but it is {compression}: it was recompressed after the build")

    spec_file = None
    if recipe.get("source") == "spec":
        if not recipe.get("spec"):
            raise CannotRebuild(f"the bundle was built from a spec file ({recipe.get('name')}) "
                                "whose text it does not record")
        spec_file = work / "spec.toml"
        spec_file.write_text(recipe["spec"])
        spec = load_spec(spec_file, target)
    else:
        if recipe.get("name") not in recipe_names():
            raise CannotRebuild(f"recipe '{recipe.get('name')}' is not shipped with "
                                f"pyannote-bundle {__version__}")
        spec = load_recipe(recipe["name"], target)
    if recipe.get("asr_model"):  # the build's --asr-model, asked for again
        spec = with_asr_model(spec, str(recipe["asr_model"]))
    if (spec.name, spec.pipeline) != (recipe.get("name"), recipe.get("pipeline")):
        raise CannotRebuild(f"the recipe now reads {spec.name}/{spec.pipeline}, the bundle "
                            f"records {recipe.get('name')}/{recipe.get('pipeline')}")

    lock = _lockfile(lock_name, manifest.get("lockfile_sha256"), lockfile)
    backend = manifest.get("build_backend")
    if backend:
        have = load_build_lock()
        sha = hashlib.sha256(have.path.read_bytes()).hexdigest()
        if sha != backend.get("sha256"):
            used = ", ".join(backend.get("requires", []))
            raise CannotRebuild(f"the wheels built from sdists used {backend.get('lockfile')} "
                                f"sha256 {backend.get('sha256')} ({used}); this tool's is "
                                f"sha256 {sha} ({', '.join(have.pins)})")

    urls = [index_rec.get("index_url", ""), *index_rec.get("extra_index_urls", []),
            *index_rec.get("find_links", [])]
    hidden = [u for u in urls if "://***@" in u]
    if hidden:
        raise CannotRebuild(f"the index {hidden[0]} was used with credentials the manifest "
                            "does not record; the rebuild cannot reach it the same way")
    index = IndexOptions(index_rec["index_url"], tuple(index_rec.get("extra_index_urls", [])),
                         tuple(index_rec.get("find_links", [])))
    commits = {m["repo"]: m["commit"] for m in models}
    asked = {m.repo_id for m in spec.models}
    if set(commits) != asked:
        raise CannotRebuild(f"the bundle holds models {sorted(commits)}, the recipe asks for "
                            f"{sorted(asked)}")
    self_test = bool((manifest.get("self_test") or {}).get("ran"))
    return Plan(spec, lock, index, epoch, compression, commits, self_test, spec_file)


def _lockfile(name: str, sha256: str | None, given: Path | None) -> Path:
    if sha256 is None:
        raise CannotRebuild(f"{layout.MANIFEST} does not record the sha256 of its lockfile "
                            f"{name}")
    if given is not None:
        candidates = [given]
    else:
        shipped = Path(str(data_dir("lockfiles").joinpath(name)))
        if not shipped.is_file():
            raise CannotRebuild(f"the bundle was built with lockfile {name} (sha256 {sha256}), "
                                "which this tool does not ship: pass it with --lockfile")
        candidates = [shipped]
    path = candidates[0]
    try:
        have = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise CannotRebuild(f"{path}: cannot read: {exc.strerror}") from None
    if have != sha256:
        raise CannotRebuild(f"{path} has sha256 {have}, the bundle was built with {name} "
                            f"sha256 {sha256}: pass that lockfile with --lockfile")
    return path


def rebuild(bundle: Path, opts: RebuildOptions) -> RebuildReport:
    """Rebuild ``bundle`` from the inputs its manifest records and compare byte for byte."""
    with open_raw(bundle) as f:  # the file, or the stream across its volumes
        compression = detect_compression(f)
    log.info("rebuild: reading %s", bundle.name)
    original = read_tarball(bundle)
    manifest = parse_manifest(original)
    work = Path(tempfile.mkdtemp(prefix="pyannote-bundle-rebuild-"))
    try:
        p = plan(manifest, compression, work, opts.lockfile)
        out = opts.output_dir or work / "out"
        if opts.output_dir is not None and _same_folder(opts.output_dir, bundle.parent):
            raise CannotRebuild(f"--output {opts.output_dir} is the folder of the bundle: "
                                "the rebuilt tarball would replace it; pick another folder")
        log.info("rebuild: %s for %s from %s", p.spec.name, p.spec.target.slug,
                 p.lockfile.name)
        result = build(p.spec, BuildOptions(
            output_dir=out, cache_dir=opts.cache_dir, index=p.index,
            compression=p.compression, endpoint=opts.endpoint, token=opts.token,
            lockfile=p.lockfile, source_date_epoch=p.source_date_epoch,
            self_test=p.self_test, python=opts.python, model_commits=p.model_commits))
        log.info("rebuild: comparing %s with the rebuilt tarball", bundle.name)
        comparison = compare(original, read_tarball(result.packed.path))
        kept = result.packed.path if opts.output_dir is not None else None
        return RebuildReport(bundle, kept, comparison, p.describe(manifest))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def render_text(report: RebuildReport) -> str:
    c = report.comparison
    if c.identical:
        return f"identical: sha256 {c.bundle_sha256}"
    lines = [f"differs: {report.bundle.name} sha256 {c.bundle_sha256}",
             f"         rebuilt sha256 {c.rebuilt_sha256}"]
    if c.top is not None:
        lines.append(f"  top folder: {c.top[0]} (bundle) vs {c.top[1]} (rebuilt)")
    for m in c.members:
        lines.append(f"  {m['path']}")
        for side in ("bundle", "rebuilt"):
            s = m[side]
            lines.append(f"    {side + ':':8} " + (f"{s['size']} bytes, sha256 {s['sha256']}"
                                                   if s else "absent"))
    if c.headers:
        lines.append(f"  tar headers differ (same content): {', '.join(c.headers)}")
    if c.order:
        lines.append("  the same members in another order")
    return "\n".join(lines)
