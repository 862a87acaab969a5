"""The transcription tests' speech (tests/speech.py): its word error rate, and the espeak-ng
dialogue it synthesizes.

.ci/run installs espeak-ng (a Debian package); the dialogue tests are skipped only where it
is missing, and say so in pytest's -ra summary.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import soundfile
import speech

ASSETS = Path(__file__).parent.parent / "bundler" / "assets"
needs_espeak = pytest.mark.skipif(not speech.have_espeak(),
                                  reason="espeak-ng is not installed (.ci/run installs it)")


@pytest.mark.parametrize(("reference", "hypothesis", "expected"), [
    ("the cat sat on the mat", "the cat sat on the mat", 0.0),
    ("The cat sat, on the mat.", "the  CAT sat on the mat", 0.0),  # case, punctuation, spaces
    ("the cat sat on the mat", "the cat sat on a mat", 1 / 6),  # a substitution
    ("the cat sat on the mat", "the cat sat on mat", 1 / 6),  # a deletion
    ("the cat sat on the mat", "the black cat sat on the mat", 1 / 6),  # an insertion
    ("the cat sat", "", 1.0),
    ("one two", "one two three four", 1.0),  # insertions can pass 1
    ("we sold four thousand", "we sold 4,000", 0.5),  # numbers are not normalised
    ("let us go", "let's go", 2 / 3),
    ("a well-known fact", "a well known fact", 0.0),
    ("sit down", "down sit", 1.0),
])
def test_wer(reference: str, hypothesis: str, expected: float) -> None:
    assert speech.wer(reference, hypothesis) == pytest.approx(expected)


def test_wer_needs_a_reference() -> None:
    with pytest.raises(ValueError):
        speech.wer(" . ", "words")


@needs_espeak
@pytest.mark.parametrize("suffix", [".flac", ".wav"])
def test_dialogue_matches_its_turns_and_is_the_same_bytes_twice(tmp_path: Path,
                                                                suffix: str) -> None:
    path = tmp_path / f"dialogue{suffix}"
    turns = speech.dialogue(path)
    assert [(t.speaker, t.text) for t in turns] == list(speech.DEFAULT_LINES)
    audio, rate = soundfile.read(path, dtype="float32")
    assert rate == speech.RATE and audio.ndim == 1
    assert len(audio) == round(turns[-1].end * rate), "the audio ends where the last turn does"
    assert 30 <= len(audio) / rate <= 40
    assert turns[0].start == 0
    for before, after in pairwise(turns):
        assert after.start - before.end == pytest.approx(speech.GAP_S, abs=1 / rate)
        assert not np.any(audio[round(before.end * rate):round(after.start * rate)])
    for turn in turns:
        voiced = audio[round(turn.start * rate):round(turn.end * rate)]
        assert np.sqrt(np.mean(voiced ** 2)) > 0.02, f"{turn.speaker} says something"

    again = tmp_path / f"again{suffix}"
    assert speech.dialogue(again) == turns
    assert again.read_bytes() == path.read_bytes()


@needs_espeak
def test_the_committed_asset_is_what_the_command_makes(tmp_path: Path) -> None:
    committed = json.loads((ASSETS / "dialogue.json").read_text())
    if f"espeak-ng {speech.espeak_version()}:" not in committed["made_by"]:
        pytest.skip(f"the asset was made by another espeak-ng: {committed['made_by']}")
    speech.asset(tmp_path)
    assert json.loads((tmp_path / "dialogue.json").read_text()) == committed
    made, _ = soundfile.read(tmp_path / "dialogue.flac", dtype="int16")
    ours, rate = soundfile.read(ASSETS / "dialogue.flac", dtype="int16")
    info = soundfile.info(ASSETS / "dialogue.flac")
    assert (rate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "FLAC")
    assert 10 <= len(ours) / rate <= 12
    # An FFT on another CPU may round a sample the other way: within one step of 16 bits.
    assert made.shape == ours.shape
    assert np.max(np.abs(made.astype(np.int32) - ours.astype(np.int32))) <= 1
