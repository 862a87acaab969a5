"""An install made for an image is the same bytes on every run: what `pyannote-bundle image`
captures into its layers (``image.capture``) depends on the bundle only, not on the moment,
the time zone or the caller's umask. Two real installs of a tiny bundle that installs with
its bundled uv (the path every real bundle takes), compared layer by layer and file by file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import TINY_UV_LOCK, TinyBundle

from bundler import image, oci, sandbox
from bundler.integrity import Limits, check_and_extract


def _install_as_image_does(tarball: Path, root: Path, tz: str, umask: str) -> dict[str, Any]:
    """The bundle unpacked into ``root`` as `image` unpacks it (its files' mtimes are the
    moment of unpacking, as on every image run), its installer run into
    ``root/opt/diarization`` with the options and the SOURCE_DATE_EPOCH `image` gives it;
    then what `image` captures: each layer's digest, and every entry (kind, mode, sha256 or
    link target)."""
    bundle = check_and_extract(tarball, root / sandbox.SOURCE_DIR, Limits()).root
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root.parent), "LANG": "C.UTF-8", "TZ": tz,
           "SOURCE_DATE_EPOCH": str(oci.archive.LAYER_EPOCH)}
    proc = subprocess.run(["sh", "-c", f'umask {umask} && exec "$@"', "sh", sys.executable,
                           "-I", str(bundle / "runtime" / "install.py"),
                           str(root / image.PREFIX), "--no-smoke", "--json", "--release",
                           image.RELEASE], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["install"]["method"] == "venv --without-pip + bundled uv"
    shutil.rmtree(root / sandbox.SOURCE_DIR)
    layers = image.capture(root, image.RELEASE)
    entries = {e.name: (e.kind, oct(e.mode), e.target or (
        hashlib.sha256(e.source.read_bytes()).hexdigest() if e.source else ""))
        for es in layers.values() for e in es}
    digests = {role: oci.archive.layer_digest(es) for role, es in layers.items()}
    return {"entries": entries, "digests": digests}


def test_two_image_installs_of_a_uv_bundle_are_the_same_bytes(
        tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    tarball = tiny_bundle(lockfile=TINY_UV_LOCK)
    root = tmp_path / "root"
    first = _install_as_image_does(tarball, root, "UTC", "022")
    root.rename(tmp_path / "first")  # the second install gets the very same paths
    time.sleep(1.1)  # another second on the clock: anything stamped with it differs
    second = _install_as_image_does(tarball, root, "Asia/Kathmandu", "077")
    names = first["entries"].keys() | second["entries"].keys()
    differ = sorted(n for n in names if first["entries"].get(n) != second["entries"].get(n))
    assert not differ, f"{len(differ)} entries differ, e.g. {differ[:5]}"
    # The venv really went through uv and compiled bytecode, and its dist-info is there:
    # the comparison above covered them.
    dist = [n for n in names if ".dist-info/" in n]
    assert any(n.endswith("six-1.16.0.dist-info/RECORD") for n in dist), dist
    assert any(n.endswith(".pyc") and "/venv/" in n for n in names)
    assert first["digests"] == second["digests"]
    # No installer metadata at all: nothing of the moment, and nothing of the bundle's path.
    assert not [n for n in names if n.endswith(("uv_cache.json", "direct_url.json"))]
