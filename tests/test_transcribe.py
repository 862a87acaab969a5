"""Who said what, fast: a speech-recognition model in a spec and on the command line, the
build that fetches it, checks it (bundler.asr's traps) and records it, the install step that
writes bin/transcribe, and bin/transcribe's own decisions before any model is loaded.

Small real bundles (tests/data/tiny.lock) with a format-true CTranslate2 Whisper model
(tests/ct2.py) served by the loopback Hub; the real models run in the slow end-to-end tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import EMB, SEG, TINY_LOCK
from ct2 import whisper_folder

from bundler import errors
from bundler.build import BuildOptions, build
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.render import runtime_bytes
from bundler.runtime import transcribe as t
from bundler.spec import load_recipe, parse_spec, recipe_names, with_asr_model

ASR = "Systran/faster-whisper-tiny.en"


def _build(tmp_path: Path, cache: Path, folder: Path, repo: str = ASR) -> Path:
    spec = with_asr_model(load_recipe("speaker-diarization-3.1"), repo)
    repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG}),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB}),
             HubRepo.from_dir(repo, folder)]
    with LoopbackHub(repos) as hub:
        opts = BuildOptions(output_dir=tmp_path / "out", cache_dir=cache, endpoint=hub.url,
                            lockfile=TINY_LOCK)
        return build(spec, opts).packed.path


def test_a_bundle_carries_the_asr_model_checked_hashed_and_described(
        tmp_path: Path, wheel_cache: Path) -> None:
    folder = whisper_folder(tmp_path / "tiny.en")
    tarball = _build(tmp_path, wheel_cache, folder)
    with tarfile.open(tarball) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
        top = tar.getmembers()[0].name.split("/")[0]
        manifest = json.load(tar.extractfile(f"{top}/manifest.json"))  # type: ignore[arg-type]
        sums = tar.extractfile(f"{top}/SHA256SUMS").read().decode()  # type: ignore[union-attr]
        sbom = json.load(tar.extractfile(f"{top}/sbom.cdx.json"))  # type: ignore[arg-type]
    asr = manifest["asr"]
    assert asr["repo"] == ASR and len(asr["commit"]) == 40
    assert asr["path"] == "models/faster-whisper-tiny.en"
    assert asr["multilingual"] is False and asr["n_mels"] == 80
    assert asr["files"] == ["config.json", "model.bin", "tokenizer.json", "vocabulary.txt"]
    assert manifest["recipe"]["asr_model"] == ASR  # rebuild asks for it again
    model = next(m for m in manifest["models"] if m["role"] == "asr")
    for f in model["files"]:
        assert f["bundle_path"] in names and f"{f['sha256']}  {f['bundle_path']}\n" in sums
        assert any(c["hashes"][0]["content"] == f["sha256"] for c in sbom["components"])
    # The real speech bin/transcribe reads in the smoke test, and the programs themselves.
    assert "smoke/dialogue.flac" in names
    assert {"runtime/transcribe.py", "runtime/transcript.py", "runtime/recordings.py",
            "runtime/audio.py", "runtime/_bootstrap.py"} <= {
        p["path"] for p in manifest["programs"]}


@pytest.mark.parametrize("kind,trap", [
    ({"tokenizer": False}, "asr-tokenizer"),
    ({"n_mels": 128, "multilingual": True}, "asr-mel-bins"),
    ({"n_mels": 128, "multilingual": True, "feature_size": 80}, "asr-mel-bins"),
])
def test_a_model_that_would_fail_offline_is_refused_at_build(
        tmp_path: Path, wheel_cache: Path, kind: dict[str, object], trap: str) -> None:
    folder = whisper_folder(tmp_path / "model", **kind)  # type: ignore[arg-type]
    with pytest.raises(errors.TrapError, match=trap) as exc:
        _build(tmp_path, wheel_cache, folder, "Systran/faster-whisper-large-v3")
    assert exc.value.exit_code == errors.EXIT_TRAP
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), "nothing half-written"


def test_a_128_mel_model_with_its_preprocessor_config_is_taken(
        tmp_path: Path, wheel_cache: Path) -> None:
    folder = whisper_folder(tmp_path / "large", n_mels=128, multilingual=True,
                            feature_size=128)
    tarball = _build(tmp_path, wheel_cache, folder, "Systran/faster-whisper-large-v3")
    with tarfile.open(tarball) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        manifest = json.load(tar.extractfile(f"{top}/manifest.json"))  # type: ignore[arg-type]
    assert manifest["asr"]["n_mels"] == 128 and manifest["asr"]["multilingual"] is True
    assert "preprocessor_config.json" in manifest["asr"]["files"]


def test_the_asr_table_of_a_spec_and_the_command_line_option() -> None:
    base = '''name = "x"\npipeline = "community-1"\n[[models]]\nrepo = "o/p"\nrole = "pipeline"
files = [{path = "config.yaml"}]\n'''
    spec = parse_spec(base + '[asr]\nrepo = "Systran/faster-whisper-small"\n'
                      'compute_type = "int8_float32"\n', "spec.toml")
    assert spec.asr is not None and spec.asr.repo_id == "Systran/faster-whisper-small"
    assert spec.asr_compute_type == "int8_float32"
    assert {f.bundle_path for f in spec.asr.files} >= {"faster-whisper-small/model.bin",
                                                       "faster-whisper-small/tokenizer.json"}
    replaced = with_asr_model(spec, "Systran/faster-whisper-medium@0123456789abcdef0123456789"
                                    "abcdef01234567")
    assert replaced.asr is not None and replaced.asr.repo_id.endswith("medium")
    assert replaced.asr.revision == "0123456789abcdef0123456789abcdef01234567"
    assert [m.role for m in replaced.models].count("asr") == 1
    assert replaced.asr_compute_type == "int8_float32"  # the spec's own, kept
    for bad, field in ((base + '[asr]\nrepo = "nope"\n', "asr.repo"),
                       (base + '[asr]\nrepo = "a/b"\ncompute_type = "int3"\n',
                        "asr.compute_type"),
                       (base + '[asr]\nrepo = "a/b"\nmodel = "x"\n', "asr.model"),
                       ('asr = "a/b"\n' + base, "asr")):
        with pytest.raises(errors.SpecError) as exc:
            parse_spec(bad, "spec.toml")
        assert exc.value.field == field
    with pytest.raises(errors.SpecError):
        with_asr_model(spec, "not a repo")
    # The shipped recipe that transcribes out of the box.
    assert "transcription-community-1" in recipe_names()
    shipped = load_recipe("transcription-community-1")
    assert shipped.asr is not None and shipped.pipeline == "community-1"


def test_build_help_teaches_asr_model_and_a_bad_one_is_exit_2() -> None:
    proc = subprocess.run(["pyannote-bundle", "build", "--help"], capture_output=True,
                          text=True)
    assert "--asr-model" in proc.stdout and "bin/transcribe" in proc.stdout
    proc = subprocess.run(["pyannote-bundle", "build", "--output", "/nonexistent/x",
                           "--asr-model", "bad id"], capture_output=True, text=True)
    assert proc.returncode == errors.SpecError.exit_code == errors.EXIT_USAGE
    assert "--asr-model" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _configure(tmp_path: Path, manifest: dict[str, object]) -> Path:
    prefix = tmp_path / "prefix"
    (prefix / "runtime").mkdir(parents=True)
    for name in ("offline.py", "common.py"):  # what configure.py loads from the prefix
        (prefix / "runtime" / name).write_bytes(runtime_bytes(name))
    (prefix / "models").mkdir()
    (prefix / "models/config.yaml").write_text("pipeline:\n  params: {}\n")
    (prefix / "manifest.json").write_text(json.dumps(manifest))
    site = prefix / f"venv/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    site.mkdir(parents=True)
    script = tmp_path / "configure.py"
    script.write_bytes(runtime_bytes("configure.py"))
    subprocess.run([sys.executable, str(script), str(prefix)], check=True)
    return prefix


def test_configure_writes_bin_transcribe_only_for_a_bundle_with_a_model(
        tmp_path: Path) -> None:
    plain = _configure(tmp_path / "a", {"bundle": "x"})
    assert (plain / "bin/diarize").is_file() and not (plain / "bin/transcribe").exists()
    with_model = _configure(tmp_path / "b", {"asr": {"path": "models/tiny", "repo": ASR}})
    wrapper = (with_model / "bin/transcribe").read_text()
    assert (with_model / "bin/transcribe").stat().st_mode & 0o111
    assert "runtime/transcribe.py" in wrapper and " -I " in wrapper
    assert "ORT_DISABLE_TELEMETRY=1" in (with_model / "pyannote.env").read_text()


def _transcribe(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, t.__file__, *argv], capture_output=True,
                          text=True, cwd=cwd)


def test_bundled_model_is_read_from_the_install_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"asr": {
        "path": "models/faster-whisper-tiny.en", "repo": ASR, "commit": "c" * 40,
        "multilingual": False, "compute_type": None}}))
    model = t.bundled_model(tmp_path)
    assert model is not None and model.path == tmp_path / "models/faster-whisper-tiny.en"
    assert model.multilingual is False and model.repo == ASR
    (tmp_path / "manifest.json").write_text(json.dumps({"bundle": "no asr"}))
    assert t.bundled_model(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{broken")
    assert t.bundled_model(tmp_path) is None


def test_english_only_models_refuse_other_languages_and_translation() -> None:
    program = t.Transcribe(t.AsrModel(Path("/m"), ASR, multilingual=False))
    from bundler.runtime import exits, recordings

    p = recordings.parser(program)
    for argv, message in ((["--language", "de"], "English-only"),
                          (["--task", "translate"], "English-only"),
                          (["--beam-size", "0"], "--beam-size must be at least 1")):
        args = p.parse_args(["a.wav", *argv])
        with pytest.raises(exits.RunError, match=message) as exc:
            program.check(args)
        assert exc.value.code == exits.EXIT_USAGE
    program.check(p.parse_args(["a.wav", "--language", "en"]))
    multi = t.Transcribe(t.AsrModel(Path("/m"), "Systran/faster-whisper-small"))
    multi.check(recordings.parser(multi).parse_args(["a.wav", "--language", "de", "--task",
                                               "translate"]))


def test_transcribe_without_a_model_is_a_usage_error_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    proc = _transcribe(str(tmp_path / "a.wav"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "carries no speech-recognition model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = _transcribe(str(tmp_path / "a.wav"), "--model", str(tmp_path), "--format",
                       "json,docx")
    assert proc.returncode == 2 and "--format 'json,docx'" in proc.stderr


def test_done_files_are_skipped_without_loading_any_model(tmp_path: Path) -> None:
    (tmp_path / "in/sub").mkdir(parents=True)
    for name in ("a.wav", "sub/b.m4a"):
        (tmp_path / "in" / name).write_bytes(b"RIFF")
    out = tmp_path / "out"
    for name in ("a.wav", "sub/b.m4a"):
        for fmt in ("json", "srt", "vtt"):
            (out / f"{name}.{fmt}").parent.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.{fmt}").write_text("done")
    # The model folder does not exist: had anything been loaded, this would exit 3.
    proc = _transcribe(str(tmp_path / "in"), "-o", str(out), "--json", "--model",
                       str(tmp_path / "absent"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["skipped"] == 2 and report["done"] == 0 and report["network_attempts"] == 0
    assert report["formats"] == ["srt", "vtt", "json"]  # the marker, json, written last
    # One format more (txt) is not done yet: now the missing model is named, exit 3.
    proc = _transcribe(str(tmp_path / "in"), "-o", str(out), "--format", "json,txt",
                       "--model", str(tmp_path / "absent"))
    assert proc.returncode == 3 and "speech-recognition model incomplete" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_names_the_formats_and_the_exit_codes() -> None:
    proc = _transcribe("--help")
    assert proc.returncode == 0
    flat = " ".join(proc.stdout.split())  # argparse wraps to the terminal's width
    for text in ("json, srt, vtt, txt, rttm", "--language", "--no-vad", "--hotwords",
                 "--shard I/N", "some files failed", "every file transcribed"):
        assert text in flat, text


def test_a_bundle_built_with_asr_model_rebuilds_identical_and_inspect_shows_it(
        tmp_path: Path, wheel_cache: Path) -> None:
    """build --asr-model through the CLI, then rebuild: the manifest's recipe.asr_model
    makes the rebuild ask for the same model, and the bytes agree."""
    import os

    folder = whisper_folder(tmp_path / "tiny.en")
    repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG}),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB}),
             HubRepo.from_dir(ASR, folder)]
    with LoopbackHub(repos) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "PYANNOTE_BUNDLE_CACHE": str(wheel_cache)}
        env.pop("SOURCE_DATE_EPOCH", None)
        built = subprocess.run(["pyannote-bundle", "build", "--output", str(tmp_path / "out"),
                                "--lockfile", str(TINY_LOCK), "--asr-model", ASR],
                               capture_output=True, text=True, env=env)
        assert built.returncode == 0, built.stderr[-3000:]
        tarball = Path(built.stdout.splitlines()[0])
        again = subprocess.run(["pyannote-bundle", "rebuild", str(tarball), "--lockfile",
                                str(TINY_LOCK), "--json"], capture_output=True, text=True,
                               env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["identical"] is True
    info = subprocess.run(["pyannote-bundle", "inspect", str(tarball), "--json"],
                          capture_output=True, text=True, check=True)
    asr = json.loads(info.stdout)["asr"]
    assert asr["repo"] == ASR and asr["path"] == "models/faster-whisper-tiny.en"
    text = subprocess.run(["pyannote-bundle", "inspect", str(tarball)], capture_output=True,
                          text=True, check=True).stdout
    assert f"asr:      {ASR} in models/faster-whisper-tiny.en for bin/transcribe" in text


def test_inspect_reads_the_small_files_only_whatever_the_models_weigh(
        tmp_path: Path, wheel_cache: Path) -> None:
    """The models follow the small files in the tarball (a 3 GB speech-recognition model
    must not make inspect read 3 GB): 8 MB of model, about a megabyte read (the small
    files: the runtime, the service's page, the smoke samples)."""
    folder = whisper_folder(tmp_path / "tiny.en")
    big = bytes(range(256)) * (8 << 12)  # 8 MB
    spec = with_asr_model(load_recipe("speaker-diarization-3.1"), ASR)
    repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": big}),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB}),
             HubRepo.from_dir(ASR, folder)]
    with LoopbackHub(repos) as hub:
        tarball = build(spec, BuildOptions(output_dir=tmp_path / "out", cache_dir=wheel_cache,
                                           endpoint=hub.url, lockfile=TINY_LOCK)).packed.path
    with tarfile.open(tarball) as tar:
        order = ["/".join(m.name.split("/")[1:2]) for m in tar.getmembers()][1:]
    first_model = order.index("models")
    assert set(order[first_model:]) == {"models", "wheels"} and order[-1] == "wheels"
    assert "smoke" in order[:first_model] and "manifest.json" in order[:first_model]
    info = json.loads(subprocess.run(["pyannote-bundle", "inspect", str(tarball), "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["bytes_read"] < 2 << 20 and len(info["models"]) == 3


def test_verify_compares_the_transcript_with_the_build_hosts() -> None:
    """A word may differ between CPUs (CTranslate2 picks kernels by instruction set); a
    different transcript, or another speaker count, fails the smoke test (exit 13)."""
    from bundler.runtime import install as installer

    said = "The train leaves in an hour, so we should go soon."
    base = {"segments": [], "speakers": 1}
    want = {**base, "transcript": {"text": said, "speakers": 2}}
    installer.compare({**base, "transcript": {"text": said.lower().replace(",", ""),
                                              "speakers": 2}}, want)
    installer.compare({**base, "transcript": {"text": said.replace("hour", "our"),
                                              "speakers": 2}}, want)  # 1 word of 11
    for got, message in (({"text": "The rain leaves at noon, so we go.", "speakers": 2},
                          "differs from the build host's in"),
                         ({"text": said, "speakers": 1}, "has 1 speakers")):
        with pytest.raises(installer.Failure, match=message) as exc:
            installer.compare({**base, "transcript": got}, want)
        assert exc.value.code == installer.EXIT_SMOKE
    assert installer.word_changes(said, "the train leaves in an hour so we should go soon") == 0
