"""End to end on the real default recipe: real torch and pyannote.audio wheels, real
format-true checkpoints served by the loopback Hub, a real offline install and a real
diarization with the network disabled.

One `pyannote-bundle demo` run per module builds and verifies the bundle (minutes, GBs),
run by the tool as the README's first command installs it, with the distribution's own
python3 where that is a 3.11 (Debian 12's 3.11.2); every test here then checks that one
bundle from another side, and it is removed after.
The wheel cache is ``$PYANNOTE_BUNDLE_CACHE`` (default ``~/.cache/pyannote-bundle``), so a
second session downloads nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import speech
import yaml
from e2e import (
    Installed,
    check_diarize_on_real_recordings,
    check_engines_match_pyannote,
    check_image_of_real_bundle,
    check_next_steps_work_verbatim,
    check_one_busy_thread_under_a_one_cpu_quota,
    check_serve_in_smoke,
    check_slurm_job_array_from_the_docs,
    check_transcribe_on_real_speech,
    check_voiceprints_in_smoke,
    diarize_as_nobody,
    image_again,
    installed_by_install_sh,
    output_dir,
    require_image_tools,
)
from forge import flip_byte

import bundler
from bundler.spec import load_recipe

pytestmark = pytest.mark.slow

RECIPE = "speaker-diarization-3.1"


def _run(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, **kw)


SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.fixture(scope="module")
def tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pyannote-bundle the README's first command makes, ``python3 -m venv .venv &&
    .venv/bin/pip install .``, with the distribution's own python3 where it is a 3.11 (Debian
    12: CPython 3.11.2, whose tarfile has no PEP 706 extraction filter); elsewhere the one
    beside this pytest."""
    if not SYSTEM_PYTHON.exists() or _run(
            str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"
    ).stdout.strip() != "(3, 11)":
        return Path(shutil.which("pyannote-bundle") or "pyannote-bundle")
    venv = tmp_path_factory.mktemp("system-tool") / ".venv"
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], check=True)
    proc = _run(str(venv / "bin/pip"), "install", "--quiet", "--index-url",
                "https://pypi.org/simple", str(repo), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv / "bin/pyannote-bundle"


@pytest.fixture(scope="module")
def demo(tool: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    out = tmp_path_factory.mktemp("demo")
    proc = _run(str(tool), "demo", "--output", str(out), "--json")  # tiny.en by default
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(proc.stdout)
    report["stderr"] = proc.stderr
    yield report
    shutil.rmtree(out, ignore_errors=True)  # 4 GB: gone before the next module's bundle


@pytest.fixture(scope="module")
def tarball(demo: dict[str, Any]) -> Path:
    return Path(demo["build"]["bundle"])


@pytest.fixture(scope="module")
def extracted(tarball: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("extracted")
    # As a sysadmin's own account unpacks it on a hardened host: umask 077, and tar applying
    # it (what tar does for a user who is not root): every file 0600, every folder 0700.
    # The install made from it must still serve the service user (nobody, below).
    subprocess.run(["sh", "-c", 'umask 077 && tar --no-same-permissions -xf "$1" -C "$2"',
                    "sh", str(tarball), str(work)], check=True)
    (root,) = work.iterdir()
    yield root
    shutil.rmtree(work, ignore_errors=True)


def test_demo_builds_and_verifies_offline(demo: dict[str, Any], tool: Path) -> None:
    assert demo["ok"] is True
    v = demo["verify"]
    # The README's first command, run as a newcomer on Debian 12 runs it: the tool's own
    # interpreter (the distribution's python3 there) verified and installed the bundle.
    assert v["host"]["python"] == "3.11"
    assert Path(v["host"]["interpreter"]).resolve() == (tool.parent / "python").resolve()
    assert v["integrity"]["sidecar"] == "match"
    assert v["install"]["packages"] > 100
    smoke = v["smoke"]
    assert smoke["ok"] is True and smoke["segments"] and smoke["speakers"] >= 1
    assert all(s["end"] > s["start"] for s in smoke["segments"])
    assert smoke["expected"] == "match"
    # verify's self-test ran the engine auto picks on a CPU: onnx, exported and checked on
    # this host by the install it made.
    assert smoke["engine"] == "onnx" and not smoke.get("engine_note"), smoke
    assert v["engines"]["onnx"]["ok"] is True
    assert v["engines"]["onnx"]["check"]["rttm"] == "identical", v["engines"]
    assert "unshare" in v["network_isolation"]
    # A socket connect from inside the smoke process was tried and failed.
    assert smoke["network_probes"] and set(smoke["network_probes"].values()) == {"blocked"}
    # bin/diarize read the sample in every container, and tried no connection itself.
    assert set(smoke["formats"]) == {"wav", "mp3", "m4a"} and smoke["network_attempts"] == 0
    assert all(f["ok"] and f["segments"] for f in smoke["formats"].values())
    # The demo's own token for its gated loopback Hub never reaches the output.
    assert not re.search(r"hf_demo_[0-9a-f]{24}", demo["stderr"])
    # bin/transcribe heard the bundled dialogue (real speech, real tiny.en weights) in every
    # format, and the self-test's transcript is what verify found again.
    heard = smoke["transcript"]
    spoken = json.loads((Path(bundler.__file__).parent / "assets/dialogue.json").read_text())
    assert heard["ok"] is True and speech.wer(spoken["text"], heard["text"]) <= 0.05, heard
    assert heard["formats"] == ["json", "rttm", "srt", "txt", "vtt"]
    assert heard["network_attempts"] == 0 and heard["language"] == "en"
    # bin/serve, on loopback in the smoke test's namespace, answered the dialogue as heard.
    check_serve_in_smoke(smoke)
    check_voiceprints_in_smoke(smoke)
    assert [m["weights"] for m in demo["build"]["models"]] == ["random", "random", "real"]


def test_bundle_passes_checks_from_outside_the_tool(tarball: Path, extracted: Path) -> None:
    subprocess.run(["sha256sum", "-c", tarball.name + ".sha256"], cwd=tarball.parent,
                   check=True, capture_output=True)
    subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=extracted, check=True,
                   capture_output=True)
    listed = {ln.split("  ", 1)[1] for ln in (extracted / "SHA256SUMS").read_text().splitlines()}
    present = {str(p.relative_to(extracted)) for p in extracted.rglob("*") if p.is_file()}
    assert listed == present - {"SHA256SUMS"}
    for name in ("segmentation-3.0", "wespeaker-voxceleb-resnet34-LM"):
        assert f"models/pyannote_model_{name}.bin" in listed
    assert "models/faster-whisper-tiny.en/model.bin" in listed
    wheels = {p.name for p in (extracted / "wheels").iterdir()}
    assert any(re.match(r"pyannote_audio-3\.\d+\.\d+-", w) for w in wheels)
    assert any(w.startswith("torch-") for w in wheels)
    assert os.access(extracted / "install.sh", os.X_OK)


def test_manifest_and_config_carry_the_recipe(extracted: Path, demo: dict[str, Any]) -> None:
    manifest = json.loads((extracted / "manifest.json").read_text())
    assert [m["commit"] for m in manifest["models"]] == [
        m["commit"] for m in demo["build"]["models"]]
    assert all(re.fullmatch(r"[0-9a-f]{40}", m["commit"]) for m in manifest["models"])
    assert manifest["self_test"]["ran"] is True
    expected = json.loads((extracted / "smoke/expected.json").read_text())
    assert expected["segments"] == demo["verify"]["smoke"]["segments"]
    config = yaml.safe_load((extracted / "models/config.yaml").read_text())
    spec = load_recipe(RECIPE)
    assert config["params"] == spec.config["params"]  # the seed's params, unchanged
    assert config["pipeline"]["params"]["embedding"] == (
        "models/pyannote_model_wespeaker-voxceleb-resnet34-LM.bin")
    assert config["pipeline"]["params"]["segmentation"] == (
        "models/pyannote_model_segmentation-3.0.bin")


@pytest.fixture(scope="module")
def installed(extracted: Path) -> Iterator[Installed]:
    with installed_by_install_sh(extracted) as inst:
        yield inst


def test_install_sh_works_offline_with_a_clean_environment(installed: Installed,
                                                           extracted: Path) -> None:
    prefix = installed.prefix
    # No pyannote-bundle on PATH, no variables from this session, no network at all.
    assert "install: ok" in installed.stdout
    result = json.loads((prefix / "smoke-result.json").read_text())
    assert result["ok"] is True and result["segments"]
    # The smoke test took the user's path: bin/diarize on three containers, no attempts.
    assert set(result["formats"]) == {"wav", "mp3", "m4a"}
    assert all(f["ok"] and f["segments"] for f in result["formats"].values())
    assert result["network_attempts"] == 0
    check_serve_in_smoke(result)
    check_voiceprints_in_smoke(result)
    assert "bin/serve answered /v1/audio/transcriptions" in installed.stdout
    # The onnx engine was exported on this host, checked against PyTorch, recorded by
    # sha256 in the install's receipt, and the smoke test ran it (auto, on a CPU).
    onnx = json.loads((prefix / ".pyannote-bundle-receipt.json").read_text())["engines"]["onnx"]
    assert onnx["ok"] is True and onnx["check"]["rttm"] == "identical", onnx
    for role in ("segmentation", "embedding"):
        exported = prefix / "current" / onnx[role]["path"]
        assert hashlib.sha256(exported.read_bytes()).hexdigest() == onnx[role]["sha256"]
    assert result["engine"] == "onnx" and not result.get("engine_note"), result
    assert os.access(prefix / "bin/diarize", os.X_OK)
    first = (prefix / "current").resolve()
    assert first.parent == prefix / "releases"
    assert str(first / "models") in (prefix / "config.yaml").read_text()
    assert "HF_HUB_OFFLINE=1" in (prefix / "pyannote.env").read_text()
    assert "installed offline with venv --without-pip + bundled uv" in installed.stderr
    site = prefix / "venv/lib/python3.11/site-packages"
    assert "PYANNOTE_METRICS_ENABLED" in (site / "pyannote_bundle_offline.pth").read_text()
    assert list((site / "pyannote/audio/__pycache__").glob("*.pyc")), "bytecode compiled"
    assert not (first / ".uv-install").exists()
    # A second run (an upgrade that switches in one rename) is proven on small real bundles
    # in tests/test_prefix.py; the failed upgrade below, on this one.


def test_diarize_turns_real_recordings_into_rttm_offline_as_nobody(
        installed: Installed) -> None:
    check_diarize_on_real_recordings(installed, expect_exclusive=False)


def test_after_a_timeout_mid_inference_the_next_file_gets_an_undisturbed_rttm(
        installed: Installed) -> None:
    """--file-timeout fires inside the pipeline on a 20-minute recording (minutes of work):
    the next file is diarized by a pipeline loaded afresh, and its RTTM equals an
    undisturbed run's. Run under umask 077: the outputs are the user's alone (0600)."""
    import wave

    from bundler.render import sample_bytes

    folder = installed.base / "timeout-corpus"
    folder.mkdir(mode=0o755)
    sample = folder / "b.wav"
    sample.write_bytes(sample_bytes("wav"))  # 10 s: done in a few seconds
    with wave.open(str(sample)) as src:
        params, frames = src.getparams(), src.readframes(src.getnframes())
    with wave.open(str(folder / "a-long.wav"), "wb") as dst:  # first in the sorted list
        dst.setparams(params)
        dst.writeframes(frames * 120)
    for path in folder.iterdir():
        path.chmod(0o644)
    out = output_dir(installed, "rttm-timeout")
    proc = diarize_as_nobody(installed, str(folder), "--output-dir", str(out),
                             "--file-timeout", "15", "--json", umask=0o077)
    assert proc.returncode == 4, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["failures"] == [{"file": "a-long.wav",
                                   "error": "diarize took longer than 15 s (--file-timeout)"}]
    assert report["done"] == 1 and report["model_reloads"] == 1
    assert "reloading the models: a timeout interrupted them" in proc.stderr
    assert "Traceback" not in proc.stderr
    alone = output_dir(installed, "rttm-undisturbed")
    again = diarize_as_nobody(installed, str(sample), "--output-dir", str(alone), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    rttm = (out / "b.wav.rttm").read_text()
    assert rttm and rttm == (alone / "b.wav.rttm").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["b.wav.rttm"]
    assert oct((out / "b.wav.rttm").stat().st_mode & 0o777) == "0o600"


def test_slurm_job_array_from_the_docs_diarizes_every_file_once(installed: Installed) -> None:
    # Sharding is bin/diarize's own code, the same in every bundle: this recipe proves it.
    check_slurm_job_array_from_the_docs(installed)


def test_transcribe_turns_real_speech_into_speaker_labelled_text_offline_as_nobody(
        installed: Installed) -> None:
    check_transcribe_on_real_speech(installed)


def test_diarize_and_transcribe_run_one_busy_thread_under_a_one_cpu_quota(
        installed: Installed) -> None:
    """A cgroup CPU quota of one core on this 2-core host (a systemd CPUQuota, a batch
    system's limit): every model computes with one thread, and the process keeps to it."""
    print(json.dumps(check_one_busy_thread_under_a_one_cpu_quota(installed)))


def test_next_steps_printed_by_install_sh_work_verbatim(installed: Installed) -> None:
    check_next_steps_work_verbatim(installed)


def test_a_failed_upgrade_leaves_the_previous_install_working(installed: Installed,
                                                              extracted: Path,
                                                              tmp_path: Path) -> None:
    prefix = installed.prefix
    live = (prefix / "current").resolve()
    mine = prefix / "notes.txt"  # a file of the sysadmin's own, beside our install
    mine.write_text("keep me\n")
    # A self-consistent bundle whose model cannot load: its bytes changed and SHA256SUMS
    # made anew, as a broken release build would be (hard links: no 4 GB copy).
    forged = tmp_path / "forged"
    subprocess.run(["cp", "-al", str(extracted), str(forged)], check=True)
    model = forged / "models/pyannote_model_segmentation-3.0.bin"
    size = model.stat().st_size
    model.unlink()  # a new file: the linked original stays as it was
    model.write_bytes(b"\0" * size)
    sums = (forged / "SHA256SUMS").read_text().splitlines()
    (forged / "SHA256SUMS").unlink()
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    (forged / "SHA256SUMS").write_text("".join(
        f"{digest}  {ln[66:]}\n" if ln.endswith(model.name) else ln + "\n" for ln in sums))
    proc = _run("unshare", "-n", "env", "-i", "PATH=/usr/bin:/bin", "HOME=/root", "sh",
                "./install.sh", str(prefix), cwd=forged)
    assert proc.returncode == 13, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.splitlines()[-1]
    assert f"{prefix} still runs the previous one" in proc.stderr
    assert (prefix / "current").resolve() == live
    assert [p.name for p in (prefix / "releases").iterdir()] == [live.name]
    receipt = json.loads((prefix / ".pyannote-bundle-receipt.json").read_text())
    assert receipt["current"] == live.name and receipt["releases"] == [live.name]
    assert mine.read_text() == "keep me\n"
    # The previous install still diarizes, through the paths users know.
    out = tmp_path / "out"
    again = _run("unshare", "-n", "env", "-i", "PATH=/usr/bin:/bin", "HOME=/root",
                 str(prefix / "bin/diarize"), str(prefix / "smoke/sample.wav"), "--output-dir",
                 str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "sample.wav.rttm").read_text().startswith("SPEAKER sample.wav 1 ")
    mine.unlink()


def test_flipped_byte_is_refused_with_nothing_installed(tarball: Path, tmp_path: Path) -> None:
    offset = tarball.stat().st_size // 2
    flip_byte(tarball, offset)
    try:
        prefix = tmp_path / "prefix"
        proc = _run("pyannote-bundle", "-q", "verify", str(tarball), "--prefix", str(prefix))
    finally:
        flip_byte(tarball, offset)
    assert proc.returncode == 10
    assert "does not match the sidecar" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not prefix.exists()


def test_changed_model_byte_is_named_without_the_sidecar(tarball: Path, tmp_path: Path) -> None:
    member = "models/pyannote_model_segmentation-3.0.bin"
    with tarfile.open(tarball) as tar:
        info = next(m for m in tar.getmembers() if m.name.endswith("/" + member))
    offset = info.offset_data + info.size // 2
    sidecar = tarball.with_name(tarball.name + ".sha256")
    moved = tmp_path / sidecar.name
    shutil.move(sidecar, moved)
    flip_byte(tarball, offset)
    try:
        prefix = tmp_path / "prefix"
        proc = _run("pyannote-bundle", "-q", "verify",
                    str(tarball), "--prefix", str(prefix), "--json")
    finally:
        flip_byte(tarball, offset)
        shutil.move(moved, sidecar)
    assert proc.returncode == 10
    report = json.loads(proc.stdout)
    assert report["ok"] is False and member in report["error"]
    assert "Traceback" not in proc.stderr
    assert not prefix.exists()


def test_every_engine_gives_pyannotes_rttm_and_embeddings(installed: Installed) -> None:
    """--engine pytorch (the trunk once per chunk) and onnx (exported and checked by the
    installed runtime/export.py) against pyannote's own pipeline, real segmentation
    weights, six kinds of recording; an unknown embedding model falls back, saying so."""
    result = check_engines_match_pyannote(installed)
    print(json.dumps({"seconds": result["seconds"]}))
def test_voiceprints_on_pyannote_3(installed: Installed) -> None:
    """The 3.1 recipe (pyannote.audio 3.x, whose centroids come from
    ``return_embeddings=True``): bin/enroll and --voiceprints as tests/test_e2e_voiceprints.py
    proves them on community-1 (4.x), offline as nobody, with real segmentation weights and
    the bundle's random embedding weights (what those can and cannot show: that module)."""
    from test_e2e_voiceprints import check_voiceprints

    check_voiceprints(installed)


def test_image_of_the_bundle_diarizes_in_podman_offline_read_only_as_nobody(
        tarball: Path, tmp_path: Path) -> None:
    """`pyannote-bundle image` of this bundle: its self-test (podman, no network, read-only
    root, user 65534, the sample against smoke/expected.json), then podman on a mounted
    folder of recordings writes an RTTM per file, with the onnx engine. tests/test_image.py
    proves that a parameter update changes only the config layer; here, that layer's share
    of the image, and that a second image of the bundle is the same image."""
    require_image_tools()
    report = check_image_of_real_bundle(tarball, tmp_path)
    sizes = {x["role"]: x["size"] for x in report["layers"]}
    print(f"image of {tarball.name}: {report['seconds']} s with its self-test; layers "
          + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    assert list(sizes) == ["base", "venv", "models", "config"]
    assert 1 - sizes["config"] / sum(sizes.values()) >= 0.99
    # The release has the same name in every image: the venv layer's paths do not carry
    # the bundle's digest.
    assert "/opt/diarization/releases/image/venv" in report["layers"][1]["holds"]
    # Reproducible for the real bundle, not only a tiny one: a second image of it, minutes
    # later, under umask 077 and another TZ, is the same image. Its venv layer (7.9 GB) is
    # the same blob (uv wrote uv_cache.json, stamped with the moment the bundle was
    # unpacked, into every dist-info), and its models layer too, which holds the onnx
    # files: the export of the same checkpoints is the same bytes.
    again = image_again(tarball, tmp_path)
    assert [x["digest"] for x in again["layers"]] == [x["digest"] for x in report["layers"]]
    assert again["digest"] == report["digest"]
