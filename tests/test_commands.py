"""bundler/commands/: the work between parsing and rendering, called without click.

A real build against the loopback Hub (the tiny lock's wheels), real refusals, and the text
each command prints, pinned as the CLI printed it when the work lived in the click functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import EMB, SEG, TINY_LOCK, TinyBundle

from bundler import inspection
from bundler.commands.build import build_bundle
from bundler.commands.image import ImageOutcome, render
from bundler.commands.inspect import inspect_file
from bundler.commands.lock import Locked
from bundler.commands.verify import render_text
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.errors import InputError
from bundler.spec import IndexOptions

INDEX = IndexOptions("https://pypi.org/simple", (), ())


def _build(output: Path, cache: Path, written: list[list[Path]], **given: Any) -> None:
    args: dict[str, Any] = {
        "recipe": "speaker-diarization-3.1", "spec_file": None, "output": output,
        "target_slug": None, "lockfile": TINY_LOCK, "index": INDEX, "cache_dir": cache,
        "compression": "none", "self_test": False, "python": None, "sign_key": None,
        "base": None, "split_size": None, "asr_model": None, "written": written.append}
    build_bundle(**{**args, **given})


def test_build_says_each_group_of_files_as_it_is_written(
        tmp_path: Path, wheel_cache: Path, tiny_bundle: TinyBundle,
        monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_bundle(out="base")
    repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG}),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB})]
    written: list[list[Path]] = []
    with LoopbackHub(repos) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read by the command, as the CLI's was
        monkeypatch.delenv("HF_TOKEN", raising=False)
        _build(tmp_path / "out", wheel_cache, written, base=base, split_size="300K")
    bundle, sidecar = written[0]
    assert bundle.parent == tmp_path / "out" and sidecar == bundle.with_name(
        bundle.name + ".sha256")
    delta, delta_sidecar = written[1]
    assert delta.name.endswith(".delta.tar") and delta_sidecar.name == delta.name + ".sha256"
    *volumes, listing = written[2]
    assert len(volumes) > 1 and all(".part-" in v.name for v in volumes)
    assert listing.name == bundle.name + ".parts.sha256"
    assert len(written) == 3 and all(p.is_file() for group in written for p in group)


@pytest.mark.parametrize(("given", "words"), [
    ({"split_size": "12Q"}, "12Q"),
    ({"base": Path("old.tar"), "compression": "zstd"}, "--base needs an uncompressed bundle"),
])
def test_build_refuses_bad_input_before_it_builds(tmp_path: Path, given: dict[str, Any],
                                                   words: str) -> None:
    written: list[list[Path]] = []
    with pytest.raises(InputError, match=words):
        _build(tmp_path / "out", tmp_path / "cache", written, **given)
    assert written == [] and not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists()


def test_inspect_reads_a_bundle_with_the_bundles_reader(tiny_bundle: TinyBundle) -> None:
    bundle = tiny_bundle()
    info, text = inspect_file(bundle)
    assert text is inspection.render_text and info == inspection.inspect_bundle(bundle)


REPORT: dict[str, Any] = {
    "signature": {"signer": "release@example.org"},
    "integrity": {"files": 12, "sidecar": "sha256:ab12"},
    "target": {"slug": "py311-linux-x86_64"},
    "install": {"packages": 40, "seconds": 9.5},
    "network_isolation": "unshare -n",
    "smoke": {"formats": {"wav": {"segments": [1, 2]}, "mp3": {"segments": [1]}},
              "speakers": 2, "seconds": 3.1, "network_attempts": 0},
}


def test_verify_text_one_line_per_proof() -> None:
    assert render_text(REPORT, installed=True).splitlines() == [
        "signature: ok (signed by release@example.org)",
        "integrity: ok (12 files, sidecar sha256:ab12)",
        "install:   ok (40 packages, 9.5 s)",
        "smoke:     ok (bin/diarize: wav 2 segments, mp3 1 segments; 2 speakers, 3.1 s; "
        "network: unshare -n, 0 connection attempts)",
    ]
    unsigned = {k: v for k, v in REPORT.items() if k != "signature"}
    assert render_text(unsigned, installed=False).splitlines() == [
        "integrity: ok (12 files, sidecar sha256:ab12)",
        "install:   skipped (--no-install); the bundle is for py311-linux-x86_64",
    ]
    skipped = {**unsigned, "smoke": {"skipped": True}}
    assert render_text(skipped, installed=True).splitlines()[-1] == (
        "smoke:     skipped (--no-smoke)")


def test_verify_text_says_the_service_answered() -> None:
    served = {**REPORT, "smoke": {**REPORT["smoke"], "serve": {
        "ok": True, "endpoint": "/v1/audio/transcriptions", "sample": "dialogue.flac",
        "port": 41234, "segments": 2, "speakers": 2, "request_seconds": 7.3,
        "ready_seconds": 12.5, "exit": 0}}}
    assert render_text(served, installed=True).splitlines()[-1] == (
        "serve:     ok (bin/serve answered POST /v1/audio/transcriptions with dialogue.flac "
        "on 127.0.0.1:41234: 2 segments, 2 speakers in 7.3 s; ready in 12.5 s, stopped "
        "cleanly on SIGTERM)")


def test_lock_and_image_text() -> None:
    lockfile, source = Path("lockfiles/x-py311-linux-x86_64.txt"), Path("lockfiles/x.in")
    assert Locked(lockfile, source, 94).render_text() == (
        f"{lockfile}: 94 packages pinned with hashes")
    assert Locked(lockfile, source, None).render_text() == f"{lockfile}: up to date with x.in"
    tested = {"segments": 7, "speakers": 2, "engine": "onnx", "expected": "identical"}
    alone = ImageOutcome(None, tested)
    assert render(alone, as_json=False) == (
        "self-test: ok - 7 segments, 2 speakers, engine onnx, expected result: identical")
    assert json.loads(render(alone, as_json=True)) == {"self_test": tested}
