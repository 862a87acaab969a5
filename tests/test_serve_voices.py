"""bin/serve's known speakers, fast: ``known_speaker_names[]`` / ``known_speaker_references[]``
on the audio endpoints and jobs (the form, the data URLs, every refusal, the private
reference files and their deletion), and the voiceprint endpoints (``POST``, ``GET``,
``DELETE /v1/voiceprints``) with per-key isolation, through Starlette's test client with a
real SQLite store in a real state dir, as tests/test_serve.py does. No model loads here:
where a worker would run, the test plays it (claims the job, finishes or fails it), as
tests/test_serve.py's ``_finish_next`` does; the voiceprint it saves is marked as the
test's own vector, not an embedding. The real worker, pipeline and embeddings are
tests/test_e2e_voiceprints.py's (``-k serve``)."""

from __future__ import annotations

import base64
import json
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_serve import Server, _error, _wav

from bundler.runtime import jobstore, responses, serve, voiceprints, voices
from bundler.runtime.service import key_digest

ALICE, BOB = "pbk_alice", "pbk_bob"
MODEL = voiceprints.EmbeddingModel("pyannote/speaker-diarization-community-1", "c" * 40,
                                   "e" * 64)


@pytest.fixture
def srv(tmp_path: Path) -> Server:
    s = Server(tmp_path / "state", max_upload=400_000, queue=3)
    s.store.add_key("alice", key_digest(ALICE))
    s.store.add_key("bob", key_digest(BOB))
    return s


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _data_url(data: bytes, media: str = "audio/wav") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def _stored(srv: Server, owner: str, name: str) -> Path:
    """A voiceprint file in ``owner``'s folder, as the worker saves one (the vector is this
    test's, not an embedding: the HTTP side never reads it)."""
    vp = voiceprints.Voiceprint(name, MODEL, (1.0, 0.0, 0.0),
                                (voiceprints.Clip("a" * 64, 3.0, 2.5),), "2026-12-07")
    return voiceprints.save(voiceprints.owner_folder(srv.state, owner), vp)


def _post(srv: Server, path: str, fields: list[tuple[str, str]], key: str = ALICE,
          files: list[tuple[str, bytes]] | None = None) -> Any:
    sent = [("file", (n, d, "audio/wav")) for n, d in (files or [("a.wav", _wav(0.5))])]
    return srv.client.post(path, files=sent, data=_fields(fields), headers=_auth(key))


def _fields(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        out.setdefault(name, []).append(value)
    return out


def _play_worker(srv: Server, work: Callable[[jobstore.Job], tuple[dict[str, Any] | None,
                                                                   str | None]]) -> None:
    """The next job, done by the test in a thread: ``work(job)`` gives its result, or the
    kind of its failure."""
    def run() -> None:
        store = jobstore.SQLiteStore(srv.state / jobstore.DB_NAME)
        for _ in range(400):
            job = store.claim("t", 60)
            if job:
                result, failed = work(job)
                if result is not None:
                    store.finish(job.id, "t", result, 0.0, 0.1)
                else:
                    store.fail(job.id, "t", failed or "internal", f"refused: {failed}")
                srv.service.job_finished({"job": job.id, "status": "succeeded"})
                return
            time.sleep(0.02)
    threading.Thread(target=run, daemon=True).start()


# --- known speakers on a recording -----------------------------------------------------
def test_names_and_references_become_private_files_deleted_with_the_job(srv: Server) -> None:
    _stored(srv, "alice", "Alice")
    ref = _wav(3.0)
    for names, refs in (("known_speaker_names[]", "known_speaker_references[]"),
                        ("known_speaker_names", "known_speaker_references")):  # both forms
        r = _post(srv, "/v1/jobs", [(names, "Alice"), (names, "Bob Smith"), (refs, ""),
                                    (refs, _data_url(ref)), ("match_threshold", "0.7")])
        assert r.status_code == 202, r.text
        job = srv.store.get(r.json()["id"], "alice")
        assert job is not None
        assert job.params["known_speakers"] == [
            {"name": "Alice", "reference": None},
            {"name": "Bob Smith", "reference": f"{job.id}.1"}]
        assert job.params["match_threshold"] == 0.7 and job.params["files"] == [f"{job.id}.1"]
        reference = srv.state / "uploads" / f"{job.id}.1"
        assert reference.read_bytes() == ref
        assert stat.S_IMODE(reference.stat().st_mode) == 0o600
        assert sorted(srv.uploads()) == sorted([job.id, f"{job.id}.1"])
        assert srv.client.delete(f"/v1/jobs/{job.id}", headers=_auth(ALICE)).status_code == 200
        assert srv.uploads() == []


def test_a_reference_of_a_delivered_request_goes_with_its_answer(srv: Server) -> None:
    seen: list[jobstore.Job] = []

    def work(job: jobstore.Job) -> tuple[dict[str, Any] | None, str | None]:
        seen.append(job)
        return {"segments": [], "speakers": [], "audio_seconds": 0.5,
                "identification": [{"speaker": "SPEAKER_00", "identified_as": "Ann",
                                    "similarity": 0.9}]}, None

    _play_worker(srv, work)
    r = _post(srv, "/v1/audio/diarization", [("known_speaker_names[]", "Ann"),
                                             ("known_speaker_references[]",
                                              _data_url(_wav(2.0)))])
    assert r.status_code == 200, r.text
    assert r.json()["identification"][0]["identified_as"] == "Ann"
    assert seen[0].kind == "diarization" and seen[0].params["files"]
    assert srv.uploads() == [] and srv.store.jobs(None) == []


@pytest.mark.parametrize(("fields", "status", "code", "says"), [
    ([("known_speaker_names[]", n) for n in "ABCDE"], 400, "invalid_value", "at most 4"),
    ([("known_speaker_names[]", "A"), ("known_speaker_references[]", _data_url(_wav(2))),
      ("known_speaker_references[]", _data_url(_wav(2)))], 400, "invalid_value",
     "one name for each reference"),
    ([("known_speaker_references[]", _data_url(_wav(2)))], 400, "invalid_value",
     "need known_speaker_names"),
    ([("known_speaker_names[]", "SPEAKER_01"), ("known_speaker_references[]",
                                                _data_url(_wav(2)))], 400, "invalid_value",
     "how the pipeline labels"),
    ([("known_speaker_names[]", "../x"), ("known_speaker_references[]", _data_url(_wav(2)))],
     400, "invalid_value", "cannot be a voiceprint name"),
    ([("known_speaker_names[]", "Ann"), ("known_speaker_names[]", "ann")], 400,
     "invalid_value", "twice"),
    ([("known_speaker_names[]", "Ann"), ("known_speaker_references[]", "https://x/a.wav")],
     400, "invalid_value", "base64 data URL"),
    ([("known_speaker_names[]", "Ann"), ("known_speaker_references[]",
                                         "data:audio/wav,RIFF")], 400, "invalid_value",
     "base64 data URL"),
    ([("known_speaker_names[]", "Ann"), ("known_speaker_references[]",
                                         "data:audio/wav;base64,!!!")], 400, "invalid_value",
     "not valid base64"),
    ([("known_speaker_names[]", "Ann"), ("known_speaker_references[]",
                                         _data_url(b"hello, I am text", "text/plain"))],
     415, "unsupported_media", "not an audio"),
    ([("known_speaker_names[]", "Nobody")], 400, "voiceprint_not_found", "POST /v1/voiceprints"),
    ([("known_speaker_names[]", "Ann"), ("known_speaker_references[]", _data_url(_wav(2))),
      ("match_threshold", "1.5")], 400, "invalid_value", "from 0 to 1"),
    ([("match_threshold", "0.5")], 400, "invalid_value", "needs known_speaker_names"),
])
def test_bad_known_speakers_are_one_line_and_leave_nothing(
        srv: Server, fields: list[tuple[str, str]], status: int, code: str, says: str) -> None:
    for path in ("/v1/audio/transcriptions", "/v1/audio/diarization", "/v1/jobs"):
        err = _error(_post(srv, path, fields), status, code)
        assert says in err["message"] and "\n" not in err["message"], err
        assert err["param"] in ("known_speaker_names", "known_speaker_references",
                                "match_threshold"), err
        assert srv.uploads() == [] and srv.store.unfinished() == 0


def test_another_keys_stored_voiceprint_is_not_found(srv: Server) -> None:
    _stored(srv, "bob", "Bob")
    _error(_post(srv, "/v1/jobs", [("known_speaker_names[]", "Bob")]), 400,
           "voiceprint_not_found")
    assert _post(srv, "/v1/jobs", [("known_speaker_names[]", "Bob")], key=BOB
                 ).status_code == 202


@pytest.mark.parametrize(("kind", "status", "param"), [
    ("invalid_reference", 400, "known_speaker_references"),
    ("voiceprint_not_found", 400, "known_speaker_names"),
])
def test_a_workers_refusal_of_a_known_speaker_is_the_requests_error(
        srv: Server, kind: str, status: int, param: str) -> None:
    _play_worker(srv, lambda job: (None, kind))
    err = _error(_post(srv, "/v1/audio/transcriptions",
                       [("known_speaker_names[]", "Ann"),
                        ("known_speaker_references[]", _data_url(_wav(0.5)))]), status, kind)
    assert err["param"] == param
    assert srv.uploads() == [] and srv.store.jobs(None) == []


def test_orphaned_references_are_swept_and_a_live_jobs_are_kept(srv: Server) -> None:
    r = _post(srv, "/v1/jobs", [("known_speaker_names[]", "Ann"),
                                ("known_speaker_references[]", _data_url(_wav(2)))])
    live = r.json()["id"]
    dead = "f" * 32
    for name in (dead, f"{dead}.1", f".{dead}.2.part", "not-ours.1"):
        (srv.state / "uploads" / name).write_bytes(b"x")
    assert serve.orphans(srv.state, srv.store) == 3
    assert srv.uploads() == sorted([live, f"{live}.1", "not-ours.1"])


# --- stored voiceprints ------------------------------------------------------------------
def _enrolled_by_the_test(srv: Server, seen: list[jobstore.Job]) -> None:
    """Plays the worker of a voiceprint job: saves the voiceprint as the real worker does
    (voiceprints.save in the key's folder) with the test's vector, and answers its summary."""
    def work(job: jobstore.Job) -> tuple[dict[str, Any] | None, str | None]:
        seen.append(job)
        folder = voiceprints.owner_folder(srv.state, job.owner)
        vp = voiceprints.Voiceprint(job.params["name"], MODEL, (0.0, 1.0, 0.0), tuple(
            voiceprints.Clip("b" * 64, 2.0, 1.8) for _ in job.uploads()), "2026-12-07")
        voiceprints.save(folder, vp, replace=job.params["replace"])
        return vp.summary(), None
    _play_worker(srv, work)


def test_enroll_list_and_delete_a_voiceprint_per_key(srv: Server) -> None:
    seen: list[jobstore.Job] = []
    _enrolled_by_the_test(srv, seen)
    r = _post(srv, "/v1/voiceprints", [("name", "Alice")],
              files=[("one.wav", _wav(2.0)), ("two.wav", _wav(3.0))])
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == "Alice" and body["object"] == "voiceprint"
    assert body["embedding_model"]["repo"] == MODEL.repo and len(body["clips"]) == 2
    assert "embedding" not in json.dumps(body).replace("embedding_model", "")
    job = seen[0]
    assert job.kind == voices.KIND and job.owner == "alice"
    assert job.params["clips"] == ["one.wav", "two.wav"] and len(job.uploads()) == 2
    assert srv.uploads() == [] and srv.store.jobs(None) == []  # the clips are not kept
    folder = voiceprints.owner_folder(srv.state, "alice")
    assert folder.name == "alice" and ALICE not in str(folder)
    path = folder / "Alice.json"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    listed = srv.client.get("/v1/voiceprints", headers=_auth(ALICE)).json()
    assert listed["object"] == "list" and [v["name"] for v in listed["data"]] == ["Alice"]
    assert "embedding" not in listed["data"][0]
    # Another key sees none, cannot delete it, and cannot use it by name.
    assert srv.client.get("/v1/voiceprints", headers=_auth(BOB)).json()["data"] == []
    _error(srv.client.delete("/v1/voiceprints/Alice", headers=_auth(BOB)), 404, "not_found")
    _error(_post(srv, "/v1/jobs", [("known_speaker_names[]", "Alice")], key=BOB), 400,
           "voiceprint_not_found")
    assert path.is_file()
    # The same name again: 409 at once (no job), unless replaced.
    err = _error(_post(srv, "/v1/voiceprints", [("name", "Alice")]), 409, "voiceprint_exists")
    assert "replace=true" in err["message"] and srv.store.unfinished() == 0
    _enrolled_by_the_test(srv, seen)
    assert _post(srv, "/v1/voiceprints", [("name", "Alice"), ("replace", "true")]
                 ).status_code == 201
    assert len(json.loads(path.read_text())["clips"]) == 1
    r = srv.client.delete("/v1/voiceprints/Alice", headers=_auth(ALICE))
    assert r.status_code == 200 and r.json() == {"object": "voiceprint", "name": "Alice",
                                                 "deleted": True}
    assert not path.exists()
    assert srv.client.get("/v1/voiceprints", headers=_auth(ALICE)).json()["data"] == []
    _error(srv.client.delete("/v1/voiceprints/Alice", headers=_auth(ALICE)), 404, "not_found")
    _error(srv.client.delete("/v1/voiceprints/..", headers=_auth(ALICE)), 404, "not_found")


def test_a_clip_the_worker_refuses_is_422_and_leaves_nothing(srv: Server) -> None:
    _play_worker(srv, lambda job: (None, "clip_refused"))
    err = _error(_post(srv, "/v1/voiceprints", [("name", "Alice")]), 422, "clip_refused")
    assert err["param"] == "file"
    assert srv.uploads() == [] and srv.store.jobs(None) == []
    assert not voiceprints.owner_folder(srv.state, "alice").exists()


@pytest.mark.parametrize(("fields", "files", "status", "code"), [
    ([], None, 400, "invalid_value"),  # no name
    ([("name", "SPEAKER_00")], None, 400, "invalid_value"),
    ([("name", "a/b")], None, 400, "invalid_value"),
    ([("name", "Ann"), ("replace", "maybe")], None, 400, "invalid_value"),
    ([("name", "Ann")], [], 400, "missing_file"),
    ([("name", "Ann")], [("a.wav", _wav(1.0)), ("notes.wav", b"text, not audio")], 415,
     "unsupported_media"),
    ([("name", "Ann")], [(f"{i}.wav", _wav(0.2)) for i in range(voices.MAX_CLIPS + 1)], 400,
     "invalid_multipart"),
])
def test_bad_enrollments_are_refused_before_any_job(
        srv: Server, fields: list[tuple[str, str]], files: list[tuple[str, bytes]] | None,
        status: int, code: str) -> None:
    if files == []:
        r = srv.client.post("/v1/voiceprints", data=_fields(fields), files={"x": (None, "1")},
                            headers=_auth(ALICE))
    else:
        r = _post(srv, "/v1/voiceprints", fields, files=files)
    _error(r, status, code)
    assert srv.uploads() == [] and srv.store.unfinished() == 0


def test_voiceprints_need_a_key_when_the_server_has_keys(srv: Server) -> None:
    _error(srv.client.get("/v1/voiceprints"), 401, "missing_api_key")
    _error(srv.client.delete("/v1/voiceprints/Alice"), 401, "missing_api_key")
    _error(srv.client.post("/v1/voiceprints", files={"file": ("a.wav", _wav(1.0))},
                           data={"name": "A"}), 401, "missing_api_key")


def test_identification_reaches_the_diarization_json() -> None:
    result = {"audio_seconds": 2.0, "speakers": ["Ann"],
              "segments": [{"speaker": "Ann", "start": 0.0, "end": 1.0}],
              "identification": [{"speaker": "SPEAKER_00", "identified_as": "Ann",
                                  "similarity": 0.91}]}
    body = json.loads(responses.diarization(result, "json")[0])
    assert body["identification"] == result["identification"]
    assert "identification" not in json.loads(responses.diarization(
        {k: v for k, v in result.items() if k != "identification"}, "json")[0])


def test_the_openai_sdk_sends_known_speakers_as_this_service_reads_them(srv: Server) -> None:
    """openai-python (its own parameters and ``extra_body``) sends the lists as repeated
    ``known_speaker_names[]`` fields beside ``chunking_strategy``: the job gets them all.
    (It drops an empty string that comes first in a list, so a stored voiceprint's name is
    sent after the names that have references, never with an empty reference before.)"""
    from openai import OpenAI

    _stored(srv, "alice", "Alice")
    client = OpenAI(base_url="http://testserver/v1", api_key=ALICE, max_retries=0,
                    http_client=srv.client)
    ref = _data_url(_wav(2.0))
    seen: list[jobstore.Job] = []

    def work(job: jobstore.Job) -> tuple[dict[str, Any] | None, str | None]:
        seen.append(job)
        return {"segments": [{"start": 0.0, "end": 0.5, "speaker": "Bob", "text": "Hi",
                              "words": []}], "audio_seconds": 0.5}, None

    for kwargs in ({"known_speaker_names": ["Bob", "Alice"],
                    "known_speaker_references": [ref]},
                   {"extra_body": {"known_speaker_names": ["Bob", "Alice"],
                                   "known_speaker_references": [ref]}}):
        seen.clear()
        _play_worker(srv, work)
        answer = client.audio.transcriptions.create(
            model="gpt-4o-transcribe-diarize", file=("a.wav", _wav(0.5), "audio/wav"),
            response_format="diarized_json", chunking_strategy="auto", **kwargs)
        assert [s.speaker for s in answer.segments] == ["Bob"]
        (job,) = seen
        assert job.params["known_speakers"] == [{"name": "Bob", "reference": f"{job.id}.1"},
                                                {"name": "Alice", "reference": None}]
    assert srv.uploads() == []
