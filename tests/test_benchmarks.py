"""benchmarks/run.py: what it needs is checked before it starts, its baselines' results are
read whatever the libraries print, and no speed ratio is given for different work."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"


def load_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_run", RUN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_run()

# What pyannote.audio prints on stdout when a checkpoint records other versions than the
# installed ones, as the Hub's checkpoints do.
PYANNOTE_NOISE = (
    "Model was trained with pyannote.audio 0.0.1, yours is 3.4.0. Bad things might happen "
    "unless you revert pyannote.audio to 0.x.\n"
    "Model was trained with torch 1.10.0+cu102, yours is 2.8.0+cpu. Bad things might happen "
    "unless you revert torch to 1.x.\n")


def test_the_baseline_result_is_read_from_stdout_polluted_by_pyannote() -> None:
    result = {"seconds": 12.5, "rttm": {"a.wav": "SPEAKER a.wav 1 0.000 1.000 <NA> <NA> "
                                                 "SPEAKER_00 <NA> <NA>\n"}}
    namespace: dict[str, object] = {"result": result}
    # The child's own last line, run as the child runs it, with pyannote's lines around it.
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print(PYANNOTE_NOISE, end="")
        print("partial line without a newline", end="")
        exec("import json\n" + bench.print_result("result"), namespace)
        print(PYANNOTE_NOISE, end="")
    stdout = buffer.getvalue()
    with pytest.raises(json.JSONDecodeError):
        json.loads(stdout)  # what the benchmark did: it died here after 37 minutes
    assert bench.child_result(stdout) == result


def test_a_baseline_that_printed_no_result_is_said_plainly() -> None:
    with pytest.raises(ValueError, match="printed no result"):
        bench.child_result(PYANNOTE_NOISE)


def test_every_baseline_child_prints_its_result_after_the_marker() -> None:
    for source in (bench.BARE_PYANNOTE, bench.WHISPERX_LOOP):
        assert source.rstrip().splitlines()[-1] == bench.print_result("result").strip()
        assert "print(json.dumps" not in source


RTTM = {"a.wav": "SPEAKER a.wav 1 0.000 2.000 <NA> <NA> SPEAKER_00 <NA> <NA>\n",
        "b.wav": "SPEAKER b.wav 1 0.500 1.000 <NA> <NA> SPEAKER_01 <NA> <NA>\n"}


def test_a_ratio_is_given_for_the_onnx_engine_and_identical_rttm() -> None:
    assert bench.refusal({"engine": "onnx"}, dict(RTTM), dict(RTTM)) is None


def test_no_ratio_when_an_rttm_differs_or_is_missing() -> None:
    moved = dict(RTTM)
    moved["b.wav"] = RTTM["b.wav"].replace("0.500", "0.510")
    assert bench.refusal({"engine": "onnx"}, moved, RTTM) == \
        "the RTTM differs from pyannote's for b.wav"
    assert "a.wav" in str(bench.refusal({"engine": "onnx"}, {"b.wav": RTTM["b.wav"]}, RTTM))


@pytest.mark.parametrize("report", [
    {"engine": "pytorch", "engine_requested": "auto"},
    {"engine": "pyannote", "engine_requested": "auto",
     "engine_note": "pytorch: the embedding model is X, not a WeSpeaker ResNet"},
    {"engine": None},
])
def test_no_ratio_when_another_engine_ran(report: dict[str, object]) -> None:
    why = bench.refusal(report, dict(RTTM), dict(RTTM))
    assert why is not None and f"ran engine {report['engine']!r}, not 'onnx'" in why
    if "engine_note" in report:
        assert str(report["engine_note"]) in why


def test_a_refused_ratio_is_left_out_of_the_ratios() -> None:
    cpu: dict[str, Any] = {"ratio": None, "refused": "the RTTM differs from pyannote's for a.wav",
           "small_batches": {"ratio": 0.5, "refused": None}}
    assert bench.cpu_ratio_entries(cpu) == {"diarize_cpu_vs_pyannote_small_batches": 0.5}
    cpu = {"ratio": 0.1484, "small_batches": {"ratio": None, "refused": "x"}}
    assert bench.cpu_ratio_entries(cpu) == {"diarize_cpu_vs_pyannote": 0.148}


def run_benchmark(python: list[str], *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                         float]:
    started = time.monotonic()
    proc = subprocess.run([*python, str(RUN), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={"PATH": os.environ["PATH"]})
    return proc, time.monotonic() - started


def test_an_interpreter_without_numpy_fails_first_with_one_line(tmp_path: Path) -> None:
    """This venv's packages, but numpy and soundfile, on the sys.path of an isolated
    interpreter: the run stops before unpacking anything, saying what to install."""
    site = Path(sysconfig.get_paths()["purelib"])
    without = tmp_path / "site"
    without.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(("numpy", "soundfile", "_soundfile")):
            (without / entry.name).symlink_to(entry)
    bundle = tmp_path / "demo.tar"
    bundle.write_bytes(b"not unpacked: the check comes first")
    wrapper = (f"import sys, runpy; sys.path.insert(0, {str(without)!r}); "
               f"sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc, seconds = run_benchmark([sys.executable, "-I", "-S", "-c", wrapper],
                                  "--only-cpu", "--bundle", str(bundle))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "diarize_cpu_vs_pyannote needs numpy, soundfile in " in lines[0]
    assert "pip install numpy soundfile" in lines[0]
    assert proc.stdout == ""
    assert seconds < 30, seconds  # the imports of the tool, nothing more


def test_an_interpreter_without_the_tool_fails_with_one_line(tmp_path: Path) -> None:
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    proc, _ = run_benchmark([str(venv / "bin" / "python")], "--only-cpu", "--bundle",
                            str(tmp_path / "missing.tar"))
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"benchmarks/run.py: {venv / 'bin' / 'python'} cannot import ")
    assert "pip install ." in line


def test_a_missing_bundle_is_said_before_anything_starts(tmp_path: Path) -> None:
    proc, _ = run_benchmark([sys.executable], "--only-cpu", "--bundle",
                            str(tmp_path / "missing.tar"))
    assert proc.returncode == 2
    assert proc.stderr == f"benchmarks/run.py: --bundle {tmp_path / 'missing.tar'}: no such file\n"
