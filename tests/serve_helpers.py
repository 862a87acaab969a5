"""What tests/test_e2e_serve.py and tests/test_e2e_replicas.py need to talk to a real
``PREFIX/bin/serve``: start it as a user does (the installed wrapper, ``--port 0``, its own
state dir) and stop it, wait until its workers have loaded the models, and speak HTTP to it
with the standard library only (urllib and raw sockets), so that a request the service
mishandles is seen as it is sent; and the recordings both modules send, with what
``bin/transcribe`` made of them (the reference every answer is compared with).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import speech
from e2e import Installed, assert_host_has_no_ffmpeg, output_dir, transcribe_as_nobody

from bundler.runtime import jobstore

LISTENING = re.compile(r"listening on (https?)://([^:/\s]+):(\d+)/v1")
READY_TIMEOUT_S = 300  # two workers loading pyannote and tiny.en on a busy 2-core host


@dataclass
class Answer:
    """One HTTP answer: status, headers (names lower-cased) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def error(self, status: int, code: str | None = None) -> dict[str, Any]:
        """The body as OpenAI's error shape, checked: ``{"error": {"message", "type",
        "param", "code"}}`` with ``status`` (and ``code`` if given)."""
        assert self.status == status, (self.status, self.body[:500])
        err = self.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["message"] and isinstance(err["type"], str), err
        if code is not None:
            assert err["code"] == code, err
        return dict(err)


@dataclass
class Server:
    """A running ``bin/serve``: its process (the Popen; the wrapper execs python, so its pid
    is the server's), port, state dir and the file its stderr goes to."""

    proc: subprocess.Popen[bytes]
    port: int
    state: Path
    log: Path
    pid: int = 0  # the server's pid when proc is a wrapper around it (strace); else proc's
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def server_pid(self) -> int:
        return self.pid or self.proc.pid

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, key: str | None = None,
                timeout: float = 300) -> Answer:
        return request(method, self.url + path, body, headers, key, timeout)

    def post_file(self, path: str, data: bytes, filename: str = "audio.wav",
                  fields: Sequence[tuple[str, str]] = (), key: str | None = None,
                  timeout: float = 300) -> Answer:
        body, content_type = multipart(fields, data, filename)
        return self.request("POST", path, body, {"Content-Type": content_type}, key, timeout)

    def workers(self) -> list[int]:
        """The server's child processes now (its workers)."""
        return children(self.server_pid())

    def uploads(self) -> list[str]:
        return sorted(os.listdir(self.state / "uploads"))


def request(method: str, url: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, key: str | None = None,
            timeout: float = 300) -> Answer:
    """One request with urllib; an HTTP error status is an answer, not an exception."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                          resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, {k.lower(): v for k, v in exc.headers.items()},
                          exc.read())


def multipart(fields: Sequence[tuple[str, str]], data: bytes | None = None,
              filename: str = "audio.wav") -> tuple[bytes, str]:
    """A ``multipart/form-data`` body: the text ``fields`` (repeatable names), then ``data``
    as the ``file`` field named ``filename``; ``(body, Content-Type)``."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in fields:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                f"{value}\r\n").encode()
    if data is not None:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                ).encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def raw_exchange(port: int, head: bytes, chunks: Iterable[bytes] = (),
                 each_chunk: Any = None, timeout: float = 60) -> tuple[Answer | None, int]:
    """Send ``head`` (request line and headers, raw) then ``chunks`` on one socket,
    stopping as soon as the server answers or closes; ``(answer or None, bytes of body
    sent)``. ``each_chunk()`` runs after every chunk (a measurement while it streams)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                sent += len(chunk)
                if each_chunk is not None:
                    each_chunk()
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered (or closed) before the body ended
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-stream: its answer may still be there to read
        sock.settimeout(timeout)
        data = bytearray()
        try:
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                data += part
                if _complete(bytes(data)):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return (_parse(bytes(data)) if data else None), sent


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return found is not None and len(body) >= int(found.group(1))


def _parse(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(status, headers, body)


def children(pid: int) -> list[int]:
    """``pid``'s child processes (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that still runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def du(folder: Path) -> int:
    """Bytes the files under ``folder`` hold now (files may vanish while it looks)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def wait_for_port(log: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """The port named in the server's ``listening on`` line (``--port 0``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = LISTENING.search(log.read_text(errors="replace"))
        if found:
            return int(found.group(3))
        if proc.poll() is not None:
            raise AssertionError(f"bin/serve exited {proc.returncode} before listening: "
                                 f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no 'listening on' line in {timeout} s: {log.read_text()[-3000:]}")


def wait_ready(server: Server, timeout: float = READY_TIMEOUT_S,
               fetch: Any = None) -> float:
    """Poll ``/readyz`` until 200 (bounded); the seconds it took. ``fetch(path)`` -> status
    replaces urllib (a client inside another network namespace)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.proc.poll() is not None:
            raise AssertionError(f"bin/serve exited {server.proc.returncode} while loading: "
                                 f"{server.stderr[-3000:]}")
        try:
            status = fetch("/readyz") if fetch else server.request("GET", "/readyz",
                                                                   timeout=10).status
        except OSError:
            status = 0
        if status == 200:
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"/readyz not 200 within {timeout} s: {server.stderr[-3000:]}")


def start(prefix: Path, state: Path, *args: str, wrap: Sequence[str] = (),
          env: dict[str, str] | None = None) -> Server:
    """``[wrap...] PREFIX/bin/serve --port 0 --state-dir STATE ARGS``, its stderr to a file
    beside the state dir; returns once it names its port (not yet ready)."""
    log = state.parent / f"{state.name}.{time.monotonic_ns()}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([*wrap, str(prefix / "bin" / "serve"), "--port", "0",
                                 "--state-dir", str(state), *args],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, env=env)
    try:
        port = wait_for_port(log, proc)
    except BaseException:
        stop_process(proc)
        raise
    return Server(proc, port, state, log)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 120) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextmanager
def serving(prefix: Path, state: Path, *args: str, wrap: Sequence[str] = (),
            env: dict[str, str] | None = None, ready: bool = True) -> Iterator[Server]:
    """A ``bin/serve`` for the ``with`` block (ready, unless ``ready=False``), stopped at
    its end (SIGTERM, then SIGKILL)."""
    server = start(prefix, state, *args, wrap=wrap, env=env)
    try:
        if ready:
            wait_ready(server)
        yield server
    finally:
        stop_process(server.proc)


@contextmanager
def replicas(prefix: Path, state: Path, count: int, *args: str) -> Iterator[list[Server]]:
    """``count`` servers on one state dir with the same ``args`` (``--store URL``: replicas
    of one queue), started together so their workers load the models at once, all ready;
    each stopped at the block's end (one a test killed already is only reaped)."""
    servers: list[Server] = []
    try:
        for _ in range(count):
            servers.append(start(prefix, state, *args))
        for server in servers:
            wait_ready(server)
        yield servers
    finally:
        for server in servers:
            stop_process(server.proc)


def store_init(prefix: Path, url: str) -> None:
    """``bin/serve store init --store URL``, as an operator runs it before the first replica."""
    proc = subprocess.run([str(prefix / "bin" / "serve"), "store", "init", "--store", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "version" in proc.stderr, proc.stderr


def metric(server: Server, name: str) -> float:
    """One unlabelled sample of the server's ``/metrics`` (0 while it is absent)."""
    text = server.request("GET", "/metrics", timeout=30).text
    found = re.search(rf"(?m)^{re.escape(name)} (\S+)$", text)
    return float(found.group(1)) if found else 0.0


def keys_add(prefix: Path, state: Path, name: str) -> str:
    """``bin/serve keys add NAME --state-dir STATE``: the key, captured from stdout."""
    proc = subprocess.run([str(prefix / "bin" / "serve"), "keys", "add", name, "--state-dir",
                           str(state)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.strip()
    assert proc.stdout == key + "\n" and re.fullmatch(r"\S{20,}", key), proc.stdout
    return key


# --- the recordings, and bin/transcribe's reference -------------------------------------
# Short clips for the many-request tests (2-4 s each): one voice, or both.
CLIPS: dict[str, list[tuple[str, str]]] = {
    "close.wav": [("A", "Please close the window before you leave.")],
    "weather.wav": [("B", "The weather will be cold and windy tomorrow.")],
    "lunch.wav": [("A", "I will call you back after lunch.")],
    "station.wav": [("A", "Where is the station?"), ("B", "It is on the left.")],
}
# A job long enough to be caught in work (about 12 s of the dialogue's first turns).
LONGER = "turns.wav"


@dataclass(frozen=True)
class Speech:
    """The recordings and what ``bin/transcribe`` made of them (json, srt, rttm)."""

    inst: Installed
    folder: Path  # dialogue.wav and the CLIPS
    reference: Path  # bin/transcribe's outputs: NAME.json, NAME.srt, NAME.rttm
    spoken: str  # the dialogue's text

    @property
    def prefix(self) -> Path:
        return self.inst.prefix

    def audio(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def srt(self, name: str) -> str:
        return (self.reference / f"{name}.srt").read_text()

    def document(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.reference / f"{name}.json").read_text())
        return data

    def speakers(self, name: str) -> set[str]:
        rttm = (self.reference / f"{name}.rttm").read_text().splitlines()
        return {line.split()[7] for line in rttm}

    def state(self, name: str) -> Path:
        """A fresh place for a state dir (the server creates it 0700)."""
        folder = self.inst.base / "serve" / name
        assert not folder.exists()
        folder.parent.mkdir(exist_ok=True)
        return folder


def make_speech(inst: Installed) -> Speech:
    """The dialogue and the clips, spoken by espeak-ng, and bin/transcribe's outputs for
    them: one run as nobody, offline, as a user on the isolated host runs it (the session's
    ``speech_ref`` fixture, tests/conftest.py)."""
    assert_host_has_no_ffmpeg()
    folder = inst.base / "serve-speech"
    folder.mkdir()
    turns = speech.dialogue(folder / "dialogue.wav")
    for name, lines in CLIPS.items():
        speech.dialogue(folder / name, lines)
    speech.dialogue(folder / LONGER, speech.DEFAULT_LINES[:3])
    for path in folder.iterdir():
        path.chmod(0o644)
    reference = output_dir(inst, "serve-reference")
    proc = transcribe_as_nobody(inst, str(folder), "--output-dir", str(reference),
                                "--format", "json,srt,rttm", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["done"] == 2 + len(CLIPS)
    return Speech(inst, folder, reference, " ".join(t.text for t in turns))


def wait_job(server: Server, job_id: str, key: str | None = None,
             timeout: float = 300) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` until the job is finished; its view."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = server.request("GET", f"/v1/jobs/{job_id}", key=key)
        assert answer.status == 200, answer.body
        view: dict[str, Any] = answer.json()
        if view["status"] in jobstore.FINISHED:
            return view
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished in {timeout} s: {server.stderr[-2000:]}")


def wait_running(server: Server, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.request("GET", f"/v1/jobs/{job_id}").json()["status"] == jobstore.RUNNING:
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never ran: {server.stderr[-2000:]}")


def post_job(server: Server, ref: Speech, name: str, key: str | None = None) -> str:
    answer = server.post_file("/v1/jobs", ref.audio(name), name, key=key)
    assert answer.status == 202, answer.body
    job_id: str = answer.json()["id"]
    return job_id
