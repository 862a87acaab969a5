"""Bundles for the Pythons that distributions ship, proven rather than only locked: the 3.1
recipe built for CPython 3.10 (Ubuntu 22.04), 3.12 (Ubuntu 24.04) and 3.13 (Debian 13) with
`pyannote-bundle demo --target`, self-tested and verified with that interpreter, then
installed offline by its own install.sh, which finds python3.X on PATH when python3 is the
host's 3.11, and diarizes.

The interpreters are this machine's (pyenv); the wheels come from PyPI through the shared
cache, so each target costs about one torch wheel. Each bundle is removed when its test ends.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from e2e import installed_by_install_sh, pyenv_python, run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("minor", [10, 12, 13])
def test_the_3_1_recipe_installs_and_diarizes_with_the_targets_python(
        minor: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    python = pyenv_python(minor)
    if python is None:
        pytest.skip(f"no CPython 3.{minor} on this machine")
    slug = f"py3{minor}-linux-x86_64"
    out = tmp_path_factory.mktemp(f"demo-{slug}")
    work = tmp_path_factory.mktemp(f"extracted-{slug}")
    try:
        proc = run("pyannote-bundle", "demo", "--target", slug, "--python", str(python),
                   "--output", str(out), "--json")
        assert proc.returncode == 0, proc.stderr[-4000:]
        report = json.loads(proc.stdout)
        v = report["verify"]
        assert report["ok"] is True and v["host"]["python"] == f"3.{minor}"
        assert v["host"]["interpreter"] == str(python)
        # The wheels' own ELF headers said what the host must have; the bundle checked it.
        assert {"libstdc++.so.6", "libgcc_s.so.1"} <= set(v["host"]["libraries"]["checked"])
        # The self-test ran with the target's Python on the build host and shipped its
        # result; the verification with the same interpreter matched it.
        assert v["smoke"]["expected"] == "match" and v["smoke"]["network_attempts"] == 0
        assert set(v["smoke"]["formats"]) == {"wav", "mp3", "m4a"}
        tarball = Path(report["build"]["bundle"])
        assert tarball.name.endswith(f"-{slug}.tar")

        subprocess.run(["tar", "-xf", str(tarball), "-C", str(work)], check=True)
        (root,) = work.iterdir()
        shutil.rmtree(out)  # 4 GB: only the extracted copy is needed from here
        host_bin = work / "host-bin"
        host_bin.mkdir()
        (host_bin / f"python3.{minor}").symlink_to(python)
        # python3 on this PATH is the distribution's 3.11: install.sh must look further.
        with installed_by_install_sh(root, path=f"{host_bin}:/usr/bin:/bin") as inst:
            assert f"using python3.{minor}" in inst.stderr
            result = json.loads((inst.prefix / "smoke-result.json").read_text())
            assert result["ok"] is True and result["network_attempts"] == 0
            assert (inst.prefix / f"venv/lib/python3.{minor}/site-packages/pyannote").is_dir()
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
