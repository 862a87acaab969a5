"""bin/serve's parts, fast: the job store (leases, attempts, owners, keys: one suite run on
SQLite and on a real PostgreSQL server), the answers' formats, and the HTTP side through
Starlette's test client with a real SQLite store in a real state dir. No model loads here: a
job stays queued unless a test finishes it itself; tests/test_e2e_serve.py runs the real
workers on an installed bundle."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg import PostgresServer, free_port
from starlette.testclient import TestClient

from bundler import layout
from bundler.runtime import (
    configure,
    jobstore,
    pool,
    responses,
    serve,
    service,
    stores,
    transcript,
    uploads,
    worker,
)
from bundler.runtime.pgstore import PostgresStore

SERVE = Path(serve.__file__)


# --- the store: one suite, both engines --------------------------------------------------
StoreMaker = Callable[[], jobstore.Store]


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreMaker]:
    """Opens the store under test: each call another connection to the same one (as another
    process, or another replica, would have)."""
    opened: list[jobstore.Store] = []
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 's.db'}"
    else:
        server = request.getfixturevalue("postgres")
        url = server.database()
        PostgresStore(url, check_schema=False).migrate()  # bin/serve store init

    def make() -> jobstore.Store:
        opened.append(stores.open_store(url, tmp_path))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


def _job(store: jobstore.Store, owner: str = "", **kw: Any) -> jobstore.Job:
    job = jobstore.Job(id=os.urandom(16).hex(), owner=owner, kind="transcription",
                       params={"language": "en"}, filename="a.wav", upload="u", sync=False,
                       **kw)
    store.add_job(job)
    time.sleep(0.001)  # distinct created_at: the queue is first come, first served
    return job


def test_a_job_is_claimed_once_renewed_and_finished_by_its_worker(new_store: StoreMaker
                                                                  ) -> None:
    store = new_store()
    first, second = _job(store), _job(store)
    a = store.claim("w1", 60)
    b = store.claim("w2", 60)
    assert (a and a.id, b and b.id) == (first.id, second.id)
    assert store.claim("w3", 60) is None  # both held
    assert a and a.params == {"language": "en"} and a.attempts == 1
    assert not store.finish(first.id, "w2", {"x": 1}, 1.0, 0.5)  # not w2's job
    assert store.renew(first.id, "w1", 60)
    assert store.finish(first.id, "w1", {"segments": []}, 2.0, 0.5)
    done = store.get(first.id, None)
    assert done and done.status == "succeeded" and done.result == {"segments": []}
    assert done.audio_seconds == 2.0 and store.unfinished() == 1
    assert store.fail(second.id, "w2", "undecodable", "cannot decode")
    failed = store.get(second.id, "")
    assert failed and failed.error == {"kind": "undecodable", "message": "cannot decode"}
    assert store.counts() == {"succeeded": 1, "failed": 1}
    assert store.finished_before(time.time() + 1) and not store.finished_before(0)


def test_an_expired_lease_is_claimed_again_and_a_poisonous_job_fails(new_store: StoreMaker
                                                                     ) -> None:
    store = new_store()
    job = _job(store)
    for attempt in range(1, jobstore.MAX_ATTEMPTS + 1):
        got = store.claim(f"w{attempt}", -1)  # a lease already run out: the worker "died"
        assert got and got.id == job.id and got.attempts == attempt
    assert store.claim("next", 60) is None
    dead = store.get(job.id, None)
    assert dead and dead.status == "failed" and dead.error
    assert dead.error["kind"] == "worker_died"


def test_requeue_running_and_release_give_the_job_back(new_store: StoreMaker) -> None:
    store = new_store()
    job = _job(store)
    assert store.claim("w", 3600)
    assert store.claim("other", 3600) is None  # the lease holds
    assert store.requeue_running() == 1  # a restart: that worker is gone
    again = store.claim("other", 3600)
    assert again and again.id == job.id and again.attempts == 2
    assert store.release(job.id, "other")
    back = store.get(job.id, None)
    assert back and back.status == "queued" and back.attempts == 1


def test_a_dead_workers_job_is_claimable_at_once(new_store: StoreMaker) -> None:
    store = new_store()
    job, other = _job(store), _job(store)
    assert store.claim("dead", 3600) and store.claim("alive", 3600)
    assert store.expire_worker("dead") == 1  # its worker exited: no waiting for the lease
    again = store.claim("next", 3600)
    assert again and again.id == job.id and store.claim("x", 3600) is None
    assert (store.get(other.id, None) or job).worker == "alive"


def test_job_lease_reaches_the_workers_and_a_dead_ones_job_waits_only_that_long(
        tmp_path: Path) -> None:
    """``--job-lease``: the workers' config carries it, their lease thread renews it at that
    pace, and once renewals stop (the replica was SIGKILLed) the job is another worker's
    after that long, not after the 60-second default."""
    args = serve.parser().parse_args(["--job-lease", "2.5", "--state-dir", str(tmp_path)])
    assert json.loads(pool.Pool(None, args, print).config(0))["lease"] == 2.5
    assert serve.parser().parse_args([]).job_lease == worker.LEASE_S == 60
    store = stores.open_store(None, tmp_path)
    job = _job(store)
    held = store.claim("w1", 0.9)
    assert held and held.id == job.id
    lease = worker.Lease(store, job.id, "w1", 0.9)
    lease.start()
    time.sleep(2.0)  # more than two leases: only the renewals keep it
    assert store.claim("w2", 0.9) is None
    lease.stop()
    lease.join(5)
    deadline = time.monotonic() + 5
    again = None
    while again is None and time.monotonic() < deadline:
        again = store.claim("w2", 0.9)
        time.sleep(0.1)
    assert again and again.id == job.id and again.attempts == 2
    store.close()
    p = _serve("--job-lease", "0", "--state-dir", str(tmp_path / "s"))
    assert p.returncode == 2 and p.stderr.strip().endswith("--job-lease must be at least 1")
    assert len(p.stderr.splitlines()) == 1


def test_jobs_are_seen_only_by_their_owner(new_store: StoreMaker) -> None:
    store = new_store()
    alice = _job(store, owner="alice")
    assert store.get(alice.id, "bob") is None and store.delete(alice.id, "bob") is None
    assert not store.set_speakers(alice.id, "bob", {"SPEAKER_00": "Ann"})
    assert store.set_speakers(alice.id, "alice", {"SPEAKER_00": "Ann"})
    seen = store.get(alice.id, "alice")
    assert seen and seen.speakers == {"SPEAKER_00": "Ann"} and seen.sync is False
    assert [j.id for j in store.jobs("alice")] == [alice.id] and store.jobs("bob") == []
    assert store.delete(alice.id, "alice") and store.get(alice.id, None) is None


def test_keys_store_only_hashes_and_revoked_ones_stop(new_store: StoreMaker) -> None:
    store = new_store()
    store.add_key("alice", service.key_digest("secret"))
    with pytest.raises(jobstore.StoreError, match="revoke it first"):
        store.add_key("alice", service.key_digest("other"))
    assert store.key_owner(service.key_digest("secret")) == "alice"
    assert "secret" not in json.dumps(store.keys())
    assert store.revoke_key("alice") and store.key_owner(service.key_digest("secret")) is None
    assert store.active_keys() == 0 and not store.revoke_key("alice")
    store.add_key("alice", service.key_digest("new"))  # a revoked name takes a new key
    assert store.key_owner(service.key_digest("new")) == "alice" and store.active_keys() == 1
    assert new_store().key_owner(service.key_digest("new")) == "alice"  # every replica's


def test_the_embedded_store_is_private_and_keeps_only_hashes(tmp_path: Path) -> None:
    store = jobstore.SQLiteStore(tmp_path / "s.db")
    store.add_key("alice", service.key_digest("secret"))
    _job(store)
    assert b"secret" not in (tmp_path / "s.db").read_bytes()
    assert (tmp_path / "s.db").stat().st_mode & 0o077 == 0


def test_two_stores_claiming_fifty_jobs_at_once_take_each_exactly_once(
        new_store: StoreMaker) -> None:
    """Two replicas' workers (two connections, two threads) on one queue."""
    first, second = new_store(), new_store()
    ids = {_job(first).id for _ in range(50)}
    taken: dict[str, list[str]] = {"a": [], "b": []}
    start = threading.Barrier(2)

    def work(store: jobstore.Store, name: str) -> None:
        start.wait()
        while (job := store.claim(name, 600)) is not None:
            taken[name].append(job.id)
            assert store.finish(job.id, name, {}, 1.0, 0.1)

    threads = [threading.Thread(target=work, args=(s, n)) for s, n in
               ((first, "a"), (second, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    both = taken["a"] + taken["b"]
    assert sorted(both) == sorted(ids), "a job taken twice, or not at all"
    assert first.counts() == {"succeeded": 50}


def test_an_unknown_store_url_names_only_its_scheme(tmp_path: Path) -> None:
    with pytest.raises(jobstore.StoreError) as err:
        stores.open_store("mysql://u:hunter2@db/x", tmp_path)
    assert "hunter2" not in str(err.value) and "postgresql://USER@HOST" in str(err.value)


# --- the formats -------------------------------------------------------------------------
ASR = [{"start": 0.0, "end": 2.0, "text": " Hello there. Good day.",
        "words": [{"start": 0.0, "end": 0.5, "word": " Hello", "probability": 0.9},
                  {"start": 0.5, "end": 1.0, "word": " there.", "probability": 0.9},
                  {"start": 1.2, "end": 1.6, "word": " Good", "probability": 0.9},
                  {"start": 1.6, "end": 2.0, "word": " day.", "probability": 0.9}]}]
TURNS = [{"start": 0.0, "end": 1.1, "speaker": "SPEAKER_00"},
         {"start": 1.1, "end": 2.2, "speaker": "SPEAKER_01"}]


def _result() -> dict[str, Any]:
    segments = transcript.speaker_segments(ASR, TURNS)
    return json.loads(transcript.to_json(segments, {
        "file": "a.wav", "uri": "a.wav", "audio_seconds": 2.2, "language": "en",
        "task": "transcribe", "speakers": ["SPEAKER_00", "SPEAKER_01"],
        "diarization": TURNS}))


def test_formats_are_bin_transcribes_and_openais_shapes() -> None:
    result = _result()
    segments = result["segments"]
    srt, media = responses.transcription(result, "srt")
    assert srt == transcript.to_srt(segments) and media.startswith("application/x-subrip")
    assert responses.transcription(result, "vtt")[0] == transcript.to_vtt(segments)
    assert responses.transcription(result, "text")[0] == "Hello there. Good day.\n"
    d = json.loads(responses.transcription(result, "diarized_json")[0])
    assert d["task"] == "transcribe" and d["duration"] == 2.2 and d["usage"]["seconds"] == 3
    assert [(s["type"], s["id"], s["speaker"], s["text"]) for s in d["segments"]] == [
        ("transcript.text.segment", "seg_0", "SPEAKER_00", "Hello there."),
        ("transcript.text.segment", "seg_1", "SPEAKER_01", "Good day.")]
    v = json.loads(responses.transcription(result, "verbose_json", words=True)[0])
    assert v["language"] == "en" and [s["speaker"] for s in v["segments"]] == [
        "SPEAKER_00", "SPEAKER_01"]
    assert [(w["word"], w["speaker"]) for w in v["words"]][-1] == ("day.", "SPEAKER_01")
    assert "words" not in json.loads(responses.transcription(result, "verbose_json")[0])
    rttm = responses.transcription(result, "rttm")[0]
    assert rttm.splitlines()[0].split()[7] == "SPEAKER_00"


def test_renamed_speakers_reach_every_format() -> None:
    names = {"SPEAKER_00": "Alice"}
    for fmt in ("srt", "vtt", "txt", "rttm", "diarized_json", "verbose_json", "transcript"):
        body = responses.transcription(_result(), fmt, names)[0]
        assert "Alice" in body and "SPEAKER_00" not in body, fmt
    assert "Alice" in responses.diarization({"segments": TURNS, "speakers": ["SPEAKER_00"]},
                                            "rttm", names)[0]


def test_media_is_recognised_by_its_first_bytes(tmp_path: Path) -> None:
    assert uploads.looks_like_media(_wav(0.1)[:64])
    assert uploads.looks_like_media(b"ID3\x04" + bytes(60))
    assert uploads.looks_like_media(b"\xff\xfb\x90\x00" + bytes(60))  # MP3 frame, no ID3
    assert uploads.looks_like_media(b"\x00\x00\x00\x20ftypM4A ")
    assert not uploads.looks_like_media(b"hello, this is text named .wav\n")
    assert not uploads.looks_like_media(b"")


# --- HTTP ------------------------------------------------------------------------------
def _wav(seconds: float) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(int(seconds * 16000) * 2))
    return buf.getvalue()


class Server:
    def __init__(self, state: Path, asr: bool = True, store: jobstore.Store | None = None,
                 **settings: Any) -> None:
        serve.private_state_dir(state)
        self.state = state
        self.store = store or jobstore.SQLiteStore(state / jobstore.DB_NAME)
        self.service = service.Service(service.Settings(
            state_dir=state, asr={"repo": "Systran/faster-whisper-tiny.en"} if asr else None,
            multilingual=False, pipeline="pyannote/speaker-diarization-community-1",
            **settings), self.store)
        self.service.worker_ready(1)
        self.client = TestClient(service.make_app(self.service))

    def uploads(self) -> list[str]:
        return sorted(os.listdir(self.state / "uploads"))


@pytest.fixture
def srv(tmp_path: Path) -> Server:
    return Server(tmp_path / "state", max_upload=200_000, queue=3)


def _post(srv: Server, path: str = "/v1/jobs", data: bytes | None = None,
          name: str = "a.wav", key: str | None = None, **fields: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    files = {"file": (name, _wav(0.5) if data is None else data, "audio/wav")}
    return srv.client.post(path, files=files, data=fields, headers=headers)


def _error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    return dict(body["error"])


def test_a_job_is_committed_private_before_its_202(srv: Server) -> None:
    r = _post(srv, name="../../etc/x.wav", model="whisper-1")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["file"] == "x.wav" and job["kind"] == "transcription"
    stored = srv.store.get(job["id"], None)
    assert stored and stored.upload == job["id"]
    upload = srv.state / "uploads" / job["id"]
    assert upload.read_bytes() == _wav(0.5) and stat.S_IMODE(upload.stat().st_mode) == 0o600
    assert not (srv.state.parent / "etc").exists() and srv.uploads() == [job["id"]]
    assert srv.client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    assert [j["id"] for j in srv.client.get("/v1/jobs").json()["data"]] == [job["id"]]
    _error(srv.client.get(f"/v1/jobs/{job['id']}/result"), 409, "not_ready")
    assert srv.client.delete(f"/v1/jobs/{job['id']}").json()["deleted"] is True
    assert srv.uploads() == [] and srv.store.get(job["id"], None) is None


@pytest.mark.parametrize(("data", "status", "code"), [
    (b"", 400, "empty_file"),
    (b"just some text, named like a recording\n", 415, "unsupported_media"),
    (b"RIFF" + bytes(300_000), 413, "file_too_large"),
])
def test_bad_files_get_their_status_and_leave_nothing(srv: Server, data: bytes, status: int,
                                                      code: str) -> None:
    _error(_post(srv, data=data), status, code)
    assert srv.uploads() == [] and srv.store.unfinished() == 0
    assert _post(srv).status_code == 202  # the next request is served


def test_bad_fields_are_named(srv: Server) -> None:
    err = _error(_post(srv, model="gpt-9"), 400, "model_not_found")
    assert "Systran/faster-whisper-tiny.en" in err["message"] and err["param"] == "model"
    assert _error(_post(srv, "/v1/audio/transcriptions", response_format="docx"), 400,
                  "invalid_value")["param"] == "response_format"
    assert _error(_post(srv, language="de"), 400, "invalid_value")["param"] == "language"
    assert _error(_post(srv, num_speakers="two"), 400, "invalid_value")["param"] == \
        "num_speakers"
    _error(_post(srv, min_speakers="3", max_speakers="2"), 400, "invalid_value")
    _error(_post(srv, kind="karaoke"), 400, "invalid_value")
    assert srv.uploads() == []


def test_malformed_multipart_and_huge_part_headers_are_400(srv: Server) -> None:
    r = srv.client.post("/v1/jobs", content=b"--xx\r\nContent-Disposition: form-data; name=\"f",
                        headers={"Content-Type": "multipart/form-data; boundary=xx"})
    _error(r, 400, "invalid_multipart")
    huge = (b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"X-Pad: " + b"a" * 40_000 + b"\r\n\r\n" + _wav(0.1) + b"\r\n--xx--\r\n")
    r = srv.client.post("/v1/jobs", content=huge,
                        headers={"Content-Type": "multipart/form-data; boundary=xx"})
    # python-multipart's own bound (0.0.21+) or this service's, whichever comes first
    assert r.status_code == 400 and r.json()["error"]["code"] in ("header_too_large",
                                                                  "invalid_multipart")
    _error(srv.client.post("/v1/jobs", content=b"{}",
                           headers={"Content-Type": "application/json"}), 400,
           "invalid_content_type")
    assert srv.uploads() == []


def test_huge_request_headers_are_431_whatever_the_route(srv: Server) -> None:
    # uvicorn (h11) lets a 64 KB header through when it arrives in one read, as it does on
    # loopback: the app bounds them itself, before the key check and the routes.
    pad = {"X-Padding": "p" * (64 << 10)}
    for method, path in (("GET", "/v1/models"), ("GET", "/healthz"), ("GET", "/nowhere")):
        _error(srv.client.request(method, path, headers=pad), 431, "header_too_large")
    r = srv.client.post("/v1/jobs", files={"file": ("a.wav", _wav(0.5), "audio/wav")},
                        headers=pad)
    _error(r, 431, "header_too_large")
    assert srv.uploads() == [] and srv.store.unfinished() == 0
    # An ordinary browser's or SDK's few kilobytes of headers pass.
    assert srv.client.get("/v1/models", headers={"X-Padding": "p" * 8000}).status_code == 200


def test_a_full_queue_is_429_with_retry_after(srv: Server) -> None:
    for _ in range(1 + 3):  # one worker + --queue 3
        assert _post(srv).status_code == 202
    r = _post(srv)
    _error(r, 429, "queue_full")
    assert int(r.headers["Retry-After"]) >= 1 and len(srv.uploads()) == 4


def test_not_ready_is_503_and_unknown_routes_are_openai_errors(srv: Server) -> None:
    _error(srv.client.get("/v1/nothing"), 404, "not_found")
    assert srv.client.get("/readyz").status_code == 200
    srv.service.worker_ready(0)
    r = _post(srv)
    _error(r, 503, "not_ready")
    assert r.headers["Retry-After"] and srv.uploads() == []
    assert srv.client.get("/readyz").status_code == 503
    assert srv.client.get("/healthz").json() == {"status": "ok"}


def test_keys_none_wrong_revoked_and_another_keys_job(srv: Server) -> None:
    srv.store.add_key("alice", service.key_digest("pbk_alice"))
    srv.store.add_key("bob", service.key_digest("pbk_bob"))
    _error(_post(srv), 401, "missing_api_key")
    _error(_post(srv, key="pbk_mallory"), 401, "invalid_api_key")
    job = _post(srv, key="pbk_alice").json()
    r = srv.client.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer pbk_bob"})
    _error(r, 404, "not_found")
    assert srv.client.get("/v1/jobs", headers={"Authorization": "Bearer pbk_bob"}).json()[
        "data"] == []
    srv.store.revoke_key("alice")
    _error(srv.client.get(f"/v1/jobs/{job['id']}",
                          headers={"Authorization": "Bearer pbk_alice"}), 401, "invalid_api_key")


def test_models_lists_the_served_names(srv: Server) -> None:
    ids = [m["id"] for m in srv.client.get("/v1/models").json()["data"]]
    assert ids[:2] == ["Systran/faster-whisper-tiny.en", "faster-whisper-tiny.en"]
    assert "whisper-1" in ids and "pyannote/speaker-diarization-community-1" in ids


def test_a_diarization_only_bundle_refuses_transcription(tmp_path: Path) -> None:
    s = Server(tmp_path / "state", asr=False)
    _error(_post(s, "/v1/audio/transcriptions"), 400, "model_not_found")
    assert _post(s).json()["kind"] == "diarization"


def _finish_next(srv: Server, result: dict[str, Any] | None, error: str | None = None) -> None:
    """What a worker does with the next job, for the HTTP side's waiting (the real worker
    runs in tests/test_e2e_serve.py)."""
    def work() -> None:
        store = jobstore.SQLiteStore(srv.state / jobstore.DB_NAME)
        for _ in range(200):
            job = store.claim("t", 60)
            if job:
                if result is not None:
                    store.finish(job.id, "t", result, 2.2, 0.4)
                else:
                    store.fail(job.id, "t", error or "internal", "it failed")
                srv.service.job_finished({"job": job.id, "status": "succeeded"})
                return
            time.sleep(0.02)
    threading.Thread(target=work, daemon=True).start()


def test_a_transcription_request_waits_for_its_job_then_forgets_it(srv: Server) -> None:
    _finish_next(srv, _result())
    r = _post(srv, "/v1/audio/transcriptions", response_format="diarized_json",
              chunking_strategy="auto")
    assert r.status_code == 200, r.text
    assert [s["speaker"] for s in r.json()["segments"]] == ["SPEAKER_00", "SPEAKER_01"]
    assert srv.store.jobs(None) == [] and srv.uploads() == []  # delivered: nothing kept
    _finish_next(srv, None, "undecodable")
    _error(_post(srv, "/v1/audio/transcriptions"), 422, "undecodable")
    _finish_next(srv, None, "too_long")
    _error(_post(srv, "/v1/audio/transcriptions"), 413, "too_long")


def test_a_failed_request_leaves_neither_its_job_nor_its_recording(srv: Server) -> None:
    for path, kind, status in (("/v1/audio/transcriptions", "undecodable", 422),
                               ("/v1/audio/transcriptions", "too_long", 413),
                               ("/v1/audio/diarization", "too_long", 413)):
        _finish_next(srv, None, kind)
        _error(_post(srv, path), status, kind)
        assert srv.store.jobs(None) == [] and srv.uploads() == [], (path, kind)


def test_job_results_in_every_format_and_renamed(srv: Server) -> None:
    _finish_next(srv, _result())
    job = _post(srv).json()
    for _ in range(100):
        if srv.client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded":
            break
        time.sleep(0.05)
    doc = srv.client.get(f"/v1/jobs/{job['id']}/result").json()
    assert doc["segments"] == _result()["segments"]  # bin/transcribe's JSON document
    srt = srv.client.get(f"/v1/jobs/{job['id']}/result?format=srt").text
    assert srt == transcript.to_srt(_result()["segments"])
    srv.store.set_speakers(job["id"], None, {"SPEAKER_00": "Alice"})
    assert "[Alice] Hello there." in srv.client.get(
        f"/v1/jobs/{job['id']}/result?format=srt").text
    view = srv.client.get(f"/v1/jobs/{job['id']}").json()
    assert view["timings"]["rtf"] == round(0.4 / 2.2, 4)
    metrics = srv.client.get("/metrics").text
    assert 'pyannote_serve_requests_total{endpoint="jobs_create",status="202"}' in metrics


# --- the program ------------------------------------------------------------------------
def _serve(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", str(SERVE), *argv], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_keys_add_prints_the_key_alone_and_stores_its_hash(tmp_path: Path) -> None:
    state = tmp_path / "state"
    p = _serve("keys", "add", "alice", "--state-dir", str(state))
    assert p.returncode == 0, p.stderr
    key = p.stdout.strip()
    assert p.stdout == key + "\n" and key.startswith("pbk_") and len(key) > 40
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    db = state / jobstore.DB_NAME
    assert stat.S_IMODE(db.stat().st_mode) == 0o600 and key.encode() not in db.read_bytes()
    assert jobstore.SQLiteStore(db).key_owner(service.key_digest(key)) == "alice"
    again = _serve("keys", "add", "alice", "--state-dir", str(state))
    assert again.returncode == 2 and "revoke it first" in again.stderr and not again.stdout
    listed = _serve("keys", "list", "--state-dir", str(state), "--json")
    assert [k["name"] for k in json.loads(listed.stdout)["keys"]] == ["alice"]
    assert _serve("keys", "revoke", "alice", "--state-dir", str(state)).returncode == 0
    gone = _serve("keys", "revoke", "alice", "--state-dir", str(state))
    assert gone.returncode == 2 and "no active key" in gone.stderr


def test_a_key_name_that_cannot_name_a_folder_is_refused(tmp_path: Path) -> None:
    # The name is the key's voiceprints folder (STATE/voiceprints/NAME): a trailing newline
    # (which a `$` at the end of a pattern lets through) or a slash must not get that far.
    state = tmp_path / "state"
    for bad in ("alice\n", "a/b", "../x", "", "-x"):
        p = _serve("keys", "add", bad, "--state-dir", str(state))
        assert p.returncode == 2 and not p.stdout, (bad, p.stderr)
        assert "Traceback" not in p.stderr
    assert not (state / "voiceprints").exists()


def test_no_keys_means_loopback_only_and_a_shared_state_dir_is_refused(tmp_path: Path
                                                                       ) -> None:
    state = tmp_path / "state"
    p = _serve("--host", "0.0.0.0", "--state-dir", str(state))
    assert p.returncode == 2 and "keys add" in p.stderr and len(p.stderr.splitlines()) == 1
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    p = _serve("--state-dir", str(shared))
    assert p.returncode == 5 and "chmod 700" in p.stderr and "Traceback" not in p.stderr
    assert _serve("--workers", "0", "--state-dir", str(state)).returncode == 2


def test_help_teaches_the_endpoints_keys_and_exit_codes() -> None:
    p = _serve("--help")
    assert p.returncode == 0
    for text in ("/v1/audio/transcriptions", "diarized_json", "keys add NAME", "--max-upload",
                 "--insecure-no-auth", "cannot listen"):
        assert text in p.stdout, text


def test_configure_writes_bin_serve_and_a_unit_whose_command_serve_takes(
        tmp_path: Path) -> None:
    prefix = tmp_path / "pre fix"
    (prefix / "runtime").mkdir(parents=True)
    unit = configure.systemd_unit(prefix)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.startswith(f'ExecStart="{prefix}/bin/serve" ')
    args = serve.parser().parse_args(exec_start.split('" ', 1)[1].split())
    assert args.state_dir == Path("/var/lib/pyannote-serve") and args.host == "127.0.0.1"
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectoryMode=0700",
                      "UMask=0077", "CapabilityBoundingSet=\n", "PrivateTmp=yes"):
        assert hardening in unit, hardening
    assert "runtime/serve.py" in configure.wrapper(prefix, "serve")


# --- the shared store: PostgreSQL ------------------------------------------------------------
def test_a_password_in_the_store_url_is_refused_and_never_shown(tmp_path: Path) -> None:
    for url in ("postgresql://serve:hunter2@db.example/jobs",
                "postgresql://serve@db.example/jobs?password=hunter2&sslmode=require"):
        with pytest.raises(jobstore.StoreError) as err:
            stores.open_store(url, tmp_path)
        message = str(err.value)
        assert "hunter2" not in message and "PGPASSFILE" in message, message
        assert "postgresql://serve@db.example/jobs" in message and "\n" not in message
    p = _serve("--store", "postgresql://serve:hunter2@db.example/jobs", "--state-dir",
               str(tmp_path / "state"))
    assert p.returncode == 3 and "hunter2" not in p.stderr + p.stdout, p.stderr
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr


def test_a_wrong_password_or_port_is_one_line_naming_the_database_not_the_password(
        postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    url = postgres.url()
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    monkeypatch.setenv("PGPASSWORD", "wrong-hunter2")
    with pytest.raises(jobstore.StoreUnavailable) as err:
        PostgresStore(url)
    message = str(err.value)
    assert "hunter2" not in message and postgres.password not in message
    assert f"postgresql://serve@127.0.0.1:{postgres.port}/postgres" in message, message
    assert "password authentication failed" in message and "\n" not in message
    closed = f"postgresql://serve@127.0.0.1:{free_port()}/postgres"
    with pytest.raises(jobstore.StoreUnavailable, match="cannot reach the job store "
                       + re.escape(closed)):
        PostgresStore(closed)


def test_store_init_makes_the_schema_the_server_refuses_to_start_without(
        postgres: PostgresServer, tmp_path: Path) -> None:
    url, state = postgres.database(), str(tmp_path / "state")
    p = _serve("--store", url, "--state-dir", state)
    assert p.returncode == 3 and f"bin/serve store init --store {url}" in p.stderr, p.stderr
    for action, said in (("init", "(created)"), ("migrate", "(already current)")):
        p = _serve("store", action, "--store", url)
        assert p.returncode == 0 and said in p.stderr, p.stderr
    assert PostgresStore(url).schema_version() == jobstore.SCHEMA_VERSION
    p = _serve("--host", "0.0.0.0", "--store", url, "--state-dir", state)
    assert p.returncode == 2 and f"keys add NAME --store {url})" in p.stderr, p.stderr
    elsewhere = tmp_path / "an-admin-host"
    key = _serve("keys", "add", "alice", "--store", url, "--state-dir", str(elsewhere))
    assert key.returncode == 0, key.stderr
    assert not elsewhere.exists()  # a shared store's keys need no state dir
    assert PostgresStore(url).key_owner(service.key_digest(key.stdout.strip())) == "alice"
    listed = _serve("keys", "list", "--json", "--store", url)
    assert [k["name"] for k in json.loads(listed.stdout)["keys"]] == ["alice"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    for argv in (("--store", url, "--state-dir", state), ("store", "migrate", "--store", url)):
        p = _serve(*argv)
        assert p.returncode == 3 and "schema 99, newer than this bundle's" in p.stderr, p.stderr


def test_a_restarted_database_is_503_in_openais_shape_then_served_again(
        postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.database()
    PostgresStore(url, check_schema=False).migrate()
    srv = Server(tmp_path / "state", store=PostgresStore(url))
    r = _post(srv)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    idle = PostgresStore(url)
    assert idle.unfinished() == 1  # a connection made, then left idle over the restart
    postgres.pg_ctl("stop")
    try:
        down = _error(srv.client.get(f"/v1/jobs/{job}"), 503, "store_unavailable")
        assert url not in down["message"]  # where the database is stays in the server's log
        assert _post(srv).status_code == 503 and srv.uploads() == [job]  # nothing half-kept
        # A delivered answer's clean-up meets it: the job stays for --keep-days, no error.
        asyncio.run(srv.service.forget(jobstore.Job(id=job, owner="", kind="diarization",
                                                    params={}, filename="a.wav", upload=job,
                                                    sync=True)))
        # The --keep-days cleaner meets it too, and goes on to its next round (it sleeps).
        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(asyncio.wait_for(serve.clean(srv.service, 7.0), 1.0))
    finally:
        postgres.pg_ctl("start")
    # A connection the restart closed is noticed before use: no call fails on it.
    assert idle.unfinished() == 1
    for _ in range(3):
        assert srv.client.get(f"/v1/jobs/{job}").json()["status"] == "queued"
    assert srv.client.delete(f"/v1/jobs/{job}").json()["deleted"] is True


def test_a_waiting_request_rides_out_a_database_restart(
        postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its job is accepted and in work: a restart of seconds is waited out, not a 503 that
    would make the client send the recording again."""
    monkeypatch.setattr(service, "WAIT_POLL_S", 0.1)
    url = postgres.database()
    PostgresStore(url, check_schema=False).migrate()
    srv = Server(tmp_path / "state", store=PostgresStore(url))

    def worker() -> None:  # another replica's, say: it takes the job, the database goes
        store = PostgresStore(url)
        for _ in range(500):
            job = store.claim("elsewhere", 60)
            if job:
                break
            time.sleep(0.02)
        assert job
        postgres.pg_ctl("stop")
        time.sleep(0.5)  # several of the request's reads meet the outage
        postgres.pg_ctl("start")
        store.finish(job.id, "elsewhere", _result(), 2.2, 0.4)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    r = _post(srv, "/v1/audio/transcriptions", response_format="text")
    thread.join(30)
    assert r.status_code == 200 and r.text == "Hello there. Good day.\n", r.text


def test_reaching_its_store_is_not_counted_as_a_workers_network_attempt(
        postgres: PostgresServer) -> None:
    """psycopg looks the store's host name up in Python (libpq connects in C): the audit
    behind /metrics' network attempts lets that one name through, and only it."""
    url = postgres.database().replace("127.0.0.1", "localhost")
    assert jobstore.store_hosts(url) == ["localhost"]
    assert jobstore.store_hosts("postgresql://u@[::1]:5433,db.example/j?host=r.example"
                                "&sslmode=require") == ["::1", "db.example", "r.example"]
    assert jobstore.store_hosts("postgresql://u@%2Fvar%2Frun%2Fpostgresql/j") == []
    assert jobstore.store_hosts(None) == [] == jobstore.store_hosts("sqlite:///s.db")
    script = ("import socket, sys\n"
              "from bundler.runtime import jobstore, offline\n"
              "from bundler.runtime.pgstore import PostgresStore\n"
              "url, allow = sys.argv[1], sys.argv[2] == 'allow'\n"
              "audit = offline.NetworkAudit(allow=jobstore.store_hosts(url) if allow else ())\n"
              "sys.addaudithook(audit)\n"
              "PostgresStore(url, check_schema=False).schema_version()\n"
              "try:\n    socket.getaddrinfo('elsewhere.invalid', 80)\n"
              "except OSError:\n    pass\n"
              "print(audit.attempts)\n")
    seen = {}
    for mode in ("allow", "count"):
        proc = subprocess.run([sys.executable, "-c", script, url, mode], capture_output=True,
                              text=True, timeout=60, cwd=Path(serve.__file__).parents[2])
        assert proc.returncode == 0, proc.stderr
        seen[mode] = proc.stdout.strip()
    assert seen["allow"] == "[\"getaddrinfo 'elsewhere.invalid'\"]", seen
    assert "getaddrinfo 'localhost'" in seen["count"], seen  # it is looked up in Python


def test_replicas_share_the_state_dir_and_leave_each_others_work_alone(
        postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.database()
    PostgresStore(url, check_schema=False).migrate()
    state = serve.private_state_dir(tmp_path / "state")
    first = serve.lock_state_dir(state, shared=True)
    second = serve.lock_state_dir(state, shared=True)  # another replica on the same volume
    with pytest.raises(serve.Fail, match="another bin/serve is using"):
        serve.lock_state_dir(state, shared=False)
    first.close()
    second.close()
    alone = serve.lock_state_dir(state, shared=False)
    with pytest.raises(serve.Fail, match="with its own embedded store is using"):
        serve.lock_state_dir(state, shared=True)
    alone.close()
    store = PostgresStore(url)
    running = _job(store)
    assert store.claim("other-replica-worker", 600)
    uploads = state / "uploads"
    fresh, old, part = (uploads / os.urandom(16).hex(), uploads / os.urandom(16).hex(),
                        uploads / f".{os.urandom(16).hex()}.part")
    for path in (fresh, old, part):
        path.write_bytes(b"RIFF")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    assert serve.recover(state, store) == (0, 1)  # no requeue; only the old orphan goes
    assert sorted(os.listdir(uploads)) == sorted([fresh.name, part.name])
    got = store.get(running.id, None)
    assert got and got.status == "running" and got.worker == "other-replica-worker"
    embedded = jobstore.SQLiteStore(tmp_path / "s.db")
    _job(embedded)
    assert embedded.claim("gone", 600)
    assert serve.recover(state, embedded) == (1, 2)  # ours alone: all of it, at once


def test_every_room_of_the_service_ships_in_the_bundle() -> None:
    """pgstore.py among them: a bundle without it could not open a shared store."""
    runtime = Path(serve.__file__).parent
    shipped = set(layout.PROGRAMS.values())
    # apply.py travels in a delta, __init__.py is the tool's package marker.
    assert {p.name for p in runtime.glob("*.py")} - shipped == {"__init__.py", "apply.py"}


def test_a_diarization_job_finds_the_pipeline_with_or_without_asr() -> None:
    """In a bundle without ASR the worker loaded bin/diarize's ``Loaded``, whose own
    ``pipeline`` is pyannote's object: the diarization job must use the Loaded itself (the
    3.1 targets' install smoke got a 500 'no diarization pipeline loaded' before)."""
    from bundler.runtime import diarize, transcribe

    alone = diarize.Loaded(pipeline=object(), torch=None, device="cpu", pyannote_audio="3.4.0",
                           seconds=0.0)
    assert worker.diarization_of(alone) is alone
    both = transcribe.Loaded(alone, None, transcribe.AsrModel(Path("m")), "cpu", "int8",
                             "1.2.1", 0.0, 1)
    assert worker.diarization_of(both) is alone
    with pytest.raises(RuntimeError, match="no diarization pipeline"):
        worker.diarization_of(object())
