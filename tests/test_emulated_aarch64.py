"""The aarch64 bundle on an aarch64 Debian 12, emulated: refused on a minimal host that lacks
the GNU OpenMP runtime PyPI's aarch64 torchaudio links, then installed offline and diarizing once
``libgomp1`` is added. The bundle carries onnxruntime and ctranslate2; under Debian 12's
qemu-user 7.2 onnxruntime cannot load (its CPU probe reads the host's x86 /proc/cpuinfo, which
qemu passes through, and dies of SIGSEGV): the install records that, naming the signal, and
``auto`` runs the pytorch engine.

Run it on purpose (root, Debian's qemu-user-static, binfmt-support and debootstrap, and the
Debian mirror for the arm64 root; about 11 minutes with a kept root, most of it emulated):

    PYANNOTE_BUNDLE_EMULATION=1 .venv/bin/python -m pytest -m slow tests/test_emulated_aarch64.py

``PYANNOTE_BUNDLE_ARM64_ROOT=DIR`` keeps the debootstrap'd root between runs (made when
missing). CI does not run it: it needs binfmt_misc, which a CI container may not mount. The
last results are recorded in docs/reference.md and docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import tool_cache

from bundler.build import BuildOptions, build
from bundler.demo.checkpoints import checkpoints
from bundler.demo.pipeline import serve
from bundler.spec import IndexOptions, Target, load_recipe

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PYANNOTE_BUNDLE_EMULATION") != "1",
                       reason="emulated aarch64: set PYANNOTE_BUNDLE_EMULATION=1 (root, qemu)"),
]

MIRROR = os.environ.get("PYANNOTE_BUNDLE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def sh(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def ensure_binfmt() -> None:
    if not (BINFMT / "register").exists():
        sh("mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT))
    if not (BINFMT / "qemu-aarch64").exists():
        sh("update-binfmts", "--enable", "qemu-aarch64")
    assert (BINFMT / "qemu-aarch64").exists(), "qemu-user-static's aarch64 handler is missing"


@pytest.fixture(scope="module")
def arm64_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    ensure_binfmt()
    root = Path(os.environ.get("PYANNOTE_BUNDLE_ARM64_ROOT")
                or tmp_path_factory.mktemp("arm64") / "root")
    if not (root / "usr/bin/python3").exists():
        proc = sh("debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3",
                  "bookworm", str(root), MIRROR)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Minimal, as a fresh host is: no OpenMP runtime.
    sh("chroot", str(root), "dpkg", "--purge", "libgomp1")
    for fs, where in (("proc", "proc"), ("sysfs", "sys")):
        sh("mount", "-t", fs, fs, str(root / where))
    try:
        yield root
    finally:
        for where in ("proc", "sys"):
            sh("umount", "-l", str(root / where))
        shutil.rmtree(root / "bundle", ignore_errors=True)
        shutil.rmtree(root / "opt/pyannote", ignore_errors=True)


def test_the_aarch64_bundle_names_libgomp1_then_installs_and_diarizes_with_it(
        arm64_root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tool_cache()
    spec = load_recipe("speaker-diarization-3.1", Target.from_slug("py311-linux-aarch64"))
    ckpt = checkpoints(cache, IndexOptions())
    served, token = serve(spec.name, ckpt)
    out = tmp_path_factory.mktemp("aarch64-bundle")
    with served as hub:
        result = build(spec, BuildOptions(output_dir=out, cache_dir=cache, endpoint=hub.url,
                                          token=token))
    # The engines' and the speech-recognition runtime's native libraries are in it.
    wheels = {w["name"] for w in result.manifest["wheels"]}
    assert {"onnxruntime", "ctranslate2", "faster-whisper"} <= wheels
    libs = {lib["soname"]: lib for lib in result.manifest["host_requirements"]["libraries"]}
    # torch brings its own OpenMP runtime (torch.libs/); torchaudio links the host's.
    assert libs["libgomp.so.1"]["required"] and "torchaudio" in libs["libgomp.so.1"]["needed_by"]

    # The sysadmin's path: tar -xf, then install.sh, with the network off.
    shutil.rmtree(arm64_root / "bundle", ignore_errors=True)
    (arm64_root / "bundle").mkdir()
    with tarfile.open(result.packed.path) as tar:
        tar.extractall(arm64_root / "bundle", filter="data")
    install = f"/bundle/{result.bundle_name}/install.sh"
    target = arm64_root / "opt/pyannote"
    shutil.rmtree(target, ignore_errors=True)

    refused = sh("unshare", "-n", "chroot", str(arm64_root), "/bin/sh", install, "/opt/pyannote")
    assert refused.returncode == 11, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert "libgomp.so.1 (needed by torchaudio" in line and "Debian/Ubuntu: libgomp1" in line
    assert "RHEL: libgomp" in line and "nothing was installed" in line
    assert not target.exists()

    shutil.copy("/etc/resolv.conf", arm64_root / "etc/resolv.conf")
    added = sh("chroot", str(arm64_root), "apt-get", "install", "-y", "-qq", "libgomp1",
               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if added.returncode != 0:  # a root made earlier may have stale package lists
        sh("chroot", str(arm64_root), "apt-get", "update", "-qq")
        added = sh("chroot", str(arm64_root), "apt-get", "install", "-y", "-qq", "libgomp1",
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert added.returncode == 0, added.stderr[-2000:]

    done = sh("unshare", "-n", "chroot", str(arm64_root), "/bin/sh", install, "/opt/pyannote")
    assert done.returncode == 0, done.stderr[-4000:]
    smoke = json.loads((target / "smoke-result.json").read_text())
    assert smoke["speakers"] >= 1 and smoke["network_attempts"] == 0
    assert sorted(smoke["formats"]) == ["m4a", "mp3", "wav"]
    # qemu-user 7.2 shows the guest this host's x86 /proc/cpuinfo, and onnxruntime's CPU
    # probe dies of it when the library loads: the install says so, and auto runs pytorch.
    onnx = json.loads((target / "current" / "engines.json").read_text())["onnx"]
    if onnx.get("onnxruntime_loads") is False:
        assert "killed by signal 11 (SIGSEGV)" in onnx["error"], onnx
        assert "onnx engine not used on this host" in done.stderr
        assert smoke["engine"] == "pytorch" and "SIGSEGV" in smoke["engine_note"], smoke
    else:  # an emulator that shows an ARM CPU: the onnx engine was checked and runs
        assert onnx["ok"] and smoke["engine"] == "onnx", (onnx, smoke)
    ok = next(ln for ln in done.stdout.splitlines() if ln.startswith("install: ok"))
    print(f"aarch64 under qemu: {ok}; engine {smoke['engine']} ({smoke.get('engine_note')})")
