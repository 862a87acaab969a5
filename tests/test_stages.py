"""Stages on real small parts: the recipe, the committed lock, config rendering, traps, and
model fetching from the loopback Hub through the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml
from hubfaults import FaultyHub

from bundler import errors
from bundler.data import data_dir
from bundler.demo.hub import HubRepo
from bundler.lockfile import parse_lockfile
from bundler.models import fetch_models
from bundler.render import config_yaml, sample_wav
from bundler.spec import SpecError, load_recipe, parse_spec
from bundler.traps import check_config, check_pins

SEG = b"segmentation weights" * 5000
EMB = b"embedding weights" * 9000


def test_default_recipe_names_the_seed_models() -> None:
    spec = load_recipe("speaker-diarization-3.1")
    assert [m.repo_id for m in spec.models] == ["pyannote/segmentation-3.0",
                                                "pyannote/wespeaker-voxceleb-resnet34-LM"]
    assert spec.model("embedding").files[0].bundle_path == (
        "pyannote_model_wespeaker-voxceleb-resnet34-LM.bin")


def test_config_carries_the_seed_params() -> None:
    spec = load_recipe("speaker-diarization-3.1")
    text = config_yaml(spec, {
        "segmentation": "models/pyannote_model_segmentation-3.0.bin",
        "embedding": "models/pyannote_model_wespeaker-voxceleb-resnet34-LM.bin"})
    cfg = yaml.safe_load(text)
    assert cfg["pipeline"]["name"] == "pyannote.audio.pipelines.SpeakerDiarization"
    assert cfg["pipeline"]["params"]["embedding"].endswith("resnet34-LM.bin")
    assert cfg["params"]["clustering"] == {"method": "centroid", "min_cluster_size": 12,
                                           "threshold": 0.7045654963945799}
    assert cfg["params"]["segmentation"]["min_duration_off"] == 0.0


@pytest.mark.parametrize("text,field", [
    ('name = "x"\npipeline = "pyannote-3.1"\nmodelz = []', "modelz"),
    ('name = "x"\npipeline = "nope"\nmodels = []', "pipeline"),
    ('name = "x"\npipeline = "pyannote-3.1"\n[[models]]\nrepo = "bad"\nrole = "embedding"',
     "models[0].repo"),
])
def test_invalid_specs_name_the_field(text: str, field: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(text, "spec.toml")
    assert exc.value.field == field


def test_committed_lock_is_pinned_hashed_and_trap_free() -> None:
    text = data_dir("lockfiles").joinpath(
        "speaker-diarization-3.1-py311-linux-x86_64.txt").read_text()
    pins = {r.name: r.version for r in parse_lockfile(text)}
    assert pins["pyannote-audio"].startswith("3.") and "pip" in pins and "torch" in pins
    check_pins(pins, asr=True)  # every recipe's lock can carry a speech-recognition model
    assert {"faster-whisper", "ctranslate2", "onnxruntime"} <= set(pins)


@pytest.mark.parametrize("pins,trap", [
    ({"pyannote-audio": "3.4.0", "huggingface-hub": "1.0.0"}, "hf-hub-1"),
    ({"pyannote-audio": "3.4.0", "torchaudio": "2.9.0"}, "torchaudio-2.9"),
    ({"pyannote-audio": "3.4.0", "torch": "2.8.0", "pytorch-lightning": "2.6.6"}, "weights-only"),
    ({"pyannote-audio": "4.0.7", "soundfile": "0.13.1"}, "decoders"),
])
def test_version_traps_are_refused(pins: dict[str, str], trap: str) -> None:
    with pytest.raises(errors.TrapError, match=trap):
        check_pins(pins)


def test_a_speech_recognition_model_needs_faster_whisper_in_the_lock() -> None:
    pins = {"pyannote-audio": "4.0.7", "soundfile": "0.13.1", "av": "18.1.0"}
    check_pins(pins)
    with pytest.raises(errors.TrapError, match="asr-runtime"):
        check_pins(pins, asr=True)
    check_pins({**pins, "faster-whisper": "1.2.1"}, asr=True)


def test_config_traps(tmp_path: Path) -> None:
    good = tmp_path / "pyannote_model_x.bin"
    good.write_bytes(b"x")
    bad = tmp_path / "nvidia" / "wespeaker.bin"
    bad.parent.mkdir()
    bad.write_bytes(b"x")
    assert check_config({"embedding": str(good)}, base=tmp_path, sha256={}) == ["embedding"]
    with pytest.raises(errors.TrapError, match="loader-routing.*'nvidia'"):
        check_config({"embedding": str(bad)}, base=tmp_path, sha256={})
    with pytest.raises(errors.TrapError, match="relative-path"):
        check_config({"segmentation": "models/x.bin"}, base=tmp_path, sha256={})
    with pytest.raises(errors.TrapError, match="hub-id"):
        check_config({"segmentation": "pyannote/segmentation-3.0"}, base=tmp_path, sha256={})
    with pytest.raises(errors.TrapError, match="checksum"):
        check_config({"embedding": str(good)}, base=tmp_path, sha256={str(good): "0" * 64},
                     hash_file=lambda p: hashlib.sha256(p.read_bytes()).hexdigest())


def test_sample_audio_is_deterministic() -> None:
    a = sample_wav(1.0)
    assert a == sample_wav(1.0) and a[:4] == b"RIFF" and len(a) == 44 + 2 * 16000


def _hub(**kw: object) -> FaultyHub:
    return FaultyHub([
        HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG}),
        HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB},
                gated=True),
    ], tokens=["canary-token-123"], **kw)  # type: ignore[arg-type]


def test_models_are_fetched_at_a_commit_and_hashed(tmp_path: Path) -> None:
    spec = load_recipe("speaker-diarization-3.1")
    with _hub() as hub:
        got = fetch_models(spec.models, endpoint=hub.url, token="canary-token-123",
                           cache_dir=tmp_path, sleep=lambda s: None)
    assert [len(m.commit) for m in got] == [40, 40]
    assert got[0].files[0].local.read_bytes() == SEG
    assert got[1].files[0].sha256 == hashlib.sha256(EMB).hexdigest()


def test_gated_repo_without_token_is_one_clear_error(tmp_path: Path) -> None:
    spec = load_recipe("speaker-diarization-3.1")
    with _hub() as hub, pytest.raises(errors.GatedRepo, match="is gated"):
        fetch_models(spec.models, endpoint=hub.url, token=None, cache_dir=tmp_path,
                     sleep=lambda s: None)


def test_corrupt_download_is_refused_by_sha256(tmp_path: Path) -> None:
    spec = load_recipe("speaker-diarization-3.1")
    with _hub() as hub:
        hub.inject("pyannote/segmentation-3.0", "pytorch_model.bin", "corrupt")
        with pytest.raises(errors.ModelChecksumMismatch, match="segmentation-3.0"):
            fetch_models(spec.models, endpoint=hub.url, token="canary-token-123",
                         cache_dir=tmp_path, sleep=lambda s: None)


def test_missing_revision_is_named(tmp_path: Path) -> None:
    spec = parse_spec('name = "x"\npipeline = "pyannote-3.1"\n'
                      '[[models]]\nrepo = "pyannote/segmentation-3.0"\nrole = "segmentation"\n'
                      'revision = "nope"\n'
                      '[[models]]\nrepo = "pyannote/wespeaker-voxceleb-resnet34-LM"\n'
                      'role = "embedding"\n', "spec")
    with _hub() as hub, pytest.raises(errors.RevisionNotFound, match="'nope'"):
        fetch_models(spec.models, endpoint=hub.url, token=None, cache_dir=tmp_path,
                     sleep=lambda s: None)


def test_configure_writes_the_offline_variables_of_the_shipped_runtime(tmp_path: Path) -> None:
    """configure.py (run as the installers run it, with a python3 and a prefix) takes the
    offline variables from the prefix's runtime/offline.py: pyannote.env and the venv's .pth
    carry exactly layout.OFFLINE_ENV, and the .pth sets them when a Python starts."""
    import shutil
    import subprocess
    import sys

    from bundler.layout import OFFLINE_ENV
    from bundler.render import runtime_bytes

    prefix = tmp_path / "prefix dir"
    (prefix / "runtime").mkdir(parents=True)
    for name in ("offline.py", "common.py"):  # what configure.py loads from the prefix
        (prefix / "runtime" / name).write_bytes(runtime_bytes(name))
    (prefix / "models").mkdir()
    (prefix / "models/config.yaml").write_text("pipeline:\n  params:\n"
                                               "    segmentation: models/pyannote_model_s.bin\n")
    site = prefix / f"venv/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    site.mkdir(parents=True)
    script = tmp_path / "configure.py"
    script.write_bytes(runtime_bytes("configure.py"))
    subprocess.run([sys.executable, str(script), str(prefix)], check=True)
    exported = dict(line.removeprefix("export ").split("=", 1)
                    for line in (prefix / "pyannote.env").read_text().splitlines()
                    if line.startswith("export ") and "PYANNOTE_BUNDLE_CONFIG" not in line)
    assert exported == OFFLINE_ENV
    assert f'"{prefix}/models/pyannote_model_s.bin"' in (prefix / "config.yaml").read_text()
    # site runs the .pth as a Python of the venv would at start-up.
    probe = ("import json, os, site, sys; site.addsitedir(sys.argv[1]); "
             "print(json.dumps({k: os.environ.get(k) for k in sys.argv[2:]}))")
    clean = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV}
    out = subprocess.run([sys.executable, "-c", probe, str(site), *OFFLINE_ENV], env=clean,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == OFFLINE_ENV
    assert (prefix / "bin/diarize").stat().st_mode & 0o111
    shutil.rmtree(prefix)
