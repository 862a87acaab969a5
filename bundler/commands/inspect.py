"""``pyannote-bundle inspect``: what the file is (an image, a delta, a bundle), read by the
module that owns that kind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bundler.delta import inspect_delta, is_delta, render_delta
from bundler.inspection import inspect_bundle, inspect_image, render_inspect, render_text
from bundler.oci.reader import is_image

Render = Callable[[dict[str, Any]], str]


def inspect_file(path: Path) -> tuple[dict[str, Any], Render]:
    """What ``path`` holds (``--json`` prints it) and the function that renders it as text."""
    if is_image(path):
        return inspect_image(path), render_inspect
    if is_delta(path):
        return inspect_delta(path), render_delta
    return inspect_bundle(path), render_text
