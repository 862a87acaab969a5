"""`inspect`: what a bundle holds, read from its manifest without unpacking the wheels.

Members are packed in sorted order, so ``manifest.json``, ``SHA256SUMS`` and
``smoke/expected.json`` come before ``wheels/``: the stream is read up to the first wheel
and no further (a few MB of a multi-GB tarball). Nothing is written to disk. This is a look,
not a proof: ``verify`` checks every byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from bundler import layout
from bundler.bundlefile import sidecar_path, total_size, whole
from bundler.checksums import parse_checksums
from bundler.errors import IntegrityError, shown
from bundler.image import LABEL
from bundler.integrity import Limits, open_bundle
from bundler.oci.reader import read_image

MAX_SMALL = 64 << 20  # manifest, checksums and expected result are far smaller than this
WANTED = (layout.MANIFEST, layout.CHECKSUMS, layout.EXPECTED)
READ_AHEAD = 1 << 16  # the stream stops at the first wheel: read little past it


def inspect_bundle(tarball: Path) -> dict[str, Any]:
    """What ``tarball`` says it holds, from the members before its models and wheels;
    IntegrityError when those cannot be read or a member there is one no bundle holds."""
    found: dict[str, bytes] = {}
    past_smoke = False
    with open_bundle(tarball, bufsize=READ_AHEAD) as bundle:
        for member in bundle.members():
            rel = "/".join(PurePosixPath(member.name).parts[1:])
            past_smoke = past_smoke or rel.startswith(layout.SMOKE_DIR + "/")
            # The models come after the small files (bundler.pack.member_order); a bundle
            # from before that order has smoke/ after models/, and is read on to it.
            if rel.startswith(layout.WHEELS_DIR + "/") or (
                    past_smoke and rel.startswith(layout.MODELS_DIR + "/")):
                break
            if member.size > Limits.max_member_bytes:
                # Passing over a member reads its bytes: a hostile size must not keep
                # inspect reading (or spinning at the end of the stream) for hours.
                raise IntegrityError(member.name, f"{member.size} bytes is over the per-file "
                                     f"limit of {Limits.max_member_bytes}")
            if rel in WANTED and member.isfile() and member.size <= MAX_SMALL:
                f = bundle.tar.extractfile(member)
                assert f is not None
                found[rel] = f.read()
        kind, bytes_read = bundle.kind, bundle.reader.count
    if layout.MANIFEST not in found:
        raise IntegrityError(tarball.name, "no manifest.json before the wheels: not a "
                             "pyannote-bundle tarball")
    try:
        manifest = json.loads(found[layout.MANIFEST])
    except ValueError:  # UnicodeDecodeError included
        raise IntegrityError(layout.MANIFEST, "not a pyannote-bundle manifest") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(layout.MANIFEST, "not a pyannote-bundle manifest")
    consistent: bool | None = None
    if layout.CHECKSUMS in found:
        try:
            listed = parse_checksums(found[layout.CHECKSUMS])
            consistent = listed.get(layout.MANIFEST) == hashlib.sha256(
                found[layout.MANIFEST]).hexdigest()
        except ValueError:  # UnicodeDecodeError included
            consistent = False
    try:
        expected = json.loads(found[layout.EXPECTED]) if layout.EXPECTED in found else None
    except ValueError:
        raise IntegrityError(layout.EXPECTED, "not valid JSON") from None
    summary = _summary(manifest, expected)
    return {"bundle": summary.pop("bundle"),
            "tarball": str(tarball),
            "size": total_size(tarball),
            "compression": kind,
            "sidecar": sidecar_path(whole(tarball)).is_file(),
            **summary,
            "manifest_matches_sha256sums": consistent,
            "bytes_read": bytes_read}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _summary(manifest: dict[str, Any], expected: Any) -> dict[str, Any]:
    """The manifest's fields in the shapes ``render_text`` reads. Nothing here is verified
    yet: a field of another type is left out, never a crash."""
    wheels = [w for w in _list(manifest.get("wheels")) if isinstance(w, dict)]
    host = manifest.get("host_requirements")
    if isinstance(host, dict):
        host = {**host, "libraries": [lib for lib in _list(host.get("libraries"))
                                      if isinstance(lib, dict) and "soname" in lib],
                "optional_for": {str(k): v for k, v in _dict(host.get("optional_for")).items()}}
    exp = _dict(expected)
    return {
        "bundle": manifest.get("bundle"),
        "recipe": _dict(manifest.get("recipe")) or None,
        "target": _dict(manifest.get("target")) or None,
        "pyannote_audio": manifest.get("pyannote_audio"),
        "tool": _dict(manifest.get("tool")) or None,
        "build": _dict(manifest.get("build")) or None,
        "models": [{"repo": m.get("repo"), "revision": m.get("revision"),
                    "commit": m.get("commit"), "license": m.get("license"),
                    "files": [{"path": f.get("bundle_path"), "sha256": f.get("sha256"),
                               "size": f.get("size")}
                              for f in map(_dict, _list(m.get("files")))]}
                   for m in map(_dict, _list(manifest.get("models")))],
        "wheels": {"count": len(wheels),
                   "size": sum(w["size"] for w in wheels if type(w.get("size")) is int),
                   "key": {str(w.get("name")): str(w.get("version")) for w in wheels
                           if w.get("name") in ("pyannote-audio", "torch", "torchaudio",
                                                "huggingface-hub", "pytorch-lightning")}},
        "host_requirements": host if isinstance(host, dict) else None,
        "files": len(manifest["files"]) + 2,  # + manifest.json, SHA256SUMS
        "self_test": manifest.get("self_test"),
        # The speech-recognition model bin/transcribe runs (None: the bundle only diarizes).
        "asr": _dict(manifest.get("asr")) or None,
        "expected": None if expected is None else {
            "segments": len(_list(exp.get("segments"))), "speakers": exp.get("speakers"),
            "tolerance_s": exp.get("tolerance_s"),
            "transcript": _dict(exp.get("transcript")).get("text")},
    }


def render_text(info: dict[str, Any]) -> str:
    target = info.get("target") or {}
    lines = [
        f"bundle:   {info['bundle']}  ({info['size'] / 1e9:.2f} GB, {info['files']} files, "
        f"compression {info['compression']}, sidecar {'present' if info['sidecar'] else 'absent'})",
        f"recipe:   {(info.get('recipe') or {}).get('name')}  "
        f"pyannote.audio {info.get('pyannote_audio')}",
        f"target:   CPython {target.get('python')} linux {target.get('arch')} "
        f"(glibc >= {target.get('glibc')})",
        f"built:    {(info.get('build') or {}).get('time')} by pyannote-bundle "
        f"{(info.get('tool') or {}).get('version')}",
        f"wheels:   {info['wheels']['count']} ({info['wheels']['size'] / 1e9:.2f} GB): "
        + ", ".join(f"{k} {v}" for k, v in sorted(info["wheels"]["key"].items())),
    ]
    host = info.get("host_requirements")
    if host is not None:
        libs = host.get("libraries", [])
        required = [lib["soname"] for lib in libs if lib.get("required")]
        optional = sorted(host.get("optional_for", {}))
        needs = [f"glibc >= {host['glibc']}"] if host.get("glibc") else []
        needs.append(", ".join(required) or "no library beyond glibc")
        lines.append("host:     " + "; ".join(needs)
                     + (f" (+{len(libs) - len(required)} optional: {', '.join(optional)})"
                        if optional else ""))
    lines.append("models:")
    for m in info["models"]:
        lines.append(f"  {m['repo']} @ {m['commit']}  ({m.get('license') or 'licence unknown'})")
        for f in m["files"]:
            lines.append(f"    {f['path']}  {f['size']} bytes  sha256 {f['sha256']}")
    asr = info.get("asr")
    if asr:
        lines.append(f"asr:      {asr.get('repo')} in {asr.get('path')} for bin/transcribe ("
                     f"{'multilingual' if asr.get('multilingual') else 'English only'}, "
                     f"{asr.get('n_mels')} mel bins, compute type "
                     f"{asr.get('compute_type') or 'int8 on CPU, float16 on GPU'})")
    exp = info.get("expected")
    lines.append("expected: " + ("none (built without --self-test)" if exp is None else
                                 f"{exp['segments']} segments, {exp['speakers']} speakers "
                                 f"(tolerance {exp['tolerance_s']} s)"))
    if exp is not None and exp.get("transcript"):
        lines.append(f"          transcript \"{exp['transcript']}\"")
    if info["manifest_matches_sha256sums"] is False:
        lines.append("WARNING:  manifest.json does not match its SHA256SUMS line")
    lines.append("Not verified: run `pyannote-bundle verify` to check every byte.")
    # Every field comes from the unverified manifest: none may forge a line of its own.
    return "\n".join(shown(line, 4000) for line in lines)


# --- image archives ------------------------------------------------------------------------
def inspect_image(path: Path) -> dict[str, Any]:
    """An image archive's (or layout folder's) bundle, layers and digest, read from its
    small blobs only."""
    view = read_image(path)
    desc, mdigest, manifest, config, sizes = (view.index_entry, view.manifest_digest,
                                              view.manifest, view.config, view.sizes)
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
