"""The community-1 recipe (pyannote.audio 4.x) on small real parts, and its traps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import EMB, SEG, TINY_LOCK

from bundler import errors
from bundler.build import BuildOptions, build
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.spec import load_recipe
from bundler.traps import check_config, check_pipeline

DEMO = Path(__file__).parent.parent / "bundler" / "demo"
CONFIG = (DEMO / "community-1-config.yaml").read_bytes()
REPO = "pyannote/speaker-diarization-community-1"


def _repo(config: bytes = CONFIG) -> HubRepo:
    return HubRepo(REPO, {"config.yaml": config, "segmentation/pytorch_model.bin": SEG,
                          "embedding/pytorch_model.bin": EMB,
                          "plda/xvec_transform.npz": b"xvec" * 4000,
                          "plda/plda.npz": b"plda" * 3000}, gated=True)


def _build(tmp_path: Path, wheel_cache: Path, config: bytes = CONFIG) -> Path:
    with LoopbackHub([_repo(config)], tokens=["hf_tok"]) as hub:
        opts = BuildOptions(output_dir=tmp_path / "out", cache_dir=wheel_cache,
                            endpoint=hub.url, token="hf_tok", lockfile=TINY_LOCK)
        return build(load_recipe("speaker-diarization-community-1"), opts).packed.path


def test_community_bundle_keeps_the_repo_layout_and_installs(tmp_path: Path,
                                                             wheel_cache: Path) -> None:
    tarball = _build(tmp_path, wheel_cache)
    prefix = tmp_path / "prefix"
    proc = subprocess.run(["pyannote-bundle", "verify", str(tarball), "--no-smoke", "--json",
                           "--prefix", str(prefix)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["config"]["checked"] == ["segmentation", "embedding", "plda"]
    release = Path(report["install"]["release"])  # the config names the release's own files
    folder = release / "models" / "speaker-diarization-community-1"
    assert (prefix / "models" / "speaker-diarization-community-1" / "plda" / "plda.npz").is_file()
    assert (folder / "plda" / "plda.npz").read_bytes() == b"plda" * 3000
    assert (folder / "config.yaml").read_bytes() == CONFIG  # the repo's own, $model and all
    params = yaml.safe_load((prefix / "config.yaml").read_text())["pipeline"]["params"]
    assert params["plda"] == {"checkpoint": str(folder), "subfolder": "plda"}
    assert params["embedding"] == {"checkpoint": str(folder), "subfolder": "embedding"}
    assert params["clustering"] == "VBxClustering"


def test_a_repo_config_without_plda_is_refused_at_build(tmp_path: Path,
                                                        wheel_cache: Path) -> None:
    no_plda = CONFIG.replace(b"    plda: $model/plda\n", b"")
    with pytest.raises(errors.TrapError, match="missing-plda.*names no plda"):
        _build(tmp_path, wheel_cache, no_plda)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_hub_id_in_the_repo_config_is_refused(tmp_path: Path, wheel_cache: Path) -> None:
    hub_id = CONFIG.replace(b"embedding: $model/embedding",
                            b"embedding: pyannote/wespeaker-voxceleb-resnet34-LM")
    with pytest.raises(errors.TrapError, match="hub-id.*embedding"):
        _build(tmp_path, wheel_cache, hub_id)


@pytest.mark.parametrize(("pipeline", "version", "words"), [
    ("pyannote-3.1", "4.0.7", "4.x always loads a PLDA"),
    ("community-1", "3.4.0", "needs pyannote.audio >= 4.0.3"),
])
def test_recipe_and_generation_must_fit(pipeline: str, version: str, words: str) -> None:
    with pytest.raises(errors.TrapError, match=words):
        check_pipeline(pipeline, version)
    check_pipeline(pipeline, "3.4.0" if version.startswith("4") else "4.0.7")


def test_folder_entries_are_linted(tmp_path: Path) -> None:
    root = tmp_path / "models" / "c1"
    (root / "plda").mkdir(parents=True)
    (root / "plda" / "plda.npz").write_bytes(b"x")
    with pytest.raises(errors.TrapError, match="missing-plda.*xvec_transform.npz"):
        check_config({"plda": {"checkpoint": str(root), "subfolder": "plda"}}, base=tmp_path,
                     sha256={}, pyannote_major=4)
    with pytest.raises(errors.TrapError, match="relative-path"):
        check_config({"plda": {"checkpoint": "models/c1", "subfolder": "plda"}},
                     base=tmp_path, sha256={}, pyannote_major=4)
    with pytest.raises(errors.TrapError, match="relative-path"):
        check_config({"plda": "$model/plda"}, base=tmp_path, sha256={}, pyannote_major=4)
    with pytest.raises(errors.TrapError, match="missing-plda"):
        check_config({"segmentation": str(root)}, base=tmp_path, sha256={}, pyannote_major=4)
