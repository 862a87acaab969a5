"""The files to process: INPUTs walked for audio and video files, sorted, refused when two
would write the same output; and this process's shard of them (``--shard``, a Slurm array,
a Kubernetes Indexed Job).

Standard library only, Python 3.9: settled before anything heavy is imported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .audio import AUDIO_EXTENSIONS
from .exits import EXIT_USAGE, RunError


@dataclass(frozen=True)
class Job:
    """One file to process: where it is, and its name relative to the INPUT it came from."""

    source: Path
    rel: str
    arg: int  # which INPUT, for a deterministic order

    @property
    def uri(self) -> str:
        """The RTTM file id: the relative name with no whitespace (RTTM splits on it)."""
        return re.sub(r"\s", "_", self.rel)


def find_jobs(inputs: Sequence[str], suffix: str = "rttm") -> list[Job]:
    """Every file to process, sorted; raises RunError(EXIT_USAGE) for a missing input,
    no audio at all, or two inputs that would write the same output."""
    jobs: list[Job] = []
    for n, raw in enumerate(inputs):
        path = Path(raw)
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith(".") or Path(name).suffix.lower() not in AUDIO_EXTENSIONS:
                        continue
                    source = Path(folder) / name
                    jobs.append(Job(source, source.relative_to(path).as_posix(), n))
        elif path.exists():
            # A FIFO, socket or device named here is a job too: named and skipped (exit 4)
            # by the loop, like one found in a folder, never opened.
            jobs.append(Job(path, path.name, n))
        else:
            raise RunError(f"{raw}: no such file or folder", EXIT_USAGE)
    if not jobs:
        raise RunError(f"no audio or video files in {', '.join(inputs)} (by extension: "
                           f"{' '.join(sorted(AUDIO_EXTENSIONS))}; name a file to take it "
                           "whatever its extension)", EXIT_USAGE)
    jobs.sort(key=lambda j: (j.arg, j.rel))
    seen: dict[str, Job] = {}
    for job in jobs:
        other = seen.setdefault(job.rel, job)
        if other is not job:
            raise RunError(f"{other.source} and {job.source} would both be written as "
                               f"{job.rel}.{suffix}: pass their common parent folder instead",
                               EXIT_USAGE)
    return jobs


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    source: str  # where it came from: --shard, a Slurm array, an Indexed Job, or none

    def take(self, jobs: Sequence[Job]) -> list[Job]:
        """This shard's share: every count-th file of the sorted list, from index."""
        return list(jobs[self.index::self.count])


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise RunError(f"--shard '{text}': expected I/N, e.g. 0/4 (I counts from 0)",
                           EXIT_USAGE)
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise RunError(f"--shard '{text}': I must be 0 to N-1 and N at least 1",
                           EXIT_USAGE)
    return index, count


def resolve_shard(option: str | None, count_option: int | None,
                  environ: dict[str, str] | Any = os.environ) -> Shard:
    """``--shard I/N``, else a Slurm job array, else a Kubernetes Indexed Job (with
    ``--shard-count``), else the whole list."""
    if option is not None:
        return Shard(*parse_shard(option), "--shard")
    if environ.get("SLURM_ARRAY_TASK_ID") is not None:
        try:
            task = int(environ["SLURM_ARRAY_TASK_ID"])
            low = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
            count = int(environ["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError):
            raise RunError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT/MIN/"
                               "STEP are missing or not numbers; pass --shard I/N",
                               EXIT_USAGE) from None
        index = (task - low) // max(step, 1)
        if count < 1 or not 0 <= index < count:
            raise RunError(f"Slurm array task {task} (min {low}, step {step}) is not one "
                               f"of {count} tasks; pass --shard I/N", EXIT_USAGE)
        return Shard(index, count, "SLURM_ARRAY_TASK_ID")
    if environ.get("JOB_COMPLETION_INDEX") is not None:
        if count_option is None:
            raise RunError("JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job): give "
                               "the Job's completions with --shard-count N", EXIT_USAGE)
        raw = environ["JOB_COMPLETION_INDEX"]
        if not raw.isdigit() or int(raw) >= count_option:
            raise RunError(f"JOB_COMPLETION_INDEX={raw} is not 0 to {count_option - 1} "
                               "(--shard-count)", EXIT_USAGE)
        return Shard(int(raw), count_option, "JOB_COMPLETION_INDEX")
    if count_option is not None:
        raise RunError("--shard-count needs JOB_COMPLETION_INDEX (a Kubernetes Indexed "
                           "Job); elsewhere use --shard I/N", EXIT_USAGE)
    return Shard(0, 1, "none")
