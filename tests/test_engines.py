"""The engines' parts that need no torch: the cores a process may use, and the installer's
receipt that the onnx engine reads before it trusts a file. The engines themselves are
proven against pyannote's own pipeline on both recipes' real bundles (tests/e2e.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bundler import layout
from bundler.runtime import engines as e


def test_a_cgroup_v2_quota_caps_the_threads(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    assert e.cgroup_quota(tmp_path) == 1.5
    assert e.usable_cores(tmp_path) == min(2, len(os.sched_getaffinity(0)))


def test_no_quota_means_the_affinity(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert e.cgroup_quota(tmp_path) is None
    assert e.usable_cores(tmp_path) == len(os.sched_getaffinity(0))


def test_a_cgroup_v1_quota_is_read_too(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert e.cgroup_quota(tmp_path) == 1.0
    assert e.usable_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert e.cgroup_quota(tmp_path) is None


@pytest.mark.parametrize("content,message", [
    (None, "no ONNX export in this install"),
    ("{", "cannot read"),
    (json.dumps({"onnx": {"ok": False, "error": "embeddings differ by 3.1e-03"}}),
     "did not pass: embeddings differ by 3.1e-03"),
])
def test_the_onnx_engine_needs_a_passed_check(tmp_path: Path, content: str | None,
                                              message: str) -> None:
    receipt = tmp_path / e.RECEIPT
    if content is not None:
        receipt.write_text(content)
    with pytest.raises(e.EngineUnavailable, match=message):
        e.use_onnx(object(), receipt, 1)


def test_an_exported_file_that_changed_is_not_used(tmp_path: Path) -> None:
    (tmp_path / "onnx").mkdir()
    model = tmp_path / "onnx" / e.SEGMENTATION_ONNX
    model.write_bytes(b"exported")
    entry = {"path": f"onnx/{e.SEGMENTATION_ONNX}", "sha256": e.sha256_file(model)}
    receipt = tmp_path / e.RECEIPT
    receipt.write_text(json.dumps({"onnx": {"ok": True, "segmentation": entry,
                                            "embedding": entry}}))
    model.write_bytes(b"exporteD")
    with pytest.raises(e.EngineUnavailable, match="differs from what the install checked"):
        e.use_onnx(object(), receipt, 1)


def test_the_engines_module_ships_in_every_bundle() -> None:
    assert layout.PROGRAMS[layout.ENGINES_MODULE] == "engines.py"
    assert set(e.ENGINES) == {"auto", "pyannote", "pytorch", "onnx"}


def test_a_batch_runs_in_passes_of_at_most_the_cpu_size_in_order() -> None:
    seen: list[int] = []

    def forward(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        return batch * 10

    passes = e.InPasses(forward, 8, join=np.concatenate)
    batch = np.arange(19)
    assert (passes(batch) == batch * 10).all()
    assert seen == [8, 8, 3]
    seen.clear()
    small = np.arange(8)
    assert (passes(small) == small * 10).all() and seen == [8]


def test_the_report_says_how_many_chunks_each_model_takes_a_pass() -> None:
    ran = e.Engine("auto", "onnx", threads=2, passes=dict(e.CPU_PASSES))
    assert ran.report()["chunks_per_pass"] == {"segmentation": 8, "embedding": 2}
    assert "chunks_per_pass" not in e.Engine("pyannote", "pyannote").report()


def test_the_help_states_the_check_the_install_runs_with_its_tolerance() -> None:
    """--help's claim is formatted from the gate's constant: it cannot say 1e-7 while the
    export compares with 1e-4, nor promise pyannote's RTTM where no check compares it."""
    import subprocess
    import sys

    from bundler.runtime import diarize

    assert float(e.TOLERANCE_TEXT) == e.TOLERANCE
    proc = subprocess.run([sys.executable, diarize.__file__, "--help"], capture_output=True,
                          text=True, check=True)
    text = " ".join(proc.stdout.split())
    assert ("the install checks onnx against pytorch on the smoke sample (segmentation "
            f"scores and embeddings within {e.TOLERANCE_TEXT}, the same RTTM)") in text
    assert "against pyannote's own RTTM are checked only in the project's end-to-end" in text
    assert "every engine gives pyannote's RTTM" not in text


def test_the_docs_state_the_gate_tolerance_not_a_measurement() -> None:
    root = Path(__file__).resolve().parent.parent
    for doc in ("README.md", "docs/diarize.md"):
        text = " ".join((root / doc).read_text().split())
        assert f"within {e.TOLERANCE_TEXT}" in text, doc
        assert "within 1e-7" not in text and "bit-identical embeddings" not in text, doc
