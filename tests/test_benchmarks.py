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


def load(path: Path, name: str) -> ModuleType:
    """A benchmark script, loaded from its file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load(RUN, "benchmark_run")

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


def run_benchmark(python: list[str], *args: str, tmp: Path | None = None
                  ) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    env = {"PATH": os.environ["PATH"], **({"TMPDIR": str(tmp)} if tmp else {})}
    proc = subprocess.run([*python, str(RUN), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=env)
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


# --- benchmarks/serve.py -------------------------------------------------------------------
SERVE_BENCH = ROOT / "benchmarks" / "serve.py"


serve_bench = load(SERVE_BENCH, "benchmark_serve")


def test_the_port_is_read_from_bin_serves_listening_line() -> None:
    from bundler.runtime import serve

    # The line as serve.py prints it (its f-string, filled in), and what comes after it.
    assert "say(f\"listening on {scheme}://{args.host}:{port}/v1" in Path(
        serve.__file__).read_text()
    line = ("serve: listening on http://127.0.0.1:40123/v1 (1 worker(s) loading the models; "
            "state in /tmp/s)")
    assert serve_bench.listening_port(line) == 40123
    assert serve_bench.listening_port(line.replace("http:", "https:")) == 40123
    assert serve_bench.listening_port("serve: ready: 1/1 worker(s) loaded the models in "
                                      "4.1 s on cpu (engine onnx)") is None


def test_the_benchmarks_multipart_body_is_read_by_the_services_parser(tmp_path: Path) -> None:
    import asyncio

    from bundler.runtime import uploads

    recording = b"RIFF" + os.urandom(5000) + b"\r\n--not-a-boundary\r\n"
    body, content_type = serve_bench.multipart({"response_format": "diarized_json",
                                                "model": "whisper-1"}, "a b.wav", recording)

    async def chunks() -> Any:
        for i in range(0, len(body), 777):  # as a socket delivers it, in pieces
            yield body[i:i + 777]

    form = asyncio.run(uploads.read_form(content_type, str(len(body)), chunks(), tmp_path,
                                         "x" * 32, 1 << 20))
    assert form.get("response_format") == "diarized_json"
    assert form.get("model") == "whisper-1"
    assert form.filename == "a b.wav"
    assert form.path is not None and form.path.read_bytes() == recording


def test_serve_vs_transcribe_takes_transcribes_work_seconds_not_its_wall() -> None:
    report = {"wall_seconds": 21.0, "load_seconds": 9.5, "transcribe_seconds": 10.25,
              "outputs": [{"seconds": 5.0}, {"seconds": 5.25}]}
    assert serve_bench.work_seconds(report) == 10.25


def _document(text: str) -> dict[str, Any]:
    segments = [{"start": 0.0, "end": 1.0, "speaker": "SPEAKER_00", "text": text,
                 "words": [{"start": 0.0, "end": 1.0, "word": text, "probability": 0.9,
                            "speaker": "SPEAKER_00"}]}]
    return {"file": "a.wav", "audio_seconds": 1.0, "language": "en", "task": "transcribe",
            "speakers": ["SPEAKER_00"], "segments": segments}


def test_no_serve_ratio_unless_each_answer_is_transcribes_document() -> None:
    from bundler.runtime import responses

    docs = {"a.wav": _document(" Hello."), "b.wav": _document(" Good day.")}
    answers = {n: responses.transcription(d, "diarized_json")[0].encode()
               for n, d in docs.items()}
    assert serve_bench.refusal(answers, docs) is None
    other = {**answers, "b.wav": responses.transcription(_document(" Good night."),
                                                         "diarized_json")[0].encode()}
    assert serve_bench.refusal(other, docs) == \
        "the service's diarized_json differs from bin/transcribe's for b.wav"
    assert "a.wav" in str(serve_bench.refusal({"b.wav": answers["b.wav"]}, docs))


def test_worker_processes_are_found_below_the_server_and_their_peak_read(
        tmp_path: Path) -> None:
    import resource

    # A wrapper shell whose child is a Python "worker.py", as bin/serve's workers are.
    worker = tmp_path / "worker.py"
    worker.write_text("import sys, time\nx = bytearray(64 << 20)\nprint(flush=True)\n"
                      "time.sleep(30)\n")
    proc = subprocess.Popen(["sh", "-c", f"{sys.executable} {worker}; :"],
                            stdout=subprocess.PIPE)
    below: list[int] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"\n"
        below = serve_bench.descendants(proc.pid)
        assert len(below) == 1
        assert b"worker.py" in Path(f"/proc/{below[0]}/cmdline").read_bytes()
        assert serve_bench.peak_rss_mb(below[0]) > 64
    finally:
        for pid in below:
            os.kill(pid, 9)
        proc.kill()
        proc.wait()
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert abs(serve_bench.peak_rss_mb(os.getpid()) - mine) < 1


def test_the_serve_benchmark_without_an_installed_prefix_says_so_in_one_line(
        tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SERVE_BENCH), "--prefix", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"benchmarks/serve.py: --prefix {tmp_path}: no bin/serve there (an installed "
        "bundle's prefix)"]
    assert proc.stdout == ""


def test_the_workers_seconds_are_read_from_the_services_own_metrics(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from bundler.runtime import jobstore, service

    svc = service.Service(service.Settings(state_dir=tmp_path),
                          jobstore.SQLiteStore(tmp_path / "serve.db"))
    text = generate_latest(svc.metrics.registry).decode()
    assert serve_bench.metric(text, serve_bench.WORK_METRIC) == 0.0
    svc.job_finished({"job": "a", "status": "succeeded", "audio_seconds": 16.0,
                      "work_seconds": 5.25})
    svc.job_finished({"job": "b", "status": "succeeded", "audio_seconds": 16.0,
                      "work_seconds": 4.5})
    text = generate_latest(svc.metrics.registry).decode()
    assert serve_bench.metric(text, serve_bench.WORK_METRIC) == 9.75


def test_only_whisperx_without_an_index_is_a_usage_error_before_anything_runs(
        tmp_path: Path) -> None:
    bundle = tmp_path / "demo.tar"
    bundle.write_bytes(b"not unpacked: the check comes first")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, seconds = run_benchmark([sys.executable], "--only-whisperx", "--bundle", str(bundle),
                                  tmp=tmp)
    assert list(tmp.iterdir()) == []  # not even the work folder
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1].endswith(
        "error: --only-whisperx needs --bundle or --prefix, and --whisperx")
    assert proc.stdout == ""


def test_a_server_that_cannot_start_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A prefix whose bin/serve fails as a real one does when its port is taken: the
    benchmark says so in one line (with bin/serve's own), no traceback, nothing left."""
    (tmp_path / "bin").mkdir()
    serve = tmp_path / "bin" / "serve"
    serve.write_text("#!/bin/sh\necho 'serve: error: cannot listen on 127.0.0.1:0: Address "
                     "already in use' >&2\nexit 6\n")
    serve.chmod(0o755)
    (tmp_path / "bin" / "transcribe").write_text("#!/bin/sh\nexit 0\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, str(SERVE_BENCH), "--prefix", str(tmp_path),
                           "--files", "1"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        "benchmarks/serve.py: bin/serve did not start: serve: error: cannot listen on "
        "127.0.0.1:0: Address already in use"]
    assert list(tmp.iterdir()) == []


# --- benchmarks/voiceprints.py ------------------------------------------------------------
VOICE_BENCH = ROOT / "benchmarks" / "voiceprints.py"
voices = load(VOICE_BENCH, "benchmark_voiceprints")


def test_the_equal_error_threshold_lies_between_the_two_voices_scores() -> None:
    same, different = [0.62, 0.71, 0.80, 0.55], [0.10, 0.21, 0.35, 0.58]
    found = voices.equal_error(same, different)
    # One stranger above one true voice: 1 in 4 either way, at 0.565 (between 0.55 and 0.58).
    assert found == {"threshold": 0.565, "eer": 0.25, "false_name_rate": 0.25,
                     "missed_name_rate": 0.25}
    assert voices.equal_error([0.9, 0.8], [0.1, 0.2])["eer"] == 0.0
    assert voices.equal_error([], [0.1])["threshold"] is None


def test_each_turn_is_scored_by_the_speaker_who_covers_most_of_it() -> None:
    record = {"speakers": ["alice", "SPEAKER_01", "bob"], "segments": [
        {"start": 0.0, "end": 3.0, "speaker": "alice"},
        {"start": 2.5, "end": 6.0, "speaker": "bob"},  # alice's turn mostly, then bob's
        {"start": 6.5, "end": 9.0, "speaker": "SPEAKER_01"},
        {"start": 9.5, "end": 12.0, "speaker": "alice"}],
        "identification": [{"speaker": "SPEAKER_00", "identified_as": "alice"},
                           {"speaker": "SPEAKER_01", "identified_as": None},
                           {"speaker": "SPEAKER_02", "identified_as": "bob"}]}
    turns = [(0.0, 3.2, "alice"), (3.8, 6.0, "bob"), (6.5, 9.0, "bob"), (9.5, 12.0, None),
             (12.5, 13.0, None)]
    got = voices.accuracy(record, turns)
    # correct: alice, bob, and the silent-in-the-output stranger turn; the stranger named
    # alice is wrong; bob's turn under SPEAKER_01 is unnamed.
    assert {k: got[k] for k in ("correct", "wrong", "unnamed", "turns")} == {
        "correct": 3, "wrong": 1, "unnamed": 1, "turns": 5}


def test_the_voiceprint_benchmark_without_bin_enroll_says_so_in_one_line(
        tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(VOICE_BENCH), "--prefix", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"benchmarks/voiceprints.py: --prefix {tmp_path}: no bin/enroll there (an installed "
        "bundle?)"]
