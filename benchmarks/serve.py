"""Time ``bin/serve`` against ``bin/transcribe`` on the same files, and the service's own
figures, on an installed prefix.

    python benchmarks/serve.py --prefix PREFIX [--json] [--runs N] [--files N] [--jobs N]

Figures (the prefix's bundle must carry an ASR model; speech is made by espeak-ng with
``tests/speech.py``):

* ``serve_vs_transcribe``: ``--files`` two-voice dialogues (about 16 s each) sent one after
  another to a warm ``bin/serve --workers 1`` (``POST /v1/audio/transcriptions``,
  ``diarized_json``: the upload, the store, the worker's wake-up, the rendering and the
  answer all counted), timed from the first request after ``/readyz`` answered 200 to the
  last answer, against ``bin/transcribe`` on the same files in one process, its own
  ``transcribe_seconds`` (the work on the files; model load excluded on both sides). Median
  of ``--runs``, the two sides alternating. No ratio unless every answer is
  ``bin/transcribe``'s document for that file rendered as ``diarized_json`` (``refused``
  says why, exit 1).
* ``cold_start_seconds``: from starting ``bin/serve`` to ``/readyz`` answering 200 (one
  worker has loaded the models), for ``--workers 1`` and ``2``;
  ``all_workers_ready_seconds``: until ``/readyz`` counts every worker (what the figures
  below wait for).
* ``warm_latency_30s``: the median seconds of one ``POST /v1/audio/transcriptions`` of a
  30-second dialogue on the warm ``--workers 1`` server.
* ``throughput``: audio hours per hour with ``--workers 1`` and ``2``: ``--jobs`` recordings
  sent at once to ``POST /v1/jobs``, timed until every one has succeeded; the peak RSS of
  each worker process (the kernel's high-water mark, ``VmHWM`` in ``/proc/PID/status``, read
  while the workers are alive, after the jobs).

The server runs in a temporary state dir on a free loopback port; nothing is written in the
prefix.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from bundler import layout  # noqa: E402  (stdlib only)
from bundler.runtime import responses  # noqa: E402  (stdlib only: the service's renderer)

# What this file needs in the interpreter that runs it (the speech is made here), each
# with what installs it; checked before anything starts.
MODULES = {"numpy": "numpy", "soundfile": "soundfile"}
PROGRAMS = {"espeak-ng": "apt-get install espeak-ng"}
LISTENING = re.compile(r"listening on https?://[^\s/]+:(\d+)/v1")
READY_TIMEOUT_S = 600.0
FORMAT = "diarized_json"  # what the sync requests ask for: the service's headline shape
LATENCY_CLIP_S = 30.0
JOB_TIMEOUT_S = 120.0  # per throughput job (about 16 s of audio), far beyond any real run
# The workers' seconds on the recordings (service.py's Metrics.work, a Counter: "_total").
WORK_METRIC = "pyannote_serve_work_seconds_total"


def preflight(prefix: Path) -> str | None:
    """Why this run cannot finish, in one line; None when it can."""
    if not (prefix / layout.PREFIX_SERVE).is_file():
        return f"--prefix {prefix}: no {layout.PREFIX_SERVE} there (an installed bundle's prefix)"
    if not (prefix / layout.PREFIX_TRANSCRIBE).is_file():
        return (f"--prefix {prefix}: no {layout.PREFIX_TRANSCRIBE}: the bundle has no ASR "
                "model (build it with --asr-model, as `pyannote-bundle demo` does)")
    problems = [f"{pkg} in {sys.executable} (pip install {pkg})" for name, pkg in
                MODULES.items() if importlib.util.find_spec(name) is None]
    problems += [f"{name} ({how})" for name, how in PROGRAMS.items()
                 if shutil.which(name) is None]
    if problems:
        return "the serve benchmark needs " + "; ".join(problems)
    return None


# --- the speech ---------------------------------------------------------------------------
def dialogues(folder: Path, count: int) -> list[Path]:
    """``count`` different two-voice dialogues of three lines each (about 16 s)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import speech

    folder.mkdir(parents=True, exist_ok=True)
    lines = list(speech.DEFAULT_LINES)
    paths = []
    for n in range(count):
        path = folder / f"dialogue-{n}.wav"
        speech.dialogue(path, [lines[(n + k) % len(lines)] for k in range(3)])
        paths.append(path)
    return paths


def clip(path: Path, seconds: float) -> Path:
    """A two-voice dialogue of exactly ``seconds`` (the test dialogue, repeated as needed)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np
    import speech

    audio, _ = speech.synthesize(speech.DEFAULT_LINES)
    want = round(seconds * speech.RATE)
    audio = np.tile(audio, -(-want // len(audio)))[:want]
    path.parent.mkdir(parents=True, exist_ok=True)
    speech.write(path, audio)
    return path


# --- HTTP, stdlib only ----------------------------------------------------------------------
def multipart(fields: dict[str, str], filename: str, data: bytes) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with ``fields`` and the recording as ``file``, and its
    Content-Type."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             .encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                 .encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def listening_port(line: str) -> int | None:
    """The port in bin/serve's ``listening on http://HOST:PORT/v1`` line (stderr)."""
    m = LISTENING.search(line)
    return int(m.group(1)) if m else None


def peak_rss_mb(pid: int) -> float:
    """A live process's peak resident set (``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/{pid}/status has no VmHWM")


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (bin/serve may be a wrapper around Python)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Server:
    """``PREFIX/bin/serve`` on a free loopback port in its own state dir, until ``stop``."""

    def __init__(self, prefix: Path, state: Path, workers: int, queue: int = 16) -> None:
        self.lines: list[str] = []
        self.cold_start_s = 0.0  # from the start to /readyz's first 200
        self.all_ready_s = 0.0  # ... to every worker ready
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(prefix / layout.PREFIX_SERVE), "--port", "0", "--state-dir", str(state),
             "--workers", str(workers), "--queue", str(queue), "--keep-days", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        self.port: int | None = None
        heard = threading.Event()

        def read() -> None:  # drained for the server's whole life: a full pipe would stall it
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                if self.port is None and listening_port(line) is not None:
                    self.port = listening_port(line)
                    heard.set()
            heard.set()

        threading.Thread(target=read, daemon=True).start()
        if not heard.wait(READY_TIMEOUT_S) or self.port is None:
            self.stop()
            raise RuntimeError("bin/serve did not start: " + " | ".join(self.lines[-5:]))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            status, body = self.request("GET", "/readyz")
            if status == 200 and not self.cold_start_s:
                self.cold_start_s = time.perf_counter() - self.started
            # /readyz answers 200 once one worker is ready; the figures wait for them all
            if status == 200 and json.loads(body).get("workers") == workers:
                self.all_ready_s = time.perf_counter() - self.started
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("bin/serve never became ready: "
                                   + " | ".join(self.lines[-5:]))
            time.sleep(0.05)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=READY_TIMEOUT_S)
        try:
            headers = {"Content-Type": content_type} if content_type else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except OSError:
            return 0, b""
        finally:
            conn.close()

    def post(self, path: str, recording: Path, **fields: str) -> tuple[int, bytes]:
        body, content_type = multipart(fields, recording.name, recording.read_bytes())
        return self.request("POST", path, body, content_type)

    def workers(self) -> list[int]:
        pids = []
        for pid in descendants(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"worker.py" in cmdline:
                pids.append(pid)
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the figures ------------------------------------------------------------------------------
def work_seconds(report: dict[str, Any]) -> float:
    """What ``bin/transcribe --json`` says it spent on the files: its ``transcribe_seconds``
    (decoding and both models, per file), not ``wall_seconds`` (which holds the model load)."""
    return float(report["transcribe_seconds"])


def refusal(answers: dict[str, bytes], documents: dict[str, dict[str, Any]]) -> str | None:
    """Why the server's answers (``diarized_json`` bodies, by file name) are not the work
    ``bin/transcribe`` did (its JSON documents, by file name), or None when each answer is
    that file's document rendered by the service's own renderer."""
    differ = sorted(name for name in set(answers) | set(documents)
                    if name not in answers or name not in documents
                    or json.loads(answers[name]) != json.loads(
                        responses.transcription(documents[name], FORMAT)[0]))
    if differ:
        return f"the service's {FORMAT} differs from bin/transcribe's for {', '.join(differ)}"
    return None


def metric(text: str, name: str) -> float:
    """A sample's value in Prometheus text (``GET /metrics``); 0 before it is first set."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def audio_hours_per_hour(audio_seconds: float, wall_seconds: float) -> float:
    return audio_seconds / wall_seconds


def serve_pass(server: Server, files: Sequence[Path]) -> tuple[float, float,
                                                                dict[str, bytes]]:
    """The files one after another through the warm server: seconds, the seconds its worker
    spent on them (as bin/transcribe counts its own: decoding and the models), and each
    answer. The difference is the service's own: upload, store, wake-up, rendering."""
    answers = {}
    before = metric(server.request("GET", "/metrics")[1].decode(), WORK_METRIC)
    t = time.perf_counter()
    for path in files:
        status, body = server.post("/v1/audio/transcriptions", path, response_format=FORMAT)
        if status != 200:
            raise RuntimeError(f"bin/serve answered {status} for {path.name}: {body[:300]!r}")
        answers[path.name] = body
    seconds = time.perf_counter() - t
    work = metric(server.request("GET", "/metrics")[1].decode(), WORK_METRIC) - before
    return seconds, work, answers


def transcribe_pass(prefix: Path, folder: Path, out: Path) -> tuple[float, float,
                                                                    dict[str, Any]]:
    """``bin/transcribe`` on the folder in one process: its work seconds, its load seconds,
    and each file's JSON document."""
    proc = subprocess.run([str(prefix / layout.PREFIX_TRANSCRIBE), str(folder), "--output-dir",
                           str(out), "--overwrite", "--json", "-q", "--format", "json"],
                          check=True, capture_output=True, text=True)
    report = json.loads(proc.stdout)
    docs = {Path(o["file"]).name: json.loads(Path(o["json"]).read_text())
            for o in report["outputs"]}
    return work_seconds(report), float(report["load_seconds"]), docs


def throughput(server: Server, files: Iterable[Path]) -> dict[str, Any]:
    """Every file sent at once as a job, timed until all succeeded; each worker's peak RSS."""
    t = time.perf_counter()
    ids = []
    for path in files:
        status, body = server.post("/v1/jobs", path)
        if status != 202:
            raise RuntimeError(f"POST /v1/jobs answered {status}: {body[:300]!r}")
        ids.append(json.loads(body)["id"])
    deadline = time.monotonic() + READY_TIMEOUT_S + JOB_TIMEOUT_S * len(ids)
    while True:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {len(ids)} jobs did not all finish in "
                               f"{deadline - t:.0f} s")
        status, body = server.request("GET", "/v1/jobs")
        jobs = {j["id"]: j for j in json.loads(body)["data"] if j["id"] in ids}
        if any(j["status"] == "failed" for j in jobs.values()):
            raise RuntimeError(f"a job failed: {[j['error'] for j in jobs.values()]}")
        if len(jobs) == len(ids) and all(j["status"] == "succeeded" for j in jobs.values()):
            break
        time.sleep(0.1)
    wall = time.perf_counter() - t
    audio = sum(j["audio_seconds"] for j in jobs.values())
    rss = sorted(round(peak_rss_mb(pid), 1) for pid in server.workers())
    return {"jobs": len(ids), "audio_seconds": round(audio, 1), "seconds": round(wall, 2),
            "audio_hours_per_hour": round(audio_hours_per_hour(audio, wall), 2),
            "worker_peak_rss_mb": rss}


def bench(prefix: Path, work: Path, runs: int, count: int, jobs: int,
          latency_runs: int) -> dict[str, Any]:
    corpus = work / "corpus"
    files = dialogues(corpus, count)
    thirty = clip(work / "clip" / "dialogue-30s.wav", LATENCY_CLIP_S)
    report: dict[str, Any] = {"files": len(files), "cold_start_seconds": {},
                              "all_workers_ready_seconds": {}, "throughput": {}}
    server = Server(prefix, work / "state-1", workers=1, queue=jobs)
    try:
        report["cold_start_seconds"]["1"] = round(server.cold_start_s, 2)
        report["all_workers_ready_seconds"]["1"] = round(server.all_ready_s, 2)
        serve_s: list[float] = []
        worker_s: list[float] = []
        tool_s: list[float] = []
        loads: list[float] = []
        answers: dict[str, bytes] = {}
        docs: dict[str, Any] = {}
        for i in range(runs):
            for side in (("serve", "transcribe") if i % 2 == 0 else ("transcribe", "serve")):
                if side == "serve":
                    seconds, spent, answers = serve_pass(server, files)
                    serve_s.append(seconds)
                    worker_s.append(spent)
                else:
                    seconds, load, docs = transcribe_pass(prefix, corpus, work / "out")
                    tool_s.append(seconds)
                    loads.append(load)
        latencies = []
        for _ in range(latency_runs):
            t = time.perf_counter()
            status, body = server.post("/v1/audio/transcriptions", thirty,
                                       response_format=FORMAT)
            if status != 200:
                raise RuntimeError(f"bin/serve answered {status} for the 30-s clip: "
                                   f"{body[:300]!r}")
            latencies.append(time.perf_counter() - t)
        report["throughput"]["1"] = throughput(server, (files * jobs)[:jobs])
    finally:
        server.stop()
    refused = refusal(answers, docs)
    report.update({
        "ratio": None if refused else statistics.median(serve_s) / statistics.median(tool_s),
        "refused": refused,
        "seconds": {"serve": round(statistics.median(serve_s), 2),
                    "transcribe": round(statistics.median(tool_s), 2),
                    "serve_runs": [round(s, 2) for s in serve_s],
                    "transcribe_runs": [round(s, 2) for s in tool_s],
                    "transcribe_load": round(statistics.median(loads), 2),
                    # the worker's own seconds on the files, and the rest of the serve side
                    "serve_worker": round(statistics.median(worker_s), 2),
                    "serve_overhead_per_request": round(statistics.median(
                        [(s - w) / len(files) for s, w in zip(serve_s, worker_s, strict=True)]
                    ), 3)},
        "audio_seconds": round(sum(json.loads(a)["duration"] for a in answers.values()), 1),
        "warm_latency_30s": {"median": round(statistics.median(latencies), 2),
                             "runs": [round(s, 2) for s in latencies]},
    })
    server = Server(prefix, work / "state-2", workers=2, queue=jobs)
    try:
        report["cold_start_seconds"]["2"] = round(server.cold_start_s, 2)
        report["all_workers_ready_seconds"]["2"] = round(server.all_ready_s, 2)
        report["throughput"]["2"] = throughput(server, (files * jobs)[:jobs])
    finally:
        server.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", type=Path, required=True,
                    help="an installed bundle with an ASR model (install.sh PREFIX)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--runs", type=int, default=3, help="serve_vs_transcribe runs (median)")
    ap.add_argument("--files", type=int, default=4, help="dialogues of about 16 s (default 4)")
    ap.add_argument("--jobs", type=int, default=8, help="recordings per throughput run")
    ap.add_argument("--latency-runs", type=int, default=3,
                    help="30-s requests for the warm latency (median)")
    args = ap.parse_args(argv)
    for name in ("runs", "files", "jobs", "latency_runs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    problem = preflight(args.prefix)
    if problem:
        print(f"benchmarks/serve.py: {problem}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="pyannote-bundle-bench-serve-"))
    try:
        report = bench(args.prefix.resolve(), work, args.runs, args.files, args.jobs,
                       args.latency_runs)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        # bin/serve or bin/transcribe failed: one line (their own stderr says the rest)
        why = (f"{Path(str(exc.cmd[0])).name} exited {exc.returncode}: "
               f"{(exc.stderr or '').strip()[-300:]}"
               if isinstance(exc, subprocess.CalledProcessError) else str(exc))
        print(f"benchmarks/serve.py: {' '.join(why.split())}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = report.pop("ratio")
    out = {"ratios": {} if ratio is None else {"serve_vs_transcribe": round(ratio, 3)},
           "serve": report, "runs": args.runs,
           "machine": {"cpus": os.cpu_count(), "usable": len(os.sched_getaffinity(0)),
                       "load_average": [round(x, 2) for x in os.getloadavg()]}}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name, value in out["ratios"].items():
            print(f"  {name:<24} {value:6.3f}")
        if report["refused"]:
            print(f"no serve_vs_transcribe: {report['refused']}")
        print(f"  serve {report['seconds']['serve']} s, bin/transcribe "
              f"{report['seconds']['transcribe']} s ({report['files']} files, "
              f"{report['audio_seconds']} s of audio)")
        print(f"  the worker's own {report['seconds']['serve_worker']} s; the service's "
              f"overhead per request {report['seconds']['serve_overhead_per_request']} s")
        print(f"  cold start to ready: {report['cold_start_seconds']} s; warm latency, 30-s "
              f"clip: {report['warm_latency_30s']['median']} s")
        for workers, t in report["throughput"].items():
            print(f"  --workers {workers}: {t['audio_hours_per_hour']} audio hours per hour; "
                  f"worker peak RSS {t['worker_peak_rss_mb']} MB")
    return 1 if report["refused"] else 0


if __name__ == "__main__":
    sys.exit(main())
