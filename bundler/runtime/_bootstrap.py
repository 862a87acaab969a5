"""How a runtime program run as a file imports its siblings: the same relative imports
(``from . import recordings``) as when the tool imports it as ``bundler.runtime.diarize``.

On the host a program runs as ``python -I runtime/diarize.py``: no package around it, and
``-I`` leaves its folder off ``sys.path``. Each program that imports a sibling starts with
the same three lines::

    if not __package__:  # run as a file: its folder is the package (runtime/_bootstrap.py)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        __package__ = __import__("_bootstrap").package(__file__)

``package`` takes the folder off ``sys.path`` again: no module of the runtime can shadow a
library's (``audio``, ``inputs``), and each exists once, under one package name.

Standard library only, Python 3.9.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

# Not a name any library uses: the runtime's modules are ``pyannote_bundle_runtime.<name>``.
PACKAGE = "pyannote_bundle_runtime"


def package(program: str) -> str:
    """Register the folder of ``program`` (a ``__file__``) as the package PACKAGE, take
    that folder off ``sys.path`` again, and return PACKAGE (the program's ``__package__``)."""
    folder = os.path.dirname(os.path.abspath(program))
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == folder:
        del sys.path[0]
    if PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [folder]
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
    return PACKAGE
