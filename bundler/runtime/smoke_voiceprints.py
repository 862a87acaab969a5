"""The smoke test's voiceprint check: ``bin/enroll`` on one voice of the bundled sample, then
``bin/diarize --voiceprints`` on that clip and on the whole sample.

The sample (``smoke/sample.wav``, in every bundle) is made at build time from ``SAMPLE_TURNS``
(``bundler.render.sample_wav`` reads them here): its first turn is one voice alone, so the
clip enrolled is that turn's frames, cut here with the standard library's ``wave`` (the
same bytes on every host: no decoder, no resampler). The voiceprint goes into a private
temporary folder (0700, removed afterwards); then one ``bin/diarize --voiceprints DIR`` run
(one model load) reads the clip and the whole sample. The clip must be named, with the
similarity of the same audio (``SAME_AUDIO``), in its JSON (``identification``:
``identified_as``) and its RTTM; what the run made of the whole sample is reported in
``on_sample`` (named or not, the similarity, and whether the named speaker is the one who
speaks the enrolled turn), not judged.

What it proves: every path of the voiceprints works in this install with its own pipeline,
engine and embedding model: the clip is decoded, diarized and heard as one voice
(``bin/enroll``'s refusal otherwise), the file is written and read back against the
install's manifest, ``bin/enroll`` and ``bin/diarize`` compute one embedding the same way
(similarity 1 for the same audio: a drift between them would name nobody), the matching
names a speaker at the default threshold, and every output says the name, with no
connection attempt. That holds with real weights and random ones alike, so the check passes
or fails for the install, never for the models. What it does not prove: that voices are
told apart (bundles built for tests carry random embedding weights, under which every voice
is nearly the same), nor that the default threshold suits the site's audio
(docs/voiceprints.md); ``on_sample`` shows what the weights make of a second voice. Where
the install's segmentation hears several voices in the one-voice turn (random test weights
hear two in every clip), ``bin/enroll`` refuses it as it must, and the check is
``not_shown`` (``ok`` None) rather than failed.

Standard library only, Python 3.9: ``smoke.py`` imports it (run as a program from the
install's ``smoke/``, it finds this module in ``runtime/`` beside it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import wave
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

# The smoke sample's turns: (start s, end s, fundamental Hz); two voices alternate. The first
# turn is the voice enrolled.
SAMPLE_TURNS = ((0.0, 2.4, 120.0), (2.7, 5.1, 210.0), (5.3, 7.6, 120.0), (7.9, 9.8, 210.0))
VOICE = "smoke voice"  # a name with a space: RTTM writes it "smoke_voice"
RTTM_VOICE = VOICE.replace(" ", "_")
TIMEOUT_S = 1800
EXIT_USAGE = 2  # bin/enroll's exit code for a clip it refuses (runtime/exits.py)
# bin/enroll's line for a clip in which the pipeline hears several voices (voiceprints.py)
MANY_VOICES = re.compile(r": the pipeline hears (\d+) voices in it")
# The clip enrolled, diarized again by the same pipeline and engine: its centroid is the
# voiceprint's (tests/test_e2e_voiceprints.py measures 1 to 4 decimals).
SAME_AUDIO = 0.999

# smoke.run_program: an installed program with the smoke test's options, its process and the
# summary it printed (passed in: this module does not import smoke.py, which imports it).
RunProgram = Callable[[List[str], bool],
                      Tuple["subprocess.CompletedProcess[str]", Dict[str, Any]]]


def cut_wav(source: Path, start: float, end: float, dest: Path) -> float:
    """Write ``dest``: the frames of the wav ``source`` from ``start`` to ``end`` seconds,
    in its own format. Returns the seconds written."""
    with wave.open(str(source), "rb") as r:
        rate = r.getframerate()
        first = int(round(start * rate))
        count = max(0, min(r.getnframes(), int(round(end * rate))) - first)
        r.setpos(first)
        frames = r.readframes(count)
        params = r.getparams()
    with wave.open(str(dest), "wb") as w:
        w.setparams(params)
        w.writeframes(frames)
    return count / rate


def overlap(segments: list[dict[str, Any]], start: float, end: float) -> dict[str, float]:
    """Seconds each speaker speaks between ``start`` and ``end``."""
    out: dict[str, float] = {}
    for s in segments:
        shared = min(float(s["end"]), end) - max(float(s["start"]), start)
        if shared > 0:
            out[str(s["speaker"])] = out.get(str(s["speaker"]), 0.0) + shared
    return out


def enroll(program: Path, clip: Path, voices: Path, block_network: bool = False
           ) -> dict[str, Any]:
    """``bin/enroll VOICE clip --voiceprints voices --json`` (``--block-network`` where the
    smoke test guards sockets): its report, or ``{"ok": False, "error"}`` with the line it
    said."""
    argv = [str(program), VOICE, str(clip), "--voiceprints", str(voices), "--json", "--quiet",
            "--embedding-batch-size", "1", "--segmentation-batch-size", "1",
            *(["--block-network"] if block_network else [])]
    began = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"bin/enroll did not finish in {TIMEOUT_S} s"}
    seconds = round(time.monotonic() - began, 3)
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    try:
        report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = {}
    if proc.returncode != 0 or report.get("action") != "enroll":
        said = lines[-1][:500] if lines else f"exit {proc.returncode}, no report"
        return {"ok": False, "error": f"bin/enroll refused the clip: {said}",
                "exit": proc.returncode, "seconds": seconds}
    return {"ok": True, "seconds": seconds, "speech_seconds": report.get("speech_seconds"),
            "network_attempts": report.get("network_attempts")}


def check(prefix: Path, run_program: RunProgram, block_network: bool) -> dict[str, Any]:
    """The voiceprint check on the install at ``prefix`` (see the module's docstring): the
    smoke result's ``voiceprints`` part. ``ok`` False with ``error`` when it failed."""
    sample = prefix / "smoke" / "sample.wav"
    start, end, _ = SAMPLE_TURNS[0]
    result: dict[str, Any] = {"ok": False, "name": VOICE, "sample": sample.name,
                              "enrolled": f"{sample.name} {start:g}-{end:g} s"}
    work = Path(tempfile.mkdtemp(prefix="pyannote-bundle-smoke-voiceprints-"))  # 0700
    began = time.monotonic()
    try:
        clip = work / "voice.wav"
        cut_wav(sample, start, end, clip)
        voices = work / "voices"  # made 0700 by bin/enroll
        enrolled = enroll(prefix / "bin" / "enroll", clip, voices, block_network)
        result["enroll_seconds"] = enrolled.get("seconds")
        if not enrolled["ok"]:
            heard = MANY_VOICES.search(enrolled["error"])
            if heard and enrolled.get("exit") == EXIT_USAGE:
                # The models' verdict on a turn of one voice, not a fault of the install:
                # bin/enroll refused it in one line, as it must. Nothing more can be shown.
                result["ok"] = None
                result["not_shown"] = (f"this install's segmentation hears {heard.group(1)} "
                                       f"voices in the sample's one-voice turn "
                                       f"({result['enrolled']}), so bin/enroll refused it as "
                                       "it must (random test weights do that; real ones "
                                       "hear one voice)")
                return result
            result["error"], result["exit"] = enrolled["error"], enrolled.get("exit")
            return result
        result["speech_seconds"] = enrolled.get("speech_seconds")
        out = work / "out"
        # One run, one model load: the clip itself (the pass criterion), then the sample.
        proc, summary = run_program(
            [str(prefix / "bin" / "diarize"), "--format", "rttm,json", "--output-dir",
             str(out), "--voiceprints", str(voices), str(clip), str(sample)], block_network)
        result["diarize_seconds"] = summary.get("wall_seconds")
        # bin/enroll's attempts (its report's count) and bin/diarize's, added up.
        result["network_attempts"] = (enrolled.get("network_attempts") or 0) + (
            summary.get("network_attempts") or 0)
        result["network_attempt_details"] = [
            *([f"bin/enroll: {enrolled['network_attempts']} attempt(s)"]
              if enrolled.get("network_attempts") else []),
            *summary.get("network_attempt_details", [])]
        outputs = [out / f"{p.name}.{fmt}" for p in (clip, sample) for fmt in ("json", "rttm")]
        if proc.returncode != 0 or not all(p.is_file() for p in outputs):
            failure = next((f["error"] for f in summary.get("failures", [])), None)
            result["error"] = ("bin/diarize --voiceprints: "
                               + (failure or f"exit {proc.returncode}, no json/rttm written"))
            return result
        clip_json, clip_rttm, sample_json, sample_rttm = (p.read_text() for p in outputs)
        _judge(json.loads(clip_json), clip_rttm, result)
        result["on_sample"] = _on_sample(json.loads(sample_json), sample_rttm, (start, end))
        return result
    finally:
        result["seconds"] = round(time.monotonic() - began, 3)
        shutil.rmtree(work, ignore_errors=True)


def _named(record: dict[str, Any], rttm: str) -> dict[str, Any]:
    """Who the outputs of one recording name the voice: the ``identification`` entry given
    it (None), its turns in the JSON, and its lines in the RTTM."""
    matches = record.get("identification") or []
    named = next((m for m in matches if m.get("identified_as") == VOICE), None)
    return {"match": named, "speakers": len(matches),
            "best": max((m.get("similarity") or 0.0 for m in matches), default=None),
            "turns": [s for s in record.get("segments") or [] if s.get("speaker") == VOICE],
            "rttm_turns": sum(ln.split()[7:8] == [RTTM_VOICE] for ln in rttm.splitlines())}


def _judge(record: dict[str, Any], rttm: str, result: dict[str, Any]) -> None:
    """The enrolled clip, diarized again: named, with the similarity of the same audio, in
    the JSON and in the RTTM."""
    seen = _named(record, rttm)
    result["turns"] = len(seen["turns"])
    if seen["match"] is None:
        result["error"] = (f"bin/diarize --voiceprints did not name '{VOICE}' in the very clip "
                           f"it was enrolled from (best similarity {seen['best']})")
        return
    result["similarity"] = seen["match"].get("similarity")
    if (result["similarity"] or 0.0) < SAME_AUDIO:
        result["error"] = (f"the clip it was enrolled from has similarity "
                           f"{result['similarity']} to its own voiceprint, not 1: bin/enroll "
                           "and bin/diarize computed its embedding differently")
    elif not seen["turns"] or seen["rttm_turns"] != len(seen["turns"]):
        result["error"] = (f"the JSON gives '{VOICE}' {len(seen['turns'])} turn(s), the RTTM "
                           f"{seen['rttm_turns']}: every output must say the name")
    else:
        result["ok"] = True


def _on_sample(record: dict[str, Any], rttm: str, stretch: tuple[float, float]
               ) -> dict[str, Any]:
    """What ``bin/diarize --voiceprints`` made of the whole sample (reported, not judged:
    whether the voice clears the default threshold there depends on the weights)."""
    seen = _named(record, rttm)
    if seen["match"] is None:
        return {"named": False, "speakers": seen["speakers"], "best_similarity": seen["best"]}
    others = [s for s in record.get("segments") or [] if s.get("speaker") != VOICE]
    return {"named": True, "speakers": seen["speakers"],
            "similarity": seen["match"].get("similarity"), "turns": len(seen["turns"]),
            "rttm_turns": seen["rttm_turns"],
            "named_speaker_spoke_it": overlap(seen["turns"], *stretch).get(VOICE, 0.0) >= max(
                overlap(others, *stretch).values(), default=0.0)}
