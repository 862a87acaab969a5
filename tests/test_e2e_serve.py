"""``PREFIX/bin/serve`` on a real installed bundle (community-1 with the real tiny.en weights),
started as a user starts it (the installed wrapper, ``--port 0``, a state dir of its own),
spoken to by real clients: the ``openai`` SDK, ``curl -F``, and plain HTTP for what no
client would send. Every transcript it returns is compared with what ``PREFIX/bin/transcribe``
writes for the same file, run once as nobody offline: the service is an adapter over the
same code, so the two must be equal, not merely similar.

The bundle is the session's (tests/conftest.py ``community_installed``); the recordings are
espeak-ng speech (tests/speech.py). Each test says what a broken service would get wrong.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import ssl
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import serve_helpers as sh
import soundfile
import speech
from e2e import (
    CLEAN_ENV,
    NOBODY,
    connection_attempts,
)
from serve_helpers import CLIPS, LONGER, Speech, post_job, wait_job, wait_running

from bundler.runtime import jobstore, stores

pytestmark = pytest.mark.slow

MODEL = "Systran/faster-whisper-tiny.en"


def wait_empty(folder: Path, timeout: float = 10) -> list[str]:
    """What is left in ``folder`` once the service had ``timeout`` s to tidy it (a sync
    request's job and recording go in the background after its answer is sent)."""
    deadline = time.monotonic() + timeout
    while os.listdir(folder) and time.monotonic() < deadline:
        time.sleep(0.2)
    return sorted(os.listdir(folder))


# --- 1. real clients ---------------------------------------------------------------------
def test_openai_sdk_and_curl_get_bin_transcribes_transcripts(speech_ref: Speech) -> None:
    """The OpenAI SDK's three formats and curl's SRT are bin/transcribe's transcript of the
    dialogue: the same SRT byte for byte, the same JSON document through the jobs API, each
    segment and word labelled with a speaker the diarization found, the words right."""
    from openai import OpenAI

    ref = speech_ref
    curl = shutil.which("curl")
    assert curl, "curl is needed (.ci/run installs it)"
    dialogue = ref.folder / "dialogue.wav"
    speakers = ref.speakers("dialogue.wav")
    with sh.serving(ref.prefix, ref.state("sdk")) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="not-needed-on-loopback",
                        max_retries=0, timeout=300)
        with open(dialogue, "rb") as f:
            diarized = client.audio.transcriptions.create(
                model="gpt-4o-transcribe-diarize", file=f, response_format="diarized_json")
        with open(dialogue, "rb") as f:
            srt = client.audio.transcriptions.create(model="whisper-1", file=f,
                                                     response_format="srt")
        with open(dialogue, "rb") as f:
            verbose = client.audio.transcriptions.create(
                model=MODEL, file=f, response_format="verbose_json",
                timestamp_granularities=["word", "segment"])
        curled = subprocess.run(
            [curl, "-sS", "--max-time", "300", "-F", f"file=@{dialogue}", "-F",
             "model=whisper-1", "-F", "response_format=srt",
             f"{server.url}/v1/audio/transcriptions"], capture_output=True, text=True)
        job = post_job(server, ref, "station.wav")  # short: the jobs API, same document
        assert wait_job(server, job)["status"] == jobstore.SUCCEEDED
        document = server.request("GET", f"/v1/jobs/{job}/result?format=json")
        assert server.request("DELETE", f"/v1/jobs/{job}").status == 200
        left = wait_empty(server.state / "uploads")

    # diarized_json: OpenAI's shape, every segment a speaker bin/transcribe's RTTM has.
    d = diarized.model_dump()
    assert d["task"] == "transcribe" and d["segments"], d
    assert all(s["type"] == "transcript.text.segment" and s["speaker"] in speakers
               for s in d["segments"]), (d["segments"], speakers)
    assert speech.wer(ref.spoken, d["text"]) <= 0.10, d["text"]
    assert abs(d["duration"] - ref.document("dialogue.wav")["audio_seconds"]) < 0.01
    # srt: the SDK's and curl's are bin/transcribe's file, byte for byte.
    assert isinstance(srt, str)
    assert srt == ref.srt("dialogue.wav")
    assert curled.returncode == 0, curled.stderr
    assert curled.stdout == ref.srt("dialogue.wav")
    # verbose_json with words: each word and segment has a speaker the diarization found.
    v = verbose.model_dump()
    assert v["language"] == "en" and speech.wer(ref.spoken, v["text"]) <= 0.10, v["text"]
    assert v["segments"] and all(s["speaker"] in speakers for s in v["segments"])
    words = v["words"]
    assert words and all(w["speaker"] in speakers for w in words), words[:5]
    assert [w["word"] for w in words] == [w["word"].strip() for s in ref.document(
        "dialogue.wav")["segments"] for w in s["words"]]
    # The JSON document is the one bin/transcribe writes, but for where the file came from
    # (the service names the upload as the client named it).
    assert document.status == 200, document.body
    served, written = document.json(), ref.document("station.wav")
    assert served.pop("source") == "station.wav"
    written.pop("source")
    assert served == written
    assert left == []  # the deleted job's recording went with it


# --- 2. keys -----------------------------------------------------------------------------
def test_keys_none_wrong_revoked_are_401_and_another_keys_job_is_404(speech_ref: Speech
                                                                     ) -> None:
    """Keys made by the real ``bin/serve keys`` command: a request without one, with a
    wrong one or a revoked one gets 401 in OpenAI's shape; bob cannot see, read or delete
    alice's job; a non-loopback --host with no key refuses to start in one line."""
    ref = speech_ref
    state = ref.state("keys")
    alice, bob, carol = (sh.keys_add(ref.prefix, state, n) for n in ("alice", "bob", "carol"))
    assert len({alice, bob, carol}) == 3
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    stored = (state / jobstore.DB_NAME).read_bytes()
    assert alice.encode() not in stored and bob.encode() not in stored  # hashes only
    clip = ref.audio("close.wav")
    with sh.serving(ref.prefix, state) as server:
        assert server.request("GET", "/v1/models", key=carol).status == 200
        revoked = subprocess.run([str(ref.prefix / "bin/serve"), "keys", "revoke", "carol",
                                  "--state-dir", str(state)], capture_output=True, text=True)
        assert revoked.returncode == 0, revoked.stderr
        for key, code in ((None, "missing_api_key"), ("pbk_" + "x" * 43, "invalid_api_key"),
                          (carol, "invalid_api_key")):
            server.request("GET", "/v1/models", key=key).error(401, code)
            server.post_file("/v1/audio/transcriptions", clip, "close.wav",
                             key=key).error(401, code)
            server.post_file("/v1/jobs", clip, "close.wav", key=key).error(401, code)
        job = post_job(server, ref, "close.wav", key=alice)
        for method, path in (("GET", f"/v1/jobs/{job}"), ("GET", f"/v1/jobs/{job}/result"),
                             ("DELETE", f"/v1/jobs/{job}")):
            server.request(method, path, key=bob).error(404, "not_found")
        assert server.request("GET", "/v1/jobs", key=bob).json()["data"] == []
        assert wait_job(server, job, key=alice)["status"] == jobstore.SUCCEEDED
        mine = server.request("GET", f"/v1/jobs/{job}/result?format=srt", key=alice)
        assert mine.status == 200 and mine.text == ref.srt("close.wav")
        server.request("DELETE", f"/v1/jobs/{job}", key=bob).error(404, "not_found")
        assert server.request("DELETE", f"/v1/jobs/{job}", key=alice).status == 200
        server.request("GET", f"/v1/jobs/{job}", key=alice).error(404, "not_found")
        assert wait_empty(state / "uploads") == []
        assert "Traceback" not in server.stderr

    fresh = ref.state("keys-none")
    started = time.monotonic()
    refused = subprocess.run([str(ref.prefix / "bin/serve"), "--host", "0.0.0.0", "--port",
                              "0", "--state-dir", str(fresh)], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and "keys add" in lines[0] and "Traceback" not in lines[0], lines
    assert time.monotonic() - started < 60  # refused before any model loads


# --- 3. bad input ------------------------------------------------------------------------
def silent_flac(path: Path, seconds: float) -> bytes:
    soundfile.write(path, np.zeros(int(seconds * 16000), dtype=np.float32), 16000,
                    format="FLAC", subtype="PCM_16")
    return path.read_bytes()


def chunked(total: int, size: int = 256 << 10) -> Iterator[bytes]:
    """A multipart body of ``total`` bytes of 'audio' sent with chunked encoding (so that
    no Content-Length announces it: the server must count as it streams)."""
    boundary = b"streamedboundary"
    first = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"file\"; "
             b"filename=\"big.wav\"\r\n\r\nRIFF")
    yield b"%x\r\n%s\r\n" % (len(first), first)
    block = b"\x01" * size
    for _ in range(total // size):
        yield b"%x\r\n%s\r\n" % (size, block)
    yield b"0\r\n\r\n"


def test_bad_input_gets_its_status_and_the_next_request_is_served(speech_ref: Speech) -> None:
    """Each bad request against one running server: the documented status in OpenAI's error
    shape, the server still answering after it, and nothing left in STATE/uploads."""
    ref = speech_ref
    state = ref.state("bad")
    clip = ref.audio("close.wav")
    with sh.serving(ref.prefix, state, "--max-upload", "1M", "--max-duration", "5") as server:
        post = server.post_file
        path = "/v1/audio/transcriptions"
        post(path, b"", "empty.wav").error(400, "empty_file")
        post(path, b"just some words in a text file\n" * 20, "notes.wav").error(
            415, "unsupported_media")
        # A truncated mp3. Its first 600 bytes (the ID3 tag, the Xing frame and a few
        # samples) decode to 3 ms: 200 with nothing heard, not the whole sample's words. Its
        # first 300 bytes hold no audio frame at all: 422 undecodable.
        mp3 = (ref.prefix / "smoke" / "sample.mp3").read_bytes()
        cut = post(path, mp3[:600], "cut.mp3", [("response_format", "verbose_json")])
        assert cut.status == 200, cut.body
        assert cut.json()["duration"] < 0.01 and cut.json()["text"] == "", cut.body
        post(path, mp3[:300], "cut.mp3").error(422, "undecodable")

        # 50 MB streamed with no Content-Length against --max-upload 1M: refused while it
        # streams, and the state dir never holds more than about the limit.
        base_use = sh.du(state)
        peak = [0]

        def measure() -> None:
            peak[0] = max(peak[0], sh.du(state))

        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                "Content-Type: multipart/form-data; boundary=streamedboundary\r\n\r\n").encode()
        answer, sent = sh.raw_exchange(server.port, head, chunked(50 << 20), measure)
        assert answer is not None, "no answer to an upload over --max-upload"
        answer.error(413, "file_too_large")
        assert sent < 40 << 20, sent  # stopped while streaming, not after the 50 MB
        measure()
        assert peak[0] - base_use < 3 << 20, (peak[0], base_use)

        silent = silent_flac(state.parent / "silent.flac", 20)
        assert len(silent) < 1 << 20
        post(path, silent, "silent.flac").error(413, "too_long")

        boundary = "b0undary"
        malformed = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                     f"filename=\"a.wav\"\r\n\r\n").encode() + clip[:4000]  # no end
        server.request("POST", path, malformed, {
            "Content-Type": f"multipart/form-data; boundary={boundary}"}).error(
                400, "invalid_multipart")

        evil = post(path, clip, "../../x.wav", [("response_format", "text")])
        assert evil.status == 200 and evil.text.strip(), evil.body
        for folder in (state, state.parent, state.parent.parent, ref.inst.base, Path.cwd()):
            assert not (folder / "x.wav").exists(), folder

        # 64 KB of headers sent at once: uvicorn (h11) alone would answer 200 (its bound
        # holds only for headers that arrive in pieces); the service answers 431.
        sh.request("GET", server.url + "/v1/models", headers={"X-Padding": "p" * (64 << 10)}
                   ).error(431, "header_too_large")
        assert server.request("GET", "/healthz").status == 200

        unknown = post(path, clip, "close.wav", [("model", "whisper-9")]).error(
            400, "model_not_found")
        assert unknown["param"] == "model" and "tiny.en" in unknown["message"]
        assert "whisper-1" in unknown["message"]
        post(path, clip, "close.wav", [("response_format", "docx")]).error(400, "invalid_value")

        good = post(path, clip, "close.wav", [("response_format", "srt")])
        assert good.status == 200 and good.text == ref.srt("close.wav")
        assert wait_empty(state / "uploads") == []
        assert "Traceback" not in server.stderr


def test_tls_serves_https_with_the_certificate_and_refuses_plain_http(
        speech_ref: Speech) -> None:
    """--tls-cert/--tls-key: the 'listening on' line says https, a client that trusts the
    certificate gets bin/transcribe's SRT over TLS, and plain HTTP gets no answer."""
    ref = speech_ref
    state = ref.state("tls")
    cert, key = state.parent / "tls-cert.pem", state.parent / "tls-key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                           "-keyout", str(key), "-out", str(cert), "-days", "1",
                           "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    context = ssl.create_default_context(cafile=str(cert))
    with sh.serving(ref.prefix, state, "--tls-cert", str(cert), "--tls-key", str(key),
                    ready=False) as server:
        assert f"listening on https://127.0.0.1:{server.port}/v1" in server.stderr
        url = f"https://127.0.0.1:{server.port}"

        def fetch(path: str) -> int:
            with urllib.request.urlopen(url + path, timeout=10, context=context) as resp:
                return int(resp.status)

        sh.wait_ready(server, fetch=fetch)
        body, content_type = sh.multipart([("response_format", "srt")],
                                          ref.audio("close.wav"), "close.wav")
        req = urllib.request.Request(url + "/v1/audio/transcriptions", data=body,
                                     method="POST", headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=300, context=context) as resp:
            assert resp.status == 200 and resp.read().decode() == ref.srt("close.wav")
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(server.url + "/healthz", timeout=10).read()


# --- 4. load -----------------------------------------------------------------------------
def test_forty_requests_from_eight_clients_are_200_or_429_and_each_is_right(
        speech_ref: Speech) -> None:
    """--workers 2 --queue 8, 40 requests from 8 threads: every answer is 200 (the SRT
    bin/transcribe writes for that clip) or 429 with Retry-After; no 5xx, no hang."""
    ref = speech_ref
    names = [name for _ in range(10) for name in CLIPS]
    with sh.serving(ref.prefix, ref.state("load"), "--workers", "2", "--queue", "8") as server:

        def one(name: str) -> tuple[str, sh.Answer]:
            return name, server.post_file("/v1/audio/transcriptions", ref.audio(name), name,
                                          [("model", "whisper-1"),
                                           ("response_format", "srt")], timeout=300)

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, names))
        took = time.monotonic() - started
        left = wait_empty(server.state / "uploads")
        assert "Traceback" not in server.stderr
    statuses = Counter(a.status for _, a in answers)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= 8, statuses
    for name, answer in answers:
        if answer.status == 429:
            assert int(answer.headers["retry-after"]) >= 1
            answer.error(429, "queue_full")
        else:
            assert answer.text == ref.srt(name), name
    assert left == []
    print(f"40 requests, 8 clients, 2 workers: {dict(statuses)} in {took:.1f} s")


# --- 5. faults ---------------------------------------------------------------------------
def test_sigkill_loses_no_job_and_sigterm_drains(speech_ref: Speech) -> None:
    """SIGKILL with 3 jobs running or queued: no worker outlives the server, and after a
    restart on the same state dir all 3 finish with bin/transcribe's results; deleted, they
    leave nothing. SIGTERM with 2 jobs: exit 0, the one in hand finished, the other still
    queued, done after the next start."""
    ref = speech_ref
    state = ref.state("faults")
    names = [LONGER, "weather.wav", "station.wav"]
    server = sh.start(ref.prefix, state)
    try:
        sh.wait_ready(server)
        jobs = [post_job(server, ref, name) for name in names]
        wait_running(server, jobs[0])
        workers = server.workers()
        assert workers
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
    finally:
        sh.stop_process(server.proc)
    deadline = time.monotonic() + 15
    while any(sh.alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if sh.alive(w)], "a worker outlived the killed server"

    with sh.serving(ref.prefix, state) as server:
        views = [wait_job(server, job) for job in jobs]
        assert [v["status"] for v in views] == [jobstore.SUCCEEDED] * 3, views
        assert views[0]["attempts"] == 2  # interrupted once, then done
        for job, name in zip(jobs, names, strict=True):
            got = server.request("GET", f"/v1/jobs/{job}/result?format=srt")
            assert got.status == 200 and got.text == ref.srt(name), name
            assert server.request("DELETE", f"/v1/jobs/{job}").status == 200
        assert server.uploads() == []
        assert server.request("GET", "/v1/jobs").json()["data"] == []
        assert "1 job(s) interrupted by the last stop run again" in server.stderr

    # SIGTERM: the job in hand is finished, the queued one waits in the store.
    server = sh.start(ref.prefix, state, "--drain-timeout", "120")
    try:
        sh.wait_ready(server)
        jobs = [post_job(server, ref, name) for name in (LONGER, "lunch.wav")]
        wait_running(server, jobs[0])
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(150)
    finally:
        sh.stop_process(server.proc)
    assert code == 0, server.stderr[-2000:]
    assert time.monotonic() - started < 120
    store = stores.open_store(None, state)
    first, second = (store.get(job, None) for job in jobs)
    store.close()
    assert first and first.status == jobstore.SUCCEEDED and first.attempts == 1
    assert second and second.status == jobstore.QUEUED
    with sh.serving(ref.prefix, state) as server:
        assert wait_job(server, jobs[1])["status"] == jobstore.SUCCEEDED
        for job, name in zip(jobs, (LONGER, "lunch.wav"), strict=True):
            got = server.request("GET", f"/v1/jobs/{job}/result?format=srt")
            assert got.status == 200 and got.text == ref.srt(name), name
            assert server.request("DELETE", f"/v1/jobs/{job}").status == 200
        assert server.uploads() == []


# --- 6. offline, as nobody ---------------------------------------------------------------
LOOPBACK_CONNECT = re.compile(r"inet_addr\(\"127\.|inet_pton\(AF_INET6, \"::1\"")


def test_as_nobody_offline_no_connection_attempt_and_private_state(speech_ref: Speech
                                                                   ) -> None:
    """bin/serve as nobody, with no HOME, in a fresh network namespace (loopback up, as a
    host with no route out), under strace, for more than 30 s with requests: no connect()
    to anything but loopback; the state dir 0700, its store and recordings 0600."""
    ref = speech_ref
    nobody = pwd.getpwnam("nobody")
    home = ref.inst.base / "serve" / "nobody"
    home.mkdir(parents=True)
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    home.chmod(0o700)
    state = home / "state"
    trace = ref.inst.base / "serve" / "serve.trace"
    wrap = ("unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            "strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o", str(trace),
            *NOBODY, *CLEAN_ENV)
    server = sh.start(ref.prefix, state, wrap=wrap)
    inside = ("nsenter", f"--net=/proc/{server.proc.pid}/ns/net")

    def curl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*inside, "curl", "-sS", "--max-time", "300", *args],
                              capture_output=True, text=True)

    def status(path: str) -> int:
        out = curl("-o", "/dev/null", "-w", "%{http_code}", server.url + path).stdout
        return int(out or 0)

    try:
        started = time.monotonic()
        (server.pid,) = sh.children(server.proc.pid)  # strace's child: the server
        uids = next(line.split()[1:] for line in Path(f"/proc/{server.pid}/status"
                                                      ).read_text().splitlines()
                    if line.startswith("Uid:"))
        assert uids == [str(nobody.pw_uid)] * 4, uids  # real, effective, saved, fs
        sh.wait_ready(server, fetch=status)
        srt = curl("-F", f"file=@{ref.folder / 'dialogue.wav'}", "-F", "response_format=srt",
                   server.url + "/v1/audio/transcriptions")
        assert srt.returncode == 0 and srt.stdout == ref.srt("dialogue.wav"), srt.stderr
        job = json.loads(curl("-F", f"file=@{ref.folder / 'station.wav'}",
                              server.url + "/v1/jobs").stdout)["id"]
        while json.loads(curl(f"{server.url}/v1/jobs/{job}").stdout)["status"] not in \
                jobstore.FINISHED:
            time.sleep(0.5)
        modes = {p.relative_to(state).as_posix(): stat.S_IMODE(p.stat().st_mode)
                 for p in [state, *state.rglob("*")]}
        owners = {p.stat().st_uid for p in [state, *state.rglob("*")]}
        while time.monotonic() - started < 35:  # past onnxruntime's telemetry delay
            clip = curl("-F", f"file=@{ref.folder / 'lunch.wav'}", "-F",
                        "response_format=srt", server.url + "/v1/audio/transcriptions")
            assert clip.stdout == ref.srt("lunch.wav"), clip.stderr
        curl("-X", "DELETE", f"{server.url}/v1/jobs/{job}")
        metrics = curl(server.url + "/metrics").stdout
        os.kill(server.pid, signal.SIGTERM)
        code = server.proc.wait(120)
        took = time.monotonic() - started
    finally:
        if server.pid and sh.alive(server.pid):
            os.kill(server.pid, signal.SIGKILL)
        sh.stop_process(server.proc)
    assert code == 0, server.stderr[-2000:]
    assert took > 30, took
    assert "Traceback" not in server.stderr
    assert "pyannote_serve_network_attempts 0.0" in metrics
    attempts = connection_attempts(trace)
    assert [ln for ln in attempts if not LOOPBACK_CONNECT.search(ln)] == [], attempts
    assert owners == {nobody.pw_uid}, owners
    assert modes["."] == 0o700 and modes["uploads"] == 0o700, modes
    assert modes[jobstore.DB_NAME] == 0o600, modes
    assert modes[f"uploads/{job}"] == 0o600, modes
    assert all(m & 0o077 == 0 for m in modes.values()), modes
