"""Build-side faults: the Hub's (against the loopback Hub) and pip's, while fetching wheels.

Each ends in one clear error that names what failed, never echoes the token, and leaves
no bundle behind.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import EMB, SEG, TinyBundle
from forge import TOKEN, _build_argv, _hub

from bundler import errors
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.models import fetch_models
from bundler.spec import IndexOptions, Target, load_recipe
from bundler.wheels import fetch_wheels


# --- build side: Hub faults ----------------------------------------------------------------
def _fetch(hub: LoopbackHub, tmp_path: Path, token: str | None = TOKEN,
           sleeps: list[float] | None = None) -> Any:
    return fetch_models(load_recipe("speaker-diarization-3.1").models, endpoint=hub.url,
                        token=token, cache_dir=tmp_path / "hub",
                        sleep=(sleeps.append if sleeps is not None else lambda s: None))


@pytest.mark.parametrize(("faults", "error", "words"), [
    (["401"], errors.GatedRepo, "is gated"),
    (["403"], errors.HubError, "access denied (HTTP 403)"),
    (["404"], errors.HubError, "repository not found"),
])
def test_hub_faults_end_in_one_clear_error(tmp_path: Path, faults: list[str],
                                           error: type[Exception], words: str) -> None:
    with _hub() as hub:
        hub.inject("pyannote/segmentation-3.0", None, *faults)
        with pytest.raises(error) as exc:
            _fetch(hub, tmp_path)
    assert words in str(exc.value) and TOKEN not in str(exc.value)


def test_gated_build_without_a_token_leaves_no_bundle(tmp_path: Path, wheel_cache: Path,
                                                     tiny_bundle: TinyBundle) -> None:
    tiny_bundle()  # warm the wheel cache
    out = tmp_path / "gated"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HOME")}
    with _hub() as hub:
        proc = subprocess.run(_build_argv(out, wheel_cache), capture_output=True, text=True,
                              env={**env, "HF_ENDPOINT": hub.url,
                                   "HF_HOME": str(tmp_path / "hf-home")})
    assert proc.returncode == 3, proc.stderr
    assert "pyannote/segmentation-3.0 is gated" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_wrong_token_is_gated_and_never_echoed(tmp_path: Path) -> None:
    with _hub() as hub, pytest.raises(errors.GatedRepo) as exc:
        _fetch(hub, tmp_path, token="hf_wrong_SECRET_1234")
    assert "hf_wrong_SECRET_1234" not in str(exc.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    repos = [HubRepo("pyannote/segmentation-3.0", {"other.bin": SEG}),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB})]
    with LoopbackHub(repos) as hub, pytest.raises(errors.EntryNotFound,
                                                  match="'pytorch_model.bin' not found"):
        _fetch(hub, tmp_path, token=None)


@pytest.mark.parametrize("faults", [["429", "503"], ["500", "502"], ["drop"], ["drop", "drop"]])
def test_transient_faults_are_retried_or_resumed(tmp_path: Path, faults: list[str]) -> None:
    with _hub() as hub:
        hub.inject("pyannote/segmentation-3.0", "pytorch_model.bin", *faults)
        got = _fetch(hub, tmp_path)
        tries = [r for r in hub.requests if r["path"].endswith("/pytorch_model.bin")
                 and "segmentation" in r["path"]]
    assert got[0].files[0].local.read_bytes() == SEG
    assert len(tries) > len(faults), "each fault cost one request, then one succeeded"


def test_persistent_5xx_gives_up_after_backoff(tmp_path: Path) -> None:
    sleeps: list[float] = []
    with _hub() as hub:
        hub.inject("pyannote/segmentation-3.0", None, *["503"] * 40)
        with pytest.raises(errors.HubError, match="after .* attempts") as exc:
            _fetch(hub, tmp_path, sleeps=sleeps)
    assert len(sleeps) >= 2 and sleeps == sorted(sleeps) and sleeps[-1] > sleeps[0]
    assert TOKEN not in str(exc.value)


# --- build side: pip faults ----------------------------------------------------------------
def test_wheel_hash_mismatch_names_the_package(tmp_path: Path) -> None:
    lock = tmp_path / "bad.lock"
    lock.write_text(f"six==1.16.0 --hash=sha256:{'ab' * 32}\n")
    with pytest.raises(errors.WheelHashMismatch, match="^six: "):
        fetch_wheels(lock, Target(), IndexOptions(), tmp_path / "cache", 0)
    assert not list((tmp_path / "cache").rglob("*.whl"))


def test_no_wheel_for_the_target_names_package_and_target(tmp_path: Path) -> None:
    lock = tmp_path / "torch.lock"
    lock.write_text(f"torch==2.8.0 --hash=sha256:{'cd' * 32}\n")
    target = Target(python="3.14", arch="aarch64")
    with pytest.raises(errors.NoWheelForTarget) as exc:
        fetch_wheels(lock, target, IndexOptions(), tmp_path / "cache", 0)
    assert "torch" in str(exc.value) and "py314-linux-aarch64" in str(exc.value)
