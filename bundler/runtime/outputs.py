"""What a file's outputs are called, RTTM, and how they are written: each atomically, the
marker last, a name the file system cannot hold failing that file alone.

Standard library only, Python 3.9.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .common import shown, write_atomic
from .exits import EXIT_OUTPUT, FileFailed, RunError
from .inputs import Job

# Output names this file system cannot hold are the file's failure, not the batch's.
NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL})

def outputs_for(job: Job, out_dir: Path, formats: Sequence[str]) -> dict[str, Path]:
    """``{format: path}``: the input's relative name, extension kept, plus the format's."""
    return {fmt: out_dir / f"{job.rel}.{fmt}" for fmt in formats}


def rttm(uri: str, segments: Iterable[dict[str, Any]]) -> str:
    """Standard RTTM: ``SPEAKER <uri> 1 <start> <duration> <NA> <NA> <speaker> <NA> <NA>``."""
    lines = []
    for s in segments:
        speaker = re.sub(r"\s", "_", str(s["speaker"]))
        lines.append(f"SPEAKER {uri} 1 {s['start']:.3f} {s['end'] - s['start']:.3f} "
                     f"<NA> <NA> {speaker} <NA> <NA>\n")
    return "".join(lines)


def is_file(path: Path) -> bool:
    """Path.is_file, and False for a name the file system cannot even look up (too long):
    that file is not done, and fails alone when its outputs are written."""
    try:
        return path.is_file()
    except OSError:
        return False


def write_outputs(outs: dict[str, Path], texts: dict[str, str]) -> None:
    """Each output, atomically, the marker last. A name this file system cannot hold (too
    long, bytes it refuses) fails this file alone, and its outputs written so far are
    removed; a full disk or a permission fails the run (EXIT_OUTPUT)."""
    written: list[Path] = []
    try:
        for fmt, path in outs.items():
            write_atomic(path, texts[fmt])
            written.append(path)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if exc.errno in NAME_ERRNOS:
            raise FileFailed(f"cannot write its output {shown(path.name)}: "
                             f"{exc.strerror or exc}") from None
        raise RunError(f"cannot write {shown(str(path))}: {exc.strerror or exc}",
                       EXIT_OUTPUT) from None
