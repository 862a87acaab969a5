"""End to end on the community-1 recipe (pyannote.audio 4.x): real wheels, the repo's
layout with a PLDA, built with its self-test and verified offline by `pyannote-bundle demo`."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def _run(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, **kw)


def test_community_1_builds_with_its_plda_and_verifies_offline(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path_factory.mktemp("demo-community-1")
    proc = _run("pyannote-bundle", "demo", "--recipe", "speaker-diarization-community-1",
                "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    v = report["verify"]
    assert report["ok"] is True and v["integrity"]["sidecar"] == "match"
    assert v["config"]["checked"] == ["segmentation", "embedding", "plda"]
    assert v["smoke"]["ok"] is True and v["smoke"]["segments"]
    assert v["smoke"]["pyannote_audio"].startswith("4.") and v["smoke"]["expected"] == "match"
    assert "unshare" in v["network_isolation"]
    assert set(v["smoke"]["network_probes"].values()) == {"blocked"}
    # inspect reads the real 4 GB bundle's manifest without unpacking its wheels.
    info = json.loads(_run("pyannote-bundle", "inspect", report["build"]["bundle"],
                           "--json").stdout)
    paths = [f["path"] for m in info["models"] for f in m["files"]]
    assert "models/speaker-diarization-community-1/plda/plda.npz" in paths
    assert info["bytes_read"] < info["size"] // 100
    shutil.rmtree(out)
