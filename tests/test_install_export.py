"""The fast engine in every install: the onnx export is the installer's own step, made with
``--no-smoke`` too (an image's install, a sysadmin's), skipped only with ``--no-export``;
where it is not made, ``engines.json`` says why, and that is what ``bin/diarize --json``
reports as its ``engine_note``. The image's self-test insists on the onnx engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import TinyBundle
from forge import extract

from bundler import image
from bundler.errors import SmokeError
from bundler.image import check_engine
from bundler.runtime import engines


def _install(tiny_bundle: TinyBundle, tmp_path: Path, *options: str
             ) -> tuple[dict[str, Any], str, Path]:
    """The tiny bundle (no torch, no pyannote) installed by its own installer with
    ``--no-smoke``: the report, the installer's messages, the release."""
    extract(tiny_bundle(), tmp_path / "x")
    (bundle,) = (tmp_path / "x").iterdir()
    proc = subprocess.run([sys.executable, "-I", str(bundle / "runtime" / "install.py"),
                           str(tmp_path / "prefix"), "--no-smoke", "--json", *options],
                          capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    return report, proc.stderr, Path(report["install"]["release"])


def test_an_install_without_the_smoke_test_still_makes_the_onnx_export(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    report, messages, release = _install(tiny_bundle, tmp_path)
    assert "smoke test:" not in messages and report["smoke"]["skipped"] is True
    # This release has no onnxruntime (nor torch) to export with: the export's first step,
    # importing onnxruntime alone, says so, and the install goes on.
    onnx = report["engines"]["onnx"]
    assert onnx["ok"] is False and onnx["onnxruntime_loads"] is False, onnx
    assert onnx["error"].startswith("importing onnxruntime failed: exit 1"), onnx
    assert "warning: onnx engine not used on this host" in messages
    receipt = release / engines.RECEIPT
    assert json.loads(receipt.read_text())["onnx"]["ok"] is False
    # bin/diarize reads that file: auto then runs pytorch, with this as its engine_note.
    with pytest.raises(engines.EngineUnavailable, match="importing onnxruntime failed"):
        engines.read_receipt(receipt)
    # The receipt keeps what was tried, for the next upgrade and for a support request.
    kept = json.loads((tmp_path / "prefix" / ".pyannote-bundle-receipt.json").read_text())
    assert kept["engines"]["onnx"]["ok"] is False


def test_no_export_skips_it_and_engines_json_says_so(tmp_path: Path,
                                                    tiny_bundle: TinyBundle) -> None:
    report, messages, release = _install(tiny_bundle, tmp_path, "--no-export")
    assert "onnx engine: exporting" not in messages
    assert "onnx engine: not exported (installed with --no-export)" in messages
    assert report["engines"]["onnx"] == {"ok": None, "skipped": "installed with --no-export"}
    with pytest.raises(engines.EngineUnavailable,
                       match=r"no ONNX export in this install \(installed with --no-export\)"):
        engines.read_receipt(release / engines.RECEIPT)
    assert not (release / engines.ONNX_DIR).exists()


def test_the_self_test_insists_on_the_onnx_engine() -> None:
    assert check_engine({"engine": "onnx", "engine_requested": "auto"}) == "onnx"
    note = "onnx: no ONNX export in this install (installed with --no-export)"
    with pytest.raises(SmokeError, match=r"runs the pytorch engine, not onnx .*--no-export"):
        check_engine({"engine": "pytorch", "engine_requested": "auto", "engine_note": note})
    with pytest.raises(SmokeError, match="runs the None engine, not onnx.*gave no reason"):
        check_engine({})  # an entrypoint that reports no engine is not proven fast


def test_an_images_onnx_files_share_the_models_layer(tmp_path: Path) -> None:
    """The export changes with the weights, not with a parameter: in the models layer, a
    one-parameter update's image still differs only in its small config layer."""
    release = tmp_path / image.PREFIX / "releases" / image.RELEASE
    for name in ("venv/bin/python3", "models/pyannote_model_x.bin", "onnx/segmentation.onnx",
                 "onnx/embedding.onnx", "engines.json", "config.yaml"):
        (release / name).parent.mkdir(parents=True, exist_ok=True)
        (release / name).write_bytes(name.encode())
    layers = {role: {e.name.split(f"{image.RELEASE}/", 1)[-1] for e in entries
                     if e.kind == "file"} for role, entries
              in image.capture(tmp_path, image.RELEASE).items()}
    assert layers["models"] == {"models/pyannote_model_x.bin", "onnx/segmentation.onnx",
                                "onnx/embedding.onnx"}
    assert layers["config"] == {"engines.json", "config.yaml"}  # the host's check: small
