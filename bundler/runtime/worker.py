"""One of ``bin/serve``'s workers: loads the bundle's models once, then takes jobs from the
store for as long as the server lives, each one exactly as ``bin/transcribe`` (or
``bin/diarize``) does a file: the same decoding, deadlines, models and code, so a result
from the service is the document the command line writes for the same recording.

    python -I runtime/worker.py CONFIG_JSON

Started by ``serve.py`` (never by hand), which passes its settings as one JSON argument.
The worker talks to the server through two pipes: a byte on stdin means "a job is waiting"
(EOF: the server is gone, stop), and each event (``ready``, ``claimed``, ``finished``) is
one JSON line on the stdout it was started with; whatever the libraries print goes to
stderr. It dies with the server (``PR_SET_PDEATHSIG``); a job it held is then claimed again
once its lease runs out (at the next start for the embedded store). SIGTERM drains: the
job in hand is finished, then the worker exits.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

if not __package__:  # run as a file: its folder is the package (runtime/_bootstrap.py)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    __package__ = __import__("_bootstrap").package(__file__)

from . import (
    diarize,
    enroll,
    exits,
    inputs,
    jobstore,
    recordings,
    stores,
    transcribe,
    voiceprints,
)
from .audio import SAMPLE_RATE, TooLong, decode
from .common import one_line, shown
from .offline import NetworkAudit, go_offline

LEASE_S = 60.0  # a job's lease (bin/serve --job-lease); renewed every third of it while held
IDLE_POLL_S = 2.0  # look at the store this often when no wake-up comes (another server's jobs)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when the server dies (Linux), so no worker outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the server died before the call above
        os._exit(0)


class Events:
    """The JSON lines the server reads, on the stdout this process started with."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self.fd = os.dup(1)
        os.dup2(2, 1)  # what libraries print goes to stderr, never into the event stream
        self.lock = threading.Lock()

    def send(self, event: str, **fields: Any) -> None:
        line = (json.dumps({"event": event, **fields}) + "\n").encode()
        with self.lock:
            os.write(self.fd, line)


class Worker:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.id = str(config["id"])
        # How long a job held by a dead replica waits before another takes it.
        self.lease = float(config.get("lease") or LEASE_S)
        self.state = Path(config["state_dir"])
        self.uploads = self.state / "uploads"
        self.store = stores.open_store(config.get("store"), self.state)
        self.model = transcribe.bundled_model()
        self.program: recordings.Program = (transcribe.Transcribe(self.model) if self.model
                                            else diarize.Diarize())
        self.args = self._base_args(config.get("options") or [])
        self.loaded: Any = None
        self._embedding_model: Optional[voiceprints.EmbeddingModel] = None
        self.draining = False
        self.reload = False  # a timeout interrupted the models: load them afresh
        self.events = Events()
        # Reaching a shared store is the one lookup a worker is told to make.
        self.audit = NetworkAudit(allow=jobstore.store_hosts(config.get("store")))

    def _base_args(self, options: list[str]) -> argparse.Namespace:
        """The program's own options, as ``bin/transcribe`` parses them (one placeholder
        input: the recordings come from the store)."""
        args = recordings.parser(self.program).parse_args(["-", *options])
        recordings.check_args(args, self.program)
        return args

    def say(self, line: str) -> None:
        print(f"serve: worker {self.id}: {line}", file=sys.stderr, flush=True)

    def load(self) -> None:
        self.loaded = None
        gc.collect()
        self.loaded = self.program.load(self.args, self.say)
        report = self.program.report(self.loaded)
        self.events.send("ready", seconds=round(self.loaded.seconds, 3),
                         device=self.loaded.device, engine=report.get("engine"),
                         pid=os.getpid())

    # --- one job ------------------------------------------------------------------------
    def job_args(self, job: jobstore.Job) -> argparse.Namespace:
        args = argparse.Namespace(**vars(self.args))
        p = job.params
        for name in ("num_speakers", "min_speakers", "max_speakers"):
            setattr(args, name, p.get(name))
        # Known speakers (voices.py): exclusive matching at the request's threshold; the
        # voiceprints themselves are made or loaded in process(), where a failure is the job's.
        args.known_voices = None
        args.match_threshold = p.get("match_threshold")
        args.exclusive = True
        if job.kind == "transcription":
            args.language = p.get("language") or None
            args.initial_prompt = p.get("prompt") or None
            args.temperature = p.get("temperature")
        return args

    def process(self, job: jobstore.Job) -> None:
        path = self.uploads / job.upload
        args = self.job_args(job)
        lease = Lease(self.store, job.id, self.id, self.lease)
        lease.start()
        t0 = time.perf_counter()
        try:
            if job.kind == VOICEPRINT:
                result, seconds = self.enroll_voice(job), 0.0
                self.finished(job, result, seconds, time.perf_counter() - t0)
                return
            args.known_voices = self.known_voices(job)
            recordings.regular_file(path)
            with recordings.deadline(recordings.limit(args.file_timeout,
                                                      recordings.DECODE_TIMEOUT_S), "decoding"):
                waveform = decode(path, args.max_duration)
            seconds = len(waveform) / SAMPLE_RATE
            if seconds == 0:
                raise exits.FileFailed("no audio samples")
            self.stored(self.store.set_progress, job.id, self.id, 0.2, patience=0)
            record = inputs.Job(path, job.filename, 0)
            with recordings.deadline(recordings.limit(
                    args.file_timeout, recordings.work_timeout(seconds)), "processing"):
                try:
                    if job.kind == "diarization":
                        texts, _, _ = diarize.Diarize().process(
                            diarization_of(self.loaded), record, waveform, args)
                    else:
                        texts, _, _ = self.program.process(self.loaded, record, waveform, args)
                except recordings.FileTimeout:
                    self.reload = True
                    raise
            del waveform
            result = json.loads(texts["json"])
            result["source"] = job.filename  # not the upload's path in the state dir
            self.finished(job, result, seconds, time.perf_counter() - t0)
            return
        except Refused as exc:
            kind, message = exc.kind, str(exc)
        except TooLong as exc:
            kind, message = "too_long", str(exc)
        except recordings.FileTimeout as exc:
            kind, message = "timeout", str(exc)
        except exits.FileFailed as exc:
            kind, message = "undecodable", str(exc)
        except exits.RunError as exc:
            kind, message = "invalid", str(exc)
        except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the worker
            if self.config.get("debug"):
                traceback.print_exc()
            kind, message = "internal", f"{type(exc).__name__}: {one_line(exc)}"
        finally:
            lease.stop()
        self.say(f"job {job.id} failed ({kind}): {message}")
        self.stored(self.store.fail, job.id, self.id, kind, message)
        self.events.send("finished", job=job.id, status="failed", kind=kind,
                         network_attempts=len(self.audit.attempts))

    def finished(self, job: jobstore.Job, result: dict[str, Any], seconds: float,
                 work: float) -> None:
        kept = self.stored(self.store.finish, job.id, self.id, result, seconds, work)
        self.events.send("finished", job=job.id, status="succeeded" if kept else "gone",
                         audio_seconds=round(seconds, 3), work_seconds=round(work, 3),
                         network_attempts=len(self.audit.attempts))

    # --- known speakers (voices.py) ---------------------------------------------------
    def enroll_voice(self, job: jobstore.Job) -> dict[str, Any]:
        """A ``voiceprint`` job: the voice enrolled from its clips by ``bin/enroll``'s code
        and saved in the key's folder; the result is its metadata, never the embedding."""
        p = job.params
        folder = voiceprints.owner_folder(self.state, job.owner)
        name = str(p["name"])
        files = job.uploads()
        clips = [(self.uploads / f, shown(str(label)))
                 for f, label in zip(files, p.get("clips") or files)]
        vp = self.voice(name, clips, "clip_refused")
        if not p.get("replace") and voiceprints.path_of(folder, name).exists():
            raise Refused("voiceprint_exists", f"a voiceprint named '{name}' exists: send "
                                               "replace=true to replace it")
        voiceprints.save(folder, vp, replace=bool(p.get("replace")))
        return vp.summary()

    def embedding_model(self) -> voiceprints.EmbeddingModel:
        """The install's embedding model, read from its manifest once: the models this
        worker loaded are the ones it names, for as long as the worker lives."""
        if self._embedding_model is None:
            self._embedding_model = voiceprints.installed_model(
                diarize.default_config().parent)
        return self._embedding_model

    def voice(self, name: str, clips: list[tuple[Path, str]], refused: str
              ) -> voiceprints.Voiceprint:
        """``name``'s voiceprint from ``clips`` by bin/enroll's own code with the loaded
        pipeline; a clip it refuses (its one line) fails the job as ``refused``."""
        try:
            return enroll.voice_of(diarization_of(self.loaded), self.embedding_model(), name,
                                   clips, self.say, voiceprints.MAX_CLIP_S)
        except exits.RunError as exc:
            if exc.code != exits.EXIT_USAGE:
                raise
            raise Refused(refused, str(exc)) from None

    def known_voices(self, job: jobstore.Job) -> Optional[list[voiceprints.Voiceprint]]:
        """The job's known speakers as voiceprints: each reference clip enrolled with the
        loaded pipeline, each stored voiceprint loaded (refused when another embedding model
        made it, as bin/diarize refuses it); None when the job names none."""
        speakers = job.params.get("known_speakers")
        if not speakers:
            return None
        folder = voiceprints.owner_folder(self.state, job.owner)
        prints = []
        for speaker in speakers:
            name, reference = str(speaker["name"]), speaker.get("reference")
            if reference:
                label = f"the reference clip of '{name}'"
                prints.append(self.voice(name, [(self.uploads / reference, label)],
                                         "invalid_reference"))
                continue
            path = voiceprints.path_of(folder, name)
            if not path.is_file():  # deleted since the request was accepted
                raise Refused("voiceprint_not_found", f"no voiceprint named '{name}' is "
                                                      "stored for this key")
            try:
                prints.append(voiceprints.load_file(path, self.embedding_model()))
            except exits.RunError as exc:  # the client is not shown the state dir's path
                raise Refused("voiceprint_not_found", one_line(
                    str(exc).replace(str(path), f"the stored voiceprint '{name}'"))) from None
        return prints

    def stored(self, call: Any, *args: Any, patience: Optional[float] = None) -> bool:
        """A write about the job in hand, tried again while a shared store is out of reach
        (a database restarting) for up to ``patience`` seconds (default: the lease); False
        if it never got through: the lease then runs out, and the job is done again, not
        lost."""
        patience = self.lease if patience is None else patience
        deadline, said = time.monotonic() + patience, False
        while True:
            try:
                return bool(call(*args))
            except jobstore.StoreUnavailable as exc:
                if time.monotonic() >= deadline:
                    if patience:  # progress is not worth a word
                        self.say(f"the job goes back to the queue when its lease ends: {exc}")
                    return False
                if not said:
                    self.say(f"{exc}; trying again for {patience:.0f} s")
                    said = True
                time.sleep(IDLE_POLL_S)

    # --- the loop -----------------------------------------------------------------------
    def wait(self, seconds: float) -> bool:
        """Wait for a wake-up byte; False when the server is gone (EOF)."""
        try:
            ready, _, _ = select.select([0], [], [], seconds)
        except InterruptedError:
            return True
        if ready:
            data = os.read(0, 4096)
            if not data:
                return False
        return True

    def run(self) -> int:
        self.load()
        unreachable = False
        while not self.draining:
            try:
                job = self.store.claim(self.id, self.lease)
            except jobstore.StoreUnavailable as exc:
                if not unreachable:  # once per outage, not every poll
                    self.say(f"{exc}; waiting for it")
                unreachable, job = True, None
            else:
                if unreachable:
                    self.say("the job store is back")
                unreachable = False
            if job is None:
                if not self.wait(IDLE_POLL_S):
                    break
                continue
            self.events.send("claimed", job=job.id)
            self.process(job)
            if self.reload and not self.draining:
                # A timeout interrupted the models: they may be half-updated (recordings.py).
                self.say("reloading the models: a timeout interrupted them")
                self.load()
                self.reload = False
        self.store.close()
        return 0


VOICEPRINT = "voiceprint"  # voices.KIND (voices.py needs Starlette, which a worker does not)


class Refused(Exception):
    """A job the request's own data makes impossible: ``kind`` says which
    (``responses.FAILURE_STATUS`` gives its status)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def diarization_of(loaded: Any) -> diarize.Loaded:
    """The diarization pipeline of what the worker loaded: bin/diarize's own load in a
    bundle without ASR (whose ``pipeline`` attribute is pyannote's object, not ours), or
    the one bin/transcribe's load carries."""
    if isinstance(loaded, diarize.Loaded):
        return loaded
    pipeline = getattr(loaded, "pipeline", None)
    if not isinstance(pipeline, diarize.Loaded):
        raise RuntimeError("no diarization pipeline loaded")
    return pipeline


class Lease(threading.Thread):
    """Renews the job's lease while the worker holds it."""

    def __init__(self, store: jobstore.Store, job_id: str, worker: str,
                 seconds: float = LEASE_S) -> None:
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.store, self.job_id, self.worker = store, job_id, worker
        self.seconds = seconds
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.seconds / 3):
            try:
                if not self.store.renew(self.job_id, self.worker, self.seconds):
                    return  # deleted, or given to another worker
            except Exception:  # noqa: BLE001 - a busy store: the next renewal tries again
                continue

    def stop(self) -> None:
        self.done.set()


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = json.loads(argv[0])
    die_with_parent(int(config["parent"]))
    go_offline()
    try:
        worker = Worker(config)
    except jobstore.StoreError as exc:
        # A shared store out of reach as this worker starts: one line; the server starts
        # another after a pause (the server itself checked the store before starting us).
        print(f"serve: worker {config['id']}: {exc}", file=sys.stderr)
        return exits.EXIT_CANNOT_RUN
    sys.addaudithook(worker.audit)

    def drain(_signum: int, _frame: Any) -> None:
        worker.draining = True

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides; Ctrl-C reaches it
    try:
        return worker.run()
    except exits.RunError as exc:
        worker.events.send("fatal", message=str(exc), code=exc.code)
        print(f"serve: worker {worker.id}: error: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
