"""Progress for long work: rich bars on a terminal, one plain line otherwise.

The CLI turns bars on only when stderr is a terminal and --quiet is off, so CI logs get
one readable line per stage and no control characters. Library callers get plain lines.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("bundler")

_bars = False


def enable_bars(on: bool) -> None:
    global _bars
    _bars = on and sys.stderr.isatty()


@contextmanager
def task(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """``with task("pack", total=bytes) as advance: advance(n)``; no total: a spinner."""
    if not _bars:
        log.info("%s", description)
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total:
        columns += [BarColumn(), DownloadColumn(), TransferSpeedColumn()]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        tid = bar.add_task(description, total=total)
        yield lambda n: bar.advance(tid, n)
