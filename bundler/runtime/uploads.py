"""A request's multipart form, streamed: the fields in memory (small, bounded), the one
recording straight into the state dir as it arrives, its size checked on every chunk, never
whole in memory. python-multipart (Starlette's own parser) does the parsing; this module
decides where the bytes go and when to stop.

A client's file name is kept only to be shown (``job.filename``): the upload is stored
under a name of the service's own, so ``../../x.wav`` names nothing on disk.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

try:  # python-multipart >= 0.0.13 names its package so; older releases "multipart"
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # pragma: no cover - the py39 lock's older release
    from multipart.exceptions import MultipartParseError  # type: ignore[no-redef]
    from multipart.multipart import (  # type: ignore[no-redef]
        MultipartParser,
        parse_options_header,
    )

from .common import shown
from .responses import ApiError

FILE_FIELD = "file"
# One text field: a data URL of a reference clip (known_speaker_references[]) fits, 30 s of
# 16-bit 48 kHz stereo WAV in base64 (7.7 MB); four of them fit in all the fields together.
MAX_FIELD_BYTES = 8 << 20
MAX_FIELDS_BYTES = 34 << 20
MAX_PARTS = 64
HEAD_BYTES = 4096  # what looks_like_media is shown of a file: its signature is in there
MAX_PART_HEADER_BYTES = 16 << 10


@dataclass
class Form:
    """A parsed form: text fields by name (each a list: ``timestamp_granularities[]`` and
    ``known_speaker_names[]`` repeat), and the uploaded file, if any."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    filename: Optional[str] = None
    path: Optional[Path] = None  # the upload, in the folder given to read_form
    size: int = 0
    # More files of the request, each (name shown, path): further ``file`` parts where the
    # endpoint takes several (POST /v1/voiceprints' clips), and the reference clips the
    # service decodes from known_speaker_references[]; discarded with the form.
    more: list[tuple[str, Path]] = field(default_factory=list)

    def get(self, name: str) -> Optional[str]:
        values = self.fields.get(name) or self.fields.get(name + "[]")
        return values[-1] if values else None

    def all(self, name: str) -> list[str]:
        return [*self.fields.get(name, []), *self.fields.get(name + "[]", [])]

    def discard(self) -> None:
        for path in [self.path, *(p for _, p in self.more)]:
            if path is not None:
                path.unlink(missing_ok=True)
        self.path, self.more = None, []


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the file is larger than this server's --max-upload "
                         f"({limit / 1e6:.0f} MB): send a shorter or more compressed "
                         "recording, or ask the operator to raise it",
                    "file_too_large", FILE_FIELD)


class _Sink:
    """python-multipart's callbacks: headers of each part, then its data to memory (a field)
    or to the upload file (``file``)."""

    def __init__(self, folder: Path, name: str, limit: int, max_files: int = 1) -> None:
        self.folder, self.name, self.limit, self.max_files = folder, name, limit, max_files
        self.files = 0
        self.form = Form()
        self.parts = 0
        self.header_bytes = 0
        self.field_bytes = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name: Optional[str] = None
        self._buffer: Optional[bytearray] = None
        self._fd: Optional[int] = None
        self.ended = False

    # -- part headers --
    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ApiError(400, f"more than {MAX_PARTS} form fields", "too_many_fields")
        self.header_bytes = 0
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self._header_value += data[start:end]

    def _header_bytes(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_PART_HEADER_BYTES:
            raise ApiError(400, f"a form part's headers are over {MAX_PART_HEADER_BYTES} "
                                "bytes", "header_too_large")

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_field).decode("latin-1").lower()] = \
            bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        kind, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = options.get(b"name")
        if kind != b"form-data" or name is None:
            raise ApiError(400, "a form part without Content-Disposition: form-data; name=...",
                           "invalid_multipart")
        self._name = name.decode("utf-8", "replace")
        if b"filename" in options or self._name == FILE_FIELD:
            if self._name != FILE_FIELD:
                raise ApiError(400, f"unexpected file in field {shown(self._name)!r}: send the "
                                    f"recording as '{FILE_FIELD}'", "invalid_multipart",
                               self._name)
            if self._fd is not None or self.files >= self.max_files:
                raise ApiError(400, "one recording per request" if self.max_files == 1 else
                               f"at most {self.max_files} files per request",
                               "invalid_multipart", FILE_FIELD)
            raw = options.get(b"filename", b"") or b"upload"
            filename = os.path.basename(raw.decode("utf-8", "replace")) or "upload"
            path = part_path(self.folder, self.name, self.files)
            self._fd = create_private(path)
            if self.files == 0:
                self.form.filename, self.form.path = filename, path
            else:
                self.form.more.append((filename, path))
            self.files += 1
        else:
            self._buffer = bytearray()

    # -- part data --
    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._fd is not None:
            self.form.size += n
            if self.form.size > self.limit:
                raise too_large(self.limit)
            view = memoryview(data)[start:end]
            while view:
                view = view[os.write(self._fd, view):]
        elif self._buffer is not None:
            self.field_bytes += n
            if len(self._buffer) + n > MAX_FIELD_BYTES or self.field_bytes > MAX_FIELDS_BYTES:
                raise ApiError(413, f"form field {shown(self._name or '')!r} is too large",
                               "field_too_large", self._name)
            self._buffer += data[start:end]

    def on_part_end(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        elif self._buffer is not None and self._name is not None:
            value = bytes(self._buffer).decode("utf-8", "replace")
            self.form.fields.setdefault(self._name, []).append(value)
        self._buffer, self._name = None, None

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def callbacks(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end",
            "on_headers_finished", "on_part_data", "on_part_end", "on_end")}


def part_path(folder: Path, name: str, index: int) -> Path:
    """Where a request's file ``index`` is written while it arrives: ``.<name>.part`` for the
    recording, ``.<name>.<index>.part`` for the others (``final_name`` once accepted)."""
    return folder / (f".{name}.part" if index == 0 else f".{name}.{index}.part")


def final_name(name: str, index: int) -> str:
    """A request's file ``index`` once its job is accepted: ``<name>``, ``<name>.<index>``."""
    return name if index == 0 else f"{name}.{index}"


def create_private(path: Path) -> int:
    """A new file for writing, 0600, never an existing one nor through a link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                   | getattr(os, "O_NOFOLLOW", 0), 0o600)


async def read_form(content_type: str, content_length: Optional[str],
                    chunks: AsyncIterator[bytes], folder: Path, name: str, limit: int,
                    max_files: int = 1) -> Form:
    """Parse a ``multipart/form-data`` body from ``chunks``: the file goes to
    ``folder/.<name>.part`` (0600, O_EXCL; up to ``max_files`` ``file`` parts, the others
    to ``part_path``), refused (413) as soon as they pass ``limit`` bytes together.
    ApiError for anything wrong, with nothing left on disk."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise ApiError(400, "send the recording as multipart/form-data (a 'file' field)",
                       "invalid_content_type")
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number", "invalid_request") from None
        if declared > limit + MAX_FIELDS_BYTES:  # more than any accepted form can be
            raise too_large(limit)
    sink = _Sink(folder, name, limit, max_files)
    parser = MultipartParser(boundary, sink.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in chunks:
            if chunk:
                parser.write(chunk)
        parser.finalize()
        if not sink.ended or sink._fd is not None or sink.parts == 0:
            raise ApiError(400, "the multipart body ends before its last part does",
                           "invalid_multipart")
    except MultipartParseError as exc:
        sink.close()
        sink.form.discard()
        raise ApiError(400, f"malformed multipart body: {exc}", "invalid_multipart") from None
    except BaseException:
        sink.close()
        sink.form.discard()
        raise
    return sink.form


# --- is it a recording at all? --------------------------------------------------------------
# The first bytes of the containers the decoders read (audio.py): anything else (a text file
# named .wav, an image) is refused at once with 415, before a worker spends time on it.
_MAGIC = (
    (0, b"RIFF"), (0, b"RF64"), (0, b"fLaC"), (0, b"OggS"), (0, b"ID3"), (0, b"FORM"),
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska, WebM
    (4, b"ftyp"),  # MP4, M4A, MOV, 3GP
    (0, b"#!AMR"), (0, b"caff"), (0, b"MAC "), (0, b"wvpk"), (0, b"OpusHead"),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"),  # ASF (WMA)
    (0, b".snd"), (0, b"FRM8"), (0, b"\x00\x00\x01\xba"),  # MPEG program stream
)


def not_media(what: str, param: str) -> ApiError:
    """The 415 for ``what`` (a file or a reference clip) whose first bytes are no container
    the decoders know (``looks_like_media``)."""
    return ApiError(415, f"{what} is not an audio or video file this server can read (wav, "
                         "flac, ogg, mp3, m4a, mp4, webm, ...)", "unsupported_media", param)


def looks_like_media(head: bytes) -> bool:
    """Whether ``head`` (the file's first bytes) starts a container the decoders know:
    by signature, an MPEG audio frame sync (MP3 without ID3, ADTS AAC) or a transport
    stream."""
    if any(head[at:at + len(sig)] == sig for at, sig in _MAGIC):
        return True
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return True
    return len(head) > 188 and head[0] == 0x47 and head[188] == 0x47
