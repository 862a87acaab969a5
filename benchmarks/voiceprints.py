"""Voiceprints on an installed bundle: enrolment time per clip, the overhead of
``--voiceprints`` on ``bin/diarize``, identification accuracy, and (``--calibrate``) the
similarity distributions and the threshold at equal error rate.

    python benchmarks/voiceprints.py --prefix PREFIX [--prefix PREFIX2] [--config CONFIG]
                                     [--runs N] [--calibrate] [--json]

Each PREFIX is an install (one per recipe); the programs run exactly as a user runs them
(``PREFIX/bin/enroll``, ``PREFIX/bin/diarize --json``), with ``--config`` passed on when given
(a config with other weights, e.g. real ones: the bundles built here carry random
segmentation weights, which hear two voices in every clip, so that ``bin/enroll`` refuses
them all). The recordings are espeak-ng voices (tests/speech.py), the sentences those of
tests/test_e2e_voiceprints.py: two voices enrolled from sentences that are not in the
meeting, and a stranger who speaks in it but is never enrolled.

* ``enrolment``: each enrolment clip (one sentence, 3-5 s) enrolled alone, and each voice
  from both its clips (8-10 s): the process's wall seconds and ``bin/enroll``'s own.
* ``overhead``: ``bin/diarize`` on the meeting with and without ``--voiceprints``,
  alternately, ``--runs`` times each; the ratio of the median ``diarize_seconds`` (the goal:
  at most 1.01). And the matching itself (``voiceprints.match`` on this many speakers and
  voiceprints of the model's dimension), timed in this process: what ``--voiceprints`` adds
  to a run besides reading its folder.
* ``accuracy``: each turn of the meeting, by the name of the output speaker who covers most
  of it: named correctly, wrongly (another name, or any name for the stranger), or left
  unnamed (the stranger's correct answer).
* ``calibration`` (``--calibrate``): same-voice and different-voice pairs, from the clips'
  own voiceprints (enrolled against enrolled) and from ``bin/diarize`` with one voiceprint
  at a time (each diarized speaker's similarity to it, against the voice that speaks most of
  that speaker's turns); their similarities, and the threshold where false names and missed
  names are equally frequent (equal error rate). A site with the real weights runs this on
  its own voices and passes the threshold with ``--match-threshold`` (docs/voiceprints.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import speech  # noqa: E402 - the tests' helpers, found through the path above
from test_e2e_voiceprints import ENROL, MEETING, STRANGER  # noqa: E402

from bundler.runtime import voiceprints  # noqa: E402

STRANGER_VOICE = "C"


def recordings(folder: Path) -> dict[str, Any]:
    """The enrolment clips (``{name: [path, ...]}``) and the meeting with its turns."""
    speech.VOICES.setdefault(STRANGER_VOICE, STRANGER)
    clips: dict[str, list[Path]] = {}
    for name, (voice, lines) in ENROL.items():
        for i, line in enumerate(lines, 1):
            path = folder / f"{name}-{i}.wav"
            speech.dialogue(path, [(voice, line)])
            clips.setdefault(name, []).append(path)
    meeting = folder / "meeting.wav"
    turns = speech.dialogue(meeting, MEETING)
    for path in folder.iterdir():
        path.chmod(0o644)
    voice_of = {voice: name for name, (voice, _) in ENROL.items()}
    return {"clips": clips, "meeting": meeting,
            "turns": [(t.start, t.end, voice_of.get(t.speaker)) for t in turns]}


def program(prefix: Path, name: str, *args: str, config: Path | None = None
            ) -> tuple[dict[str, Any], float]:
    """``PREFIX/bin/NAME ARGS --json``: its JSON (the last line of stdout) and wall seconds;
    SystemExit with its last line when it fails."""
    argv = [str(prefix / "bin" / name), *args, "--json", "--quiet",
            *(["--config", str(config)] if config else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=3600)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks/voiceprints.py: bin/{name} exit {proc.returncode}: "
                         f"{lines[-1] if lines else ''}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def enrolment(prefix: Path, clips: dict[str, list[Path]], folder: Path,
              config: Path | None) -> list[dict[str, Any]]:
    """Each clip enrolled alone (``NAME-i``), then each voice from all its clips (``NAME``)."""
    rows = []
    for name, paths in clips.items():
        for i, path in enumerate(paths, 1):
            rows.append(_enroll(prefix, f"{name}-{i}", [path], folder, config))
        rows.append(_enroll(prefix, name, paths, folder, config))
    return rows


def _enroll(prefix: Path, name: str, paths: Sequence[Path], folder: Path,
            config: Path | None) -> dict[str, Any]:
    import soundfile

    report, wall = program(prefix, "enroll", name, *map(str, paths), "--voiceprints",
                           str(folder), config=config)
    audio = sum(soundfile.info(str(p)).duration for p in paths)
    return {"name": name, "clips": len(paths), "audio_seconds": round(audio, 2),
            "speech_seconds": report["speech_seconds"], "wall_seconds": round(wall, 2),
            "enroll_seconds": report["seconds"]}


def diarize(prefix: Path, meeting: Path, out: Path, config: Path | None,
            prints: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``bin/diarize`` on the meeting: its summary and the meeting's JSON record."""
    shutil.rmtree(out, ignore_errors=True)
    summary, _ = program(prefix, "diarize", str(meeting), "--output-dir", str(out),
                         "--format", "json", "--overwrite",
                         *(["--voiceprints", str(prints)] if prints else []), config=config)
    return summary, json.loads((out / f"{meeting.name}.json").read_text())


def overhead(prefix: Path, meeting: Path, prints: Path, work: Path, config: Path | None,
             runs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """With and without ``--voiceprints``, alternately: the medians and their ratio; and the
    last record made with them (for ``accuracy``)."""
    times: dict[str, list[float]] = {"without": [], "with": []}
    record: dict[str, Any] = {}
    for _ in range(runs):
        summary, _ = diarize(prefix, meeting, work / "out-plain", config)
        times["without"].append(summary["diarize_seconds"])
        summary, record = diarize(prefix, meeting, work / "out-named", config, prints)
        times["with"].append(summary["diarize_seconds"])
    without, with_ = (statistics.median(times[k]) for k in ("without", "with"))
    known = voiceprints.load_folder(prints)
    speakers = max(1, len(record.get("identification") or []))
    rng = random.Random(0)
    centroids = {f"SPEAKER_{i:02d}": [rng.gauss(0, 1) for _ in known[0].embedding]
                 for i in range(speakers)}
    t0 = time.perf_counter()
    for _ in range(100):
        voiceprints.match(centroids, known)
    match_ms = (time.perf_counter() - t0) * 10  # per call, in ms
    return {"runs": runs, "diarize_seconds_without": round(without, 3),
            "diarize_seconds_with": round(with_, 3),
            "ratio": round(with_ / without, 4) if without else None,
            "match_ms": round(match_ms, 3), "speakers": speakers, "voiceprints": len(known),
            "dimension": len(known[0].embedding)}, record


def who_speaks(segments: list[dict[str, Any]], start: float, end: float) -> str | None:
    """The output speaker covering most of ``start``-``end`` (None: nobody)."""
    cover: dict[str, float] = {}
    for s in segments:
        shared = min(s["end"], end) - max(s["start"], start)
        if shared > 0:
            cover[s["speaker"]] = cover.get(s["speaker"], 0.0) + shared
    return max(cover, key=lambda k: cover[k]) if cover else None


def accuracy(record: dict[str, Any], turns: list[tuple[float, float, str | None]]
             ) -> dict[str, Any]:
    """Each reference turn named correctly, wrongly, or left unnamed (see the docstring)."""
    names = {m["identified_as"] for m in record.get("identification") or []} - {None}
    counts = {"correct": 0, "wrong": 0, "unnamed": 0, "turns": len(turns)}
    for start, end, truth in turns:
        heard = who_speaks(record.get("segments") or [], start, end)
        given = heard if heard in names else None
        if given is None:
            counts["correct" if truth is None else "unnamed"] += 1
        else:
            counts["correct" if given == truth else "wrong"] += 1
    counts["speakers"] = len(record.get("speakers") or [])
    counts["identification"] = record.get("identification")
    return counts


def equal_error(same: Sequence[float], different: Sequence[float]) -> dict[str, Any]:
    """The threshold where the share of different-voice pairs at or above it (false names)
    and of same-voice pairs below it (missed names) are closest: the midpoint between the
    two scores around it, and that error rate."""
    if not same or not different:
        return {"threshold": None, "eer": None}
    scores = sorted(set(same) | set(different))
    cuts = [scores[0] - 1e-6, *((a + b) / 2 for a, b in pairwise(scores)), scores[-1] + 1e-6]
    best = min(cuts, key=lambda t: (abs(_far(different, t) - _frr(same, t)),
                                    _far(different, t) + _frr(same, t)))
    return {"threshold": round(best, 4),
            "eer": round((_far(different, best) + _frr(same, best)) / 2, 4),
            "false_name_rate": round(_far(different, best), 4),
            "missed_name_rate": round(_frr(same, best), 4)}


def _far(different: Sequence[float], t: float) -> float:
    return sum(x >= t for x in different) / len(different)


def _frr(same: Sequence[float], t: float) -> float:
    return sum(x < t for x in same) / len(same)


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {"n": len(values), **({"min": round(min(values), 4),
                                  "median": round(statistics.median(values), 4),
                                  "max": round(max(values), 4)} if values else {})}


def calibration(prefix: Path, data: dict[str, Any], prints: Path, work: Path,
                config: Path | None) -> dict[str, Any]:
    """Same-voice and different-voice similarities, and the threshold at equal error rate."""
    clip_prints = [vp for vp in voiceprints.load_folder(prints) if "-" in vp.name]
    same: list[float] = []
    different: list[float] = []
    for i, a in enumerate(clip_prints):  # enrolled against enrolled: clip by clip
        for b in clip_prints[i + 1:]:
            sim = voiceprints.cosine(a.embedding, b.embedding)
            if sim is not None:
                (same if a.name.split("-")[0] == b.name.split("-")[0] else different).append(
                    sim)
    enrolled = {"same": _spread(same), "different": _spread(different)}
    for name in data["clips"]:  # enrolled against diarized: one voiceprint at a time
        alone = work / f"only-{name}"
        alone.mkdir(mode=0o700)
        shutil.copy(prints / f"{name}.json", alone / f"{name}.json")
        _, record = diarize(prefix, data["meeting"], work / "out-one", config, alone)
        labels = {m["identified_as"] or m["speaker"]: m for m in record["identification"]}
        for label, m in labels.items():
            if m["similarity"] is None:
                continue
            spoken = [t for t in data["turns"]
                      if who_speaks(record["segments"], t[0], t[1]) == label]
            voices = [t[2] for t in spoken]
            main = max(set(voices), key=voices.count) if voices else None
            (same if main == name else different).append(m["similarity"])
    return {"enrolled_pairs": enrolled, "same_voice": _spread(same),
            "different_voice": _spread(different), **equal_error(same, different),
            "default_threshold": voiceprints.DEFAULT_THRESHOLD}


def bench(prefix: Path, config: Path | None, runs: int, calibrate: bool) -> dict[str, Any]:
    manifest = json.loads((prefix / "manifest.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="bench-voiceprints-"))
    work.chmod(0o755)
    try:
        audio = work / "audio"
        audio.mkdir()
        data = recordings(audio)
        prints = work / "voices"
        report: dict[str, Any] = {
            "recipe": (manifest.get("recipe") or {}).get("name"),
            "pyannote_audio": manifest.get("pyannote_audio"), "prefix": str(prefix),
            "config": str(config) if config else None,
            "enrolment": enrolment(prefix, data["clips"], prints, config)}
        named = work / "named"  # the voices, not their single clips
        named.mkdir(mode=0o700)
        for name in data["clips"]:
            shutil.copy(prints / f"{name}.json", named / f"{name}.json")
        report["overhead"], record = overhead(prefix, data["meeting"], named, work, config,
                                              runs)
        report["accuracy"] = accuracy(record, data["turns"])
        if calibrate:
            report["calibration"] = calibration(prefix, data, prints, work, config)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", type=Path, action="append", required=True,
                   help="an install (one per recipe; repeat it)")
    p.add_argument("--config", type=Path, help="a pipeline config passed to the programs")
    p.add_argument("--runs", type=int, default=3, help="runs with and without --voiceprints")
    p.add_argument("--calibrate", action="store_true",
                   help="similarity distributions and the threshold at equal error rate")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    missing = [str(x) for x in args.prefix if not (x / "bin" / "enroll").is_file()]
    if missing or not speech.have_espeak():
        print("benchmarks/voiceprints.py: " + (
            f"--prefix {missing[0]}: no bin/enroll there (an installed bundle?)" if missing
            else "needs espeak-ng (apt-get install espeak-ng)"), file=sys.stderr)
        return 2
    os.umask(0o022)
    reports = [bench(x.resolve(), args.config, args.runs, args.calibrate) for x in args.prefix]
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    for r in reports:
        print(f"{r['recipe']} (pyannote.audio {r['pyannote_audio']}):")
        for e in r["enrolment"]:
            print(f"  enroll {e['name']}: {e['clips']} clip(s), {e['audio_seconds']} s -> "
                  f"{e['wall_seconds']} s wall ({e['enroll_seconds']} s in bin/enroll)")
        o = r["overhead"]
        print(f"  --voiceprints: diarize {o['diarize_seconds_with']} s vs "
              f"{o['diarize_seconds_without']} s (ratio {o['ratio']}); matching "
              f"{o['match_ms']} ms")
        a = r["accuracy"]
        print(f"  turns: {a['correct']} correct, {a['wrong']} wrong, {a['unnamed']} unnamed "
              f"of {a['turns']} ({a['speakers']} speaker(s) heard)")
        c = r.get("calibration")
        if c:
            print(f"  calibration: same {c['same_voice']}, different {c['different_voice']}; "
                  f"EER {c['eer']} at {c['threshold']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
