"""End to end on the community-1 recipe (pyannote.audio 4.x): real wheels, the repo's
layout with a PLDA, built with its self-test and verified offline by `pyannote-bundle demo`,
then installed by its own install.sh and used through bin/diarize on real recordings."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from e2e import (
    Installed,
    check_diarize_on_real_recordings,
    check_engines_match_pyannote,
    check_next_steps_work_verbatim,
    check_serve_in_smoke,
    check_transcribe_on_real_speech,
    check_voiceprints_in_smoke,
)

pytestmark = pytest.mark.slow


def _run(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, **kw)


# The bundle (built once per test session, shared with tests/test_e2e_serve.py) and its
# install by install.sh: tests/conftest.py's community_demo and community_installed.
@pytest.fixture
def demo(community_demo: dict[str, Any]) -> dict[str, Any]:
    return community_demo


@pytest.fixture
def installed(community_installed: Installed) -> Installed:
    return community_installed


def test_community_1_builds_with_its_plda_and_verifies_offline(demo: dict[str, Any]) -> None:
    v = demo["verify"]
    assert demo["ok"] is True and v["integrity"]["sidecar"] == "match"
    assert v["config"]["checked"] == ["segmentation", "embedding", "plda"]
    assert v["smoke"]["ok"] is True and v["smoke"]["segments"]
    assert v["smoke"]["pyannote_audio"].startswith("4.") and v["smoke"]["expected"] == "match"
    assert v["smoke"]["engine"] == "onnx" and not v["smoke"].get("engine_note"), v["smoke"]
    assert "unshare" in v["network_isolation"]
    assert set(v["smoke"]["network_probes"].values()) == {"blocked"}
    # pyannote.audio 4 reads files only through torchcodec and FFmpeg; bin/diarize read
    # the sample as wav, mp3 and m4a here, where there is no FFmpeg, with no attempt to
    # reach pyannote's telemetry.
    assert set(v["smoke"]["formats"]) == {"wav", "mp3", "m4a"}
    assert v["smoke"]["network_attempts"] == 0
    # bin/transcribe beside pyannote.audio 4 in one process: the bundled dialogue, heard.
    heard = v["smoke"]["transcript"]
    assert heard["ok"] is True and heard["words"] > 20 and heard["network_attempts"] == 0
    # bin/serve answered the same dialogue on loopback in the same namespace, as heard.
    check_serve_in_smoke(v["smoke"])
    check_voiceprints_in_smoke(v["smoke"])
    # inspect reads the real 4 GB bundle's manifest without unpacking its wheels.
    info = json.loads(_run("pyannote-bundle", "inspect", demo["build"]["bundle"],
                           "--json").stdout)
    paths = [f["path"] for m in info["models"] for f in m["files"]]
    assert "models/speaker-diarization-community-1/plda/plda.npz" in paths
    assert info["bytes_read"] < info["size"] // 100


def test_diarize_turns_real_recordings_into_rttm_offline_as_nobody(
        installed: Installed) -> None:
    assert (installed.prefix / "smoke-result.json").is_file()
    # The re-run and the shards are proven on the 3.1 bundle (tests/test_e2e.py).
    check_diarize_on_real_recordings(installed, expect_exclusive=True, rerun_and_shards=False)


def test_transcribe_turns_real_speech_into_speaker_labelled_text_offline_as_nobody(
        installed: Installed) -> None:
    # pyannote.audio 4 gives exclusive turns: each word goes to one speaker.
    check_transcribe_on_real_speech(installed)


def test_next_steps_printed_by_install_sh_work_verbatim(installed: Installed) -> None:
    check_next_steps_work_verbatim(installed)


def test_every_engine_gives_pyannotes_rttm_and_embeddings(installed: Installed) -> None:
    """--engine pytorch (the trunk once per chunk) and onnx (exported and checked by the
    installed runtime/export.py) against pyannote's own pipeline, real segmentation
    weights, six kinds of recording; an unknown embedding model falls back, saying so."""
    result = check_engines_match_pyannote(installed)
    print(json.dumps({"seconds": result["seconds"]}))
