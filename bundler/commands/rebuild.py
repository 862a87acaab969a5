"""``pyannote-bundle rebuild``: the options from the arguments and the environment, the
rebuild, and the exit status its comparison calls for."""

from __future__ import annotations

import os
from pathlib import Path

from bundler.errors import RebuildDiffers
from bundler.rebuild import RebuildOptions, RebuildReport, rebuild


def rebuild_bundle(bundle: Path, *, output: Path | None, lockfile: Path | None,
                   cache_dir: Path, python: str | None) -> RebuildReport:
    """Rebuild ``bundle`` from what its manifest records (``HF_ENDPOINT``, ``HF_TOKEN`` from
    the environment) and compare; the report says identical or not, whichever it is."""
    return rebuild(bundle, RebuildOptions(cache_dir=cache_dir, output_dir=output,
                                          lockfile=lockfile,
                                          endpoint=os.environ.get("HF_ENDPOINT"),
                                          token=os.environ.get("HF_TOKEN"),
                                          python=python))


def require_identical(bundle: Path, report: RebuildReport) -> None:
    """Raise ``RebuildDiffers`` (exit 17) unless the rebuild matched byte for byte; called
    once the report is shown, so the differences are printed either way."""
    if not report.comparison.identical:
        raise RebuildDiffers(bundle.name, report.differing)
