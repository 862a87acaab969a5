"""Offline smoke test of a pyannote-bundle install: the user's own command on the samples.

    python3 smoke.py --prefix PREFIX [--probe HOST:PORT]... [--guard-sockets]

Runs ``PREFIX/bin/diarize`` (exactly what a user runs) on the bundled sample in three
containers (``smoke/sample.wav``, ``.mp3``, ``.m4a``) and checks that every one became
speech segments, with no connection attempt from the diarizing process (it counts its own
attempts: ``network_attempts``). Where the install has ``bin/transcribe`` (a bundle with a
speech-recognition model), it also transcribes ``smoke/dialogue.flac`` (real speech) in
every output format, and reports the transcript (``transcript``). Before that it tries a
TCP connect to each ``--probe`` address (the caller passes a loopback listener of its own:
inside a fresh network namespace even loopback is down, so a probe that gets through means
the isolation failed).
Where the install has ``bin/enroll``, it then enrolls the voice of the sample's first turn
and checks that ``bin/diarize --voiceprints`` names it on the sample (``smoke_voiceprints.py``:
what that proves, and why random test weights leave it ``not_shown``): the result's
``voiceprints`` part.
Where the install has ``bin/serve``, it then starts the service as a user would
(``--port 0 --workers 1``, a fresh private state dir), on loopback inside the same
isolation: in a fresh namespace loopback is down, so it brings ``lo`` up first (an ioctl;
root in the namespace may), after the probes ran. Once the worker says ``ready`` (and
``GET /readyz`` agrees) it posts the sample the bundle's programs just read:
``smoke/dialogue.flac`` to ``/v1/audio/transcriptions`` as ``diarized_json`` where the
bundle transcribes (the words and the speaker count must be ``bin/transcribe``'s), else
``smoke/sample.wav`` to ``/v1/audio/diarization`` (the segments and speakers must be
``bin/diarize``'s). Then a SIGTERM: the server must exit 0 and leave no upload in its state
dir. What it saw is the result's ``serve`` part; the worker's connection attempts (its
``/metrics`` gauge ``pyannote_serve_network_attempts``) add to ``network_attempts``.
``--guard-sockets`` (hosts with no network namespace) makes this process's connects fail and
runs diarize and transcribe with ``--block-network``. The serve check still runs there, on
the host's loopback: this process's one exemption from the guard is its own HTTP client,
which connects to ``127.0.0.1`` and the port the server it started named, through the
``socket.connect`` kept from before the guard (every other address, and every name lookup,
stays refused); the server's workers count their own attempts (bin/serve has no
``--block-network``), and any attempt fails the smoke test as it does for the programs.

Prints exactly one JSON object on stdout: ``{"ok": true, "segments": [...], "formats":
{...}, ...}`` (the wav's segments at the top, as in ``smoke/expected.json``), or
``{"ok": false, "error": "..."}`` with exit status 1. Standard library only (and the
installer's ``runtime/install.py``, beside ``smoke/`` in the bundle and the release).
"""

from __future__ import annotations

import argparse
import fcntl
import http.client
import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn

if __package__:  # imported by the tool and its tests
    from bundler.runtime import smoke_voiceprints
    from bundler.runtime.install import exit_text, word_changes
else:  # run as a program from smoke/: the installer's helper, from runtime/ beside it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))
    import smoke_voiceprints  # type: ignore[no-redef]
    from install import exit_text, word_changes  # type: ignore[no-redef]

SAMPLES = ("wav", "mp3", "m4a")
TIMEOUT_S = 1800
SERVE_READY_S = 300  # to "ready": the worker imports torch and loads every model once
SERVE_REQUEST_S = 600
SERVE_STOP_S = 120  # a SIGTERM drains: the job in hand is already done
# Kept before --guard-sockets replaces it: the serve check's client, to loopback alone.
_CONNECT = socket.socket.connect


class SmokeError(Exception):
    """A failure with a message meant for the operator."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SmokeError(f"bad arguments: {message}")


def guard_sockets() -> None:
    """Make every inet connect and every name lookup in this process fail."""

    def refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise ConnectionRefusedError("network disabled by smoke.py --guard-sockets")

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse()
        return original_connect(self, address)

    original_connect = socket.socket.connect
    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.getaddrinfo = refuse
    socket.create_connection = refuse


def probe(address: str, timeout: float = 2.0) -> str:
    """'open' if a TCP connect to HOST:PORT succeeds, else 'blocked'."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return "open"
    except (OSError, ValueError):
        return "blocked"


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def run_program(argv: list[str], block_network: bool
                ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """An installed program (``bin/diarize``, ``bin/transcribe``) on the samples, as a user
    runs it, with the smallest batches: its process and the summary it printed (--json)."""
    name = Path(argv[0]).name
    argv = [argv[0], "--json", "--quiet", "--overwrite", "--embedding-batch-size", "1",
            "--segmentation-batch-size", "1", *argv[1:]]
    if block_network:
        argv.append("--block-network")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SmokeError(f"{name} did not finish in {TIMEOUT_S} s") from None
    sys.stderr.write(proc.stderr)
    try:
        summary: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        # A process killed by a signal (a crash in a native library) prints nothing more.
        said = last_line(proc.stderr)
        raise SmokeError(f"{name} printed no summary ({exit_text(proc.returncode)})"
                         + (f": {said}" if said else "")) from None
    return proc, summary


def smoke(prefix: Path, block_network: bool) -> dict[str, Any]:
    diarize = prefix / "bin" / "diarize"
    if not diarize.is_file():
        raise SmokeError(f"{diarize} is missing: the install did not finish")
    samples = {fmt: prefix / "smoke" / f"sample.{fmt}" for fmt in SAMPLES}
    for path in samples.values():
        if not path.is_file():
            raise SmokeError(f"sample not found: {path}")
    out = Path(tempfile.mkdtemp(prefix="pyannote-bundle-smoke-"))
    try:
        proc, summary = run_program(
            [str(diarize), "--format", "rttm,json", "--output-dir", str(out),
             *map(str, samples.values())], block_network)
        formats: dict[str, Any] = {}
        for fmt, path in samples.items():
            record = out / f"{path.name}.json"
            failure = next((f["error"] for f in summary.get("failures", [])
                            if f["file"] == path.name), None)
            if failure is not None or not record.is_file():
                formats[fmt] = {"ok": False, "error": failure or "no output written"}
                continue
            data = json.loads(record.read_text())
            rttm = (out / f"{path.name}.rttm").read_text().splitlines()
            formats[fmt] = {"ok": bool(data["segments"]) and len(rttm) == len(
                                data["segments"]),
                            "segments": data["segments"], "speakers": len(data["speakers"]),
                            "audio_seconds": data["audio_seconds"]}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    transcribed = transcribe(prefix, block_network) \
        if (prefix / "bin" / "transcribe").is_file() else None
    wav = formats["wav"]
    result: dict[str, Any] = {
        "ok": proc.returncode == 0 and all(f["ok"] for f in formats.values()),
        "segments": wav.get("segments", []),
        "speakers": wav.get("speakers", 0),
        "formats": formats,
        "network_attempts": summary.get("network_attempts"),
        "network_attempt_details": summary.get("network_attempt_details", []),
        "seconds": summary.get("wall_seconds"),
        "load_seconds": summary.get("load_seconds"),
        "diarize_seconds": summary.get("diarize_seconds"),
        "audio_seconds": summary.get("audio_seconds"),
        "rtf": summary.get("rtf"),
        "peak_rss_mb": summary.get("peak_rss_mb"),
        "pyannote_audio": summary.get("pyannote_audio"),
        "torch": summary.get("torch"),
        "device": summary.get("device"),
        "engine": summary.get("engine"),
        "engine_note": summary.get("engine_note"),
        "embedding_batch_size": 1,
        "segmentation_batch_size": 1,
    }
    if transcribed is not None:
        result["transcript"] = transcribed
        result["network_attempts"] = (summary.get("network_attempts") or 0) + (
            transcribed.get("network_attempts") or 0)
        result["network_attempt_details"] = (summary.get("network_attempt_details") or []) + (
            transcribed.get("network_attempt_details") or [])
    bad = {fmt: f.get("error", "no speech segments") for fmt, f in formats.items()
           if not f["ok"]}
    if transcribed is not None and not transcribed["ok"]:
        bad["dialogue.flac"] = f"bin/transcribe: {transcribed.get('error')}"
    if not bad and proc.returncode == 0 and (prefix / "bin" / "enroll").is_file():
        # Once the programs passed, as the service's check: a voice of the sample enrolled,
        # then named by bin/diarize --voiceprints (smoke_voiceprints.py).
        voiced = result["voiceprints"] = smoke_voiceprints.check(prefix, run_program,
                                                                 block_network)
        result["network_attempts"] = (result["network_attempts"] or 0) + (
            voiced.get("network_attempts") or 0)
        result["network_attempt_details"] = [*(result["network_attempt_details"] or []),
                                             *(voiced.get("network_attempt_details") or [])]
    if not bad and proc.returncode == 0 and (prefix / "bin" / "serve").is_file():
        # Only once the programs passed: a server that runs their code would fail alike.
        served = result["serve"] = serve_check(prefix, transcribed, wav)
        result["network_attempts"] = (result["network_attempts"] or 0) + (
            served.get("network_attempts") or 0)
        if served.get("network_attempts"):
            result["network_attempt_details"] = [
                *(result["network_attempt_details"] or []),
                f"bin/serve's worker: {served['network_attempts']} attempt(s) (its /metrics)"]
    if bad:
        result["error"] = "; ".join(f"sample.{fmt}: {why}" for fmt, why in bad.items())
        result["ok"] = False
    elif proc.returncode != 0:
        result["error"] = f"diarize {exit_text(proc.returncode)}: {last_line(proc.stderr)}"
    elif (result.get("voiceprints") or {}).get("ok") is False:
        result["ok"] = False
        result["error"] = f"voiceprints: {result['voiceprints'].get('error')}"
    elif "serve" in result and not result["serve"]["ok"]:
        result["ok"] = False
        result["error"] = (f"bin/serve on loopback ({result['serve']['endpoint']}, "
                           f"{result['serve']['sample']}): {result['serve'].get('error')}")
    elif result["network_attempts"]:
        result["ok"] = False
        result["error"] = (f"the programs made {result['network_attempts']} connection "
                           f"attempt(s) (first: {result['network_attempt_details'][0]}); an "
                           "isolated host must see none")
    return result


TRANSCRIBE_FORMATS = ("json", "srt", "vtt", "txt", "rttm")


def transcribe(prefix: Path, block_network: bool) -> dict[str, Any]:
    """``PREFIX/bin/transcribe`` on ``smoke/dialogue.flac``, every format: what it heard."""
    sample = prefix / "smoke" / "dialogue.flac"
    if not sample.is_file():
        return {"ok": False, "error": f"sample not found: {sample}"}
    out = Path(tempfile.mkdtemp(prefix="pyannote-bundle-smoke-asr-"))
    try:
        try:
            proc, summary = run_program(
                [str(prefix / "bin" / "transcribe"), "--format", ",".join(TRANSCRIBE_FORMATS),
                 "--output-dir", str(out), str(sample)], block_network)
        except SmokeError as exc:
            return {"ok": False, "error": str(exc)}
        outputs = {fmt: out / f"{sample.name}.{fmt}" for fmt in TRANSCRIBE_FORMATS}
        missing = [fmt for fmt, path in outputs.items() if not path.is_file()]
        if proc.returncode != 0 or missing:
            failure = next((f["error"] for f in summary.get("failures", [])), None)
            return {"ok": False, "error": failure or f"exit {proc.returncode}, no "
                                                     f"{', '.join(missing)} written",
                    "network_attempts": summary.get("network_attempts")}
        data = json.loads(outputs["json"].read_text())
        segments = data.get("segments") or []
        text = " ".join(s["text"].strip() for s in segments).strip()
        words = [w for s in segments for w in s.get("words") or []]
        return {"ok": bool(text) and all(w.get("speaker") for w in words),
                "error": None if text else "no words recognised in real speech",
                "text": text, "words": len(words),
                "speakers": len({s["speaker"] for s in segments}),
                "language": data.get("language"), "segments": len(segments),
                "formats": sorted(fmt for fmt, p in outputs.items() if p.stat().st_size),
                "seconds": summary.get("wall_seconds"),
                "load_seconds": summary.get("load_seconds"),
                "network_attempts": summary.get("network_attempts"),
                "network_attempt_details": summary.get("network_attempt_details", [])}
    finally:
        shutil.rmtree(out, ignore_errors=True)


# --- bin/serve ------------------------------------------------------------------------------
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1  # <linux/sockios.h>, <net/if.h>
IFREQ_SIZE = 40  # struct ifreq on Linux: a 16-byte name, then a 24-byte union (ifr_flags)


def loopback_up(name: str = "lo") -> bool:
    """Bring the interface ``name`` up (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP): True
    when this call did, False when it was up already (as on any host outside a fresh
    network namespace, where nothing is asked of the kernel). OSError when the interface is
    missing or this process may not change it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", name.encode(), 0).ljust(IFREQ_SIZE, b"\0")
        flags = struct.unpack_from("16sH", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS,
                                                       request))[1]
        if flags & IFF_UP:
            return False
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack(
            "16sH", name.encode(), flags | IFF_UP).ljust(IFREQ_SIZE, b"\0"))
        return True


def multipart_body(fields: dict[str, str], filename: str, data: bytes
                   ) -> tuple[str, bytes]:
    """``(Content-Type, body)`` of a ``multipart/form-data`` request: ``fields`` as text
    parts, then ``data`` as the part ``file`` named ``filename`` (what OpenAI's clients
    send)."""
    for text in (*fields, *fields.values(), filename):
        if any(c in text for c in '"\r\n'):
            raise ValueError(f"{text!r}: a form name or value with a quote or a line break")
    boundary = "smoke-" + uuid.uuid4().hex
    while boundary.encode() in data:  # 2**-122 a try; never inside the recording all the same
        boundary = "smoke-" + uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
             f'{value}\r\n'.encode() for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                 .encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


class LoopbackConnection(http.client.HTTPConnection):
    """HTTP to ``127.0.0.1:port`` and nowhere else, whatever host it is given: the socket
    is connected with the ``socket.connect`` kept from before ``--guard-sockets``, so the
    guard refuses every other connect of this process and every name lookup."""

    def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            _CONNECT(sock, ("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def http_call(port: int, method: str, path: str, timeout: float, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """``(status, body)`` of one request to the server on ``127.0.0.1:port``."""
    conn = LoopbackConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _die_with_parent() -> None:
    """In the server's child, before exec: SIGTERM when this smoke process dies (the
    installer's timeout kills it), so no server outlives the smoke test."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _ServerLog:
    """The server's stderr, passed on to ours line by line: the port it names in its
    ``listening on`` line, and whether its workers said ``ready``."""

    LISTENING = re.compile(r"listening on https?://\S+:(\d+)/v1")

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.port: int | None = None
        self.ready = threading.Event()  # set on "ready", or when the server's stderr ends
        self.said_ready = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            sys.stderr.write(line)
            self.lines.append(line)
            found = self.LISTENING.search(line)
            if found and self.port is None:
                self.port = int(found.group(1))
            if line.startswith("serve: ready:"):
                self.said_ready = True
                self.ready.set()
        self.ready.set()  # the server is gone: nothing more will come

    def said(self) -> str:
        return last_line("".join(line for line in self.lines
                                 if not line.startswith("serve: worker")) or
                         "".join(self.lines))


def serve_check(prefix: Path, transcribed: dict[str, Any] | None,
                diarized: dict[str, Any]) -> dict[str, Any]:
    """``PREFIX/bin/serve`` on loopback, one request with the smoke sample, then a SIGTERM:
    what it answered, compared with what ``transcribed`` (bin/transcribe on the dialogue)
    or, in a bundle without speech recognition, ``diarized`` (bin/diarize on the wav) gave."""
    asr = transcribed is not None
    sample = prefix / "smoke" / ("dialogue.flac" if asr else "sample.wav")
    endpoint = "/v1/audio/transcriptions" if asr else "/v1/audio/diarization"
    fields = {"response_format": "diarized_json" if asr else "json"}
    if asr:
        fields["model"] = "whisper-1"  # OpenAI's own name, as an unchanged client sends it
    result: dict[str, Any] = {"ok": False, "endpoint": endpoint, "sample": sample.name,
                              "workers": 1}
    try:
        result["loopback"] = "brought up" if loopback_up() else "up"
    except OSError as exc:
        result["error"] = f"cannot bring the loopback interface up: {exc.strerror or exc}"
        return result
    state = Path(tempfile.mkdtemp(prefix="pyannote-bundle-smoke-serve-"))  # 0700
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(prefix / "bin" / "serve"), "--host", "127.0.0.1", "--port", "0",
         "--state-dir", str(state), "--workers", "1", "--embedding-batch-size", "1",
         "--segmentation-batch-size", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, errors="replace", preexec_fn=_die_with_parent)
    log = _ServerLog(proc)
    try:
        answer = _ask(proc, log, sample, endpoint, fields, result, started)
        if answer is not None:
            _check_answer(answer, transcribed, diarized, result)
    except (OSError, http.client.HTTPException) as exc:
        result["ok"] = False
        result["error"] = f"no answer from 127.0.0.1:{log.port}: {exc}"
    finally:
        _stop(proc, log, state, result)
    return result


def _ask(proc: subprocess.Popen[str], log: _ServerLog, sample: Path, endpoint: str,
         fields: dict[str, str], result: dict[str, Any], started: float
         ) -> dict[str, Any] | None:
    """Wait for the server, post ``sample``: its parsed answer, or None with
    ``result["error"]`` said."""
    log.ready.wait(SERVE_READY_S)
    if not log.said_ready or log.port is None:
        try:
            code = proc.wait(10) if log.ready.is_set() else None  # its stderr closed
        except subprocess.TimeoutExpired:
            code = None
        result["error"] = (f"it stopped before it was ready ({exit_text(code)}): "
                           f"{log.said()}" if code is not None else
                           f"not ready in {SERVE_READY_S} s")
        return None
    result["port"] = log.port
    status, body = http_call(log.port, "GET", "/readyz", 30)
    result["ready_seconds"] = round(time.monotonic() - started, 3)
    if status != 200:
        result["error"] = f"GET /readyz answered {status} after 'ready': {body[:200]!r}"
        return None
    content_type, form = multipart_body(fields, sample.name, sample.read_bytes())
    began = time.monotonic()
    status, body = http_call(log.port, "POST", endpoint, SERVE_REQUEST_S, form,
                             {"Content-Type": content_type})
    result["request_seconds"] = round(time.monotonic() - began, 3)
    result["status"] = status
    try:
        answer: Any = json.loads(body)
    except ValueError:
        answer = None
    answer = answer if isinstance(answer, dict) else {}
    if status != 200 or not answer:
        error = answer.get("error")
        said = error.get("message") if isinstance(error, dict) else None
        result["error"] = f"POST {endpoint} answered {status}: {said or body[:200]!r}"
        return None
    status, metrics = http_call(log.port, "GET", "/metrics", 30)
    found = re.search(rb"^pyannote_serve_network_attempts ([0-9.e+]+)$", metrics, re.M)
    result["network_attempts"] = int(float(found.group(1))) if status == 200 and found \
        else None
    return answer


def _check_answer(answer: dict[str, Any], transcribed: dict[str, Any] | None,
                  diarized: dict[str, Any], result: dict[str, Any]) -> None:
    segments = answer.get("segments") or []
    result["segments"] = len(segments)
    result["speakers"] = len({s.get("speaker") for s in segments})
    if transcribed is not None:
        result["text"] = str(answer.get("text") or "")
        changed = word_changes(str(transcribed.get("text") or ""), result["text"])
        if not segments or not result["text"]:
            result["error"] = "the transcript has no segments or no words"
        elif result["speakers"] != transcribed.get("speakers"):
            result["error"] = (f"{result['speakers']} speakers, bin/transcribe heard "
                               f"{transcribed.get('speakers')}")
        elif changed:
            result["error"] = (f"the transcript differs from bin/transcribe's in {changed} "
                               f"word(s): '{result['text']}'")
    else:
        want = diarized.get("segments") or []
        if not segments:
            result["error"] = "no speech segments"
        elif (len(segments), result["speakers"]) != (len(want), diarized.get("speakers")):
            result["error"] = (f"{len(segments)} segments / {result['speakers']} speakers, "
                               f"bin/diarize found {len(want)} / {diarized.get('speakers')}")
    result["ok"] = "error" not in result


def _stop(proc: subprocess.Popen[str], log: _ServerLog, state: Path,
          result: dict[str, Any]) -> None:
    """SIGTERM, which must end the server with status 0 and leave no upload behind."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(SERVE_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                result["ok"] = False
                result.setdefault("error", f"it did not stop in {SERVE_STOP_S} s after "
                                           "SIGTERM")
        log.thread.join(10)
        result["exit"] = proc.returncode
        left = sorted(p.name for p in (state / "uploads").iterdir()) \
            if (state / "uploads").is_dir() else []
        if result["ok"] and proc.returncode != 0:
            result["ok"] = False
            result["error"] = f"{exit_text(proc.returncode)} after SIGTERM: {log.said()}"
        elif result["ok"] and left:
            result["ok"] = False
            result["error"] = f"the delivered upload stayed in its state dir: {left[0]}"
    finally:
        shutil.rmtree(state, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    result: dict[str, Any]
    try:
        parser = _Parser(description="Offline smoke test: bin/diarize on the samples.")
        parser.add_argument("--prefix", type=Path, required=True)
        parser.add_argument("--guard-sockets", action="store_true")
        parser.add_argument("--probe", action="append", default=[], metavar="HOST:PORT")
        args = parser.parse_args(argv)
        if args.guard_sockets:
            guard_sockets()
        probes = {a: probe(a) for a in dict.fromkeys(args.probe)}
        result = smoke(args.prefix.resolve(), args.guard_sockets)
        result["network_probes"] = probes
        if args.guard_sockets:
            result["isolation"] = "socket guard"
    except SmokeError as exc:
        result = {"ok": False, "error": str(exc)}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
