"""Decoding without FFmpeg on the host: every recording becomes 16 kHz mono float32 in
memory, soundfile (libsndfile, in its wheel) first, PyAV (FFmpeg's libraries, in its wheel)
for the rest and for resampling; never more than ``--max-duration`` decoded.

Standard library only at import: numpy, soundfile and av are imported when a file is
decoded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import one_line
from .exits import FileFailed

SAMPLE_RATE = 16000
# By extension, case-insensitive, when a folder is walked. A file named on the command line
# is taken whatever its name.
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".mp4",
    ".m4v", ".mov", ".mkv", ".mka", ".webm", ".wma", ".aif", ".aiff", ".amr", ".3gp",
    ".avi", ".ts",
})
SOUNDFILE_EXTENSIONS = frozenset({".wav", ".wave", ".flac", ".ogg", ".oga", ".mp3", ".aif",
                                  ".aiff"})

# The longest recording decoded, by default: 8 hours, longer than a meeting, a lecture or a
# court day. Decoded, 16 kHz float32 is 64 KB per second of audio: 8 h is 1.8 GB in memory,
# which a host with 8 GB or more holds beside the models. --max-duration 0 lifts the limit.
MAX_DURATION_S = 8 * 3600


class TooLong(FileFailed):
    """A recording longer than --max-duration: refused before its samples fill memory."""


def too_long(max_seconds: float, seconds: float | None = None) -> TooLong:
    length = (f"{seconds:.0f} s of audio" if seconds is not None
              else "more audio than that")
    return TooLong(f"longer than --max-duration {max_seconds:g} s ({length}): refused "
                   "before decoding it whole; raise --max-duration, or 0 for no limit")


def max_samples(max_seconds: float) -> int:
    """The samples (at 16 kHz) --max-duration allows; 0 for no limit."""
    return int(max_seconds * SAMPLE_RATE) if max_seconds > 0 else 0


def decode(path: Path, max_seconds: float = 0) -> Any:
    """The file's audio as 16 kHz mono float32 (a 1-D numpy array); FileFailed if it cannot
    be read, TooLong (never more than ``max_seconds`` decoded, 0: no limit) if it is longer.
    soundfile first for the formats libsndfile reads at 16 kHz already, PyAV for everything
    else and for resampling."""
    import numpy as np

    problems = []
    cap = max_samples(max_seconds)
    if path.suffix.lower() in SOUNDFILE_EXTENSIONS:
        import soundfile

        try:
            info = soundfile.info(str(path))
            if info.samplerate == SAMPLE_RATE:
                # The header's frame count refuses a long file before a sample is read; the
                # read is capped too, for a header that understates it.
                if cap and info.frames > cap:
                    raise too_long(max_seconds, info.frames / SAMPLE_RATE)
                data, _ = soundfile.read(str(path), dtype="float32", always_2d=True,
                                         frames=cap + 1 if cap else -1)
                if cap and len(data) > cap:
                    raise too_long(max_seconds)
                # A mono file's one column is already the waveform (contiguous, no copy):
                # half the peak memory of averaging it into a second array.
                mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
                return np.ascontiguousarray(mono, dtype=np.float32)
        except (RuntimeError, OSError, ValueError, TypeError) as exc:  # LibsndfileError
            problems.append(f"soundfile: {one_line(exc)}")
    try:
        return decode_av(path, cap)
    except TooLong:
        raise too_long(max_seconds) from None
    except FileFailed as exc:
        problems.append(str(exc))
    except ModuleNotFoundError:
        problems.append("PyAV (av) is not installed in this bundle's venv")
    raise FileFailed("cannot decode: " + "; ".join(problems))


def decode_av(path: Path, cap: int = 0) -> Any:
    """PyAV's decoding, resampled to 16 kHz mono; TooLong as soon as more than ``cap``
    samples (0: no limit) are decoded, holding at most ``cap`` plus one frame's samples."""
    import av
    import numpy as np

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise FileFailed("PyAV: the file has no audio track")
            stream = container.streams.audio[0]
            samples = Samples(expected_samples(container, stream), cap)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    samples.add(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                samples.add(out.to_ndarray().reshape(-1))
    except FileFailed:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        # FFmpeg's errors carry an errno and the path: the reason alone reads better.
        raise FileFailed(f"PyAV: {one_line(getattr(exc, 'strerror', None) or exc)}") from None
    if not samples.total:
        raise FileFailed("PyAV: no audio samples")
    return np.ascontiguousarray(samples.waveform(), dtype=np.float32)


def expected_samples(container: Any, stream: Any) -> int:
    """How many 16 kHz samples the header's duration promises, plus a second for a codec's
    priming and the resampler's rounding; 0 when it gives no duration. A hint for sizing,
    never trusted as a limit."""
    seconds = 0.0
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / 1_000_000  # AV_TIME_BASE
    if not 0 < seconds < float("inf"):
        return 0
    return int(seconds * SAMPLE_RATE) + SAMPLE_RATE


class Samples:
    """Decoded samples, frame by frame, into one array sized from the header's duration
    (at most ``cap``): the waveform is not held twice while pieces are joined, as a list of
    frames concatenated at the end would be. Frames past that size (a header that
    understates) are kept aside and joined at the end. TooLong once more than ``cap``
    samples (0: no limit) have come."""

    def __init__(self, expected: int, cap: int = 0) -> None:
        import numpy as np

        self.np = np
        size = min(expected, cap) if cap else expected
        try:
            # Pages are touched only as samples arrive: the part a short file does not
            # fill costs address space, not memory.
            self.buffer = np.empty(size, dtype=np.float32)
        except (MemoryError, ValueError):  # a header claiming more than this host has
            self.buffer = np.empty(0, dtype=np.float32)
        self.cap, self.filled, self.total = cap, 0, 0
        self.rest: list[Any] = []

    def add(self, chunk: Any) -> None:
        n = len(chunk)
        if not self.rest and self.filled + n <= len(self.buffer):
            self.buffer[self.filled:self.filled + n] = chunk
            self.filled += n
        else:
            self.rest.append(chunk)
        self.total += n
        if self.cap and self.total > self.cap:
            raise TooLong()

    def waveform(self) -> Any:
        head = self.buffer[:self.filled]
        if self.rest:
            return self.np.concatenate([head, *self.rest])
        # A header that promised far more than came: copy out the part filled rather than
        # keep the whole reservation behind a view.
        return head.copy() if len(self.buffer) > 2 * self.filled + SAMPLE_RATE else head
