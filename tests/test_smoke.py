"""smoke/smoke.py's bin/serve check, fast: the multipart body it sends (read by the service's
own parser), loopback brought up in a fresh network namespace, its client's one exemption
from --guard-sockets, and a server that stops before it is ready. The whole check on an
installed bundle runs in the slow tests (tests/test_e2e.py, tests/test_e2e_community.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from bundler.runtime import jobstore, serve, service, smoke

ROOT = Path(smoke.__file__).parents[2]


def _wav() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        # Frames that hold what a naive body builder would trip on: CRLF and dashes.
        w.writeframes(b"\r\n--\r\n" * 2000)
    return buf.getvalue()


def test_the_multipart_body_is_read_by_the_service_as_it_was_sent(tmp_path: Path) -> None:
    state = serve.private_state_dir(tmp_path / "state")
    store = jobstore.SQLiteStore(state / jobstore.DB_NAME)
    svc = service.Service(service.Settings(
        state_dir=state, asr={"repo": "Systran/faster-whisper-tiny.en"}, multilingual=False,
        pipeline="pyannote/speaker-diarization-community-1"), store)
    svc.worker_ready(1)
    data = _wav()
    content_type, body = smoke.multipart_body(
        {"kind": "transcription", "model": "whisper-1", "language": "en"}, "dialogue.flac",
        data)
    r = TestClient(service.make_app(svc)).post(
        "/v1/jobs", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 202, r.text
    job = store.get(r.json()["id"], None)
    assert job is not None and job.kind == "transcription"
    assert job.params == {"language": "en"} and job.filename == "dialogue.flac"
    assert (state / "uploads" / job.upload).read_bytes() == data


def test_a_form_value_that_would_break_the_body_is_refused() -> None:
    with pytest.raises(ValueError, match="quote or a line break"):
        smoke.multipart_body({"model": 'a"b'}, "x.wav", b"")
    with pytest.raises(ValueError, match="quote or a line break"):
        smoke.multipart_body({}, "x\r\n.wav", b"")


def _in_fresh_namespace(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a Python with this checkout's runtime, in a network namespace of its own
    (this machine runs the tests as root: ``unshare -n`` as the installer uses it)."""
    return subprocess.run(["unshare", "-n", sys.executable, "-I", "-c", code],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PATH": os.environ["PATH"]})


def test_loopback_is_brought_up_in_a_fresh_namespace_and_left_alone_when_up() -> None:
    proc = _in_fresh_namespace(
        "import sys, socket; sys.path.insert(0, '.'); from bundler.runtime import smoke\n"
        "s = socket.socket(); s.settimeout(2)\n"
        "try:\n    s.connect(('127.0.0.1', 9)); print('connected')\n"
        "except OSError as e:\n    print('down', e.errno)\n"
        "print(smoke.loopback_up(), smoke.loopback_up())\n"
        "l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(1)\n"
        "c = socket.create_connection(l.getsockname(), timeout=2); print('up')\n")
    assert proc.returncode == 0, proc.stderr
    # Down (ENETUNREACH) first; this call brought it up, the second found it up.
    assert proc.stdout.split("\n")[:3] == ["down 101", "True False", "up"]
    assert smoke.loopback_up() is False  # on this host lo is up: nothing is asked for
    with pytest.raises(OSError):
        smoke.loopback_up("no-such-if0")


def test_the_guard_refuses_every_connect_but_the_smoke_clients_own_to_loopback() -> None:
    proc = subprocess.run([sys.executable, "-I", "-c", (
        "import sys, socket, threading, http.server\n"
        "sys.path.insert(0, '.'); from bundler.runtime import smoke\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.send_header('Content-Length', '2')\n"
        "        self.end_headers(); self.wfile.write(b'ok')\n"
        "    def log_message(self, *a): pass\n"
        "srv = http.server.HTTPServer(('127.0.0.1', 0), H)\n"
        "threading.Thread(target=srv.serve_forever, daemon=True).start()\n"
        "port = srv.server_address[1]\n"
        "smoke.guard_sockets()\n"
        "print(smoke.http_call(port, 'GET', '/readyz', 5))\n"
        "for attempt in (lambda: socket.create_connection(('127.0.0.1', port)),\n"
        "                lambda: socket.socket().connect(('127.0.0.1', port)),\n"
        "                lambda: socket.getaddrinfo('localhost', port)):\n"
        "    try:\n        attempt(); print('open')\n"
        "    except ConnectionRefusedError:\n        print('refused')\n")],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["(200, b'ok')", "refused", "refused", "refused"]


def test_a_server_that_stops_before_it_is_ready_is_said_in_one_line(tmp_path: Path) -> None:
    """bin/serve refusing to start (a stand-in that says what bin/serve says and exits
    as it does): the check fails with its line, and leaves no state dir."""
    program = tmp_path / "bin" / "serve"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\necho 'serve: error: cannot use --state-dir: disk full' >&2\n"
                       "exit 5\n")
    program.chmod(0o755)
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "sample.wav").write_bytes(_wav())
    before = set(os.listdir(tempfile.gettempdir()))
    result = smoke.serve_check(tmp_path, None, {"segments": [], "speakers": 0})
    assert result["ok"] is False and result["exit"] == 5
    assert result["error"] == ("it stopped before it was ready (exit 5): serve: error: "
                               "cannot use --state-dir: disk full")
    assert result["endpoint"] == "/v1/audio/diarization" and "port" not in result
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - before
                if n.startswith("pyannote-bundle-smoke-serve-")}
    json.dumps(result)  # goes into smoke-result.json as it is
