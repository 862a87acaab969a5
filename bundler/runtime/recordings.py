"""The shared core of the programs that process recordings on an isolated host.

``bin/diarize`` and ``bin/transcribe`` (``runtime/diarize.py``, ``runtime/transcribe.py``)
each keep only their own work: what to load and what to make of one recording. Everything
else is here, once: the offline environment, the connection-attempt count, finding the
inputs, sharding, output names and atomic writes, decoding without FFmpeg, the device, the
per-file loop that skips finished files and names failed ones, progress, the summary and
the exit codes.

Shipped verbatim in every bundle (``runtime/recordings.py``, listed in SHA256SUMS) beside
the programs, which import it from their own folder. Standard library only up to the
decoders and the models, and Python 3.9: argument errors, sharding and output names are
settled before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import re
import signal
import socket
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

# The offline variables: the one list (layout.OFFLINE_ENV on the build side and configure.py,
# for pyannote.env and the venv's defaults, read it from here). Forced here, not defaulted:
# these programs never need the network.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYANNOTE_METRICS_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
    # onnxruntime >= 1.29 (faster-whisper's Silero VAD) starts DNS attempts about 10 s after
    # a session opens and writes ~/.cache/Microsoft/...; this stops both.
    "ORT_DISABLE_TELEMETRY": "1",
}
# Library caches, each under a writable per-user folder unless the user set it already.
CACHE_VARS = {"MPLCONFIGDIR": "matplotlib", "TORCH_HOME": "torch", "HF_HOME": "huggingface",
              "NUMBA_CACHE_DIR": "numba", "XDG_CACHE_HOME": "xdg"}

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

# Exit codes (a contract: batch schedulers and scripts read them), the same for every program.
EXIT_OK = 0  # every file done, or already done
EXIT_INTERNAL = 1  # a bug: rerun with --debug
EXIT_USAGE = 2  # bad arguments, an input that does not exist, no audio files found
EXIT_CANNOT_RUN = 3  # nothing could run: config or model missing, pipeline or device unusable
EXIT_SOME_FAILED = 4  # some files could not be decoded or processed; the others are done
EXIT_OUTPUT = 5  # the output folder cannot be written
EXIT_INTERRUPTED = 130


def exit_codes(done: str) -> dict[int, str]:
    """Each exit code and its meaning, for a program whose work is ``done`` ("diarized")."""
    return {
        EXIT_OK: f"every file {done} (or already done)",
        EXIT_INTERNAL: "internal error (rerun with --debug)",
        EXIT_USAGE: "bad usage: arguments, a missing input, no audio files",
        EXIT_CANNOT_RUN: "nothing could run: config, model, pipeline or device unusable",
        EXIT_SOME_FAILED: "some files failed (each named on stderr); the others are done",
        EXIT_OUTPUT: "the output folder cannot be written",
        EXIT_INTERRUPTED: "interrupted",
    }


class RunError(Exception):
    """A failure that stops the run: one line for the operator, and its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class FileFailed(Exception):
    """One file could not be decoded or processed; the run goes on."""


# --- offline by construction -----------------------------------------------------------
def go_offline(environ: dict[str, str] | Any = os.environ) -> Path | None:
    """Set the offline variables and point the library caches at a writable per-user
    folder; return that folder (None when nothing is writable: caches stay unset)."""
    for key, value in OFFLINE_ENV.items():
        environ[key] = value
    root = cache_root(environ)
    if root is not None:
        for var, sub in CACHE_VARS.items():
            environ.setdefault(var, str(root / sub))
    return root


def cache_root(environ: dict[str, str] | Any = os.environ) -> Path | None:
    """``$XDG_CACHE_HOME/pyannote-bundle``, else ``~/.cache/pyannote-bundle``, else a
    private folder under the temporary directory: the first one this user can write.

    A service user often has no home, or an unwritable one; the prefix is read-only."""
    candidates = []
    # Only under a folder that exists: a service user's nonexistent home is not created.
    if environ.get("XDG_CACHE_HOME") and Path(environ["XDG_CACHE_HOME"]).is_dir():
        candidates.append(Path(environ["XDG_CACHE_HOME"]) / "pyannote-bundle")
    if environ.get("HOME") and Path(environ["HOME"]).is_dir():
        candidates.append(Path(environ["HOME"]) / ".cache" / "pyannote-bundle")
    private = Path(tempfile.gettempdir()) / f"pyannote-bundle-{os.getuid()}"
    for path in (*candidates, private):
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = path.lstat()
        except OSError:
            continue
        # In a shared /tmp, use only a real folder that is ours (no planted symlink).
        if path == private and (not path.is_dir() or path.is_symlink()
                                or st.st_uid != os.getuid()):
            continue
        if os.access(path, os.W_OK | os.X_OK):
            return path
    return None


NAME_EVENTS = frozenset({"socket.getaddrinfo", "socket.gethostbyname",
                         "socket.gethostbyname_ex", "socket.gethostbyaddr",
                         "socket.getnameinfo"})
INET = (socket.AF_INET, socket.AF_INET6)


class NetworkAudit:
    """A ``sys.addaudithook`` hook: counts every connection attempt and name lookup this
    process makes (local sockets aside), and refuses them when ``block`` is set."""

    def __init__(self, block: bool = False) -> None:
        self.block = block
        self.attempts: list[str] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            sock, address = args[0], args[-1]
            if getattr(sock, "family", None) not in INET:
                return
            what = f"{event.split('.')[1]} {address!r}"
        elif event in NAME_EVENTS:
            what = f"{event.split('.')[1]} {args[0]!r}"
        else:
            return
        if len(self.attempts) < 1000:
            self.attempts.append(what)
        if self.block:
            raise ConnectionRefusedError(f"network disabled by --block-network ({what})")


# --- inputs, outputs, shards -------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One file to process: where it is, and its name relative to the INPUT it came from."""

    source: Path
    rel: str
    arg: int  # which INPUT, for a deterministic order

    @property
    def uri(self) -> str:
        """The RTTM file id: the relative name with no whitespace (RTTM splits on it)."""
        return re.sub(r"\s", "_", self.rel)


def find_jobs(inputs: Sequence[str], suffix: str = "rttm") -> list[Job]:
    """Every file to process, sorted; raises RunError(EXIT_USAGE) for a missing input,
    no audio at all, or two inputs that would write the same output."""
    jobs: list[Job] = []
    for n, raw in enumerate(inputs):
        path = Path(raw)
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith(".") or Path(name).suffix.lower() not in AUDIO_EXTENSIONS:
                        continue
                    source = Path(folder) / name
                    jobs.append(Job(source, source.relative_to(path).as_posix(), n))
        elif path.exists():
            # A FIFO, socket or device named here is a job too: named and skipped (exit 4)
            # by the loop, like one found in a folder, never opened.
            jobs.append(Job(path, path.name, n))
        else:
            raise RunError(f"{raw}: no such file or folder", EXIT_USAGE)
    if not jobs:
        raise RunError(f"no audio or video files in {', '.join(inputs)} (by extension: "
                           f"{' '.join(sorted(AUDIO_EXTENSIONS))}; name a file to take it "
                           "whatever its extension)", EXIT_USAGE)
    jobs.sort(key=lambda j: (j.arg, j.rel))
    seen: dict[str, Job] = {}
    for job in jobs:
        other = seen.setdefault(job.rel, job)
        if other is not job:
            raise RunError(f"{other.source} and {job.source} would both be written as "
                               f"{job.rel}.{suffix}: pass their common parent folder instead",
                               EXIT_USAGE)
    return jobs


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    source: str  # where it came from: --shard, a Slurm array, an Indexed Job, or none

    def take(self, jobs: Sequence[Job]) -> list[Job]:
        """This shard's share: every count-th file of the sorted list, from index."""
        return list(jobs[self.index::self.count])


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise RunError(f"--shard '{text}': expected I/N, e.g. 0/4 (I counts from 0)",
                           EXIT_USAGE)
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise RunError(f"--shard '{text}': I must be 0 to N-1 and N at least 1",
                           EXIT_USAGE)
    return index, count


def resolve_shard(option: str | None, count_option: int | None,
                  environ: dict[str, str] | Any = os.environ) -> Shard:
    """``--shard I/N``, else a Slurm job array, else a Kubernetes Indexed Job (with
    ``--shard-count``), else the whole list."""
    if option is not None:
        return Shard(*parse_shard(option), "--shard")
    if environ.get("SLURM_ARRAY_TASK_ID") is not None:
        try:
            task = int(environ["SLURM_ARRAY_TASK_ID"])
            low = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
            count = int(environ["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError):
            raise RunError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT/MIN/"
                               "STEP are missing or not numbers; pass --shard I/N",
                               EXIT_USAGE) from None
        index = (task - low) // max(step, 1)
        if count < 1 or not 0 <= index < count:
            raise RunError(f"Slurm array task {task} (min {low}, step {step}) is not one "
                               f"of {count} tasks; pass --shard I/N", EXIT_USAGE)
        return Shard(index, count, "SLURM_ARRAY_TASK_ID")
    if environ.get("JOB_COMPLETION_INDEX") is not None:
        if count_option is None:
            raise RunError("JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job): give "
                               "the Job's completions with --shard-count N", EXIT_USAGE)
        raw = environ["JOB_COMPLETION_INDEX"]
        if not raw.isdigit() or int(raw) >= count_option:
            raise RunError(f"JOB_COMPLETION_INDEX={raw} is not 0 to {count_option - 1} "
                               "(--shard-count)", EXIT_USAGE)
        return Shard(int(raw), count_option, "JOB_COMPLETION_INDEX")
    if count_option is not None:
        raise RunError("--shard-count needs JOB_COMPLETION_INDEX (a Kubernetes Indexed "
                           "Job); elsewhere use --shard I/N", EXIT_USAGE)
    return Shard(0, 1, "none")


def outputs_for(job: Job, out_dir: Path, formats: Sequence[str]) -> dict[str, Path]:
    """``{format: path}``: the input's relative name, extension kept, plus the format's."""
    return {fmt: out_dir / f"{job.rel}.{fmt}" for fmt in formats}


def create_exclusive(folder: Path, name: str) -> tuple[int, Path]:
    """A new file in ``folder`` named ``.<name[:32]>.<random>.tmp``, opened for writing:
    ``(fd, path)``.

    Made with O_EXCL (never through a planted link) and mode 0666, which the kernel narrows
    by the user's umask (and the folder's default ACL) as for any file the user makes:
    outputs of private recordings are as private as the user asked, never widened to 0644
    and never narrowed behind the user's back. (mkstemp makes 0600, and reading the umask
    means setting it: a race with any other thread.) The name's length is bounded, so that
    an output whose own name just fits the file system's limit is not refused for it."""
    for _ in range(100):
        tmp = folder / f".{name[:32]}.{os.urandom(6).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(folder))


def write_atomic(path: Path, text: str) -> None:
    """Write beside the target and rename: a reader never sees half a file. The file's
    mode is what the user's umask gives a new file (``create_exclusive``).

    Text that cannot be UTF-8 (a file name with undecodable bytes, carried as surrogates)
    is written escaped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_exclusive(path.parent, path.name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rttm(uri: str, segments: Iterable[dict[str, Any]]) -> str:
    """Standard RTTM: ``SPEAKER <uri> 1 <start> <duration> <NA> <NA> <speaker> <NA> <NA>``."""
    lines = []
    for s in segments:
        speaker = re.sub(r"\s", "_", str(s["speaker"]))
        lines.append(f"SPEAKER {uri} 1 {s['start']:.3f} {s['end'] - s['start']:.3f} "
                     f"<NA> <NA> {speaker} <NA> <NA>\n")
    return "".join(lines)


# --- decoding ---------------------------------------------------------------------------
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


# --- device ------------------------------------------------------------------------------
def cuda_driver_version() -> tuple[int, int] | None:
    """The CUDA version the installed NVIDIA driver supports, or None without a driver."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, (version.value % 1000) // 10


def driver_too_old(driver: tuple[int, int] | None, built_for: str | None) -> bool:
    """True when the driver cannot run a torch built for CUDA ``built_for`` ("12.8").

    CUDA's minor-version compatibility lets a driver of the same major version run it."""
    if driver is None or not built_for:
        return False
    try:
        major = int(built_for.split(".")[0])
    except ValueError:
        return False
    return driver[0] < major


def choose_device(requested: str, torch: Any, warn: Callable[[str], None]) -> str:
    """``auto`` -> ``cuda`` when torch can use a GPU (and the driver is new enough), else
    ``cpu``. An explicit ``cuda[:N]`` (its form checked by ``check_args``) that cannot be
    used is an error."""
    if requested == "cpu":
        return "cpu"
    built = getattr(torch.version, "cuda", None)
    driver = cuda_driver_version() if built else None
    too_old = driver_too_old(driver, built)
    if requested == "auto":
        if too_old and driver is not None:
            warn(f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]}; this torch was "
                 f"built for CUDA {built}: using the CPU (update the driver to use the GPU)")
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not built:
        raise RunError(f"--device {requested}: this bundle's torch is a CPU-only build",
                           EXIT_CANNOT_RUN)
    if too_old and driver is not None:
        raise RunError(f"--device {requested}: the NVIDIA driver supports CUDA "
                           f"{driver[0]}.{driver[1]}, this torch needs CUDA {built}: update "
                           "the driver or use --device cpu", EXIT_CANNOT_RUN)
    if not torch.cuda.is_available():
        raise RunError(f"--device {requested}: torch sees no usable GPU (driver "
                           f"{'absent' if driver is None else f'{driver[0]}.{driver[1]}'})",
                           EXIT_CANNOT_RUN)
    index = int(requested.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise RunError(f"--device {requested}: this host has "
                           f"{torch.cuda.device_count()} GPU(s)", EXIT_CANNOT_RUN)
    return requested


# --- progress and reporting --------------------------------------------------------------
class Progress:
    """A bar on a terminal, one plain line per file otherwise, nothing with --quiet."""

    def __init__(self, total: int, quiet: bool, stream: Any = sys.stderr,
                 program: str = "diarize") -> None:
        self.total, self.quiet, self.stream, self.program = total, quiet, stream, program
        self.tty = bool(getattr(stream, "isatty", lambda: False)()) and not quiet

    def say(self, line: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"{self.program}: {line}\n")
        self.stream.flush()

    def file(self, n: int, rel: str, line: str) -> None:
        if self.quiet:
            return
        if self.tty:
            width = 30
            filled = width * n // max(self.total, 1)
            self.stream.write(f"\r\x1b[K[{'#' * filled}{'.' * (width - filled)}] "
                              f"{n}/{self.total} {shown(rel)}: {line}")
            if n == self.total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            self.say(f"[{n}/{self.total}] {shown(rel)}: {line}")

    def fail(self, rel: str, reason: str) -> None:
        # Always shown, --quiet included: a failed file must be named.
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"{self.program}: {shown(rel)}: {reason}\n")
        self.stream.flush()


def shown(name: str, limit: int = 300) -> str:
    """A file name as it may appear on a terminal or in a log: control characters and
    undecodable bytes escaped (no forged line, no terminal escape), its length bounded."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in name)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    """An exception as one printable line of bounded length (no forged second line)."""
    text = str(exc) if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Summary:
    """What a run did; ``work`` names the seconds spent on the files ("diarize")."""

    work: str = "diarize"
    files: int = 0
    done: int = 0
    skipped: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    audio_seconds: float = 0.0
    work_seconds: float = 0.0
    load_seconds: float = 0.0
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self, **extra: Any) -> dict[str, Any]:
        return {"ok": not self.failures, "files": self.files, "done": self.done,
                "skipped": self.skipped, "failed": len(self.failures),
                "failures": self.failures,
                "audio_seconds": round(self.audio_seconds, 3),
                "audio_hours": round(self.audio_seconds / 3600, 4),
                "load_seconds": round(self.load_seconds, 3),
                f"{self.work}_seconds": round(self.work_seconds, 3),
                "rtf": (round(self.work_seconds / self.audio_seconds, 4)
                        if self.audio_seconds else None),
                **extra, "outputs": self.outputs}


# --- the command every program shares -----------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        if "required: INPUT" in message or "unrecognized arguments: -" in message:
            # `diarize -call.wav` takes the name for an option.
            message += "; a file whose name starts with '-' goes after --: -- -call.wav"
        raise RunError(f"{message} (see {self.prog} --help)", EXIT_USAGE)


class Program:
    """What one program adds to the shared run: its name, outputs, options, what it loads
    once, and what it makes of one decoded recording. Subclassed by diarize and transcribe."""

    name = "program"
    done = "processed"  # in "every file <done>"
    formats: tuple[str, ...] = ()
    default_formats = ""
    marker = ""  # the format written last: its presence marks a file done
    description = ""
    examples = ""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        """The program's own options."""

    def check(self, args: argparse.Namespace) -> None:
        """Refuse bad values of the program's own options (RunError, EXIT_USAGE)."""

    def load(self, args: argparse.Namespace, say: Callable[[str], None]) -> Any:
        """Load the models once; called only when some file is left to do, and again
        after a timeout interrupted ``process`` (what it returned before is dropped
        first). Returns what ``process`` gets, with ``seconds`` (load time) and
        ``device`` attributes."""
        raise NotImplementedError

    def process(self, loaded: Any, job: Job, waveform: Any, args: argparse.Namespace
                ) -> tuple[dict[str, str], dict[str, Any], str]:
        """One recording -> ({format: text}, fields for the summary's outputs entry, one
        line for progress). Raises FileFailed for what is the file's fault."""
        raise NotImplementedError

    def report(self, loaded: Any) -> dict[str, Any]:
        """Fields the summary adds after the run (versions, device)."""
        return {}


def parser(program: Program) -> argparse.ArgumentParser:
    """The options every program shares, then the program's own."""
    p = _Parser(
        prog=program.name,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=program.description,
        epilog="examples:\n" + program.examples + "\nexit codes:\n"
               + "".join(f"  {code:>3}  {text}\n"
                         for code, text in exit_codes(program.done).items()),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a file, or a folder walked recursively for audio/video files")
    default_dir = {"diarize": "diarization", "transcribe": "transcripts"}.get(
        program.name, program.name)
    p.add_argument("-o", "--output-dir", type=Path, default=Path(default_dir),
                   help="where outputs go, mirroring each INPUT's tree (default: "
                        f"./{default_dir})")
    p.add_argument("--format", default=program.default_formats, metavar="LIST",
                   help=f"outputs per file, comma-separated: {', '.join(program.formats)} "
                        f"(default: {program.default_formats})")
    p.add_argument("--num-speakers", type=int, metavar="N", help="exactly N speakers")
    p.add_argument("--min-speakers", type=int, metavar="N", help="at least N speakers")
    p.add_argument("--max-speakers", type=int, metavar="N", help="at most N speakers")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true",
                   help="redo files whose outputs exist (default: skip them)")
    p.add_argument("--shard", metavar="I/N",
                   help="process only the I-th of N shares of the sorted file list (I from "
                        "0); default: from SLURM_ARRAY_TASK_ID, or JOB_COMPLETION_INDEX "
                        "with --shard-count")
    p.add_argument("--shard-count", type=int, metavar="N",
                   help="the number of shares when JOB_COMPLETION_INDEX (a Kubernetes "
                        "Indexed Job) gives the index")
    p.add_argument("--max-duration", type=float, metavar="SECONDS",
                   default=MAX_DURATION_S,
                   help="refuse a recording longer than this while decoding it, before it "
                        "fills memory (16 kHz float32 is 64 KB a second), name it and go "
                        f"on (default: {MAX_DURATION_S} s, {MAX_DURATION_S / 3600:g} h; 0: "
                        "no limit)")
    p.add_argument("--file-timeout", type=float, metavar="SECONDS",
                   help=f"give up on a file after this long, name it, and go on (default: "
                        f"{DECODE_TIMEOUT_S} s to decode, then {WORK_TIMEOUT_FACTOR}x its "
                        f"duration, at least {MIN_WORK_S} s; 0: no limit)")
    program.add_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object on stdout")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress on stderr (failed files are still named)")
    p.add_argument("--block-network", action="store_true",
                   help="refuse every connection attempt in-process (for hosts that cannot "
                        "disable the network otherwise); attempts are counted either way")
    p.add_argument("--debug", action="store_true", help="tracebacks for failures")
    return p


def check_args(args: argparse.Namespace, program: Program) -> list[str]:
    """The formats asked for, in order; RunError(EXIT_USAGE) for any bad shared option."""
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in program.formats]
    if bad or not formats:
        raise RunError(f"--format '{args.format}': choose from {', '.join(program.formats)}",
                       EXIT_USAGE)
    for name in ("num_speakers", "min_speakers", "max_speakers", "shard_count"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise RunError(f"--{name.replace('_', '-')} must be at least 1", EXIT_USAGE)
    if args.file_timeout is not None and not args.file_timeout >= 0:
        raise RunError("--file-timeout must be 0 (no limit) or more seconds", EXIT_USAGE)
    if not 0 <= args.max_duration < float("inf"):
        raise RunError("--max-duration must be 0 (no limit) or more seconds", EXIT_USAGE)
    if args.num_speakers is not None and (args.min_speakers or args.max_speakers):
        raise RunError("--num-speakers excludes --min-speakers and --max-speakers",
                       EXIT_USAGE)
    if args.min_speakers and args.max_speakers and args.min_speakers > args.max_speakers:
        raise RunError("--min-speakers is larger than --max-speakers", EXIT_USAGE)
    if args.device != "auto" and args.device != "cpu" and not re.fullmatch(
            r"cuda(:\d+)?", args.device):
        raise RunError(f"--device '{args.device}': use auto, cpu, cuda or cuda:N",
                       EXIT_USAGE)
    program.check(args)
    formats = list(dict.fromkeys(formats))
    # The marker last: a file whose marker exists was finished.
    if program.marker in formats:
        formats.remove(program.marker)
        formats.append(program.marker)
    return formats


def speakers(args: argparse.Namespace) -> dict[str, int | None]:
    """The speaker-count options as the pipeline takes them."""
    return {"num_speakers": args.num_speakers, "min_speakers": args.min_speakers,
            "max_speakers": args.max_speakers}


DECODE_TIMEOUT_S = 600  # decoding one file; a decoder that never returns is cut here
# Whatever the program does with one file: this many times its duration, and at least
# MIN_WORK_S (model warm-up on a slow host), unless --file-timeout says otherwise.
WORK_TIMEOUT_FACTOR = 20
MIN_WORK_S = 600
# Output names this file system cannot hold are the file's failure, not the batch's.
NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL})


class FileTimeout(FileFailed):
    """One file took longer than its deadline; the run goes on with the next."""


def work_timeout(seconds: float) -> float:
    return max(MIN_WORK_S, WORK_TIMEOUT_FACTOR * seconds)


def limit(option: float | None, default: float) -> float:
    """--file-timeout's value: the default when not given, 0 for no limit."""
    return default if option is None else option


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise FileTimeout in this (the main) thread when ``seconds`` pass: a read that
    blocks (a FIFO that slipped in) or a decoder that never returns ends the file, not the
    batch. SIGALRM interrupts a blocked system call; Python code resumes to raise."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(_signum: int, _frame: Any) -> None:
        raise FileTimeout(f"{what} took longer than {seconds:.0f} s (--file-timeout)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def regular_file(path: Path) -> None:
    """FileFailed unless ``path`` is a regular file: a FIFO would block the first read
    forever, a device would be read without end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise FileFailed(f"cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise FileFailed(f"{kind}, not a recording: skipped")


def is_file(path: Path) -> bool:
    """Path.is_file, and False for a name the file system cannot even look up (too long):
    that file is not done, and fails alone when its outputs are written."""
    try:
        return path.is_file()
    except OSError:
        return False


def write_outputs(outs: dict[str, Path], texts: dict[str, str]) -> None:
    """Each output, atomically, the marker last. A name this file system cannot hold (too
    long, bytes it refuses) fails this file alone, and its outputs written so far are
    removed; a full disk or a permission fails the run (EXIT_OUTPUT)."""
    written: list[Path] = []
    try:
        for fmt, path in outs.items():
            write_atomic(path, texts[fmt])
            written.append(path)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if exc.errno in NAME_ERRNOS:
            raise FileFailed(f"cannot write its output {shown(path.name)}: "
                             f"{exc.strerror or exc}") from None
        raise RunError(f"cannot write {shown(str(path))}: {exc.strerror or exc}",
                       EXIT_OUTPUT) from None


def run(program: Program, args: argparse.Namespace, audit: NetworkAudit,
        started: float) -> tuple[int, dict[str, Any]]:
    """The shared run: find, shard, skip what is done, load once, then each file in turn
    (decoded once, processed, its outputs written atomically, the marker last)."""
    formats = check_args(args, program)
    shard = resolve_shard(args.shard, args.shard_count)
    jobs = shard.take(find_jobs(args.inputs, formats[-1]))
    out_dir: Path = args.output_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=f".{program.name}-",
                                            delete=True)
        probe.close()
    except OSError as exc:
        raise RunError(f"cannot write to {out_dir}: {exc.strerror or exc}",
                       EXIT_OUTPUT) from None
    progress = Progress(len(jobs), args.quiet, program=program.name)
    summary = Summary(work=program.name, files=len(jobs))
    todo = []
    for job in jobs:
        outs = outputs_for(job, out_dir, formats)
        if not args.overwrite and all(is_file(p) for p in outs.values()):
            summary.skipped += 1
        else:
            todo.append((job, outs))
    extra: dict[str, Any] = {"shard": {"index": shard.index, "count": shard.count,
                                       "from": shard.source},
                             "output_dir": str(out_dir), "formats": formats}
    if shard.source != "none" or summary.skipped:
        progress.say(f"{len(jobs)} file(s) in shard {shard.index}/{shard.count} "
                     f"({shard.source}); {summary.skipped} already done")
    loaded = None
    if todo:
        loaded = program.load(args, progress.say)
        summary.load_seconds = loaded.seconds
    reloads = 0
    interrupted = False  # a timeout fired inside the models' code
    waveform = None
    for n, (job, outs) in enumerate(todo, summary.skipped + 1):
        # The last file's samples go before the next file's come (and before any reload):
        # one recording in memory at a time, as --max-duration promises.
        waveform = None
        if interrupted:
            # SIGALRM raised FileTimeout wherever Python was in pyannote or faster-whisper:
            # a cache, a hook or a batch may be half-updated. The next file gets models
            # loaded afresh, never that state; the old ones are dropped first, so that two
            # sets of models are never in memory at once.
            progress.say("reloading the models: a timeout interrupted them on the previous "
                         "file, which may have left them half-updated")
            loaded = None
            gc.collect()
            loaded = program.load(args, progress.say)
            summary.load_seconds += loaded.seconds
            reloads += 1
            interrupted = False
        t0 = time.perf_counter()
        try:
            regular_file(job.source)
            with deadline(limit(args.file_timeout, DECODE_TIMEOUT_S), "decoding"):
                waveform = decode(job.source, args.max_duration)
            seconds = len(waveform) / SAMPLE_RATE
            if seconds == 0:
                raise FileFailed("no audio samples")
            t1 = time.perf_counter()
            with deadline(limit(args.file_timeout, work_timeout(seconds)), program.name):
                try:
                    texts, fields, line = program.process(loaded, job, waveform, args)
                except FileTimeout:
                    interrupted = True
                    raise
            t2 = time.perf_counter()
            write_outputs(outs, texts)
        except FileFailed as exc:
            summary.failures.append({"file": job.rel, "error": str(exc)})
            progress.fail(job.rel, str(exc))
            continue
        except (KeyboardInterrupt, SystemExit, RunError):
            raise  # the run's end (RunError: an output folder that cannot be written)
        except Exception as exc:  # noqa: BLE001 - one file's failure must not stop the rest
            if args.debug:
                traceback.print_exc()
            reason = f"{program.name} failed: {type(exc).__name__}: {one_line(exc)}"
            summary.failures.append({"file": job.rel, "error": reason})
            progress.fail(job.rel, reason)
            continue
        summary.done += 1
        summary.audio_seconds += seconds
        summary.work_seconds += t2 - t0
        summary.outputs.append({"file": job.rel, **{f: str(p) for f, p in outs.items()},
                                **fields, "audio_seconds": round(seconds, 3),
                                "decode_seconds": round(t1 - t0, 3),
                                "seconds": round(t2 - t0, 3)})
        rtf = (t2 - t0) / seconds if seconds else 0.0
        progress.file(n, job.rel, f"{seconds:.1f} s of audio in {t2 - t0:.1f} s "
                                  f"(RTF {rtf:.2f}), {line}")
    import resource

    extra.update({
        "wall_seconds": round(time.perf_counter() - started, 3),
        "device": loaded.device if loaded else None,
        **program.report(loaded),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "network_attempts": len(audit.attempts),
        "network_attempt_details": audit.attempts[:10],
        "model_reloads": reloads,
    })
    report = summary.as_dict(**extra)
    return (EXIT_SOME_FAILED if summary.failures else EXIT_OK), report


def render(program: Program, report: dict[str, Any]) -> str:
    lines = [f"{program.name}: {report['done']} done, {report['skipped']} skipped, "
             f"{report['failed']} failed of {report['files']} file(s); "
             f"{report['audio_hours']:.3f} h of audio in {report['wall_seconds']:.1f} s; "
             f"outputs in {report['output_dir']}"]
    for f in report["failures"]:
        lines.append(f"failed: {shown(f['file'])}: {f['error']}")
    if report["network_attempts"]:
        lines.append(f"network: {report['network_attempts']} connection attempt(s), first: "
                     f"{report['network_attempt_details'][0]}")
    return "\n".join(lines)


def main(program: Program, argv: Sequence[str] | None = None) -> int:
    """Parse, run and report for ``program``; every failure is one line and an exit code."""
    started = time.perf_counter()
    go_offline()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser(program).parse_args(argv)  # --help exits here, on stdout
    except RunError as exc:
        print(f"{program.name}: error: {exc}", file=sys.stderr)
        return exc.code
    audit = NetworkAudit(block=args.block_network)
    sys.addaudithook(audit)
    # stdout carries the summary alone (scripts parse --json): whatever the libraries print,
    # from Python or C, goes to stderr while the files are processed.
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        code, report = run(program, args, audit, started)
    except RunError as exc:
        print(f"{program.name}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{program.name}: interrupted (files already written are complete; re-run to "
              "go on)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"{program.name}: internal error: {type(exc).__name__}: {one_line(exc)} "
              "(rerun with --debug)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
    print(json.dumps(report) if args.json else render(program, report), flush=True)
    return code
