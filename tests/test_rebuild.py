"""`rebuild` on small real bundles: real wheels from PyPI (six, pip), models from the
loopback Hub, real tarballs; the comparison on tarballs made by the tool's own packer.

The issue's full-size case (the 3.1 recipe with torch, two differently configured build
hosts) is tests/test_e2e_rebuild.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EMB, SEG, TINY_LOCK
from forge import extract, forge

from bundler import layout, render
from bundler.build import BuildOptions, build
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.errors import CannotRebuild
from bundler.pack import Entry, pack
from bundler.rebuild import (
    RebuildOptions,
    compare,
    plan,
    read_tarball,
    rebuild,
    render_text,
)
from bundler.spec import load_recipe

TOKEN = "hf_rebuild_0123456789abcdef"
SEG_MEMBER = "models/pyannote_model_segmentation-3.0.bin"


# --- the comparison, on small tarballs ---------------------------------------------------

def _tar(out: Path, files: dict[str, bytes], mtime: int = 946684800) -> Path:
    return pack([Entry.from_bytes(p, d) for p, d in files.items()], top="b",
                output_dir=out, compression="none", mtime=mtime).path


FILES = {"a.txt": b"alpha\n", "models/m.bin": b"\x00" * 1000, "install.sh": b"#!/bin/sh\n"}


def test_identical_tarballs_compare_identical(tmp_path: Path) -> None:
    a = read_tarball(_tar(tmp_path / "1", FILES))
    b = read_tarball(_tar(tmp_path / "2", FILES))
    c = compare(a, b)
    assert c.identical and c.members == [] and c.bundle_sha256 == c.rebuilt_sha256
    assert a.top == "b" and a.members["models/m.bin"].size == 1000
    assert render_text_for(c) == f"identical: sha256 {a.sha256}"


def render_text_for(c: object) -> str:
    from bundler.rebuild import RebuildReport

    return render_text(RebuildReport(Path("x.tar"), None, c, {}))  # type: ignore[arg-type]


def test_a_changed_member_is_named_with_both_sizes_and_hashes(tmp_path: Path) -> None:
    other = {**FILES, "models/m.bin": b"\x00" * 999 + b"\x01", "extra.txt": b"new\n"}
    del other["a.txt"]
    a = read_tarball(_tar(tmp_path / "1", FILES))
    b = read_tarball(_tar(tmp_path / "2", other))
    c = compare(a, b)
    assert not c.identical
    by_path = {m["path"]: m for m in c.members}
    # SHA256SUMS lists every file, so it differs too; the three changed members are named.
    assert set(by_path) == {"a.txt", "extra.txt", "models/m.bin", "SHA256SUMS"}
    m = by_path["models/m.bin"]
    assert m["bundle"] == {"size": 1000, "sha256": a.members["models/m.bin"].sha256}
    assert m["rebuilt"] == {"size": 1000, "sha256": b.members["models/m.bin"].sha256}
    assert m["bundle"]["sha256"] != m["rebuilt"]["sha256"]
    assert by_path["a.txt"]["rebuilt"] is None and by_path["extra.txt"]["bundle"] is None
    text = render_text_for(c)
    assert "  models/m.bin\n    bundle:  1000 bytes, sha256 " + m["bundle"]["sha256"] in text
    assert "    rebuilt: absent" in text


def test_same_content_with_other_headers_is_told_apart(tmp_path: Path) -> None:
    a = read_tarball(_tar(tmp_path / "1", FILES))
    b = read_tarball(_tar(tmp_path / "2", FILES, mtime=0))
    c = compare(a, b)
    assert not c.identical and c.members == []
    assert "a.txt" in c.headers and "models/m.bin" in c.headers
    assert "tar headers differ (same content)" in render_text_for(c)


def test_a_tarball_that_is_not_one_is_refused(tmp_path: Path) -> None:
    from bundler.errors import IntegrityError

    bad = tmp_path / "x.tar"
    bad.write_bytes(b"\x00" * 100 + b"junk" * 500)
    with pytest.raises(IntegrityError):
        read_tarball(bad)


# --- a real tiny bundle, rebuilt ---------------------------------------------------------

@pytest.fixture
def hub() -> Iterator[LoopbackHub]:
    repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG}, gated=True),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB})]
    with LoopbackHub(repos, tokens=[TOKEN]) as h:
        yield h


@pytest.fixture
def bundle(tmp_path: Path, hub: LoopbackHub, wheel_cache: Path) -> Path:
    opts = BuildOptions(output_dir=tmp_path / "release", cache_dir=wheel_cache,
                        endpoint=hub.url, token=TOKEN, lockfile=TINY_LOCK,
                        source_date_epoch=1234567890)
    return build(load_recipe("speaker-diarization-3.1"), opts).packed.path


def _cli(*args: str, hub: LoopbackHub, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN,
           "PYANNOTE_BUNDLE_CACHE": str(cache)}
    env.pop("SOURCE_DATE_EPOCH", None)  # the rebuild takes the bundle's own
    return subprocess.run(["pyannote-bundle", *args], capture_output=True, text=True, env=env)


def test_a_bundle_rebuilds_identical(bundle: Path, hub: LoopbackHub, wheel_cache: Path,
                                     tmp_path: Path) -> None:
    proc = _cli("rebuild", str(bundle), "--lockfile", str(TINY_LOCK), "--json",
                "--output", str(tmp_path / "again"), hub=hub, cache=wheel_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    digest = bundle.with_name(bundle.name + ".sha256").read_text().split()[0]
    assert report["identical"] is True and report["bundle_sha256"] == digest
    assert report["rebuilt_sha256"] == digest and report["members"] == []
    assert report["inputs"]["source_date_epoch"] == 1234567890
    assert report["inputs"]["lockfile"] == TINY_LOCK.name
    rebuilt = Path(report["rebuilt"])
    assert rebuilt.read_bytes() == bundle.read_bytes() and rebuilt.parent == tmp_path / "again"
    assert TOKEN not in proc.stdout + proc.stderr

    text = _cli("rebuild", str(bundle), "--lockfile", str(TINY_LOCK), hub=hub,
                cache=wheel_cache)
    assert text.returncode == 0 and text.stdout == f"identical: sha256 {digest}\n"


def test_a_self_consistent_forgery_is_named_and_fails(bundle: Path, hub: LoopbackHub,
                                                      wheel_cache: Path, tmp_path: Path) -> None:
    forged = forge(bundle, SEG_MEMBER, tmp_path / "forged")
    # Every sum inside agrees with the forged byte: integrity alone cannot tell.
    subprocess.run(["sha256sum", "-c", forged.name + ".sha256"], cwd=forged.parent, check=True,
                   capture_output=True)
    with tarfile.open(forged) as tar:
        f = tar.extractfile(f"{forged.name[:-4]}/{layout.MANIFEST}")
        assert f is not None
        manifest = json.loads(f.read())
    assert manifest["files"][SEG_MEMBER]["sha256"] != read_tarball(bundle).members[
        SEG_MEMBER].sha256

    proc = _cli("rebuild", str(forged), "--lockfile", str(TINY_LOCK), "--json", hub=hub,
                cache=wheel_cache)
    assert proc.returncode == 17, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["identical"] is False
    named = {m["path"]: m for m in report["members"]}
    # The model, and the three lists of sums the forger had to remake around it.
    assert set(named) == {SEG_MEMBER, layout.MANIFEST, layout.SBOM, layout.CHECKSUMS}
    seg = named[SEG_MEMBER]
    assert seg["bundle"]["size"] == seg["rebuilt"]["size"] == len(SEG)
    assert seg["rebuilt"]["sha256"] == read_tarball(bundle).members[SEG_MEMBER].sha256
    assert seg["bundle"]["sha256"] == manifest["files"][SEG_MEMBER]["sha256"]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"pyannote-bundle: error: {forged.name}: the rebuild differs in 4 "
                           "member(s): ")
    assert SEG_MEMBER in line and "Traceback" not in proc.stderr

    text = _cli("rebuild", str(forged), "--lockfile", str(TINY_LOCK), hub=hub,
                cache=wheel_cache)
    assert text.returncode == 17
    assert f"  {SEG_MEMBER}\n    bundle:  {len(SEG)} bytes, sha256 " in text.stdout


def _with_manifest(bundle: Path, out: Path, change: dict[str, object]) -> Path:
    """``bundle`` re-packed with top-level manifest keys replaced (sums made again)."""
    work = out / "x"
    extract(bundle, work)
    (root,) = work.iterdir()
    manifest = json.loads((root / layout.MANIFEST).read_text())
    manifest.update(change)
    entries = [Entry.from_bytes(p.relative_to(root).as_posix(), p.read_bytes())
               for p in sorted(root.rglob("*")) if p.is_file()
               and p.name not in (layout.MANIFEST, layout.CHECKSUMS)]
    entries.append(Entry.from_bytes(layout.MANIFEST, render.manifest_json(manifest)))
    return pack(entries, top=root.name, output_dir=out / "packed", compression="none",
                mtime=0).path


def test_another_tool_version_is_refused_before_building(bundle: Path, hub: LoopbackHub,
                                                         wheel_cache: Path,
                                                         tmp_path: Path) -> None:
    other = _with_manifest(bundle, tmp_path, {"tool": {"name": "pyannote-bundle",
                                                        "version": "0.0.9"}})
    requests = len(hub.requests)
    proc = _cli("rebuild", str(other), "--lockfile", str(TINY_LOCK), hub=hub,
                cache=wheel_cache)
    assert proc.returncode == 18, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "pyannote-bundle: error: the bundle was built by pyannote-bundle 0.0.9, this is 0.1.0: "
        "rebuild it with pyannote-bundle==0.0.9 (another version makes another bundle)")
    assert "Traceback" not in proc.stderr
    assert len(hub.requests) == requests  # refused before anything was fetched


def test_a_lockfile_it_does_not_have_is_named(bundle: Path, hub: LoopbackHub,
                                             wheel_cache: Path, tmp_path: Path) -> None:
    proc = _cli("rebuild", str(bundle), hub=hub, cache=wheel_cache)
    assert proc.returncode == 18
    assert (f"the bundle was built with lockfile {TINY_LOCK.name} (sha256 "
            in proc.stderr) and "which this tool does not ship: pass it with --lockfile" \
        in proc.stderr
    wrong = tmp_path / "tiny.lock"
    wrong.write_text(TINY_LOCK.read_text() + "\n")
    proc = _cli("rebuild", str(bundle), "--lockfile", str(wrong), hub=hub, cache=wheel_cache)
    assert proc.returncode == 18
    assert f"{wrong} has sha256 " in proc.stderr and "pass that lockfile with --lockfile" \
        in proc.stderr


def test_the_rebuild_never_replaces_the_bundle(bundle: Path, hub: LoopbackHub,
                                               wheel_cache: Path) -> None:
    before = bundle.read_bytes()
    with pytest.raises(CannotRebuild, match="is the folder of the bundle"):
        rebuild(bundle, RebuildOptions(cache_dir=wheel_cache, output_dir=bundle.parent,
                                       lockfile=TINY_LOCK, endpoint=hub.url, token=TOKEN))
    assert bundle.read_bytes() == before


def test_the_plan_reads_every_recorded_input(bundle: Path, tmp_path: Path) -> None:
    manifest = json.loads(read_tarball(bundle).manifest or b"")
    assert manifest["recipe"]["source"] == "recipe" and manifest["recipe"]["spec"] is None
    assert manifest["build"]["compression"] == "none"
    assert manifest["build_backend"] is None  # six and pip are wheels: nothing built here
    assert len(manifest["lockfile_sha256"]) == 64
    p = plan(manifest, "none", tmp_path, TINY_LOCK)
    assert p.spec.name == "speaker-diarization-3.1" and p.source_date_epoch == 1234567890
    assert p.model_commits == {m["repo"]: m["commit"] for m in manifest["models"]}
    # A tarball recompressed after the build cannot rebuild to the same digest.
    with pytest.raises(CannotRebuild, match="recompressed"):
        plan(manifest, "zstd", tmp_path, TINY_LOCK)


def test_a_spec_file_is_rebuilt_from_the_text_the_bundle_records(
        tmp_path: Path, hub: LoopbackHub, wheel_cache: Path) -> None:
    from bundler.spec import load_spec

    text = (Path(__file__).resolve().parent.parent / "bundler" / "recipes"
            / "speaker-diarization-3.1.toml").read_text()
    spec_path = tmp_path / "my-spec.toml"
    spec_path.write_text(text.replace('name = "speaker-diarization-3.1"',
                                      'name = "my-diarization"'))
    opts = BuildOptions(output_dir=tmp_path / "release", cache_dir=wheel_cache,
                        endpoint=hub.url, token=TOKEN, lockfile=TINY_LOCK)
    built = build(load_spec(spec_path), opts).packed.path
    spec_path.unlink()  # the engineer who rebuilds has only the bundle
    proc = _cli("rebuild", str(built), "--lockfile", str(TINY_LOCK), hub=hub,
                cache=wheel_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("identical: sha256 ")
