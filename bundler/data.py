"""Where the package's data folders are: installed (``bundler.templates``, ``bundler.lockfiles``)
or, in a source tree or an editable install, the top-level ``templates/`` and ``lockfiles/``."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path


def data_dir(name: str) -> Traversable:
    """The ``templates`` or ``lockfiles`` folder."""
    source = Path(__file__).resolve().parent.parent / name
    if source.is_dir():
        return source
    return resources.files(f"bundler.{name}")
