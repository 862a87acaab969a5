"""The engines' parts that need no torch: the cores a process may use, and the installer's
receipt that the onnx engine reads before it trusts a file. The engines themselves are
proven against pyannote's own pipeline on both recipes' real bundles (tests/e2e.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import pytest

from bundler import layout
from bundler.runtime import common, exits, export, recordings, smoke, transcribe
from bundler.runtime import engines as e
from bundler.runtime import install as installer

RUNTIME = Path(e.__file__).parent


def test_a_cgroup_v2_quota_caps_the_threads(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    assert common.cgroup_quota(tmp_path) == 1.5
    assert common.usable_cores(tmp_path) == min(2, len(os.sched_getaffinity(0)))


def test_no_quota_means_the_affinity(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert common.cgroup_quota(tmp_path) is None
    assert common.usable_cores(tmp_path) == len(os.sched_getaffinity(0))


def test_a_cgroup_v1_quota_is_read_too(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert common.cgroup_quota(tmp_path) == 1.0
    assert common.usable_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert common.cgroup_quota(tmp_path) is None


def test_the_quota_of_the_process_own_cgroup_and_those_above_it_counts(tmp_path: Path) -> None:
    # A systemd service or a cgroup made by hand: the host's whole tree is mounted, and the
    # process sits below its root (/proc/self/cgroup names where).
    service = tmp_path / "system.slice" / "diarize.service"
    service.mkdir(parents=True)
    (service / "cpu.max").write_text("150000 100000\n")  # CPUQuota=150%
    (tmp_path / "system.slice" / "cpu.max").write_text("max 100000\n")
    assert common.cgroup_quota(tmp_path, "0::/system.slice/diarize.service\n") == 1.5
    assert common.cgroup_quota(tmp_path, "0::/\n") is None
    (tmp_path / "system.slice" / "cpu.max").write_text("100000 100000\n")  # the parent's
    assert common.cgroup_quota(tmp_path, "0::/system.slice/diarize.service\n") == 1.0
    # cgroup v1 (and hybrid hosts): the cpu controller's own hierarchy, its own line.
    v1 = tmp_path / "v1"
    job = v1 / "cpu" / "batch" / "job"
    job.mkdir(parents=True)
    (job / "cpu.cfs_quota_us").write_text("50000\n")
    (job / "cpu.cfs_period_us").write_text("100000\n")
    membership = "4:memory:/other\n2:cpu,cpuacct:/batch/job\n0::/\n"
    assert common.cgroup_quota(v1, membership) == 0.5
    # A container's mount is its own cgroup: the host's path below it does not exist there.
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert common.cgroup_quota(v1, "2:cpu,cpuacct:/docker/0123abcd\n") == 2.0


def test_every_model_gets_the_one_thread_count_under_a_cpu_quota(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # docker --cpus 1 on this (2-core) host: torch, onnxruntime and CTranslate2 all get 1.
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    monkeypatch.setattr(common, "CGROUP", tmp_path)
    assert e.cpu_threads() == 1
    assert e.ort_settings(e.cpu_threads()) == {
        "options": {"intra_op_num_threads": 1, "inter_op_num_threads": 1},
        "config": {"session.intra_op.allow_spinning": "0",
                   "session.inter_op.allow_spinning": "0"}}
    program = transcribe.Transcribe()
    parser = recordings.parser(program)

    def ct2(*argv: str) -> dict[str, Any]:
        return transcribe.whisper_options(parser.parse_args(["a.wav", *argv]), "cpu", 0, "int8")

    assert ct2() == {"device": "cpu", "device_index": 0, "compute_type": "int8",
                     "cpu_threads": 1, "num_workers": 1, "local_files_only": True}
    # --threads is the one number for every model; --asr-threads overrides it for recognition.
    assert ct2("--threads", "3")["cpu_threads"] == 3 == e.cpu_threads(3)
    assert ct2("--threads", "3", "--asr-threads", "2")["cpu_threads"] == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert ct2()["cpu_threads"] == e.cpu_threads() == len(os.sched_getaffinity(0))


def test_numpys_own_pool_takes_the_thread_count_before_it_loads() -> None:
    """pyannote's clustering runs in numpy's BLAS, whose pool counts the host's cores at
    import (here, numpy's OpenBLAS: one worker thread per core beyond the first)."""
    code = ("from bundler.runtime import engines\n"
            "engines.limit_native_pools(engines.cpu_threads(int(sys.argv[1]) or None))\n"
            "import numpy, os\n"
            "numpy.ones((300, 300)) @ numpy.ones((300, 300))\n"
            "print(len(os.listdir('/proc/self/task')))\n")
    env = {k: v for k, v in os.environ.items() if k not in e.NATIVE_POOLS}

    def threads(requested: int) -> int:
        proc = subprocess.run([sys.executable, "-c", f"import sys\n{code}", str(requested)],
                              env=env, capture_output=True, text=True, check=True)
        return int(proc.stdout)

    assert threads(1) == 1  # the main thread alone
    assert threads(0) == common.usable_cores()  # the default: the cores this process may use
    env["OPENBLAS_NUM_THREADS"] = "2"
    assert threads(1) == 2  # the user's own setting wins


def test_the_export_says_ok_only_after_its_check_passed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A check that raises leaves engines.json saying it failed and why, and nothing in the
    release that says ok; while it runs, only the check itself reads an ok."""
    release = tmp_path / "release"
    release.mkdir()
    environ = dict(os.environ)
    seen: dict[str, Any] = {}

    def export_whose_check_raises(release: Path, threads: int | None) -> dict[str, Any]:
        seen["before"] = json.loads((release / e.RECEIPT).read_text())["onnx"]
        exported = {"ok": False, "segmentation": {"path": "onnx/segmentation.onnx"}}
        with export.checking_receipt(release, exported) as staged:
            seen["checked"] = e.read_receipt(staged)  # what use_onnx reads in the check
            seen["public"] = json.loads((release / e.RECEIPT).read_text())["onnx"]
            raise RuntimeError("the sample's RTTM cannot be computed")

    # main() goes offline and silences warnings for its own process: this one's restored.
    (tmp_path / "cache").mkdir()
    with patch.dict(os.environ, {"XDG_CACHE_HOME": str(tmp_path / "cache")}), \
            warnings.catch_warnings():
        assert export.main([str(release)], export_whose_check_raises) == 1
    assert dict(os.environ) == environ  # later tests talk to the loopback Hub
    assert seen["checked"]["ok"] is True and seen["checked"]["segmentation"]
    assert seen["before"] == seen["public"] == export.UNFINISHED
    failed = {"ok": False, "error": "RuntimeError: the sample's RTTM cannot be computed"}
    assert json.loads((release / e.RECEIPT).read_text()) == {"onnx": failed}
    assert json.loads(capsys.readouterr().out) == {"onnx": failed}
    assert [p.name for p in release.iterdir()] == [e.RECEIPT]
    with pytest.raises(e.EngineUnavailable, match="did not pass: RuntimeError: the sample"):
        e.read_receipt(release / e.RECEIPT)  # so auto runs pytorch


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
    entry = {"path": f"onnx/{e.SEGMENTATION_ONNX}", "sha256": common.sha256_file(model)}
    receipt = tmp_path / e.RECEIPT
    receipt.write_text(json.dumps({"onnx": {"ok": True, "segmentation": entry,
                                            "embedding": entry}}))
    model.write_bytes(b"exporteD")
    with pytest.raises(e.EngineUnavailable, match="differs from what the install checked"):
        e.use_onnx(object(), receipt, 1)


def test_the_engines_module_ships_in_every_bundle() -> None:
    assert layout.PROGRAMS[layout.ENGINES_MODULE] == "engines.py"
    assert layout.PROGRAMS[layout.EXPORT_SCRIPT] == "export.py"
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
    for doc in ("README.md", "docs/diarize.md", "docs/installing.md"):
        text = " ".join((root / doc).read_text().split())
        assert f"within {e.TOLERANCE_TEXT}" in text, doc
        assert "within 1e-7" not in text and "bit-identical embeddings" not in text, doc


# --- a native library that kills the process when it loads -------------------------------
def dying_package(site: Path, name: str, version: str) -> None:
    """A package whose import dies of a real SIGSEGV (CPython's own faulthandler._sigsegv),
    as onnxruntime 1.28.0's does on aarch64 under qemu-user 7.2; installed, with metadata."""
    (site / name).mkdir()
    (site / name / "__init__.py").write_text("import faulthandler\nfaulthandler._sigsegv()\n")
    installed(site, name, version)


def installed(site: Path, name: str, version: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (site / name).mkdir(exist_ok=True)
    (site / name / "__init__.py").touch()


def release_with_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A release as the installer makes it, with a real (empty) venv: its folder and
    site-packages."""
    release = tmp_path / "release"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(release / "venv")],
                   check=True)
    (release / "runtime").mkdir()
    for program in RUNTIME.glob("*.py"):  # export.py and the modules it imports
        shutil.copy(program, release / "runtime" / program.name)
    return release, next((release / "venv" / "lib").glob("python3.*/site-packages"))


def test_an_onnxruntime_that_dies_when_it_loads_is_a_failed_export_naming_the_signal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The install goes on (auto runs pytorch, and says why) instead of dying in the export."""
    monkeypatch.chdir(tmp_path)  # where a core file would go
    release, site = release_with_venv(tmp_path)
    dying_package(site, "onnxruntime", "1.28.0")
    onnx = installer.export_engines(release)
    assert onnx == {"ok": False, "onnxruntime_loads": False,
                    "error": "importing onnxruntime 1.28.0 failed: killed by signal 11 "
                             "(SIGSEGV)"}
    assert json.loads((release / e.RECEIPT).read_text()) == {"onnx": onnx}
    with pytest.raises(e.EngineUnavailable, match=r"did not pass: importing onnxruntime "
                                                  r"1\.28\.0 failed: killed by signal 11"):
        e.read_receipt(release / e.RECEIPT)
    # bin/transcribe: faster-whisper's VAD runs in onnxruntime. Off by default, and why;
    # asked for, one clear error instead of a crash on the first recording.
    assert e.onnxruntime_failure(release / e.RECEIPT) == onnx["error"]
    vad, note = transcribe.choose_vad(None, release / e.RECEIPT)
    assert not vad and note and note.endswith("cannot load on this host: " + onnx["error"])
    assert transcribe.choose_vad(False, release / e.RECEIPT) == (False, None)
    with pytest.raises(exits.RunError, match=r"^--vad: .*killed by signal 11") as err:
        transcribe.choose_vad(True, release / e.RECEIPT)
    assert err.value.code == exits.EXIT_CANNOT_RUN


@pytest.mark.parametrize("receipt", [
    None,  # not tried (--no-smoke)
    {"onnx": {"ok": True}},
    {"onnx": {"ok": False, "error": "embeddings differ by 3.1e-03"}},  # loads, check failed
])
def test_the_vad_runs_where_onnxruntime_was_not_found_to_crash(
        tmp_path: Path, receipt: dict[str, Any] | None) -> None:
    path = tmp_path / e.RECEIPT
    if receipt is not None:
        path.write_text(json.dumps(receipt))
    assert e.onnxruntime_failure(path) is None
    assert transcribe.choose_vad(None, path) == (True, None)
    assert transcribe.choose_vad(True, path) == (True, None)
    assert transcribe.choose_vad(False, path) == (False, None)


def test_an_export_killed_by_a_signal_is_a_failed_export_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    release, site = release_with_venv(tmp_path)
    installed(site, "onnxruntime", "1.28.0")  # loads
    dying_package(site, "numpy", "2.2.6")  # the export's first native library does not
    onnx = installer.export_engines(release)
    assert onnx == {"ok": False, "error": "the ONNX export failed: killed by signal 11 (SIGSEGV)"}
    assert json.loads((release / e.RECEIPT).read_text()) == {"onnx": onnx}


def test_pyannote_loads_its_pipelines_without_onnxruntime_which_loads_after(
        tmp_path: Path) -> None:
    """pyannote.audio 3.4.0's pipelines/speaker_verification.py imports onnxruntime when it
    loads, as ``optional_user`` does here: within onnxruntime_deferred it sees none, and a
    onnxruntime that dies when it loads is loaded only when asked for after."""
    (tmp_path / "site").mkdir()
    dying_package(tmp_path / "site", "onnxruntime", "1.28.0")
    (tmp_path / "site" / "optional_user.py").write_text(
        "try:\n    import onnxruntime as ort\n\n    ONNX_IS_AVAILABLE = True\n"
        "except ImportError:\n    ONNX_IS_AVAILABLE = False\n")
    code = ("import sys\nfrom bundler.runtime import engines\n"
            "with engines.onnxruntime_deferred():\n    import optional_user\n"
            "print(optional_user.ONNX_IS_AVAILABLE, 'onnxruntime' in sys.modules, flush=True)\n"
            "import onnxruntime\n")
    path = os.pathsep.join([str(tmp_path / "site"), str(RUNTIME.parents[1])])
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": path})
    assert proc.stdout.split() == ["False", "False"], proc.stderr
    assert proc.returncode == -signal.SIGSEGV


@pytest.mark.parametrize("text,arm", [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu vme\n", False),
    ("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n",
     True),
])
def test_an_arm_cpuinfo_is_told_from_the_one_an_emulator_passes_through(
        tmp_path: Path, text: str, arm: bool) -> None:
    (tmp_path / "cpuinfo").write_text(text)
    assert installer.arm_cpuinfo(tmp_path / "cpuinfo") is arm


def test_the_smoke_test_names_the_signal_that_killed_a_program(tmp_path: Path) -> None:
    """smoke/smoke.py run as install.py runs it (the installer and the voiceprint check
    beside it in runtime/), on a release whose bin/diarize dies of SIGSEGV."""
    for name, folder in (("smoke.py", "smoke"), ("install.py", "runtime"),
                         ("smoke_voiceprints.py", "runtime")):
        (tmp_path / folder).mkdir(exist_ok=True)
        shutil.copy(RUNTIME / name, tmp_path / folder / name)
    for fmt in smoke.SAMPLES:
        (tmp_path / "smoke" / f"sample.{fmt}").write_bytes(b"")
    (tmp_path / "bin").mkdir()
    program = tmp_path / "bin" / "diarize"
    program.write_text(f"#!{sys.executable}\nimport faulthandler\nfaulthandler._sigsegv()\n")
    program.chmod(0o755)
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "smoke" / "smoke.py"),
                           "--prefix", str(tmp_path)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["error"] == ("diarize printed no summary (killed by signal "
                                                "11 (SIGSEGV))")
