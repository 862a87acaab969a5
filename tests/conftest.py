"""Shared setup: the `pyannote-bundle` the tests run is the one installed beside this pytest."""

import os
import sys
from pathlib import Path

os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
