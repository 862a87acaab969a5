"""What ``bin/serve`` answers: its errors in OpenAI's shape, and a finished job's result in
each format a client can ask for.

A job's result is the document ``bin/transcribe --format json`` writes for the same
recording (or ``bin/diarize``'s, for a diarization job): the worker runs the same code.
Every other format is made from it here, on the way out, by the same functions
``bin/transcribe`` writes its files with (``transcript.py``, ``outputs.py``), so that a
transcript from the service and one from the command line are the same text; renamed
speakers are applied first.

OpenAI's shapes (openai-python's types for ``audio.transcriptions``): ``json`` is ``{"text",
"usage"}``; ``verbose_json`` has ``task``, ``language``, ``duration``, ``text``, ``segments``
(and ``words`` when word timestamps are asked for); ``diarized_json`` has ``task``,
``duration``, ``text``, ``segments`` of ``{"type": "transcript.text.segment", "id",
"start", "end", "speaker", "text"}`` and ``usage``. Each segment and word here also says
its ``speaker``. Speakers keep the pipeline's labels (``SPEAKER_00``, as in the RTTM and
the command line's outputs), not OpenAI's "A", "B".

Standard library only, Python 3.9.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from . import outputs, transcript
from .transcript import renamed

# Every format a transcription job's result can be read in, and its media type.
TRANSCRIPTION_FORMATS = {
    "json": "application/json", "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8", "vtt": "text/vtt; charset=utf-8",
    "verbose_json": "application/json", "diarized_json": "application/json",
    "txt": "text/plain; charset=utf-8", "rttm": "text/plain; charset=utf-8",
}
# /v1/audio/transcriptions's response_format (OpenAI's names).
OPENAI_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
DIARIZATION_FORMATS = {"json": "application/json", "rttm": "text/plain; charset=utf-8"}


class ApiError(Exception):
    """An answer that is an error: status, OpenAI's ``type`` and ``code``, the parameter at
    fault, and a message that says what to do."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
             404: "invalid_request_error", 409: "invalid_request_error",
             413: "invalid_request_error",
             415: "invalid_request_error", 422: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: str,
                 param: Optional[str] = None, headers: Optional[dict[str, str]] = None
                 ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str, param: Optional[str] = None
               ) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI answers."""
    return {"error": {"message": message,
                      "type": ApiError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# What a worker's failure of a recording means to the client.
# Known speakers (voices.py): a reference clip the pipeline cannot take as one voice, or a
# stored voiceprint gone or of another model, is the request's fault (400); a clip sent to
# POST /v1/voiceprints that cannot be enrolled, 422.
FAILURE_STATUS = {"too_long": 413, "undecodable": 422, "timeout": 500,
                  "worker_died": 500, "internal": 500, "invalid_reference": 400,
                  "voiceprint_not_found": 400, "clip_refused": 422, "voiceprint_exists": 409}
FAILURE_PARAM = {"too_long": "file", "undecodable": "file", "clip_refused": "file",
                 "invalid_reference": "known_speaker_references",
                 "voiceprint_not_found": "known_speaker_names", "voiceprint_exists": "name"}


def failure(error: Mapping[str, Any]) -> ApiError:
    kind = str(error.get("kind") or "internal")
    return ApiError(FAILURE_STATUS.get(kind, 500), str(error.get("message") or kind), kind,
                    FAILURE_PARAM.get(kind))


# --- transcription -----------------------------------------------------------------------
def full_text(segments: Sequence[Mapping[str, Any]]) -> str:
    return " ".join(t for t in (transcript.one_line(str(s.get("text") or ""))
                                for s in segments) if t)


def usage(duration: float) -> dict[str, Any]:
    """OpenAI bills transcription by the second; here it says how much audio was heard."""
    return {"type": "duration", "seconds": int(math.ceil(duration))}


def transcription(result: Mapping[str, Any], fmt: str, names: Mapping[str, str] = {},
                  words: bool = False, temperature: float = 0.0) -> tuple[str, str]:
    """``(body, media type)`` of a transcription result in ``fmt``."""
    doc = renamed(result, names)
    segments = doc.get("segments") or []
    duration = float(doc.get("audio_seconds") or 0.0)
    if fmt == "json":
        body = _json({"text": full_text(segments), "usage": usage(duration)})
    elif fmt in ("text",):
        body = full_text(segments) + "\n"
    elif fmt == "txt":
        body = transcript.to_txt(segments)
    elif fmt == "srt":
        body = transcript.to_srt(segments)
    elif fmt == "vtt":
        body = transcript.to_vtt(segments)
    elif fmt == "rttm":
        body = outputs.rttm(str(doc.get("uri") or "audio"), doc.get("diarization") or [])
    elif fmt == "verbose_json":
        body = _json(verbose(doc, segments, duration, words, temperature))
    elif fmt == "diarized_json":
        body = _json(diarized(segments, duration))
    elif fmt == "transcript":  # the whole document (GET /v1/jobs/{id}/result?format=json)
        body = transcript.to_json(segments, {k: v for k, v in doc.items() if k != "segments"})
    else:
        raise ValueError(fmt)
    media = TRANSCRIPTION_FORMATS.get(fmt, "application/json")
    return body, media


def verbose(doc: Mapping[str, Any], segments: Sequence[Mapping[str, Any]], duration: float,
            words: bool, temperature: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "task": "translate" if doc.get("task") == "translate" else "transcribe",
        "language": doc.get("language") or "", "duration": duration,
        "text": full_text(segments),
        "segments": [{"id": i, "seek": 0, "start": s["start"], "end": s["end"],
                      "text": str(s.get("text") or ""), "tokens": [],
                      "temperature": temperature, "speaker": s.get("speaker")}
                     for i, s in enumerate(segments)],
        "usage": usage(duration)}
    if words:
        out["words"] = [{"word": str(w.get("word") or "").strip(), "start": w["start"],
                         "end": w["end"], "speaker": w.get("speaker")}
                        for s in segments for w in s.get("words") or []]
    return out


def diarized(segments: Sequence[Mapping[str, Any]], duration: float) -> dict[str, Any]:
    return {"task": "transcribe", "duration": duration, "text": full_text(segments),
            "segments": [{"type": "transcript.text.segment", "id": f"seg_{i}",
                          "start": s["start"], "end": s["end"],
                          "speaker": transcript.label(s.get("speaker")),
                          "text": str(s.get("text") or "")}
                         for i, s in enumerate(segments)],
            "usage": usage(duration)}


# --- diarization -------------------------------------------------------------------------
def diarization(result: Mapping[str, Any], fmt: str, names: Mapping[str, str] = {}
                ) -> tuple[str, str]:
    """``(body, media type)`` of a diarization result (``bin/diarize``'s JSON) in ``fmt``:
    ``json`` (duration, speakers, segments) or ``rttm``."""
    doc = renamed(result, names)
    segments = doc.get("segments") or []
    if fmt == "rttm":
        return outputs.rttm(str(doc.get("uri") or "audio"), segments), \
            DIARIZATION_FORMATS["rttm"]
    if fmt != "json":
        raise ValueError(fmt)
    body: dict[str, Any] = {
        "duration": float(doc.get("audio_seconds") or 0.0),
        "speakers": list(doc.get("speakers") or []),
        "segments": [{"speaker": s["speaker"], "start": s["start"], "end": s["end"]}
                     for s in segments]}
    if "identification" in doc:  # known speakers asked for: each speaker's match
        body["identification"] = doc["identification"]
    return _json(body), "application/json"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)
