"""Reproducible on any build host, checkable by a second engineer: the 3.1 recipe (real torch
and pyannote.audio wheels, docopt built from its sdist, format-true checkpoints from the
loopback Hub) built for py311-linux-x86_64 on one build host and rebuilt identical by
`pyannote-bundle rebuild` on a second, differently configured one. That a self-consistent
forgery is named (exit 17) is proven on the small bundle (tests/test_rebuild.py): the
comparison is the same code at any size.

Host A: the tool under this CPython (3.11), this umask, time zone, locale and the shared
cache ($PYANNOTE_BUNDLE_CACHE or ~/.cache/pyannote-bundle). Host B: the tool installed under
CPython 3.12, umask 077, TZ=Asia/Tokyo, LANG=C, another HOME, working folder and cache. B's
cache is seeded with hard links to A's downloaded files only (the download is not what is
tested; the cache location is): B builds docopt's wheel itself.

About 4 minutes and 8 GB of disk (two builds of a 4 GB bundle).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e import pyenv_python, tool_cache

from bundler.demo.checkpoints import COMPLETE, checkpoints
from bundler.demo.hub import LoopbackHub
from bundler.demo.pipeline import serve
from bundler.spec import IndexOptions

pytestmark = pytest.mark.slow

RECIPE = "speaker-diarization-3.1"
TARGET = "py311-linux-x86_64"
EPOCH = "1700000000"  # set explicitly: the digest must not depend on a default
ROOT = Path(__file__).resolve().parent.parent
# TLS settings a build host behind a corporate CA keeps; nothing else of this machine's.
TLS = {k: v for k, v in os.environ.items() if k in ("PIP_CERT", "SSL_CERT_FILE")}


@dataclass(frozen=True)
class Host:
    """How a build host runs the tool: its program, environment, umask and folder."""

    tool: Path
    env: dict[str, str]
    umask: str
    cwd: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", f'umask {self.umask} && exec "$@"', "sh",
                               str(self.tool), *args], capture_output=True, text=True,
                              env=self.env, cwd=self.cwd)


@pytest.fixture(scope="module")
def hub() -> Iterator[tuple[LoopbackHub, str]]:
    # Any complete set of the demo's random-weight checkpoints serves (they are keyed by the
    # helper venv's lock); make one only when the cache has none.
    depth = len(Path(COMPLETE).parts) - 1
    made = sorted(p.parents[depth]
                  for p in (tool_cache() / "demo").glob(f"checkpoints-*/{COMPLETE}"))
    ckpt = made[0] if made else checkpoints(tool_cache(), IndexOptions())
    served, token = serve(RECIPE, ckpt)
    with served as h:
        yield h, token


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("rebuild")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def host_a(hub: tuple[LoopbackHub, str], work: Path) -> Host:
    h, token = hub
    tool = Path(shutil.which("pyannote-bundle") or "pyannote-bundle")
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "",
           "PYANNOTE_BUNDLE_CACHE": str(tool_cache()), "SOURCE_DATE_EPOCH": EPOCH,
           "HF_ENDPOINT": h.url, "HF_TOKEN": token}
    return Host(tool, env, "022", work)


@pytest.fixture(scope="module")
def host_b(hub: tuple[LoopbackHub, str], work: Path) -> Host:
    py312 = pyenv_python(12)
    if py312 is None:
        pytest.skip("needs a CPython 3.12 (pyenv) for the second build host")
    h, token = hub
    base = work / "host-b"
    (base / "home").mkdir(parents=True)
    (base / "cwd").mkdir()
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(base / "home"), "PIP_CONFIG_FILE": os.devnull,
             **TLS}
    venv = base / "venv"
    subprocess.run([str(py312), "-m", "venv", str(venv)], check=True, env=clean)
    pip = subprocess.run([str(venv / "bin/pip"), "install", "-q", "--index-url",
                          "https://pypi.org/simple", str(ROOT)], capture_output=True, text=True,
                         env=clean)
    assert pip.returncode == 0, pip.stderr[-3000:]
    cache = base / "cache"
    (cache / "wheels").mkdir(parents=True)
    # The downloaded files only: hard links, not a second 4 GB download.
    subprocess.run(["cp", "-al", str(tool_cache() / "wheels" / "wheels"),
                    str(cache / "wheels")], check=True)
    env = {**clean, "TZ": "Asia/Tokyo", "LANG": "C", "PYANNOTE_BUNDLE_CACHE": str(cache),
           "SOURCE_DATE_EPOCH": EPOCH, "HF_ENDPOINT": h.url, "HF_TOKEN": token}
    return Host(venv / "bin/pyannote-bundle", env, "077", base / "cwd")


def _build(host: Host, out: Path) -> Path:
    proc = host.run("build", "--recipe", RECIPE, "--target", TARGET, "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    tarball = Path(proc.stdout.split()[0])
    assert tarball.is_file()
    return tarball


def _digest(tarball: Path) -> str:
    return tarball.with_name(tarball.name + ".sha256").read_text().split()[0]


@pytest.fixture(scope="module")
def bundle_a(host_a: Host, work: Path) -> Path:
    return _build(host_a, work / "a")


def test_a_second_engineer_on_another_build_host_rebuilds_the_release_identical(
        bundle_a: Path, host_b: Host) -> None:
    """Host B, with its own tool, Python, cache and settings, checks host A's release: the
    rebuild is a build on B from what A's manifest records, so identical bytes prove that
    two differently configured build hosts make the same bundle."""
    version = subprocess.run([str(host_b.tool.parent / "python"), "-c",
                              "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    assert version == "(3, 12)"
    env = {**host_b.env}
    env.pop("SOURCE_DATE_EPOCH")  # the rebuild takes the bundle's own
    host = Host(host_b.tool, env, host_b.umask, host_b.cwd)
    proc = host.run("rebuild", str(bundle_a), "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["identical"] is True and report["members"] == []
    assert report["bundle_sha256"] == report["rebuilt_sha256"] == _digest(bundle_a)
    assert report["rebuilt"] is None  # not kept without --output
    # B made docopt's wheel itself (its cache had only the downloads), under umask 077,
    # byte for byte the one A shipped.
    cache_b = Path(host_b.env["PYANNOTE_BUNDLE_CACHE"])
    (built,) = (cache_b / "wheels" / "sdist-builds").rglob("docopt-*.whl")
    manifest = json.loads(subprocess.run(
        ["tar", "-xOf", str(bundle_a), f"{bundle_a.name[:-4]}/manifest.json"],
        capture_output=True, text=True, check=True).stdout)
    (docopt,) = [w for w in manifest["wheels"] if w["name"] == "docopt"]
    assert docopt["built_from_sdist"] and docopt["filename"] == built.name
    assert hashlib.sha256(built.read_bytes()).hexdigest() == docopt["sha256"]
    assert manifest["build_backend"]["requires"] == ["setuptools==84.2.1"]
    assert manifest["build"]["source_date_epoch"] == int(EPOCH)
