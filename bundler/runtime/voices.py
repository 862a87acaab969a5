"""``bin/serve``'s known speakers: OpenAI's ``known_speaker_names[]`` and
``known_speaker_references[]`` on ``/v1/audio/transcriptions``, ``/v1/audio/diarization``
and ``/v1/jobs``, and each key's stored voiceprints (``POST``, ``GET /v1/voiceprints``,
``DELETE /v1/voiceprints/{name}``).

The HTTP side only checks and stores: a reference clip (a data URL) is decoded here into a
private file beside the job's recording (0600, deleted with the job), a name without a
reference must be a voiceprint the key stored. The worker does the rest with its loaded
pipeline, through ``bin/enroll``'s own code (``enroll.voice_of``): it enrolls each
reference, loads each stored voiceprint (refused when another embedding model made it),
and matches them with ``voiceprints.identify`` as ``bin/transcribe --voiceprints`` does.
Enrolling a stored voiceprint is a job of kind ``voiceprint``, waited for like a
synchronous transcription; its answer is the voiceprint's metadata, never its embedding.

Voiceprints are ``voiceprints.save``'s files (0600) in ``STATE/voiceprints/OWNER`` (0700),
``voiceprints.owner_folder``: replicas share the state dir, and another key never sees
them.

Standard library and Starlette only, Python 3.9.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import jobstore, responses, uploads, voiceprints
from .common import one_line, shown
from .exits import RunError
from .responses import ApiError

# Each handler takes service.py's Service (``Any`` here: service.py imports this module).
Handler = Callable[[Any, Request], Awaitable[Response]]

KIND = "voiceprint"  # the job that enrolls a voice
MAX_KNOWN = 4  # known speakers in one request, as OpenAI allows
MAX_CLIPS = 8  # clips of one voice in one POST /v1/voiceprints
NAMES, REFERENCES = "known_speaker_names", "known_speaker_references"
# RFC 2397: data:[<media type>][;parameter=value]*[;base64],<data>
DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),(.*)", re.DOTALL)


def _name(value: str, param: str) -> str:
    name = value.strip()
    try:
        return voiceprints.check_name(name)
    except RunError as exc:
        raise ApiError(400, str(exc), "invalid_value", param) from None


def decode_data_url(text: str, index: int) -> bytes:
    """The bytes of the ``index``-th reference, a base64 data URL (``data:audio/wav;base64,
    ...``); ApiError 400 for anything else."""
    where = f"{REFERENCES}[{index}]"
    m = DATA_URL.fullmatch(text.strip())
    if m is None or "base64" not in m.group(2).split(";"):
        raise ApiError(400, f"{where} must be a base64 data URL of a recording, such as "
                            "data:audio/wav;base64,UklGR...", "invalid_value", REFERENCES)
    try:
        data = base64.b64decode(re.sub(r"\s+", "", m.group(3)), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where} is not valid base64", "invalid_value",
                       REFERENCES) from None
    if not data:
        raise ApiError(400, f"{where} is empty", "invalid_value", REFERENCES)
    if not uploads.looks_like_media(data[:uploads.HEAD_BYTES]):
        raise uploads.not_media(where, REFERENCES)
    return data


def known_speakers(form: uploads.Form, state_dir: Path, owner: str, job_id: str
                   ) -> dict[str, Any]:
    """The request's known speakers, checked, as the job's params (``known_speakers``: each
    ``{"name", "reference"}``, the reference the name of its clip in uploads/ once the job
    is accepted, None for the key's stored voiceprint; ``match_threshold``). Each reference
    is written to ``form.more`` (0600), so that a refused request leaves nothing. The i-th
    reference goes with the i-th name, as OpenAI pairs them; an empty reference, or none
    at the end of the list, means the voiceprint stored under that name."""
    names = form.all(NAMES)
    refs = form.all(REFERENCES)
    threshold = form.get("match_threshold")
    if not names:
        if refs:
            raise ApiError(400, f"{REFERENCES}[] need {NAMES}[]: one name for each reference, "
                                "in the same order", "invalid_value", NAMES)
        if threshold not in (None, ""):
            raise ApiError(400, f"match_threshold needs {NAMES}[]", "invalid_value",
                           "match_threshold")
        return {}
    if len(names) > MAX_KNOWN:
        raise ApiError(400, f"at most {MAX_KNOWN} known speakers per request (as OpenAI's "
                            f"API): {len(names)} given", "invalid_value", NAMES)
    if len(refs) > len(names):
        raise ApiError(400, f"{len(refs)} {REFERENCES}[] for {len(names)} {NAMES}[]: one "
                            "name for each reference", "invalid_value", REFERENCES)
    checked = [_name(n, NAMES) for n in names]
    folded = [n.casefold() for n in checked]
    for n in checked:
        if folded.count(n.casefold()) > 1:
            raise ApiError(400, f"{NAMES}[] names '{n}' twice", "invalid_value", NAMES)
    folder = voiceprints.owner_folder(state_dir, owner)
    speakers: list[dict[str, Any]] = []
    for i, name in enumerate(checked):
        ref = refs[i] if i < len(refs) else ""
        if not ref.strip():
            if not voiceprints.path_of(folder, name).is_file():
                raise ApiError(400, f"no voiceprint named '{name}' is stored for this key: "
                                    f"send its clip in {REFERENCES}[] or enroll it (POST "
                                    "/v1/voiceprints)", "voiceprint_not_found", NAMES)
            speakers.append({"name": name, "reference": None})
            continue
        data = decode_data_url(ref, i)
        index = len(form.more) + 1
        path = uploads.part_path(state_dir / "uploads", job_id, index)
        fd = uploads.create_private(path)
        form.more.append((f"{REFERENCES}[{i}]", path))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        speakers.append({"name": name, "reference": uploads.final_name(job_id, index)})
    params: dict[str, Any] = {"known_speakers": speakers}
    if threshold not in (None, ""):
        try:
            value = float(str(threshold))
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise ApiError(400, "match_threshold must be a number from 0 to 1",
                           "invalid_value", "match_threshold")
        params["match_threshold"] = value
    return params


def enrollment_params(form: uploads.Form, state_dir: Path, owner: str) -> dict[str, Any]:
    """``POST /v1/voiceprints``' fields, checked: ``name``, ``replace``, and the clips'
    names as sent (shown in a refusal); 409 when the name is taken and not replaced."""
    name = _name(form.get("name") or "", "name")
    replace = (form.get("replace") or "false").strip().lower()
    if replace not in ("true", "false", "1", "0"):
        raise ApiError(400, "replace must be true or false", "invalid_value", "replace")
    if replace in ("false", "0") and voiceprints.path_of(
            voiceprints.owner_folder(state_dir, owner), name).exists():
        raise ApiError(409, f"a voiceprint named '{name}' exists: send replace=true to replace "
                            f"it, or DELETE /v1/voiceprints/{name} first", "voiceprint_exists",
                       "name")
    return {"name": name, "replace": replace in ("true", "1"),
            "clips": [form.filename or "upload", *(n for n, _ in form.more)]}


# --- endpoints --------------------------------------------------------------------------
async def create(service: Any, request: Request) -> Response:
    """Enroll a voice from the request's clips (a job any worker does), then answer 201
    with what was stored: the voiceprint's metadata, never its embedding."""
    owner = await service.owner(request)
    job = await service.accept(request, owner, KIND, sync=True)
    done: jobstore.Job = await service.finished(job)
    await service.forget(done)  # the clips go at once: the voiceprint keeps no audio
    if done.status == jobstore.FAILED:
        raise responses.failure(done.error or {})
    return JSONResponse(done.result, 201)


def _listed(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob(f"*{voiceprints.SUFFIX}")) if folder.is_dir() else []:
        try:
            out.append(voiceprints.load_file(path).summary())
        except RunError as exc:  # not the server's path: the key's owner sees this
            raise ApiError(500, one_line(str(exc).replace(str(path), f"'{path.stem}'")),
                           "voiceprint_unreadable") from None
    return out


async def list_prints(service: Any, request: Request) -> Response:
    owner = await service.owner(request)
    folder = voiceprints.owner_folder(service.settings.state_dir, owner)
    return JSONResponse({"object": "list", "data": await service.call(_listed, folder)})


async def delete(service: Any, request: Request) -> Response:
    """Delete the key's voiceprint (its file is unlinked); 404 if the key has none so
    named."""
    owner = await service.owner(request)
    name = request.path_params["name"]
    folder = voiceprints.owner_folder(service.settings.state_dir, owner)
    try:
        await service.call(voiceprints.remove, folder, name)
    except RunError:
        raise ApiError(404, f"no voiceprint named {shown(name, 80)!r}", "not_found",
                       "name") from None
    return JSONResponse({"object": "voiceprint", "name": name, "deleted": True})


# Registered by service.make_app beside the API's own: counted, errors in OpenAI's shape.
ROUTES: list[tuple[str, str, Handler, list[str]]] = [
    ("/v1/voiceprints", "voiceprints_create", create, ["POST"]),
    ("/v1/voiceprints", "voiceprints_list", list_prints, ["GET"]),
    ("/v1/voiceprints/{name}", "voiceprint_delete", delete, ["DELETE"]),
]
