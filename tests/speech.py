"""Real speech for the transcription tests: a two-voice English dialogue synthesized with
espeak-ng, its turns, and a word error rate to score a transcript against it.

espeak-ng is a Debian package (``apt-get install espeak-ng``); .ci/run installs it, so the
tests that need it run in CI and are skipped only where it is missing.

    python tests/speech.py asset bundler/assets    # the committed dialogue.flac + .json

espeak-ng's output is the same bytes on every run of one version, and everything after it
here is plain arithmetic (an FFT resampler, no dither), so a dialogue is a function of its
lines: the committed asset can be made again and compared.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bundler.runtime.install import word_changes, words  # noqa: E402

RATE = 16000
GAP_S = 0.6  # silence between turns
VOICES = {"A": "en-us", "B": "en-gb+f3"}
WPM = 140
# Below this (of int16 full scale) a sample is espeak's silence: each line is trimmed to its
# voiced span, so a turn's start and end are where its speech is.
SILENCE = 64


@dataclass(frozen=True)
class Turn:
    """One line of the dialogue: who says it, when (seconds), and what."""

    speaker: str  # "A" or "B"
    start: float
    end: float
    text: str


# Plain sentences, common words, numbers spelled out (no number normalisation in wer()),
# no names; about 37 s with the gaps.
DEFAULT_LINES: tuple[tuple[str, str], ...] = (
    ("A", "Good morning. Did you have time to read the report before the meeting?"),
    ("B", "Yes, I read it last night. The sales for the second quarter look much better."),
    ("A", "They do. We sold almost twice as many units as we did last spring."),
    ("B", "That is good news. What should we change for the next three months?"),
    ("A", "I think we should hire two more people and open the new office in May."),
    ("B", "I agree. Let us write a short plan and share it with the team on Friday."),
    ("A", "Sounds good. I will send you the first draft tomorrow afternoon."),
)

# The committed smoke asset: about 11 s, both voices.
ASSET_LINES: tuple[tuple[str, str], ...] = (
    ("A", "The train leaves in an hour, so we should go soon."),
    ("B", "I am almost ready. Let me find my coat and the tickets."),
    ("A", "Thank you. I will wait for you by the door."),
)


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_version() -> str:
    out = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    found = re.search(r"text-to-speech: (\S+)", out)
    return found.group(1) if found else out.strip()


def speak(text: str, voice: str) -> np.ndarray:
    """``text`` said by espeak-ng's ``voice`` at ``WPM``: float32 mono at ``RATE``, trimmed
    to its voiced span."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "line.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(WPM), "-w", str(wav), text],
                       check=True, capture_output=True, timeout=60)
        pcm, rate = soundfile.read(wav, dtype="int16")
    if pcm.ndim > 1:
        pcm = pcm[:, 0]
    voiced = np.flatnonzero(np.abs(pcm.astype(np.int32)) > SILENCE)
    if not len(voiced):
        raise ValueError(f"espeak-ng said nothing for {text!r}")
    pcm = pcm[voiced[0]:voiced[-1] + 1]
    return resample(pcm.astype(np.float64) / 32768.0, rate, RATE).astype(np.float32)


def resample(x: np.ndarray, rate: int, to: int) -> np.ndarray:
    """``x`` at ``to`` Hz: an ideal low-pass by truncating its spectrum (no aliasing, and
    exactly reproducible: no state, no dither)."""
    if rate == to:
        return x
    n = round(len(x) * to / rate)
    spectrum = np.fft.rfft(x)[:n // 2 + 1]
    return np.fft.irfft(spectrum, n) * (n / len(x))


def synthesize(lines: Sequence[tuple[str, str]]) -> tuple[np.ndarray, list[Turn]]:
    """The dialogue's samples (float32 mono at ``RATE``) and its turns."""
    gap = np.zeros(round(GAP_S * RATE), dtype=np.float32)
    parts: list[np.ndarray] = []
    turns: list[Turn] = []
    at = 0
    for speaker, text in lines:
        if parts:
            parts.append(gap)
            at += len(gap)
        clip = speak(text, VOICES[speaker])
        turns.append(Turn(speaker, at / RATE, (at + len(clip)) / RATE, text))
        parts.append(clip)
        at += len(clip)
    audio = np.clip(np.concatenate(parts), -1.0, 1.0).astype(np.float32)
    return audio, turns


def write(path: Path, audio: np.ndarray) -> None:
    """``audio`` (float32 mono at ``RATE``) to ``path``, in the format its suffix names."""
    suffix = path.suffix.lower()
    if suffix == ".wav":
        soundfile.write(path, audio, RATE, subtype="PCM_16")
    elif suffix == ".flac":
        soundfile.write(path, audio, RATE, format="FLAC", subtype="PCM_16")
    elif suffix == ".m4a":
        from media import encode

        encode(path, "aac", rate=RATE, bit_rate=48000, frames=audio.reshape(-1, 1))
    else:
        raise ValueError(f"{path}: write .wav, .flac or .m4a")


def dialogue(path: Path, lines: Sequence[tuple[str, str]] = DEFAULT_LINES) -> list[Turn]:
    """A two-voice dialogue of ``lines`` (speaker "A" or "B", text) written to ``path``
    (.wav, .flac or .m4a): each line by its speaker's espeak-ng voice, 16 kHz mono,
    ``GAP_S`` of silence between turns, none before the first or after the last."""
    audio, turns = synthesize(lines)
    write(path, audio)
    return turns


def normalize(text: str) -> list[str]:
    """Words as the installer compares transcripts (bundler.runtime.install.words)."""
    return words(text)


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: (substitutions + deletions + insertions) / words of ``reference``,
    the installer's own word_changes (one measure for the smoke test and these tests)."""
    ref = normalize(reference)
    if not ref:
        raise ValueError("the reference has no words")
    return word_changes(reference, hypothesis) / len(ref)


def asset(folder: Path) -> None:
    """The committed smoke asset: ``dialogue.flac`` and ``dialogue.json`` (its turns)."""
    folder.mkdir(parents=True, exist_ok=True)
    turns = dialogue(folder / "dialogue.flac", ASSET_LINES)
    meta = {"rate": RATE, "text": " ".join(t.text for t in turns),
            "turns": [{**asdict(t), "start": round(t.start, 3), "end": round(t.end, 3)}
                      for t in turns],
            "made_by": f"python tests/speech.py asset bundler/assets (espeak-ng "
                       f"{espeak_version()}: "
                       + ", ".join(f"{s}={v}" for s, v in VOICES.items()) + f", -s {WPM})"}
    (folder / "dialogue.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    import argparse

    cli = argparse.ArgumentParser(description="Make the committed dialogue or a test one.")
    cli.add_argument("what", choices=("asset", "dialogue"))
    cli.add_argument("path", type=Path, help="asset: the folder; dialogue: the audio file")
    opts = cli.parse_args()
    if opts.what == "asset":
        asset(opts.path)
    else:
        for turn in dialogue(opts.path):
            print(f"{turn.speaker} {turn.start:7.3f} {turn.end:7.3f}  {turn.text}")
    sys.exit(0)
