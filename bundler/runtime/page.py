"""``bin/serve``'s page for people without a shell (``GET /``), and the two endpoints only a
page needs: a job's recording for its player, and the speakers' names.

The page is four files shipped beside this module (``page/index.html``, ``app.js``,
``app.css``, ``icon.svg``): no framework, no build step, nothing fetched from anywhere but
this server, and a Content-Security-Policy that says so to the browser too (an isolated
network has no CDN, and a page that tried one would hang or leak the hostnames it was
served from).

Standard library and Starlette only, Python 3.9.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from . import jobstore
from .common import shown
from .responses import ApiError

# Each handler takes service.py's Service (``Any`` here: service.py imports this module to
# register these routes, and a module does not import the one that imports it).
Handler = Callable[[Any, Request], Awaitable[Response]]

PAGE_DIR = Path(__file__).resolve().parent / "page"
# Every file the page is made of, with its media type: nothing else under PAGE_DIR is served.
ASSETS = {"index.html": "text/html; charset=utf-8",
          "app.js": "text/javascript; charset=utf-8",
          "app.css": "text/css; charset=utf-8",
          "icon.svg": "image/svg+xml"}
# The page loads only from this server. media-src blob: is the player's recording, fetched
# with the key (an <audio src> cannot send an Authorization header) and played from an
# object URL; no inline script or style, no frames, no form posts elsewhere.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
MAX_NAME = 64


def asset(name: str) -> Response:
    """One of the page's files, with the page's security headers."""
    return Response((PAGE_DIR / name).read_bytes(), media_type=ASSETS[name],
                    headers=PAGE_HEADERS)


async def index(service: Any, request: Request) -> Response:
    return asset("index.html")


async def page_asset(service: Any, request: Request) -> Response:
    name = request.path_params["name"]
    if name not in ASSETS or name == "index.html":
        raise ApiError(404, f"no page file {shown(name)!r}", "not_found")
    return asset(name)


def result_speakers(result: dict[str, Any]) -> list[str]:
    """The pipeline's labels in a job's stored result (stored as the worker wrote it:
    names are applied on the way out)."""
    labels = [str(s) for s in result.get("speakers") or []]
    for key in ("segments", "diarization"):
        for seg in result.get(key) or []:
            if isinstance(seg, dict) and isinstance(seg.get("speaker"), str):
                labels.append(seg["speaker"])
    return list(dict.fromkeys(labels))


def checked_names(body: Any, labels: list[str], current: dict[str, str]) -> dict[str, str]:
    """The job's names once ``body`` (``{"SPEAKER_00": "Alice", ...}``) is applied to
    ``current``: ApiError 400 naming what is wrong. A name equal to its own label undoes a
    rename. Names stay distinct from each other and from every other label, so that each
    name in a transcript means one speaker (and the page can tell which)."""
    if not isinstance(body, dict) or not body:
        raise ApiError(400, 'send a JSON object of labels to names, such as {"SPEAKER_00": '
                            '"Alice"}', "invalid_value", "speakers")
    names = dict(current)
    for label, name in body.items():
        if label not in labels:
            raise ApiError(400, f"no speaker {shown(str(label))!r} in this job's result; its "
                                f"speakers: {', '.join(labels) or 'none'}", "invalid_value",
                           "speakers")
        if not isinstance(name, str):
            raise ApiError(400, f"the name for {label} must be a string", "invalid_value",
                           "speakers")
        name = name.strip()
        if not 1 <= len(name) <= MAX_NAME or not all(c.isprintable() for c in name):
            raise ApiError(400, f"the name for {label} must be 1 to {MAX_NAME} printable "
                                "characters", "invalid_value", "speakers")
        if name == label:
            names.pop(label, None)
        else:
            names[label] = name
    shown_as = [names.get(label, label) for label in labels]
    for label, name in names.items():
        if shown_as.count(name) > 1:
            raise ApiError(400, f"{shown(name)!r} would name two speakers: choose another "
                                f"name for {label}", "invalid_value", "speakers")
    return names


async def set_speakers(service: Any, request: Request) -> Response:
    job = await service.owned(request, with_result=True)
    if job.status != jobstore.SUCCEEDED or job.result is None:
        raise ApiError(409, f"job {job.id} is {job.status}: its speakers are known once it "
                            "succeeded", "not_ready")
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "the body is not JSON", "invalid_value", "speakers") from None
    names = checked_names(body, result_speakers(job.result), job.speakers)
    if not await service.call(service.store.set_speakers, job.id, job.owner, names):
        raise ApiError(404, f"no job {job.id!r}", "not_found")  # deleted meanwhile
    return JSONResponse({"id": job.id, "object": "job", "speakers": names})


async def job_audio(service: Any, request: Request) -> Response:
    """The job's recording as uploaded, for the page's player (Range requests served)."""
    job = await service.owned(request)
    path = service.settings.uploads / job.upload
    if not path.is_file():  # a waiting request's job, delivered and forgotten
        raise ApiError(404, f"job {job.id}'s recording is no longer kept", "not_found")
    media = mimetypes.guess_type(job.filename)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media, headers={"X-Content-Type-Options": "nosniff"})


# Registered by service.make_app beside the API's own: counted, errors in OpenAI's shape.
ROUTES: list[tuple[str, str, Handler, list[str]]] = [
    ("/", "page", index, ["GET"]),
    ("/page/{name}", "page_asset", page_asset, ["GET"]),
    ("/v1/jobs/{job_id}/speakers", "job_speakers", set_speakers, ["PATCH"]),
    ("/v1/jobs/{job_id}/audio", "job_audio", job_audio, ["GET"]),
]

