"""Bundles for the Pythons that distributions ship, proven rather than only locked: the 3.1
recipe built for another CPython of this architecture, then installed offline by its own
`install.sh` with that interpreter (found as `python3.X` on PATH when `python3` is the
host's 3.11) under `unshare -n env -i`, and diarizing.

CI proves two targets, each by its own road from the build host:

- CPython 3.10 (Ubuntu 22.04): `build --target --self-test --python`: the self-test runs
  with that interpreter on the build host, so `smoke/expected.json` ships, and install.sh
  must then match it;
- CPython 3.12 (Ubuntu 24.04): a plain `build --target`, as for a host this one cannot run.

With ``PYANNOTE_BUNDLE_ALL_TARGETS=1`` every x86_64 target (3.9 for RHEL 9, 3.10, 3.12,
3.13 for Debian 13) goes through `demo --target --python` (self-test and verify with that
Python) and then install.sh: the command whose results docs/reference.md's host table
records.

The interpreters are this machine's (pyenv); the wheels come from PyPI through the shared
cache, so each target costs about one torch wheel. Each bundle is removed when its test ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import (
    check_voiceprints_in_smoke,
    installed_by_install_sh,
    pyenv_python,
    run,
    tool_cache,
)

from bundler.demo.checkpoints import RECIPE, checkpoints
from bundler.demo.pipeline import serve
from bundler.spec import IndexOptions

pytestmark = pytest.mark.slow

ALL = os.environ.get("PYANNOTE_BUNDLE_ALL_TARGETS") == "1"
OPT_IN = pytest.mark.skipif(not ALL, reason="every target: set PYANNOTE_BUNDLE_ALL_TARGETS=1")
FIGURES: dict[str, dict[str, object]] = {}
CASES = [
    pytest.param(9, "demo", marks=OPT_IN, id="3.9"),
    pytest.param(10, "demo" if ALL else "self-test", id="3.10"),
    pytest.param(12, "demo" if ALL else "build", id="3.12"),
    pytest.param(13, "demo", marks=OPT_IN, id="3.13"),
]


@pytest.fixture(scope="module", autouse=True)
def figures() -> Iterator[None]:
    """What docs/reference.md's host table records, printed at the end (pytest -s shows it)."""
    yield
    print("\nfigures:", json.dumps(FIGURES))


@pytest.fixture(scope="module")
def hub() -> Iterator[dict[str, str]]:
    """The demo's random-weight checkpoints on a gated loopback Hub: HF_ENDPOINT, HF_TOKEN."""
    served, token = serve(RECIPE, checkpoints(tool_cache(), IndexOptions()))
    with served as h:
        yield {"HF_ENDPOINT": h.url, "HF_TOKEN": token}


def _by_demo(python: Path, minor: int, slug: str, out: Path) -> Path:
    """`demo --target --python`: built with the self-test by that Python, verified by it."""
    proc = run("pyannote-bundle", "demo", "--target", slug, "--python", str(python),
               "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    v = report["verify"]
    assert report["ok"] is True and v["host"]["python"] == f"3.{minor}"
    assert v["host"]["interpreter"] == str(python)
    # The wheels' own ELF headers said what the host must have; the bundle checked it.
    assert {"libstdc++.so.6", "libgcc_s.so.1"} <= set(v["host"]["libraries"]["checked"])
    # The self-test ran with the target's Python on the build host and shipped its result;
    # the verification with the same interpreter matched it.
    assert v["smoke"]["expected"] == "match" and v["smoke"]["network_attempts"] == 0
    assert set(v["smoke"]["formats"]) == {"wav", "mp3", "m4a"}
    FIGURES[slug] = {"demo": report["seconds"], "speakers": v["smoke"]["speakers"]}
    return Path(report["build"]["bundle"])


def _by_build(slug: str, out: Path, hub: dict[str, str], python: Path | None) -> Path:
    """`build --target`, as a release engineer runs it for another host; with ``python``,
    `--self-test --python` too."""
    self_test = ["--self-test", "--python", str(python)] if python else []
    proc = subprocess.run(["pyannote-bundle", "build", "--recipe", RECIPE, "--target", slug,
                           *self_test, "--output", str(out)], capture_output=True, text=True,
                          env={**os.environ, **hub})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert hub["HF_TOKEN"] not in proc.stdout + proc.stderr
    ran = re.search(r"self-test: \d+ segments, \d+ speakers", proc.stderr) is not None
    assert ran is (python is not None), proc.stderr[-2000:]
    return Path(proc.stdout.split()[0])


def _install_sh(root: Path, python: Path, minor: int, work: Path) -> None:
    """The bundle's install.sh, offline with a clean environment, on a PATH whose python3
    is the distribution's 3.11 and which also has python3.X: it must look further. A bundle
    that ships the self-test's result (smoke/expected.json) must match it, or exit 13."""
    host_bin = work.parent / f"{work.name}-bin"
    host_bin.mkdir()
    (host_bin / f"python3.{minor}").symlink_to(python)
    try:
        t = time.monotonic()
        # pyenv's interpreters live under /root, which only root can enter: the install is
        # root's alone, in a prefix only root can reach (else the installer refuses it).
        with installed_by_install_sh(root, path=f"{host_bin}:/usr/bin:/bin",
                                     others=False) as inst:
            FIGURES.setdefault(f"py3{minor}-linux-x86_64", {})["install.sh_seconds"] = round(
                time.monotonic() - t, 1)
            assert f"using python3.{minor}" in inst.stderr
            assert "warning: only root can use this install" in inst.stderr
            result = json.loads((inst.prefix / "smoke-result.json").read_text())
            assert result["ok"] is True and result["network_attempts"] == 0
            assert set(result["formats"]) == {"wav", "mp3", "m4a"}
            check_voiceprints_in_smoke(result)  # pyannote 3.x's bin/enroll ran
            assert (inst.prefix / f"venv/lib/python3.{minor}/site-packages/pyannote").is_dir()
            FIGURES[f"py3{minor}-linux-x86_64"]["install.sh_speakers"] = result["speakers"]
    finally:
        shutil.rmtree(host_bin, ignore_errors=True)


@pytest.mark.parametrize(("minor", "road"), CASES)
def test_the_3_1_recipe_installs_and_diarizes_with_the_targets_python(
        minor: int, road: str, hub: dict[str, str],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    python = pyenv_python(minor)
    if python is None:
        pytest.skip(f"no CPython 3.{minor} on this machine")
    slug = f"py3{minor}-linux-x86_64"
    out = tmp_path_factory.mktemp(f"out-{slug}")
    work = tmp_path_factory.mktemp(f"extracted-{slug}")
    try:
        if road == "demo":
            tarball = _by_demo(python, minor, slug, out)
        else:
            tarball = _by_build(slug, out, hub, python if road == "self-test" else None)
        assert tarball.name.endswith(f"-{slug}.tar")
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(work)], check=True)
        shutil.rmtree(out)  # 4 GB: only the extracted copy is needed from here
        (root,) = work.iterdir()
        # A self-tested build ships its result, which install.sh must match (else exit 13).
        assert (root / "smoke/expected.json").is_file() is (road != "build")
        _install_sh(root, python, minor, work)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
