"""`inspect`: what a bundle holds, read from its manifest without unpacking the wheels.

Members are packed in sorted order, so ``manifest.json``, ``SHA256SUMS`` and
``smoke/expected.json`` come before ``wheels/``: the stream is read up to the first wheel
and no further (a few MB of a multi-GB tarball). Nothing is written to disk. This is a look,
not a proof: ``verify`` checks every byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from bundler import layout
from bundler.errors import IntegrityError
from bundler.integrity import HashingReader, detect_compression
from bundler.render import parse_checksums

MAX_SMALL = 64 << 20  # manifest, checksums and expected result are far smaller than this
WANTED = (layout.MANIFEST, layout.CHECKSUMS, layout.EXPECTED)


def inspect_bundle(tarball: Path) -> dict[str, Any]:
    from bundler.parts import open_bundle, total_size, whole

    try:
        raw = open_bundle(tarball)  # the file, or one stream across its parts
    except OSError as exc:
        raise IntegrityError(str(tarball), f"cannot open: {exc.strerror}") from None
    found: dict[str, bytes] = {}
    with raw:
        reader = HashingReader(raw)
        kind = detect_compression(raw)
        stream: Any = io.BufferedReader(reader, 1 << 16)
        if kind == "gzip":
            import gzip

            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        elif kind == "zstd":
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    rel = "/".join(PurePosixPath(member.name).parts[1:])
                    if rel.startswith(layout.WHEELS_DIR + "/"):
                        break
                    if rel in WANTED and member.isfile() and member.size <= MAX_SMALL:
                        f = tar.extractfile(member)
                        assert f is not None
                        found[rel] = f.read()
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise IntegrityError(tarball.name, "not a readable bundle tarball: "
                                 f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
        except Exception as exc:
            # zlib.error (gzip) and ZstdError mean a corrupt stream; anything else is a bug
            if not isinstance(exc, zlib.error) and type(exc).__name__ != "ZstdError":
                raise
            raise IntegrityError(tarball.name, f"corrupt {kind} stream: {exc}") from None
        bytes_read = reader.count
    if layout.MANIFEST not in found:
        raise IntegrityError(tarball.name, "no manifest.json before the wheels: not a "
                             "pyannote-bundle tarball")
    try:
        manifest = json.loads(found[layout.MANIFEST])
        assert isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
    except (ValueError, AssertionError):
        raise IntegrityError(layout.MANIFEST, "not a pyannote-bundle manifest") from None
    consistent: bool | None = None
    if layout.CHECKSUMS in found:
        try:
            listed = parse_checksums(found[layout.CHECKSUMS])
            consistent = listed.get(layout.MANIFEST) == hashlib.sha256(
                found[layout.MANIFEST]).hexdigest()
        except (ValueError, UnicodeDecodeError):
            consistent = False
    expected = json.loads(found[layout.EXPECTED]) if layout.EXPECTED in found else None
    wheels = manifest.get("wheels", [])
    return {
        "bundle": manifest.get("bundle"),
        "tarball": str(tarball),
        "size": total_size(tarball),
        "compression": kind,
        "sidecar": whole(tarball).with_name(whole(tarball).name
                                            + layout.SIDECAR_SUFFIX).is_file(),
        "recipe": manifest.get("recipe"),
        "target": manifest.get("target"),
        "pyannote_audio": manifest.get("pyannote_audio"),
        "tool": manifest.get("tool"),
        "build": manifest.get("build"),
        "models": [{"repo": m.get("repo"), "revision": m.get("revision"),
                    "commit": m.get("commit"), "license": m.get("license"),
                    "files": [{"path": f.get("bundle_path"), "sha256": f.get("sha256"),
                               "size": f.get("size")} for f in m.get("files", [])]}
                   for m in manifest.get("models", [])],
        "wheels": {"count": len(wheels), "size": sum(int(w.get("size", 0)) for w in wheels),
                   "key": {w["name"]: w["version"] for w in wheels
                           if w.get("name") in ("pyannote-audio", "torch", "torchaudio",
                                                "huggingface-hub", "pytorch-lightning")}},
        "host_requirements": manifest.get("host_requirements"),
        "files": len(manifest["files"]) + 2,  # + manifest.json, SHA256SUMS
        "self_test": manifest.get("self_test"),
        "expected": None if expected is None else {
            "segments": len(expected.get("segments", [])), "speakers": expected.get("speakers"),
            "tolerance_s": expected.get("tolerance_s")},
        "manifest_matches_sha256sums": consistent,
        "bytes_read": bytes_read,
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
    exp = info.get("expected")
    lines.append("expected: " + ("none (built without --self-test)" if exp is None else
                                 f"{exp['segments']} segments, {exp['speakers']} speakers "
                                 f"(tolerance {exp['tolerance_s']} s)"))
    if info["manifest_matches_sha256sums"] is False:
        lines.append("WARNING:  manifest.json does not match its SHA256SUMS line")
    lines.append("Not verified: run `pyannote-bundle verify` to check every byte.")
    return "\n".join(lines)
