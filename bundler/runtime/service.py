"""``bin/serve``'s HTTP side: OpenAI's audio endpoints, the jobs API, keys, health and
metrics, as a Starlette application. It never touches a model: each accepted recording
becomes a job in the store (committed before the answer), and the workers (``worker.py``)
do it; a request that waits for its answer (``/v1/audio/...``) waits for its job.

Every error is one JSON object in OpenAI's shape (``responses.ApiError``) with its status.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import jobstore, page, responses, uploads, voices
from .common import one_line, shown
from .responses import ApiError

# What OpenAI clients send as ``model``: each is served by the bundle's one ASR model.
OPENAI_ALIASES = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe",
                  "gpt-4o-transcribe-diarize")
# A request's headers, all together. uvicorn's h11 refuses more only when they arrive in
# several reads (a 64 KB header sent at once on loopback was answered 200): the app refuses
# them whatever their path, so the answer does not depend on how the bytes were split.
MAX_HEADER_BYTES = 16 << 10
# A request waiting for its job reads the store this often (a job another replica's worker
# did is seen so), and waits out a shared store's outage this long before its 503: the job
# is accepted, and a database restart takes seconds.
WAIT_POLL_S = 2.0
STORE_PATIENCE_S = 60.0


def key_digest(key: str) -> str:
    """What the store keeps of a key: its sha256 (a key is 256 random bits, so a fast hash
    is enough; the key itself is shown once and never stored)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Settings:
    state_dir: Path
    workers: int = 1
    queue: int = 16
    max_upload: int = 1 << 30
    keep_days: float = 7.0
    no_auth: bool = False  # --insecure-no-auth
    asr: Optional[dict[str, Any]] = None  # manifest.json's asr, when the bundle has one
    pipeline: str = "pyannote"  # the diarization pipeline's repo, for /v1/models
    multilingual: bool = True

    @property
    def uploads(self) -> Path:
        return self.state_dir / "uploads"


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("pyannote_serve_requests", "HTTP requests, by endpoint and "
                                "status", ["endpoint", "status"], registry=r)
        self.errors = Counter("pyannote_serve_errors", "Failed requests and jobs, by kind",
                              ["kind"], registry=r)
        self.audio = Counter("pyannote_serve_audio_seconds", "Seconds of audio processed",
                             registry=r)
        self.work = Counter("pyannote_serve_work_seconds", "Seconds spent processing audio",
                            registry=r)
        self.rtf = Histogram("pyannote_serve_real_time_factor", "Processing time over audio "
                             "duration, per job", buckets=(0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1,
                                                           2, 5), registry=r)
        self.queue = Gauge("pyannote_serve_queue_depth", "Jobs accepted and not finished",
                           registry=r)
        self.ready = Gauge("pyannote_serve_workers_ready", "Workers with models loaded",
                           registry=r)
        self.network = Gauge("pyannote_serve_network_attempts", "Outbound connection attempts "
                             "the workers counted (0 on an offline host)", registry=r)


class Service:
    """What the endpoints share: settings, store, the workers' pool and who waits for what."""

    def __init__(self, settings: Settings, store: jobstore.Store,
                 wake: Callable[[], None] = lambda: None) -> None:
        self.settings, self.store, self.wake = settings, store, wake
        self.metrics = Metrics()
        self.ready_workers = 0
        self.network_attempts = 0
        self.waiters: dict[str, asyncio.Event] = {}
        self.admit = asyncio.Lock()
        self.recent_work: list[float] = []

    # -- told by the workers' supervisor --
    def worker_ready(self, count: int) -> None:
        self.ready_workers = count
        self.metrics.ready.set(count)

    def job_finished(self, event: dict[str, Any]) -> None:
        if event.get("status") == "succeeded":
            audio, work = float(event.get("audio_seconds") or 0), float(
                event.get("work_seconds") or 0)
            self.metrics.audio.inc(audio)
            self.metrics.work.inc(work)
            if audio:
                self.metrics.rtf.observe(work / audio)
            self.recent_work = (self.recent_work + [work])[-20:]
        elif event.get("status") == "failed":
            self.metrics.errors.labels(f"job_{event.get('kind') or 'internal'}").inc()
        self.network_attempts = max(self.network_attempts,
                                    int(event.get("network_attempts") or 0))
        self.metrics.network.set(self.network_attempts)
        waiter = self.waiters.get(str(event.get("job")))
        if waiter is not None:
            waiter.set()

    # -- store calls, off the event loop --
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # -- who is asking --
    async def owner(self, request: Request) -> str:
        """The key's name ("" when the server runs without keys); ApiError 401 otherwise."""
        if self.settings.no_auth:
            return ""
        active = await self.call(self.store.active_keys)
        if not active:
            return ""  # loopback only (serve.py refuses anything else without keys)
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "You didn't provide an API key: send 'Authorization: Bearer "
                                "KEY' (ask the operator for one: bin/serve keys add NAME)",
                           "missing_api_key")
        name = await self.call(self.store.key_owner, key_digest(key.strip()))
        if name is None:
            raise ApiError(401, "Incorrect API key provided (unknown or revoked)",
                           "invalid_api_key")
        return str(name)

    async def owned(self, request: Request, with_result: bool = False) -> jobstore.Job:
        """The job named by the path's ``job_id``, if it is the key's; ApiError 404 if not."""
        owner = await self.owner(request)
        job = await self.call(self.store.get, request.path_params["job_id"], owner,
                              with_result)
        if job is None:  # another key's job is not found either
            raise ApiError(404, f"no job {shown(request.path_params['job_id'])!r}",
                           "not_found")
        return job

    # -- accepting a recording --
    def served_models(self) -> list[str]:
        asr = self.settings.asr
        if not asr:
            return []
        repo = str(asr.get("repo") or "asr")
        return list(dict.fromkeys([repo, repo.rpartition("/")[2], *OPENAI_ALIASES]))

    def retry_after(self) -> str:
        mean = sum(self.recent_work) / len(self.recent_work) if self.recent_work else 10.0
        return str(max(1, math.ceil(mean / max(1, self.settings.workers))))

    async def accept(self, request: Request, owner: str, kind: str, sync: bool,
                     formats: Any = ()) -> jobstore.Job:
        """Stream the request's recording in, check its fields, and commit it as a job
        (``formats``: the ``response_format`` values the endpoint answers in). ``kind``
        ``voiceprint``: the clips of a voice to enroll (``voices.py``)."""
        if self.ready_workers == 0:
            raise ApiError(503, "the models are still loading: retry in a few seconds",
                           "not_ready", headers={"Retry-After": "5"})
        job_id = uuid.uuid4().hex
        enrolling = kind == voices.KIND
        form = await uploads.read_form(request.headers.get("content-type", ""),
                                       request.headers.get("content-length"), request.stream(),
                                       self.settings.uploads, job_id, self.settings.max_upload,
                                       voices.MAX_CLIPS if enrolling else 1)
        try:
            if kind == "job":
                kind = form.get("kind") or ("transcription" if self.settings.asr
                                            else "diarization")
            if enrolling:
                params = voices.enrollment_params(form, self.settings.state_dir, owner)
            else:
                params = self.params(form, kind)
                params.update(voices.known_speakers(form, self.settings.state_dir, owner,
                                                    job_id))
            if formats:
                fmt = form.get("response_format") or "json"
                if fmt not in formats:
                    raise ApiError(400, f"response_format {shown(fmt)!r}: choose from "
                                        f"{', '.join(formats)}", "invalid_value",
                                   "response_format")
                params["response_format"] = fmt
                granularities = form.all("timestamp_granularities")
                if any(g not in ("segment", "word") for g in granularities):
                    raise ApiError(400, "timestamp_granularities[]: segment and/or word",
                                   "invalid_value", "timestamp_granularities")
                params["words"] = "word" in granularities
            if form.path is None:
                raise ApiError(400, "no recording: send it as the multipart field 'file'",
                               "missing_file", "file")
            if form.size == 0:
                raise ApiError(400, "the file is empty (0 bytes)", "empty_file", "file")
            for name, path in [(form.filename, form.path)] + (form.more if enrolling else []):
                with open(path, "rb") as f:
                    head = f.read(uploads.HEAD_BYTES)
                if not uploads.looks_like_media(head):
                    raise uploads.not_media(shown(name or "the file"), "file")
            if form.more:  # the job's other files, by the names they take once accepted
                params["files"] = [uploads.final_name(job_id, i + 1)
                                   for i in range(len(form.more))]
            job = jobstore.Job(id=job_id, owner=owner, kind=kind, params=params,
                               filename=form.filename or "upload", upload=job_id, sync=sync)
            async with self.admit:
                unfinished = await self.call(self.store.unfinished)
                if unfinished >= self.settings.workers + self.settings.queue:
                    raise ApiError(429, f"the queue is full ({unfinished} recordings waiting "
                                        "or in work): retry after the Retry-After seconds",
                                   "queue_full", headers={"Retry-After": self.retry_after()})
                os.replace(form.path, self.settings.uploads / job_id)
                form.path = self.settings.uploads / job_id
                for i, (name, path) in enumerate(form.more):
                    final = self.settings.uploads / uploads.final_name(job_id, i + 1)
                    os.replace(path, final)
                    form.more[i] = (name, final)
                if sync:
                    self.waiters[job_id] = asyncio.Event()
                await self.call(self.store.add_job, job)
        except BaseException:
            self.waiters.pop(job_id, None)
            form.discard()
            raise
        self.wake()
        return job

    def params(self, form: uploads.Form, kind: str) -> dict[str, Any]:
        """The request's options, checked: ApiError 400 naming the field."""
        if kind not in ("transcription", "diarization"):
            raise ApiError(400, f"kind {shown(kind)!r}: transcription or diarization",
                           "invalid_value", "kind")
        params: dict[str, Any] = {}
        for name in ("num_speakers", "min_speakers", "max_speakers"):
            value = form.get(name)
            if value not in (None, ""):
                try:
                    params[name] = int(str(value))
                except ValueError:
                    raise ApiError(400, f"{name} must be a whole number", "invalid_value",
                                   name) from None
                if params[name] < 1:
                    raise ApiError(400, f"{name} must be at least 1", "invalid_value", name)
        if "num_speakers" in params and ("min_speakers" in params or "max_speakers" in params):
            raise ApiError(400, "num_speakers excludes min_speakers and max_speakers",
                           "invalid_value", "num_speakers")
        if params.get("min_speakers", 0) > params.get("max_speakers", 1 << 30):
            raise ApiError(400, "min_speakers is larger than max_speakers", "invalid_value",
                           "min_speakers")
        if kind == "diarization":
            return params
        if not self.settings.asr:
            raise ApiError(400, "this server's bundle has no speech-recognition model: it "
                                "serves diarization only (POST /v1/audio/diarization)",
                           "model_not_found", "model")
        model = form.get("model")
        served = self.served_models()
        if model and model not in served:
            raise ApiError(400, f"model {shown(model)!r} is not served here; served: "
                                f"{', '.join(served)}", "model_not_found", "model")
        language = (form.get("language") or "").strip().lower()
        if language:
            if not language.isalpha() or len(language) > 8:
                raise ApiError(400, f"language {shown(language)!r}: an ISO-639-1 code such as "
                                    "en or de", "invalid_value", "language")
            if not self.settings.multilingual and language != "en":
                raise ApiError(400, f"language {language!r}: {self.settings.asr.get('repo')} "
                                    "is an English-only model", "invalid_value", "language")
            params["language"] = language
        prompt = form.get("prompt")
        if prompt:
            params["prompt"] = prompt
        temperature = form.get("temperature")
        if temperature not in (None, ""):
            try:
                params["temperature"] = float(str(temperature))
            except ValueError:
                raise ApiError(400, "temperature must be a number from 0 to 1",
                               "invalid_value", "temperature") from None
            if not 0 <= params["temperature"] <= 1:
                raise ApiError(400, "temperature must be a number from 0 to 1",
                               "invalid_value", "temperature")
        return params

    async def finished(self, job: jobstore.Job) -> jobstore.Job:
        """Wait for ``job`` to finish (told by the supervisor, or seen in the store: a job
        another server's worker did)."""
        event = self.waiters.setdefault(job.id, asyncio.Event())
        outage: Optional[float] = None
        try:
            while True:
                try:
                    await asyncio.wait_for(event.wait(), WAIT_POLL_S)
                except asyncio.TimeoutError:
                    pass
                event.clear()
                try:
                    done = await self.call(self.store.get, job.id, None)
                except jobstore.StoreUnavailable:
                    outage = outage or time.monotonic()
                    if time.monotonic() - outage > STORE_PATIENCE_S:
                        raise
                    continue
                outage = None
                if done is None:
                    raise ApiError(404, "the job was deleted before it finished", "not_found")
                if done.status in jobstore.FINISHED:
                    return done
        finally:
            self.waiters.pop(job.id, None)

    async def forget(self, job: jobstore.Job) -> None:
        """A delivered request's job: its recording and result go (the client has it)."""
        try:
            gone = await self.call(self.store.delete, job.id, None)
        except jobstore.StoreUnavailable:
            return  # the answer is sent; --keep-days removes what stays
        if gone is not None:
            self.discard_upload(gone)

    def discard_upload(self, job: jobstore.Job) -> None:
        """The job's files go: its recording, and its reference clips (private too)."""
        for name in job.uploads():
            (self.settings.uploads / name).unlink(missing_ok=True)


# --- endpoints --------------------------------------------------------------------------
Handler = Callable[[Service, Request], Awaitable[Response]]


def endpoint(name: str, handler: Handler, service: Service) -> Callable[[Request],
                                                                         Awaitable[Response]]:
    """One endpoint: its errors as OpenAI's JSON, each request counted."""

    async def run(request: Request) -> Response:
        try:
            try:
                response = await handler(service, request)
            except jobstore.StoreUnavailable as exc:
                # A shared store restarting or out of reach: the client retries; the next
                # call connects again (nothing it was told was accepted is lost).
                # Clients are not told where the database is; the operator's log is.
                print(f"serve: {exc}", file=sys.stderr, flush=True)
                raise ApiError(503, "the job store is unavailable: retry in a few seconds",
                               "store_unavailable", headers={"Retry-After": "5"}) from None
        except ApiError as exc:
            service.metrics.errors.labels(exc.code).inc()
            response = JSONResponse(exc.body(), exc.status, headers=exc.headers)
        service.metrics.requests.labels(name, str(response.status_code)).inc()
        return response

    return run


def _job_view(job: jobstore.Job) -> dict[str, Any]:
    queued = (job.started_at or time.time()) - job.created_at
    view: dict[str, Any] = {
        "id": job.id, "object": "job", "kind": job.kind, "status": job.status,
        "progress": round(job.progress, 3), "file": job.filename, "params": job.params,
        "created_at": int(job.created_at), "attempts": job.attempts,
        "started_at": int(job.started_at) if job.started_at else None,
        "finished_at": int(job.finished_at) if job.finished_at else None,
        "audio_seconds": job.audio_seconds,
        "timings": {"queued_seconds": round(queued, 3),
                    "work_seconds": job.work_seconds,
                    "rtf": (round(job.work_seconds / job.audio_seconds, 4)
                            if job.work_seconds and job.audio_seconds else None)},
        "speakers": job.speakers, "error": None}
    if job.error:
        err = responses.failure(job.error)
        view["error"] = {"message": err.message, "code": err.code, "status": err.status}
    return view


def rendered(job: jobstore.Job, fmt: str, words: bool = False) -> Response:
    """A finished job's result in ``fmt``, or its failure as the request's error."""
    if job.status == jobstore.FAILED:
        raise responses.failure(job.error or {})
    assert job.result is not None
    try:
        if job.kind == "diarization":
            body, media = responses.diarization(job.result, fmt, job.speakers)
        else:
            temperature = float(job.params.get("temperature") or 0.0)
            body, media = responses.transcription(job.result, fmt, job.speakers, words,
                                                  temperature)
    except ValueError:
        formats = (responses.DIARIZATION_FORMATS if job.kind == "diarization"
                   else responses.TRANSCRIPTION_FORMATS)
        raise ApiError(400, f"format {shown(fmt)!r} for a {job.kind} job: choose from "
                            f"{', '.join(formats)}", "invalid_value", "response_format"
                       ) from None
    return Response(body, media_type=media)


async def delivered(service: Service, done: jobstore.Job, fmt: str, words: bool = False
                    ) -> Response:
    """A waiting request's answer; its job and recording go once it is sent, a failed one's
    (413 too long, 422 undecodable) too: nobody will ask for them again."""
    try:
        response = rendered(done, fmt, words)
    except ApiError:
        await service.forget(done)
        raise
    response.background = BackgroundTask(service.forget, done)
    return response


async def transcriptions(service: Service, request: Request) -> Response:
    owner = await service.owner(request)
    job = await service.accept(request, owner, "transcription", sync=True,
                               formats=responses.OPENAI_FORMATS)
    done = await service.finished(job)
    return await delivered(service, done, job.params["response_format"], job.params["words"])


async def diarization(service: Service, request: Request) -> Response:
    owner = await service.owner(request)
    job = await service.accept(request, owner, "diarization", sync=True,
                               formats=tuple(responses.DIARIZATION_FORMATS))
    done = await service.finished(job)
    return await delivered(service, done, job.params["response_format"])


async def create_job(service: Service, request: Request) -> Response:
    owner = await service.owner(request)
    job = await service.accept(request, owner, "job", sync=False)
    return JSONResponse(_job_view(job), 202)


async def list_jobs(service: Service, request: Request) -> Response:
    owner = await service.owner(request)
    jobs = await service.call(service.store.jobs, owner)
    return JSONResponse({"object": "list", "data": [_job_view(j) for j in jobs]})


async def get_job(service: Service, request: Request) -> Response:
    return JSONResponse(_job_view(await service.owned(request)))


async def job_result(service: Service, request: Request) -> Response:
    job = await service.owned(request, with_result=True)
    if job.status not in jobstore.FINISHED:
        raise ApiError(409, f"job {job.id} is {job.status}: its result is not ready",
                       "not_ready")
    fmt = request.query_params.get("format") or "json"
    if fmt == "json" and job.kind == "transcription":
        fmt = "transcript"  # the whole document, as bin/transcribe writes it
    words = request.query_params.get("words") in ("1", "true")
    return rendered(job, fmt, words)


async def delete_job(service: Service, request: Request) -> Response:
    job = await service.owned(request)
    gone = await service.call(service.store.delete, job.id, job.owner)
    if gone is not None:
        service.discard_upload(gone)
    return JSONResponse({"id": job.id, "object": "job", "deleted": True})


async def models(service: Service, request: Request) -> Response:
    await service.owner(request)
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "pyannote-bundle"}
            for m in service.served_models()]
    data.append({"id": service.settings.pipeline, "object": "model", "created": 0,
                 "owned_by": "pyannote-bundle"})
    return JSONResponse({"object": "list", "data": data})


async def healthz(service: Service, request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(service: Service, request: Request) -> Response:
    if service.ready_workers == 0:
        raise ApiError(503, "not ready: the workers are loading the models", "not_ready",
                       headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready", "workers": service.ready_workers})


async def metrics(service: Service, request: Request) -> Response:
    service.metrics.queue.set(await service.call(service.store.unfinished))
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


ROUTES: list[tuple[str, str, Handler, list[str]]] = [
    ("/v1/audio/transcriptions", "transcriptions", transcriptions, ["POST"]),
    ("/v1/audio/diarization", "diarization", diarization, ["POST"]),
    ("/v1/jobs", "jobs_create", create_job, ["POST"]),
    ("/v1/jobs", "jobs_list", list_jobs, ["GET"]),
    ("/v1/jobs/{job_id}", "job", get_job, ["GET"]),
    ("/v1/jobs/{job_id}", "job_delete", delete_job, ["DELETE"]),
    ("/v1/jobs/{job_id}/result", "job_result", job_result, ["GET"]),
    ("/v1/models", "models", models, ["GET"]),
    ("/healthz", "healthz", healthz, ["GET"]),
    ("/readyz", "readyz", readyz, ["GET"]),
    ("/metrics", "metrics", metrics, ["GET"]),
]


class HeaderLimit:
    """Refuses a request whose headers pass ``MAX_HEADER_BYTES`` with 431, in OpenAI's shape,
    before any route (or key check) sees it."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) \
                > MAX_HEADER_BYTES:
            self.service.metrics.errors.labels("header_too_large").inc()
            response = JSONResponse(responses.error_body(
                431, f"the request's headers are over {MAX_HEADER_BYTES >> 10} KB",
                "header_too_large"), 431)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def make_app(service: Service, lifespan: Any = None) -> Starlette:
    routes = [Route(path, endpoint(name, handler, service), methods=methods, name=name)
              for path, name, handler, methods in ROUTES + page.ROUTES + voices.ROUTES]

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", None) or "error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        return JSONResponse(responses.error_body(status, f"{request.method} {request.url.path}:"
                                                         f" {detail}", code), status)

    async def internal(request: Request, exc: Exception) -> Response:
        service.metrics.errors.labels("internal").inc()
        return JSONResponse(responses.error_body(
            500, f"internal error: {type(exc).__name__}: {one_line(exc)}", "internal"), 500)

    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(HeaderLimit, service=service)],
                     exception_handlers={HTTPException: http_error, Exception: internal})
