"""diarize: who spoke when, for the recordings people have, on an isolated host.

    PREFIX/bin/diarize [OPTIONS] INPUT...

Shipped verbatim in every bundle (``runtime/diarize.py``, listed in SHA256SUMS) and run by
``PREFIX/bin/diarize`` with the install's own venv. Each INPUT is a file or a folder,
walked recursively for audio and video files by extension. For every file it writes
``OUTPUT_DIR/<path relative to its INPUT>.rttm`` (``meetings/a.m4a`` ->
``OUTPUT_DIR/meetings/a.m4a.rttm``), and ``.json`` with ``--format rttm,json``.

Decoding needs no FFmpeg on the host: soundfile (libsndfile, inside its wheel) reads wav,
flac, ogg and mp3; PyAV (FFmpeg's libraries, inside its wheel) reads the rest (m4a/AAC,
mp4/mov/mkv, webm/opus, ...) and resamples. Every file becomes 16 kHz mono float32 in
memory and goes to the pipeline as a waveform, loaded once per process.

Offline by construction: the variables that keep huggingface_hub and pyannote's
telemetry off the network are set before either is imported, caches go to a writable
per-user folder (never the prefix), and every connection attempt the process makes is
counted (``network_attempts`` in ``--json``); ``--block-network`` refuses them too.

Up to the pipeline, this file needs only the standard library: argument errors, sharding
and output names are settled before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

# The offline variables: the one list (layout.OFFLINE_ENV on the build side and configure.py,
# for pyannote.env and the venv's defaults, read it from here). Forced here, not defaulted:
# this program never needs the network.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYANNOTE_METRICS_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
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
FORMATS = ("rttm", "json")

# Exit codes (a contract: batch schedulers and scripts read them).
EXIT_OK = 0  # every file diarized, or already done
EXIT_INTERNAL = 1  # a bug: rerun with --debug
EXIT_USAGE = 2  # bad arguments, an input that does not exist, no audio files found
EXIT_CANNOT_RUN = 3  # nothing could run: config or model missing, pipeline or device unusable
EXIT_SOME_FAILED = 4  # some files could not be decoded or diarized; the others are done
EXIT_OUTPUT = 5  # the output folder cannot be written
EXIT_INTERRUPTED = 130
EXIT_CODES = {
    EXIT_OK: "every file diarized (or already done)",
    EXIT_INTERNAL: "internal error (rerun with --debug)",
    EXIT_USAGE: "bad usage: arguments, a missing input, no audio files",
    EXIT_CANNOT_RUN: "nothing could run: config, model, pipeline or device unusable",
    EXIT_SOME_FAILED: "some files failed (each named on stderr); the others are done",
    EXIT_OUTPUT: "the output folder cannot be written",
    EXIT_INTERRUPTED: "interrupted",
}


class DiarizeError(Exception):
    """A failure that stops the run: one line for the operator, and its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class FileFailed(Exception):
    """One file could not be decoded or diarized; the run goes on."""


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
            raise ConnectionRefusedError(f"network disabled by diarize --block-network ({what})")


# --- inputs, outputs, shards -------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One file to diarize: where it is, and its name relative to the INPUT it came from."""

    source: Path
    rel: str
    arg: int  # which INPUT, for a deterministic order

    @property
    def uri(self) -> str:
        """The RTTM file id: the relative name with no whitespace (RTTM splits on it)."""
        return re.sub(r"\s", "_", self.rel)


def find_jobs(inputs: Sequence[str]) -> list[Job]:
    """Every file to diarize, sorted; raises DiarizeError(EXIT_USAGE) for a missing input,
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
        elif path.is_file():
            jobs.append(Job(path, path.name, n))
        elif path.exists():
            raise DiarizeError(f"{raw}: not a file or a folder", EXIT_USAGE)
        else:
            raise DiarizeError(f"{raw}: no such file or folder", EXIT_USAGE)
    if not jobs:
        raise DiarizeError(f"no audio or video files in {', '.join(inputs)} (by extension: "
                           f"{' '.join(sorted(AUDIO_EXTENSIONS))}; name a file to take it "
                           "whatever its extension)", EXIT_USAGE)
    jobs.sort(key=lambda j: (j.arg, j.rel))
    seen: dict[str, Job] = {}
    for job in jobs:
        other = seen.setdefault(job.rel, job)
        if other is not job:
            raise DiarizeError(f"{other.source} and {job.source} would both be written as "
                               f"{job.rel}.rttm: pass their common parent folder instead",
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
        raise DiarizeError(f"--shard '{text}': expected I/N, e.g. 0/4 (I counts from 0)",
                           EXIT_USAGE)
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise DiarizeError(f"--shard '{text}': I must be 0 to N-1 and N at least 1",
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
            raise DiarizeError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT/MIN/"
                               "STEP are missing or not numbers; pass --shard I/N",
                               EXIT_USAGE) from None
        index = (task - low) // max(step, 1)
        if count < 1 or not 0 <= index < count:
            raise DiarizeError(f"Slurm array task {task} (min {low}, step {step}) is not one "
                               f"of {count} tasks; pass --shard I/N", EXIT_USAGE)
        return Shard(index, count, "SLURM_ARRAY_TASK_ID")
    if environ.get("JOB_COMPLETION_INDEX") is not None:
        if count_option is None:
            raise DiarizeError("JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job): give "
                               "the Job's completions with --shard-count N", EXIT_USAGE)
        raw = environ["JOB_COMPLETION_INDEX"]
        if not raw.isdigit() or int(raw) >= count_option:
            raise DiarizeError(f"JOB_COMPLETION_INDEX={raw} is not 0 to {count_option - 1} "
                               "(--shard-count)", EXIT_USAGE)
        return Shard(int(raw), count_option, "JOB_COMPLETION_INDEX")
    if count_option is not None:
        raise DiarizeError("--shard-count needs JOB_COMPLETION_INDEX (a Kubernetes Indexed "
                           "Job); elsewhere use --shard I/N", EXIT_USAGE)
    return Shard(0, 1, "none")


def outputs_for(job: Job, out_dir: Path, formats: Sequence[str]) -> dict[str, Path]:
    """``{format: path}``: the input's relative name, extension kept, plus the format's."""
    return {fmt: out_dir / f"{job.rel}.{fmt}" for fmt in formats}


def write_atomic(path: Path, text: str) -> None:
    """Write beside the target and rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rttm(uri: str, segments: Iterable[dict[str, Any]]) -> str:
    """Standard RTTM: ``SPEAKER <uri> 1 <start> <duration> <NA> <NA> <speaker> <NA> <NA>``."""
    lines = []
    for s in segments:
        speaker = re.sub(r"\s", "_", str(s["speaker"]))
        lines.append(f"SPEAKER {uri} 1 {s['start']:.3f} {s['end'] - s['start']:.3f} "
                     f"<NA> <NA> {speaker} <NA> <NA>\n")
    return "".join(lines)


# --- decoding ----------------------------------------------------------------------------
def decode(path: Path) -> Any:
    """The file's audio as 16 kHz mono float32 (a 1-D numpy array); FileFailed if it cannot
    be read. soundfile first for the formats libsndfile reads at 16 kHz already, PyAV for
    everything else and for resampling."""
    import numpy as np

    problems = []
    if path.suffix.lower() in SOUNDFILE_EXTENSIONS:
        import soundfile

        try:
            if soundfile.info(str(path)).samplerate == SAMPLE_RATE:
                data, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
                return np.ascontiguousarray(data.mean(axis=1), dtype=np.float32)
        except (RuntimeError, OSError, ValueError, TypeError) as exc:  # LibsndfileError
            problems.append(f"soundfile: {one_line(exc)}")
    try:
        return decode_av(path)
    except FileFailed as exc:
        problems.append(str(exc))
    except ModuleNotFoundError:
        problems.append("PyAV (av) is not installed in this bundle's venv")
    raise FileFailed("cannot decode: " + "; ".join(problems))


def decode_av(path: Path) -> Any:
    import av
    import numpy as np

    chunks = []
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise FileFailed("PyAV: the file has no audio track")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except FileFailed:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        # FFmpeg's errors carry an errno and the path: the reason alone reads better.
        raise FileFailed(f"PyAV: {one_line(getattr(exc, 'strerror', None) or exc)}") from None
    if not chunks:
        raise FileFailed("PyAV: no audio samples")
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


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
        raise DiarizeError(f"--device {requested}: this bundle's torch is a CPU-only build",
                           EXIT_CANNOT_RUN)
    if too_old and driver is not None:
        raise DiarizeError(f"--device {requested}: the NVIDIA driver supports CUDA "
                           f"{driver[0]}.{driver[1]}, this torch needs CUDA {built}: update "
                           "the driver or use --device cpu", EXIT_CANNOT_RUN)
    if not torch.cuda.is_available():
        raise DiarizeError(f"--device {requested}: torch sees no usable GPU (driver "
                           f"{'absent' if driver is None else f'{driver[0]}.{driver[1]}'})",
                           EXIT_CANNOT_RUN)
    index = int(requested.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise DiarizeError(f"--device {requested}: this host has "
                           f"{torch.cuda.device_count()} GPU(s)", EXIT_CANNOT_RUN)
    return requested


# --- the pipeline ------------------------------------------------------------------------
def check_config(config: Path) -> None:
    """A missing config or model file named before pyannote takes it for a Hub id (trap 3)."""
    import yaml

    if not config.is_file():
        raise DiarizeError(f"config not found: {config} (pass --config, or re-run "
                           "install.sh)", EXIT_CANNOT_RUN)
    try:
        data = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DiarizeError(f"cannot read {config}: {one_line(exc)}", EXIT_CANNOT_RUN) from None
    params = data.get("pipeline", {}).get("params", {}) if isinstance(data, dict) else {}
    for key in ("segmentation", "embedding", "plda"):
        value = params.get(key)
        if isinstance(value, dict) and isinstance(value.get("checkpoint"), str):
            value = str(Path(value["checkpoint"]) / str(value.get("subfolder", "")))
        if not isinstance(value, str):
            continue
        value = value.replace("$model", str(config.parent))
        if value.startswith("/") and not Path(value).exists():
            raise DiarizeError(f"{key} model not found: {value} (named in {config})",
                               EXIT_CANNOT_RUN)


@dataclass
class Loaded:
    pipeline: Any
    torch: Any
    device: str
    pyannote_audio: str
    seconds: float


def load_pipeline(config: Path, device: str, batch: dict[str, int | None],
                  warn: Callable[[str], None]) -> Loaded:
    check_config(config)
    t0 = time.perf_counter()
    import warnings

    # pyannote 4 warns at import that torchcodec cannot load FFmpeg: diarize never asks
    # torchcodec for anything (it decodes itself), so that warning would only mislead.
    warnings.filterwarnings("ignore", message=r"(?s).*torchcodec")
    try:
        import torch
        from pyannote.audio import Pipeline
        from pyannote.audio import __version__ as version
    except ImportError as exc:
        raise DiarizeError(f"cannot import pyannote.audio from this venv: {one_line(exc)}",
                           EXIT_CANNOT_RUN) from None
    chosen = choose_device(device, torch, warn)
    try:
        pipeline = Pipeline.from_pretrained(str(config))
    except Exception as exc:  # noqa: BLE001 - any load failure means nothing can run
        raise DiarizeError(f"cannot load the pipeline from {config}: {one_line(exc)}",
                           EXIT_CANNOT_RUN) from None
    if pipeline is None:  # pyannote 3.x prints and returns None on a failed load (trap 3)
        raise DiarizeError(f"cannot load the pipeline from {config} (pyannote returned "
                           "None; see above)", EXIT_CANNOT_RUN)
    for attr, value in batch.items():
        if value is not None and hasattr(pipeline, attr):
            setattr(pipeline, attr, value)
    if chosen != "cpu":
        pipeline.to(torch.device(chosen))
    return Loaded(pipeline, torch, chosen, str(version), time.perf_counter() - t0)


def diarize_one(loaded: Loaded, waveform: Any, uri: str,
                speakers: dict[str, int | None]) -> dict[str, Any]:
    """Run the pipeline on one waveform; the segments (and 4.x's exclusive ones)."""
    tensor = loaded.torch.from_numpy(waveform).unsqueeze(0)
    kwargs = {k: v for k, v in speakers.items() if v is not None}
    output = loaded.pipeline({"waveform": tensor, "sample_rate": SAMPLE_RATE, "uri": uri},
                             **kwargs)
    annotation = getattr(output, "speaker_diarization", output)  # 4.x DiarizeOutput / 3.x
    result: dict[str, Any] = {"segments": _segments(annotation)}
    exclusive = getattr(output, "exclusive_speaker_diarization", None)
    if exclusive is not None:
        result["exclusive_segments"] = _segments(exclusive)
    return result


def _segments(annotation: Any) -> list[dict[str, Any]]:
    return [{"start": round(float(turn.start), 3), "end": round(float(turn.end), 3),
             "speaker": str(label)}
            for turn, _, label in annotation.itertracks(yield_label=True)]


# --- progress and reporting --------------------------------------------------------------
class Progress:
    """A bar on a terminal, one plain line per file otherwise, nothing with --quiet."""

    def __init__(self, total: int, quiet: bool, stream: Any = sys.stderr) -> None:
        self.total, self.quiet, self.stream = total, quiet, stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)()) and not quiet

    def say(self, line: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"diarize: {line}\n")
        self.stream.flush()

    def file(self, n: int, rel: str, line: str) -> None:
        if self.quiet:
            return
        if self.tty:
            width = 30
            filled = width * n // max(self.total, 1)
            self.stream.write(f"\r\x1b[K[{'#' * filled}{'.' * (width - filled)}] "
                              f"{n}/{self.total} {rel}: {line}")
            if n == self.total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            self.say(f"[{n}/{self.total}] {rel}: {line}")

    def fail(self, rel: str, reason: str) -> None:
        # Always shown, --quiet included: a failed file must be named.
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"diarize: {rel}: {reason}\n")
        self.stream.flush()


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    """An exception as one printable line of bounded length (no forged second line)."""
    text = str(exc) if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Summary:
    files: int = 0
    done: int = 0
    skipped: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    audio_seconds: float = 0.0
    diarize_seconds: float = 0.0
    load_seconds: float = 0.0
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self, **extra: Any) -> dict[str, Any]:
        return {"ok": not self.failures, "files": self.files, "done": self.done,
                "skipped": self.skipped, "failed": len(self.failures),
                "failures": self.failures,
                "audio_seconds": round(self.audio_seconds, 3),
                "audio_hours": round(self.audio_seconds / 3600, 4),
                "load_seconds": round(self.load_seconds, 3),
                "diarize_seconds": round(self.diarize_seconds, 3),
                "rtf": (round(self.diarize_seconds / self.audio_seconds, 4)
                        if self.audio_seconds else None),
                **extra, "outputs": self.outputs}


# --- the command -------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise DiarizeError(f"{message} (see diarize --help)", EXIT_USAGE)


def parser(default_config: Path) -> argparse.ArgumentParser:
    p = _Parser(
        prog="diarize",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Who spoke when: an RTTM file for each recording, offline, with this "
                    "bundle's pipeline.\nReads wav, flac, ogg, mp3, m4a/AAC, mp4, mov, mkv, "
                    "webm/opus and more, with no FFmpeg on the host.",
        epilog="examples:\n"
               "  diarize call.mp3                          -> diarization/call.mp3.rttm\n"
               "  diarize /srv/meetings --output-dir /srv/rttm --format rttm,json\n"
               "  diarize /srv/corpus --shard 3/16          # the 4th of 16 shares\n"
               "  sbatch --array=0-15 ...  diarize /srv/corpus   # shard from Slurm\n"
               "\nexit codes:\n"
               + "".join(f"  {code:>3}  {text}\n" for code, text in EXIT_CODES.items()),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a file, or a folder walked recursively for audio/video files")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("diarization"),
                   help="where outputs go, mirroring each INPUT's tree (default: "
                        "./diarization)")
    p.add_argument("--format", default="rttm", metavar="LIST",
                   help="outputs per file, comma-separated: rttm, json (default: rttm)")
    p.add_argument("--num-speakers", type=int, metavar="N", help="exactly N speakers")
    p.add_argument("--min-speakers", type=int, metavar="N", help="at least N speakers")
    p.add_argument("--max-speakers", type=int, metavar="N", help="at most N speakers")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--config", type=Path, default=default_config,
                   help=f"the pipeline config (default: {default_config})")
    p.add_argument("--overwrite", action="store_true",
                   help="redo files whose outputs exist (default: skip them)")
    p.add_argument("--shard", metavar="I/N",
                   help="process only the I-th of N shares of the sorted file list (I from "
                        "0); default: from SLURM_ARRAY_TASK_ID, or JOB_COMPLETION_INDEX "
                        "with --shard-count")
    p.add_argument("--shard-count", type=int, metavar="N",
                   help="the number of shares when JOB_COMPLETION_INDEX (a Kubernetes "
                        "Indexed Job) gives the index")
    p.add_argument("--embedding-batch-size", type=int, metavar="N",
                   help="lower it to use less memory (default: the config's)")
    p.add_argument("--segmentation-batch-size", type=int, metavar="N",
                   help="lower it to use less memory (default: the config's)")
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object on stdout")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress on stderr (failed files are still named)")
    p.add_argument("--block-network", action="store_true",
                   help="refuse every connection attempt in-process (for hosts that cannot "
                        "disable the network otherwise); attempts are counted either way")
    p.add_argument("--debug", action="store_true", help="tracebacks for failures")
    return p


def check_args(args: argparse.Namespace) -> list[str]:
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise DiarizeError(f"--format '{args.format}': choose from {', '.join(FORMATS)}",
                           EXIT_USAGE)
    for name in ("num_speakers", "min_speakers", "max_speakers", "embedding_batch_size",
                 "segmentation_batch_size", "shard_count"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DiarizeError(f"--{name.replace('_', '-')} must be at least 1", EXIT_USAGE)
    if args.num_speakers is not None and (args.min_speakers or args.max_speakers):
        raise DiarizeError("--num-speakers excludes --min-speakers and --max-speakers",
                           EXIT_USAGE)
    if args.min_speakers and args.max_speakers and args.min_speakers > args.max_speakers:
        raise DiarizeError("--min-speakers is larger than --max-speakers", EXIT_USAGE)
    if args.device != "auto" and args.device != "cpu" and not re.fullmatch(
            r"cuda(:\d+)?", args.device):
        raise DiarizeError(f"--device '{args.device}': use auto, cpu, cuda or cuda:N",
                           EXIT_USAGE)
    return list(dict.fromkeys(formats))


def run(args: argparse.Namespace, audit: NetworkAudit, started: float) -> tuple[int, dict]:
    formats = check_args(args)
    shard = resolve_shard(args.shard, args.shard_count)
    jobs = shard.take(find_jobs(args.inputs))
    out_dir: Path = args.output_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".diarize-", delete=True)
        probe.close()
    except OSError as exc:
        raise DiarizeError(f"cannot write to {out_dir}: {exc.strerror or exc}",
                           EXIT_OUTPUT) from None
    progress = Progress(len(jobs), args.quiet)
    summary = Summary(files=len(jobs))
    todo = []
    for job in jobs:
        outs = outputs_for(job, out_dir, formats)
        if not args.overwrite and all(p.is_file() for p in outs.values()):
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
        loaded = load_pipeline(args.config, args.device,
                               {"embedding_batch_size": args.embedding_batch_size,
                                "segmentation_batch_size": args.segmentation_batch_size},
                               progress.say)
        summary.load_seconds = loaded.seconds
        progress.say(f"pipeline loaded in {loaded.seconds:.1f} s on {loaded.device} "
                     f"(pyannote.audio {loaded.pyannote_audio})")
    speakers = {"num_speakers": args.num_speakers, "min_speakers": args.min_speakers,
                "max_speakers": args.max_speakers}
    for n, (job, outs) in enumerate(todo, summary.skipped + 1):
        assert loaded is not None
        t0 = time.perf_counter()
        try:
            waveform = decode(job.source)
            seconds = len(waveform) / SAMPLE_RATE
            if seconds == 0:
                raise FileFailed("no audio samples")
            t1 = time.perf_counter()
            result = diarize_one(loaded, waveform, job.uri, speakers)
            t2 = time.perf_counter()
        except FileFailed as exc:
            summary.failures.append({"file": job.rel, "error": str(exc)})
            progress.fail(job.rel, str(exc))
            continue
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - one file's failure must not stop the rest
            if args.debug:
                traceback.print_exc()
            reason = f"diarization failed: {type(exc).__name__}: {one_line(exc)}"
            summary.failures.append({"file": job.rel, "error": reason})
            progress.fail(job.rel, reason)
            continue
        segments = result["segments"]
        labels = sorted({s["speaker"] for s in segments})
        record = {"file": job.rel, "uri": job.uri, "source": str(job.source),
                  "audio_seconds": round(seconds, 3), "sample_rate": SAMPLE_RATE,
                  "speakers": labels, **result, "pyannote_audio": loaded.pyannote_audio,
                  "config": str(args.config)}
        try:
            if "json" in outs:
                write_atomic(outs["json"], json.dumps(record, indent=1) + "\n")
            if "rttm" in outs:  # last: its presence marks the file done
                write_atomic(outs["rttm"], rttm(job.uri, segments))
        except OSError as exc:
            raise DiarizeError(f"cannot write {outs[formats[0]]}: {exc.strerror or exc}",
                               EXIT_OUTPUT) from None
        summary.done += 1
        summary.audio_seconds += seconds
        summary.diarize_seconds += t2 - t0
        summary.outputs.append({"file": job.rel, **{f: str(p) for f, p in outs.items()},
                                "segments": len(segments), "speakers": len(labels),
                                "audio_seconds": round(seconds, 3),
                                "decode_seconds": round(t1 - t0, 3),
                                "seconds": round(t2 - t0, 3)})
        rtf = (t2 - t0) / seconds if seconds else 0.0
        progress.file(n, job.rel, f"{seconds:.1f} s of audio in {t2 - t0:.1f} s "
                                  f"(RTF {rtf:.2f}), {len(labels)} speaker(s)")
    import resource

    extra.update({
        "wall_seconds": round(time.perf_counter() - started, 3),
        "device": loaded.device if loaded else None,
        "pyannote_audio": loaded.pyannote_audio if loaded else None,
        "torch": str(loaded.torch.__version__) if loaded else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "network_attempts": len(audit.attempts),
        "network_attempt_details": audit.attempts[:10],
    })
    report = summary.as_dict(**extra)
    return (EXIT_SOME_FAILED if summary.failures else EXIT_OK), report


def render(report: dict[str, Any]) -> str:
    lines = [f"diarize: {report['done']} done, {report['skipped']} skipped, "
             f"{report['failed']} failed of {report['files']} file(s); "
             f"{report['audio_hours']:.3f} h of audio in {report['wall_seconds']:.1f} s; "
             f"outputs in {report['output_dir']}"]
    for f in report["failures"]:
        lines.append(f"failed: {f['file']}: {f['error']}")
    if report["network_attempts"]:
        lines.append(f"network: {report['network_attempts']} connection attempt(s), first: "
                     f"{report['network_attempt_details'][0]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    go_offline()
    argv = list(sys.argv[1:] if argv is None else argv)
    default_config = Path(__file__).resolve().parent.parent / "config.yaml"
    try:
        args = parser(default_config).parse_args(argv)  # --help exits here, on stdout
    except DiarizeError as exc:
        print(f"diarize: error: {exc}", file=sys.stderr)
        return exc.code
    audit = NetworkAudit(block=args.block_network)
    sys.addaudithook(audit)
    # stdout carries the summary alone (scripts parse --json): whatever the libraries print,
    # from Python or C, goes to stderr while the files are processed.
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        code, report = run(args, audit, started)
    except DiarizeError as exc:
        print(f"diarize: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("diarize: interrupted (files already written are complete; re-run to go on)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"diarize: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with "
              "--debug)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
    print(json.dumps(report) if args.json else render(report), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
