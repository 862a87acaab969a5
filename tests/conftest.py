"""Shared setup.

The `pyannote-bundle` the tests run is the one installed beside this pytest. Small real
bundles (`tiny_bundle`) hold two real PyPI wheels (six, pip: tests/data/tiny.lock) and two
small model files served by the loopback Hub; the wheels are downloaded once per session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e import Installed, installed_by_install_sh
from pg import PostgresServer
from pg import binaries as pg_binaries
from serve_helpers import Speech, make_speech

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


# --- the real community-1 bundle with faster-whisper tiny.en, built once per session ----
@pytest.fixture(scope="session")
def community_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``pyannote-bundle demo`` of community-1 with real tiny.en weights: built, verified
    offline; its ``--json`` report. Shared by tests/test_e2e_community.py and
    tests/test_e2e_serve.py (one 4 GB build per session)."""
    out = tmp_path_factory.mktemp("demo-community-1")
    proc = subprocess.run(["pyannote-bundle", "demo", "--recipe",
                           "speaker-diarization-community-1", "--output", str(out), "--json",
                           "--asr-model", "Systran/faster-whisper-tiny.en"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    yield json.loads(proc.stdout)
    shutil.rmtree(out, ignore_errors=True)  # 4 GB


@pytest.fixture(scope="session")
def community_installed(community_demo: dict[str, Any],
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """That bundle extracted and installed by its own install.sh."""
    work = tmp_path_factory.mktemp("extracted-community-1")
    subprocess.run(["tar", "-xf", community_demo["build"]["bundle"], "-C", str(work)],
                   check=True)
    (root,) = work.iterdir()
    try:
        with installed_by_install_sh(root) as inst:
            yield inst
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def speech_ref(community_installed: Installed) -> Iterator[Speech]:
    """espeak-ng recordings and bin/transcribe's outputs for them on that bundle
    (tests/serve_helpers.py), for every module that serves them; the servers' state dirs
    (under ``base/serve``) go at the end."""
    yield make_speech(community_installed)
    shutil.rmtree(community_installed.base / "serve", ignore_errors=True)


# --- a real PostgreSQL server, for bin/serve's shared store ------------------------------
@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL cluster for the session (tests/pg.py), its password given to
    libpq by ``PGPASSFILE``; stopped and removed after. Missing binaries fail the tests: the
    shared store must be proven on a real server, never skipped."""
    bindir = pg_binaries()
    if bindir is None:
        pytest.fail("PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/"
                    "initdb): apt-get install postgresql, as .ci/run does")
    server = PostgresServer(bindir)
    before = os.environ.get("PGPASSFILE")
    try:
        server.start()
        os.environ["PGPASSFILE"] = str(server.passfile)
        yield server
    finally:
        if before is None:
            os.environ.pop("PGPASSFILE", None)
        else:
            os.environ["PGPASSFILE"] = before
        server.stop()
