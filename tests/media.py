"""Real recordings of the kinds people have, made with PyAV (FFmpeg's encoders in its wheel)
and soundfile from the bundle's deterministic two-voice sample.

    python tests/media.py samples bundler/assets      # the committed smoke samples

The smoke samples (``sample.mp3``, ``sample.m4a``) are committed rather than encoded at
build time: an encoder's version would otherwise decide a bundle's bytes, and a second
build host could not reproduce them.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile

BITEXACT = {"fflags": "+bitexact"}
# The wav everything is made from: the bundle's sample, rendered by bundler.render, or a
# file of it (``--wav``: an install's smoke/sample.wav, where bundler is not importable).
SAMPLE_WAV: Path | None = None


def sample_bytes() -> bytes:
    if SAMPLE_WAV is not None:
        return SAMPLE_WAV.read_bytes()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bundler.render import sample_wav

    return sample_wav()


def sample(rate: int = 16000, channels: int = 1) -> np.ndarray:
    """The bundle's sample (16 kHz mono) as float32 frames x channels at ``rate``."""
    import io

    data, sr = soundfile.read(io.BytesIO(sample_bytes()), dtype="float32")
    if rate != sr:
        t = np.arange(int(len(data) * rate / sr)) / rate
        data = np.interp(t, np.arange(len(data)) / sr, data).astype(np.float32)
    if channels > 1:
        data = np.stack([data * (0.9 - 0.2 * c) for c in range(channels)], axis=1)
    return np.ascontiguousarray(data.reshape(len(data), -1))


def encode(path: Path, codec: str, rate: int = 16000, channels: int = 1,
           video: bool = False, bit_rate: int | None = None,
           frames: np.ndarray | None = None) -> Path:
    """Write ``path`` (the container from its extension) with one audio stream in ``codec``
    and, with ``video``, a small video track before it. ``frames``: float32, frames x
    ``channels`` at ``rate`` (default: the bundle's sample)."""
    if frames is None:
        frames = sample(rate, channels)
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(path), "w", options=BITEXACT) as out:
        vstream = None
        if video:
            vstream = out.add_stream("mpeg4", rate=10)
            vstream.width, vstream.height, vstream.pix_fmt = 64, 48, "yuv420p"
        astream = out.add_stream(codec, rate=rate)
        astream.layout = layout
        if bit_rate:
            astream.bit_rate = bit_rate
        astream.codec_context.flags |= av.codec.context.Flags.bitexact
        fmt = astream.codec_context.format.name  # the encoder's sample format
        if vstream is not None:
            for i in range(int(len(frames) / rate * 10)):
                img = np.full((48, 64, 3), (i * 7) % 255, dtype=np.uint8)
                vf = av.VideoFrame.from_ndarray(img, format="rgb24")
                vf.pts, vf.time_base = i, Fraction(1, 10)
                for packet in vstream.encode(vf):
                    out.mux(packet)
        resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate)
        step = 1024
        for start in range(0, len(frames), step):
            chunk = frames[start:start + step]
            # packed float: one row of interleaved samples
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="flt",
                                               layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            for f in resampler.resample(frame):
                for packet in astream.encode(f):
                    out.mux(packet)
        for f in resampler.resample(None):
            for packet in astream.encode(f):
                out.mux(packet)
        for packet in astream.encode(None):
            out.mux(packet)
        if vstream is not None:
            for packet in vstream.encode(None):
                out.mux(packet)
    return path


def corpus(folder: Path) -> dict[str, Path]:
    """A folder of the recordings people have, plus a same-name file in a subfolder and a
    corrupt one: ``{label: path}``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meetings").mkdir(exist_ok=True)
    files = {
        "wav": folder / "call.wav",
        "flac": folder / "archive 44k stereo.flac",
        "mp3": folder / "phone.mp3",
        "ogg": folder / "voice.ogg",
        "m4a": folder / "meetings" / "standup.m4a",
        "mp4": folder / "meetings" / "review.mp4",
        "webm": folder / "call.webm",
        "same-name": folder / "meetings" / "call.wav",
        "corrupt": folder / "broken.m4a",
    }
    soundfile.write(files["wav"], sample(), 16000, subtype="PCM_16")
    soundfile.write(files["flac"], sample(44100, 2), 44100, format="FLAC")
    encode(files["mp3"], "libmp3lame", rate=16000, bit_rate=48000)
    soundfile.write(files["ogg"], sample(), 16000, format="OGG", subtype="VORBIS")
    encode(files["m4a"], "aac", rate=16000, bit_rate=48000)
    encode(files["mp4"], "aac", rate=48000, channels=2, video=True, bit_rate=96000)
    encode(files["webm"], "libopus", rate=48000, bit_rate=32000)
    soundfile.write(files["same-name"], sample(), 16000, subtype="PCM_16")
    # A truncated download: an m4a header followed by garbage.
    files["corrupt"].write_bytes(files["m4a"].read_bytes()[:600] + b"\x00garbage" * 64)
    return files


BENCH_KINDS = (("wav", None), ("flac", None), ("mp3", "libmp3lame"), ("ogg", None),
               ("m4a", "aac"), ("mp4", "aac"), ("webm", "libopus"))


def bench(folder: Path, count: int = 20) -> list[Path]:
    """``count`` recordings cycling through the containers people have (for benchmarks)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count):
        ext, codec = BENCH_KINDS[i % len(BENCH_KINDS)]
        path = folder / f"rec{i:02}.{ext}"
        if ext == "wav":
            soundfile.write(path, sample(), 16000, subtype="PCM_16")
        elif ext == "flac":
            soundfile.write(path, sample(44100, 2), 44100, format="FLAC")
        elif ext == "ogg":
            soundfile.write(path, sample(), 16000, format="OGG", subtype="VORBIS")
        else:
            encode(path, codec or "aac", rate=48000 if ext in ("mp4", "webm") else 16000,
                   video=ext == "mp4", bit_rate=48000)
        made.append(path)
    return made


def samples(folder: Path) -> None:
    """The committed smoke samples: sample.mp3 and sample.m4a."""
    folder.mkdir(parents=True, exist_ok=True)
    encode(folder / "sample.mp3", "libmp3lame", bit_rate=48000)
    encode(folder / "sample.m4a", "aac", bit_rate=48000)


if __name__ == "__main__":
    import argparse

    cli = argparse.ArgumentParser(description="Make the smoke samples or a test corpus.")
    cli.add_argument("what", choices=("samples", "corpus", "bench"))
    cli.add_argument("folder", type=Path)
    cli.add_argument("--wav", type=Path, help="the sample to encode (default: rendered)")
    opts = cli.parse_args()
    SAMPLE_WAV = opts.wav
    {"samples": samples, "corpus": corpus, "bench": bench}[opts.what](opts.folder)
