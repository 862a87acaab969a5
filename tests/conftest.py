"""Shared setup.

The `pyannote-bundle` the tests run is the one installed beside this pytest. Small real
bundles (`tiny_bundle`) hold two real PyPI wheels (six, pip: tests/data/tiny.lock) and two
small model files served by the loopback Hub; the wheels are downloaded once per session.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bundler.build import BuildOptions, build
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.spec import Target, load_recipe

os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# A test run started in the background (nohup, `cmd &` in a script) inherits SIGINT ignored,
# and so would every program the tests interrupt with Ctrl-C: Python leaves an ignored SIGINT
# ignored. Restore the default here; an exec'd child then starts with it too.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SEG = b"segmentation weights" * 5000
EMB = b"embedding weights" * 9000
TINY_LOCK = Path(__file__).parent / "data" / "tiny.lock"
TINY_UV_LOCK = Path(__file__).parent / "data" / "tiny-uv.lock"  # + the uv wheel


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


TinyBundle = Callable[..., Path]


@pytest.fixture
def tiny_bundle(tmp_path: Path, wheel_cache: Path) -> TinyBundle:
    """``make(compression="none", target=None, token=None)`` -> the tarball's path."""

    def make(compression: str = "none", target: Target | None = None,
             token: str | None = None, out: str = "out", lockfile: Path = TINY_LOCK) -> Path:
        spec = load_recipe("speaker-diarization-3.1", target)
        repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG},
                         gated=token is not None),
                 HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB})]
        with LoopbackHub(repos, tokens=[token] if token else []) as hub:
            opts = BuildOptions(output_dir=tmp_path / out, cache_dir=wheel_cache,
                                endpoint=hub.url, token=token, lockfile=lockfile,
                                compression=compression)
            return build(spec, opts).packed.path

    return make
