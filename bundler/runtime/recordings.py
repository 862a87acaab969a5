"""The per-file loop every program that processes recordings shares, and its command line.

``bin/diarize`` and ``bin/transcribe`` (``runtime/diarize.py``, ``runtime/transcribe.py``)
each keep only their own work: what to load and what to make of one recording (a
``Program``). Here, once: the options every program shares, the loop that skips finished
files, decodes each once, gives each a deadline and names failed ones, progress, the
summary and the exit codes. The rooms it goes through are its siblings: ``offline.py`` (the
offline environment and the connection-attempt count), ``inputs.py`` (files and shards),
``audio.py`` (decoding without FFmpeg), ``devices.py``, ``outputs.py`` (names, RTTM, atomic
writes), ``exits.py`` and ``common.py``.

Shipped verbatim in every bundle (``runtime/recordings.py``, listed in SHA256SUMS) beside
the programs, which import it from their own folder. Standard library only up to the
decoders and the models, and Python 3.9: argument errors, sharding and output names are
settled before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .audio import MAX_DURATION_S, SAMPLE_RATE, decode
from .common import one_line, shown
from .exits import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    FileFailed,
    RunError,
    exit_codes,
)
from .inputs import Job, find_jobs, resolve_shard
from .offline import NetworkAudit, go_offline
from .outputs import is_file, outputs_for, write_outputs


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
