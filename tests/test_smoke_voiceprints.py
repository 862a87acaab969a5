"""smoke/smoke.py's voiceprint check (runtime/smoke_voiceprints.py), fast: the clip it cuts is
the sample's first turn to the byte, bin/enroll's refusal line it recognises is the one
voiceprints.py says, and the whole check against stand-in programs that do what bin/enroll
and bin/diarize do with the runtime's own file format, matching and outputs, with fixed
embeddings in place of a model. The check on an installed bundle runs in the slow tests
(tests/test_e2e.py, tests/test_e2e_community.py, tests/test_e2e_targets.py)."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import wave
from pathlib import Path
from typing import Any

import pytest

from bundler import layout, render
from bundler.commands.verify import voiceprints_line
from bundler.runtime import exits, install, smoke, smoke_voiceprints, voiceprints

ROOT = Path(smoke.__file__).parents[2]

# Stand-ins: the programs' arguments and outputs, the runtime's own voiceprint file, matching
# and RTTM; a fixed embedding per speaker instead of a model. VOICE_VECTOR is what "enroll"
# hears; the "diarized" speakers are SPEAKER_00 (that voice) and SPEAKER_01 (another).
COMMON = f"""import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from bundler.runtime import outputs, transcript, voiceprints
VOICE_VECTOR = [1.0, 0.0, 0.2]
"""
ENROLL = COMMON + """
args = sys.argv[1:]
if REFUSE:
    print("enroll: error: " + REFUSE, file=sys.stderr)
    sys.exit(CODE)
if EXPECT_BLOCK and "--block-network" not in args:
    print("enroll: error: expected --block-network", file=sys.stderr)
    sys.exit(70)
name, clip, folder = args[0], Path(args[1]), Path(args[args.index("--voiceprints") + 1])
model = voiceprints.EmbeddingModel("pyannote/x", "0" * 40, "1" * 64)
vp = voiceprints.Voiceprint(name, model, tuple(VOICE_VECTOR),
                            (voiceprints.Clip("2" * 64, 2.4, 2.4),), voiceprints.today())
voiceprints.save(folder, vp)
print(json.dumps({"action": "enroll", "name": name, "speech_seconds": 2.4,
                  "network_attempts": ATTEMPTS}))
"""
DIARIZE = COMMON + """
args = sys.argv[1:]
out = Path(args[args.index("--output-dir") + 1])
prints = voiceprints.load_folder(Path(args[args.index("--voiceprints") + 1]))
out.mkdir(parents=True, exist_ok=True)
for path in map(Path, args[args.index("--voiceprints") + 2:]):
    if path.name == "voice.wav":  # the clip enrolled: its own voice alone
        segments = [{"start": 0.0, "end": 2.4, "speaker": "SPEAKER_00"}]
        centroids = {"SPEAKER_00": CLIP_VECTOR if NAMED else [0.0, 1.0, 0.0]}
    else:
        segments = [{"start": 0.0, "end": 2.4, "speaker": "SPEAKER_00"},
                    {"start": 2.7, "end": 5.1, "speaker": "SPEAKER_01"},
                    {"start": 5.3, "end": 7.6, "speaker": "SPEAKER_00"}]
        centroids = {"SPEAKER_00": [1.0, 0.3, 0.2], "SPEAKER_01": [0.0, 1.0, 0.0]}
    matches = voiceprints.match(centroids, prints)
    result = transcript.renamed({"segments": segments}, voiceprints.names(matches))
    (out / (path.name + ".json")).write_text(json.dumps(
        {**result, "identification": [m.as_dict() for m in matches]}))
    (out / (path.name + ".rttm")).write_text(outputs.rttm(
        path.stem, result["segments"] if RTTM_NAMES else segments))
print(json.dumps({"wall_seconds": 1.5, "network_attempts": 0, "failures": []}))
"""


def _install(tmp_path: Path, refuse: str = "", code: int = 0, named: bool = True,
             rttm_names: bool = True, clip_vector: tuple[float, ...] = (1.0, 0.0, 0.2),
             attempts: int = 0, expect_block: bool = False) -> Path:
    """A prefix with the smoke sample and the stand-in bin/enroll and bin/diarize."""
    (tmp_path / "bin").mkdir(parents=True)
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "sample.wav").write_bytes(render.sample_wav())
    settings = (f"REFUSE, CODE, NAMED, RTTM_NAMES = {refuse!r}, {code}, {named}, "
                f"{rttm_names}\nCLIP_VECTOR = {list(clip_vector)}\n"
                f"ATTEMPTS, EXPECT_BLOCK = {attempts}, {expect_block}\n")
    for name, text in (("enroll", ENROLL), ("diarize", DIARIZE)):
        program = tmp_path / "bin" / name
        program.write_text(f"#!{sys.executable}\n{settings}{text}")
        program.chmod(0o755)
    return tmp_path


def _check(prefix: Path) -> dict[str, Any]:
    before = set(os.listdir(tempfile.gettempdir()))
    result = smoke_voiceprints.check(prefix, smoke.run_program, False)
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - before
                if n.startswith("pyannote-bundle-smoke-voiceprints-")}, "left its folder"
    json.dumps(result)  # goes into smoke-result.json as it is
    return result


def test_the_clip_is_the_samples_first_turn_to_the_byte(tmp_path: Path) -> None:
    sample = tmp_path / "sample.wav"
    sample.write_bytes(render.sample_wav())
    start, end, _ = smoke_voiceprints.SAMPLE_TURNS[0]
    assert smoke_voiceprints.cut_wav(sample, start, end, tmp_path / "clip.wav") == 2.4
    with wave.open(str(sample)) as whole, wave.open(str(tmp_path / "clip.wav")) as clip:
        assert clip.getparams()[:3] == whole.getparams()[:3]
        frames = clip.readframes(clip.getnframes())
        assert frames == whole.readframes(int(end * 16000))
    # One voice: the sample is silent (noise only) until its second turn begins.
    second = smoke_voiceprints.SAMPLE_TURNS[1][0]
    with wave.open(io.BytesIO(render.sample_wav())) as whole:
        whole.setpos(int(end * 16000))
        gap = whole.readframes(int((second - end) * 16000))
    assert max(abs(int.from_bytes(gap[i:i + 2], "little", signed=True))
               for i in range(0, len(gap), 2)) < 400  # 0.003 noise at 20000 scale
    assert max(frames) > 200


def test_the_refusal_it_recognises_is_the_one_enroll_says() -> None:
    with pytest.raises(exits.RunError) as refused:
        voiceprints.clip_voice({"segments": [
            {"start": 0.0, "end": 2.0, "speaker": "SPEAKER_00"},
            {"start": 0.0, "end": 2.0, "speaker": "SPEAKER_01"}]}, "voice.wav")
    assert refused.value.code == smoke_voiceprints.EXIT_USAGE == exits.EXIT_USAGE
    found = smoke_voiceprints.MANY_VOICES.search(f"enroll: error: {refused.value}")
    assert found and found.group(1) == "2"
    assert layout.PROGRAMS[layout.SMOKE_VOICEPRINTS] == "smoke_voiceprints.py"


def test_a_voice_enrolled_and_named_everywhere_passes(tmp_path: Path) -> None:
    result = _check(_install(tmp_path))
    assert result["ok"] is True, result
    assert result["enrolled"] == "sample.wav 0-2.4 s" and result["speech_seconds"] == 2.4
    assert (result["turns"], result["similarity"], result["network_attempts"]) == (1, 1.0, 0)
    # The whole sample: reported, not judged.
    assert result["on_sample"] == {"named": True, "speakers": 2, "similarity": 0.9594,
                                   "turns": 2, "rttm_turns": 2, "named_speaker_spoke_it": True}
    line = voiceprints_line(result)
    assert line.startswith("voiceprints: ok (bin/enroll took 'smoke voice' from sample.wav "
                           "0-2.4 s in ")
    assert ("named it in that clip, similarity 1.0, in JSON and RTTM; named on all of "
            "sample.wav too, similarity 0.9594; ") in line


def test_enrolments_connection_attempts_count_and_a_guarded_host_blocks_them(
        tmp_path: Path) -> None:
    # bin/enroll's own count (its report's network_attempts) adds to bin/diarize's: the
    # smoke test fails an install whose programs tried the network, enrolment included.
    counted = smoke_voiceprints.check(_install(tmp_path / "a", attempts=2), smoke.run_program,
                                      False)
    assert counted["network_attempts"] == 2
    assert counted["network_attempt_details"] == ["bin/enroll: 2 attempt(s)"]
    # Where the smoke test guards sockets (no network namespace), bin/enroll is told to
    # refuse them in-process, as bin/diarize is.
    guarded = smoke_voiceprints.check(_install(tmp_path / "b", expect_block=True),
                                      smoke.run_program, True)
    assert guarded["ok"] is True, guarded


def test_the_clip_not_named_fails(tmp_path: Path) -> None:
    result = _check(_install(tmp_path, named=False))
    assert result["ok"] is False
    assert result["error"] == ("bin/diarize --voiceprints did not name 'smoke voice' in the "
                               "very clip it was enrolled from (best similarity 0.0)")


def test_the_clip_named_with_another_embedding_than_enrolment_fails(tmp_path: Path) -> None:
    """bin/enroll and bin/diarize computing one clip's embedding differently (an engine
    drift) still names it at the threshold, and fails here all the same."""
    result = _check(_install(tmp_path, clip_vector=(1.0, 0.1, 0.2)))
    assert result["ok"] is False and 0.99 < result["similarity"] < 0.999
    assert result["error"].endswith("to its own voiceprint, not 1: bin/enroll and bin/diarize "
                                    "computed its embedding differently")


def test_an_output_without_the_name_fails(tmp_path: Path) -> None:
    result = _check(_install(tmp_path, rttm_names=False))
    assert result["ok"] is False
    assert result["error"] == ("the JSON gives 'smoke voice' 1 turn(s), the RTTM 0: every "
                               "output must say the name")


def test_several_voices_heard_in_the_turn_is_not_shown_other_refusals_fail(
        tmp_path: Path) -> None:
    heard = "voice.wav: the pipeline hears 2 voices in it: enroll from clips of one voice alone"
    result = _check(_install(tmp_path / "a", refuse=heard, code=2))
    assert result["ok"] is None and "diarize_seconds" not in result
    assert result["not_shown"].startswith("this install's segmentation hears 2 voices in the "
                                          "sample's one-voice turn (sample.wav 0-2.4 s)")
    assert voiceprints_line(result).startswith("voiceprints: not shown (this install's ")
    crashed = _check(_install(tmp_path / "b", refuse="internal error: KeyError: 'x'", code=1))
    assert crashed["ok"] is False and crashed["exit"] == 1
    assert crashed["error"] == "bin/enroll refused the clip: enroll: error: internal error: " \
                               "KeyError: 'x'"


def test_an_install_must_name_the_voice_where_the_build_host_named_it() -> None:
    expected = {"segments": [], "speakers": 0, "voiceprints": {"ok": True}}
    result = {"segments": [], "speakers": 0,
              "voiceprints": {"ok": None, "not_shown": "it hears 2 voices"}}
    with pytest.raises(install.Failure) as failed:
        install.compare(result, expected)
    assert failed.value.code == install.EXIT_SMOKE
    assert "did not: it hears 2 voices" in str(failed.value)
    install.compare(result, {**expected, "voiceprints": result["voiceprints"]})
    install.compare({**result, "voiceprints": {"ok": True}}, expected)
