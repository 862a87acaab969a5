"""bin/diarize's own logic, fast: output names, sharding, arguments and exit codes, decoding
the recordings people have, the offline environment and the connection-attempt count.

The pipeline itself runs in the slow end-to-end tests (tests/test_e2e*.py); everything here
is decided before pyannote is imported, and is run the way a user runs it where it can be:
``python diarize.py ...`` in a child process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bundler.runtime import (
    audio,
    common,
    devices,
    exits,
    inputs,
    offline,
    outputs,
    recordings,
)
from bundler.runtime import diarize as d

SCRIPT = Path(d.__file__)


def _diarize(*argv: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True,
                          text=True, env=env, cwd=cwd)


def _tree(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF")


def test_outputs_mirror_the_tree_and_keep_the_extension(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    _tree(corpus, ["meetings/a.m4a", "a.wav", "a.mp3", "notes.txt", ".hidden.wav",
                   ".cache/x.wav", "deep/er/b c.webm"])
    single = tmp_path / "elsewhere" / "call.MP3"
    _tree(single.parent, [single.name])
    jobs = inputs.find_jobs([str(corpus), str(single)])
    assert [j.rel for j in jobs] == ["a.mp3", "a.wav", "deep/er/b c.webm", "meetings/a.m4a",
                                     "call.MP3"]
    out = tmp_path / "out"
    names = {j.rel: outputs.outputs_for(j, out, ["rttm", "json"]) for j in jobs}
    assert names["meetings/a.m4a"]["rttm"] == out / "meetings/a.m4a.rttm"
    assert names["a.wav"]["json"] == out / "a.wav.json"
    assert names["a.wav"]["rttm"] != names["a.mp3"]["rttm"]
    assert next(j for j in jobs if " " in j.rel).uri == "deep/er/b_c.webm"


def test_two_inputs_that_would_write_the_same_output_are_refused(tmp_path: Path) -> None:
    _tree(tmp_path, ["x/a.wav", "y/a.wav"])
    with pytest.raises(exits.RunError, match="would both be written as a.wav.rttm") as exc:
        inputs.find_jobs([str(tmp_path / "x/a.wav"), str(tmp_path / "y/a.wav")])
    assert exc.value.code == exits.EXIT_USAGE


def test_rttm_lines_are_standard() -> None:
    text = outputs.rttm("meetings/a_b.m4a", [{"start": 0.5, "end": 2.25, "speaker": "SPEAKER 00"}])
    assert text == "SPEAKER meetings/a_b.m4a 1 0.500 1.750 <NA> <NA> SPEAKER_00 <NA> <NA>\n"
    assert len(text.split()) == 10


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_cover_every_file_exactly_once(count: int) -> None:
    jobs = [inputs.Job(Path(f"/c/{i}.wav"), f"{i:02}.wav", 0) for i in range(20)]
    shares = [inputs.Shard(i, count, "--shard").take(jobs) for i in range(count)]
    flat = [j.rel for share in shares for j in share]
    assert sorted(flat) == [j.rel for j in jobs] and len(flat) == len(set(flat))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_shard_comes_from_the_option_slurm_or_an_indexed_job() -> None:
    assert inputs.resolve_shard("3/8", None, {}) == inputs.Shard(3, 8, "--shard")
    slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10",
             "SLURM_ARRAY_TASK_COUNT": "4"}
    assert inputs.resolve_shard(None, None, slurm) == inputs.Shard(2, 4, "SLURM_ARRAY_TASK_ID")
    stepped = {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "5"}
    assert inputs.resolve_shard(None, None, stepped) == inputs.Shard(3, 5, "SLURM_ARRAY_TASK_ID")
    assert inputs.resolve_shard("0/2", None, slurm).source == "--shard"  # the option wins
    k8s = {"JOB_COMPLETION_INDEX": "5"}
    assert inputs.resolve_shard(None, 6, k8s) == inputs.Shard(5, 6, "JOB_COMPLETION_INDEX")
    assert inputs.resolve_shard(None, None, {}) == inputs.Shard(0, 1, "none")


def test_the_docs_slurm_array_takes_a_sites_paths_and_sizes() -> None:
    """docs/diarize.md's diarize.sbatch with a site's values in (tests/slurm.py; the slow
    end-to-end test runs it on a real Slurm): the docs still print their own values where a
    site puts its own, the script stays valid sh and a path with a space stays one argument;
    logs/ is made before sbatch (Slurm fails a task whose --output folder is missing)."""
    import shlex

    import slurm

    script = slurm.docs_script_for_site(Path("/opt/a b/prefix"), Path("/data/my corpus"),
                                        Path("/data/rttm"), tasks=3, cpus=1)
    assert "\n#SBATCH --array=0-2\n" in script and "\n#SBATCH --cpus-per-task=1\n" in script
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    command = script.split("\nexec ", 1)[1].replace("\\\n", " ")
    argv = shlex.split(command.split(">", 1)[0])
    assert argv[:4] == ["/opt/a b/prefix/bin/diarize", "/data/my corpus", "--output-dir",
                        "/data/rttm"] and "--json" in argv
    commands = slurm.job_array_from_docs().commands
    assert "mkdir -p logs" in commands.split("sbatch diarize.sbatch", 1)[0], commands


@pytest.mark.parametrize("option,count,env,message", [
    ("2/2", None, {}, "I must be 0 to N-1"),
    ("1-4", None, {}, "expected I/N"),
    (None, None, {"JOB_COMPLETION_INDEX": "1"}, "--shard-count"),
    (None, 2, {"JOB_COMPLETION_INDEX": "2"}, "is not 0 to 1"),
    (None, 2, {}, "needs JOB_COMPLETION_INDEX"),
    (None, None, {"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT"),
])
def test_bad_shards_are_usage_errors(option: str | None, count: int | None,
                                     env: dict[str, str], message: str) -> None:
    with pytest.raises(exits.RunError, match=message) as exc:
        inputs.resolve_shard(option, count, env)
    assert exc.value.code == exits.EXIT_USAGE


@pytest.mark.parametrize("argv,message", [
    (["--format", "rttm,srt"], "--format 'rttm,srt'"),
    (["--num-speakers", "2", "--max-speakers", "3"], "excludes"),
    (["--min-speakers", "4", "--max-speakers", "3"], "larger than"),
    (["--num-speakers", "0"], "at least 1"),
    (["--device", "gpu"], "--device 'gpu'"),
    (["--shard", "5/5"], "I must be 0 to N-1"),
    (["--bogus"], "unrecognized arguments"),
    (["--engine", "tensorrt"], "invalid choice: 'tensorrt'"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_argument_errors_exit_2_with_one_line(tmp_path: Path, argv: list[str],
                                              message: str) -> None:
    _tree(tmp_path, ["a.wav"])
    proc = _diarize(str(tmp_path / "a.wav"), *argv, "-o", str(tmp_path / "out"))
    assert proc.returncode == exits.EXIT_USAGE
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_missing_input_and_no_audio_exit_2(tmp_path: Path) -> None:
    proc = _diarize(str(tmp_path / "nope"))
    assert proc.returncode == 2 and "nope: no such file or folder" in proc.stderr
    _tree(tmp_path / "docs", ["a.txt"])
    proc = _diarize(str(tmp_path / "docs"))
    assert proc.returncode == 2 and "no audio or video files" in proc.stderr


def test_a_missing_config_means_nothing_can_run(tmp_path: Path) -> None:
    _tree(tmp_path, ["a.wav"])
    proc = _diarize(str(tmp_path / "a.wav"), "--config", str(tmp_path / "none.yaml"),
                    "-o", str(tmp_path / "out"))
    assert proc.returncode == exits.EXIT_CANNOT_RUN
    assert "config not found" in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_model_is_named_before_loading(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("pipeline:\n  params:\n    segmentation: /nowhere/pyannote_seg.bin\n")
    _tree(tmp_path, ["a.wav"])
    proc = _diarize(str(tmp_path / "a.wav"), "--config", str(config), "-o",
                    str(tmp_path / "o"))
    assert proc.returncode == 3 and "segmentation model not found: /nowhere" in proc.stderr


def test_done_files_are_skipped_without_loading_anything(tmp_path: Path) -> None:
    _tree(tmp_path / "in", ["a.wav", "sub/b.flac"])
    out = tmp_path / "out"
    _tree(out, ["a.wav.rttm", "sub/b.flac.rttm"])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.rttm")}
    # The config does not exist: had anything been loaded, this would exit 3.
    proc = _diarize(str(tmp_path / "in"), "-o", str(out), "--json", "--config",
                    str(tmp_path / "absent.yaml"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["skipped"] == 2 and report["done"] == 0 and report["failed"] == 0
    assert report["network_attempts"] == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.rttm")} == before


def test_an_unwritable_output_folder_exits_5(tmp_path: Path) -> None:
    _tree(tmp_path, ["a.wav"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _diarize(str(tmp_path / "a.wav"), "-o", str(blocker / "out"))
    assert proc.returncode == exits.EXIT_OUTPUT and "cannot write to" in proc.stderr


def test_help_lists_the_exit_codes_on_stdout() -> None:
    proc = _diarize("--help")
    assert proc.returncode == 0
    assert "--shard I/N" in proc.stdout and "some files failed" in proc.stdout


def test_a_program_run_as_a_file_imports_its_siblings_once_and_shadows_nothing(
        tmp_path: Path) -> None:
    """``python -I runtime/x.py``, as bin/diarize runs it: the program's siblings are one
    package (each module once, the same objects the program and its siblings use), and the
    runtime folder is not left on sys.path, where ``audio.py`` or ``inputs.py`` would shadow
    a library's module of that name."""
    import shutil

    runtime = tmp_path / "runtime"
    shutil.copytree(SCRIPT.parent, runtime, ignore=shutil.ignore_patterns("__pycache__"))
    (runtime / "probe.py").write_text(
        "import json, os, sys\n"
        "if not __package__:\n"
        "    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n"
        "    __package__ = __import__('_bootstrap').package(__file__)\n"
        "from . import diarize, exits, recordings\n"
        "same = diarize.exits.RunError is exits.RunError is recordings.RunError\n"
        "print(json.dumps({'path': sys.path, 'same': same,"
        " 'module': exits.__name__, 'bare': [n for n in ('audio', 'inputs', 'recordings')"
        " if n in sys.modules]}))\n")
    proc = subprocess.run([sys.executable, "-I", str(runtime / "probe.py")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert str(runtime) not in got["path"]
    assert got["same"] is True and got["module"] == "pyannote_bundle_runtime.exits"
    assert got["bare"] == []


def test_atomic_write_leaves_no_partial_file(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sub" / "a.wav.rttm"
    common.write_atomic(target, "one\n")

    def boom(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        common.write_atomic(target, "two\n")
    assert target.read_text() == "one\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.wav.rttm"]


def test_offline_environment_and_caches_for_a_user_without_a_home(tmp_path: Path,
                                                                  monkeypatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    env: dict[str, str] = {"HOME": "/nonexistent/home", "TORCH_HOME": "/mine",
                           "PYANNOTE_METRICS_ENABLED": "true"}
    root = offline.go_offline(env)
    assert root == tmp_path / f"pyannote-bundle-{os.getuid()}" and root.is_dir()
    assert env["PYANNOTE_METRICS_ENABLED"] == "false" and env["HF_HUB_OFFLINE"] == "1"
    assert env["OTEL_SDK_DISABLED"] == "true"
    assert env["TORCH_HOME"] == "/mine"  # the user's own setting wins
    assert env["MPLCONFIGDIR"] == str(root / "matplotlib")
    assert env["XDG_CACHE_HOME"] == str(root / "xdg")



def test_offline_environment_with_nothing_writable_leaves_the_caches_unset(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only root with no home and no writable temp dir (a container without a /tmp
    volume): the offline variables are set all the same, no cache is pointed anywhere, and
    nothing raises (tempfile.gettempdir() does, in that case, as below)."""
    def no_temp_dir() -> str:
        raise FileNotFoundError(2, "No usable temporary directory found in ['/tmp']")

    monkeypatch.setattr("tempfile.gettempdir", no_temp_dir)
    env: dict[str, str] = {"HOME": "/nonexistent/home"}
    assert offline.go_offline(env) is None
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYANNOTE_METRICS_ENABLED"] == "false"
    assert not set(offline.CACHE_VARS) & set(env)


def test_an_import_that_cannot_write_is_one_line_and_exit_3(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """On a read-only root with no writable /tmp, importing pyannote raises OSError (seen:
    matplotlib's "requires access to a writable cache directory"): every program, and each
    bin/serve worker, must stop with one line and exit 3, not a traceback and a restart."""
    import types

    config = tmp_path / "config.yaml"
    config.write_text("pipeline:\n  params: {}\n")

    def cannot_write() -> Any:
        raise OSError("Matplotlib requires access to a writable cache directory")

    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    monkeypatch.setattr(d.engines, "load_pyannote", cannot_write)
    with pytest.raises(exits.RunError) as err:
        d.load_pipeline(config, "cpu", {}, print)
    assert err.value.code == exits.EXIT_CANNOT_RUN
    assert "writable cache directory" in str(err.value) and "/tmp" in str(err.value)

def test_network_attempts_are_counted_and_can_be_blocked() -> None:
    audit = offline.NetworkAudit()
    s = socket.socket()
    audit("socket.connect", (s, ("192.0.2.1", 443)))
    audit("socket.getaddrinfo", ("otel.example", 443, 0, 0, 0))
    unix = socket.socket(socket.AF_UNIX)
    audit("socket.connect", (unix, "/run/x.sock"))
    audit("open", ("/etc/hosts", "r", 0))
    assert len(audit.attempts) == 2 and "192.0.2.1" in audit.attempts[0]
    blocking = offline.NetworkAudit(block=True)
    with pytest.raises(ConnectionRefusedError):
        blocking("socket.getaddrinfo", ("example.org", 80, 0, 0, 0))
    assert blocking.attempts == ["getaddrinfo 'example.org'"]
    s.close()
    unix.close()


@pytest.mark.parametrize("driver,built,old", [
    ((12, 2), "12.8", False),  # minor-version compatibility
    ((11, 8), "12.8", True),
    (None, "12.8", False),
    ((12, 4), None, False),
])
def test_driver_preflight(driver: tuple[int, int] | None, built: str | None,
                          old: bool) -> None:
    assert devices.driver_too_old(driver, built) is old


def test_auto_device_falls_back_to_cpu_with_one_line_for_an_old_driver(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeCuda:
        @staticmethod
        def is_available() -> bool:
            return True

    class FakeTorch:  # only what choose_device reads: torch itself is for the e2e tests
        version = type("v", (), {"cuda": "12.8"})
        cuda = FakeCuda

    said: list[str] = []
    monkeypatch.setattr(devices, "cuda_driver_version", lambda: (11, 4))
    assert devices.choose_device("auto", FakeTorch, said.append) == "cpu"
    assert len(said) == 1 and "CUDA 11.4" in said[0] and "12.8" in said[0]
    with pytest.raises(exits.RunError, match="update the driver") as exc:
        devices.choose_device("cuda", FakeTorch, said.append)
    assert exc.value.code == exits.EXIT_CANNOT_RUN
    monkeypatch.setattr(devices, "cuda_driver_version", lambda: (12, 9))
    assert devices.choose_device("auto", FakeTorch, said.append) == "cuda"


def test_recordings_people_have_decode_to_16k_mono(tmp_path: Path) -> None:
    """Real files from real encoders: every container docs/diarize.md names, and a
    corrupt one."""
    sys.path.insert(0, str(Path(__file__).parent))
    import media

    files = media.corpus(tmp_path)
    for label, path in files.items():
        if label == "corrupt":
            with pytest.raises(exits.FileFailed, match="cannot decode"):
                audio.decode(path)
            continue
        wave = audio.decode(path)
        assert wave.dtype.name == "float32" and wave.ndim == 1, label
        assert abs(len(wave) / 16000 - 10.0) < 0.1, label
        assert 0.05 < float(abs(wave).max()) <= 1.0, label


def test_committed_smoke_samples_are_the_bundle_sample(tmp_path: Path) -> None:
    """sample.mp3/.m4a are the rendered sample.wav, encoded once by tests/media.py."""
    import numpy as np

    from bundler.render import sample_bytes

    wav_path = tmp_path / "s.wav"
    wav_path.write_bytes(sample_bytes("wav"))
    ref = audio.decode(wav_path)
    for fmt in ("mp3", "m4a"):
        path = tmp_path / f"s.{fmt}"
        path.write_bytes(sample_bytes(fmt))
        got = audio.decode(path)
        n = min(len(ref), len(got))
        # Lossy codecs shift and shape the signal; the envelope (who speaks when) is kept.
        n -= n % 1600
        env_ref = np.abs(ref[:n]).reshape(-1, 1600).mean(axis=1)
        env_got = np.abs(got[:n]).reshape(-1, 1600).mean(axis=1)
        assert np.corrcoef(env_ref, env_got)[0, 1] > 0.9, fmt


# --- awkward and hostile input: no hang, no batch lost to one file -----------------------
ECHO = (
    "import sys; from bundler.runtime import recordings\n"
    "class Echo(recordings.Program):\n"
    "    name = 'echo'; formats = ('txt',); default_formats = 'txt'; marker = 'txt'\n"
    "    def load(self, args, say):\n"
    "        return type('L', (), {'seconds': 0.0, 'device': 'cpu'})()\n"
    "    def process(self, loaded, job, waveform, args):\n"
    "        return {'txt': job.rel + '\\n'}, {}, 'ok'\n"
    "sys.exit(recordings.main(Echo()))\n")


def _fake_program_run(tmp_path: Path, *inputs: str, extra: tuple[str, ...] = (),
                      umask: int = -1, code: str = ECHO) -> subprocess.CompletedProcess[str]:
    """The shared loop (recordings.run) with a program that needs no model (``code``; by
    default, what it makes of a file is its name), so only the machinery before and after
    the models is tried. ``umask``: the child's, as a user's shell would set it (-1: this
    process's)."""
    return subprocess.run([sys.executable, "-c", code, *inputs, "-o", str(tmp_path / "out"),
                           "--json", *extra], capture_output=True, text=True, timeout=120,
                          umask=umask)


def _wav(path: Path) -> Path:
    from bundler.render import sample_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sample_bytes("wav"))
    return path


def test_a_fifo_in_a_folder_or_on_the_command_line_is_named_and_skipped(
        tmp_path: Path) -> None:
    corpus = tmp_path / "in"
    _wav(corpus / "a.wav")
    os.mkfifo(corpus / "stuck.wav")  # opening it would wait for a writer forever
    os.mkfifo(tmp_path / "named.mp3")
    proc = _fake_program_run(tmp_path, str(corpus), str(tmp_path / "named.mp3"))
    assert proc.returncode == exits.EXIT_SOME_FAILED, proc.stderr
    report = json.loads(proc.stdout)
    assert report["done"] == 1 and report["failed"] == 2
    assert {f["file"]: f["error"] for f in report["failures"]} == {
        "stuck.wav": "a FIFO, not a recording: skipped",
        "named.mp3": "a FIFO, not a recording: skipped"}


def test_a_decoder_that_never_returns_is_cut_by_the_file_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    def forever(_path: Path) -> Any:
        while True:
            time.sleep(0.05)

    monkeypatch.setattr(audio, "decode", forever)
    with pytest.raises(recordings.FileTimeout, match="took longer than 1 s"):
        with recordings.deadline(1, "decoding"):
            audio.decode(tmp_path / "x.mp3")
    # The alarm is gone afterwards: nothing fires later.
    with recordings.deadline(0.2, "x"):
        pass
    time.sleep(0.4)


def test_names_the_file_system_cannot_hold_fail_alone_and_the_batch_goes_on(
        tmp_path: Path) -> None:
    corpus = tmp_path / "in"
    _wav(corpus / "a.wav")
    _wav(corpus / ("b" * 250 + ".wav"))  # + ".txt": 258 bytes, over NAME_MAX (255)
    _wav(corpus / "c.wav")
    bad = os.fsencode(str(corpus)) + b"/d-\xff\xfe.wav"  # not UTF-8
    Path(os.fsdecode(bad)).write_bytes((corpus / "a.wav").read_bytes())
    proc = _fake_program_run(tmp_path, str(corpus))
    assert proc.returncode == exits.EXIT_SOME_FAILED, proc.stderr
    report = json.loads(proc.stdout)
    assert report["done"] == 3 and report["failed"] == 1
    assert "File name too long" in report["failures"][0]["error"]
    out = tmp_path / "out"
    assert (out / "a.wav.txt").is_file() and (out / "c.wav.txt").is_file()
    undecodable = Path(os.fsdecode(os.fsencode(str(out)) + b"/d-\xff\xfe.wav.txt"))
    assert undecodable.read_text() == "d-\\udcff\\udcfe.wav\n"  # its name, escaped
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert "[4/4] d-\\udcff\\udcfe.wav: " in proc.stderr  # progress: escaped, never raw


def test_control_characters_in_names_are_escaped_in_progress_lines(tmp_path: Path) -> None:
    corpus = tmp_path / "in"
    _wav(corpus / "evil\x1b[31m\nname.wav")
    proc = _fake_program_run(tmp_path, str(corpus))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr and "evil\\x1b[31m\\nname.wav" in proc.stderr


def test_a_name_starting_with_a_dash_gets_a_hint(tmp_path: Path) -> None:
    proc = _diarize("-call.wav", cwd=tmp_path)
    assert proc.returncode == 2 and "goes after --: -- -call.wav" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_file_timeout_must_not_be_negative(tmp_path: Path) -> None:
    _tree(tmp_path, ["a.wav"])
    proc = _diarize(str(tmp_path / "a.wav"), "--file-timeout", "-1")
    assert proc.returncode == 2 and "--file-timeout must be 0" in proc.stderr


def test_an_output_folder_that_cannot_be_written_ends_the_run_with_exit_5(
        tmp_path: Path) -> None:
    """Unlike a name the file system cannot hold, a folder nobody can write ends the run:
    every next file would fail the same way."""
    corpus = tmp_path / "in"
    _wav(corpus / "a.wav")
    _wav(corpus / "sub" / "b.wav")
    out = tmp_path / "out"
    out.mkdir()
    # A file where an output folder must go: no one, root included, can write there.
    (out / "sub").write_text("a file, not a folder")
    run = _fake_program_run(tmp_path, str(corpus))
    assert run.returncode == exits.EXIT_OUTPUT, run.stderr
    assert "cannot write" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("umask,mode", [(0o077, 0o600), (0o022, 0o644), (0o027, 0o640),
                                        (0o002, 0o664)],
                         ids=["umask077", "umask022", "umask027", "umask002"])
def test_outputs_honour_the_users_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Transcripts of private recordings are as private as the user's umask says: under
    077 no one else can read them (and nothing was ever 0644 on the way); under 022 they
    are 0644 as before. Through the shared loop, the way bin/diarize writes them."""
    corpus = tmp_path / "in"
    _wav(corpus / "a.wav")
    _wav(corpus / "sub" / "b.wav")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.wav.txt").write_text("an older output, replaced under --overwrite\n")
    os.chmod(out / "a.wav.txt", 0o644)
    proc = _fake_program_run(tmp_path, str(corpus), extra=("--overwrite",), umask=umask)
    assert proc.returncode == 0, proc.stderr
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert [p.relative_to(out).as_posix() for p in written] == ["a.wav.txt", "sub/b.wav.txt"]
    assert {p.name: oct(p.stat().st_mode & 0o7777) for p in written} == {
        "a.wav.txt": oct(mode), "b.wav.txt": oct(mode)}
    # A folder the run made for an output: the umask's too (0777 narrowed).
    assert oct((out / "sub").stat().st_mode & 0o777) == oct(0o777 & ~umask)


# --- bounded decoding: --max-duration ------------------------------------------------------
def _silent_wav(path: Path, seconds: int, rate: int) -> Path:
    """A real 16-bit mono WAV of ``seconds`` of silence, made sparse: hours of audio that
    cost no disk and no time to write (the data chunk reads back as zeros)."""
    import struct

    size = seconds * rate * 2
    header = (b"RIFF" + struct.pack("<I", 36 + size) + b"WAVE" + b"fmt "
              + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
              + b"data" + struct.pack("<I", size))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + size)
    return path


def test_a_recording_longer_than_max_duration_is_refused_and_the_batch_goes_on(
        tmp_path: Path) -> None:
    """Both decoders: soundfile's header says how long a 16 kHz wav is before a sample is
    read; PyAV (an m4a, a 44.1 kHz wav it resamples) stops as soon as it passes the limit.
    Each long file is named with the reason; the shorter ones in the same batch are done."""
    from bundler.render import sample_bytes

    corpus = tmp_path / "in"
    _wav(corpus / "a-long.wav")  # the 10-s sample, 16 kHz: soundfile
    (corpus / "b-long.m4a").write_bytes(sample_bytes("m4a"))  # PyAV
    _silent_wav(corpus / "c-short.wav", 3, 16000)
    _silent_wav(corpus / "d-short.wav", 4, 44100)  # PyAV, resampled
    _silent_wav(corpus / "e-long.wav", 9, 44100)
    proc = _fake_program_run(tmp_path, str(corpus), extra=("--max-duration", "5"))
    assert proc.returncode == exits.EXIT_SOME_FAILED, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert [o["file"] for o in report["outputs"]] == ["c-short.wav", "d-short.wav"]
    assert [o["audio_seconds"] for o in report["outputs"]] == [3.0, 4.0]
    errors = {f["file"]: f["error"] for f in report["failures"]}
    assert errors == {
        "a-long.wav": "longer than --max-duration 5 s (10 s of audio): refused before "
                      "decoding it whole; raise --max-duration, or 0 for no limit",
        "b-long.m4a": "longer than --max-duration 5 s (more audio than that): refused "
                      "before decoding it whole; raise --max-duration, or 0 for no limit",
        "e-long.wav": "longer than --max-duration 5 s (more audio than that): refused "
                      "before decoding it whole; raise --max-duration, or 0 for no limit"}
    for name, error in errors.items():
        assert f"echo: {name}: {error}\n" in proc.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["c-short.wav.txt", "d-short.wav.txt"]
    # 0 lifts the limit; the default (8 h) takes them all.
    for extra in (("--max-duration", "0", "--overwrite"), ("--overwrite",)):
        again = _fake_program_run(tmp_path, str(corpus), extra=extra)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["done"] == 5


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_max_duration_must_be_a_number_of_seconds(tmp_path: Path, value: str) -> None:
    _tree(tmp_path, ["a.wav"])
    proc = _diarize(str(tmp_path / "a.wav"), "--max-duration", value)
    assert proc.returncode == 2 and "--max-duration must be 0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_ten_hour_recording_is_refused_quickly_in_bounded_memory(tmp_path: Path) -> None:
    """Ten hours of audio would be 2.3 GB decoded. With --max-duration 60, the 16 kHz wav
    is refused from its header (nothing read) and the 8 kHz one, which PyAV decodes, after
    60 s of samples: the process's peak memory grows by a few MB, not GBs. Measured in a
    child, whose ru_maxrss is its own peak, after a warm-up decode of each kind."""
    big16 = _silent_wav(tmp_path / "ten-hours-16k.wav", 36000, 16000)
    big8 = _silent_wav(tmp_path / "ten-hours-8k.wav", 36000, 8000)
    small16 = _silent_wav(tmp_path / "s16.wav", 2, 16000)
    small8 = _silent_wav(tmp_path / "s8.wav", 2, 8000)
    code = (
        "import json, resource, sys, time\n"
        "from pathlib import Path\n"
        "from bundler.runtime import audio\n"
        "big16, big8, small16, small8 = map(Path, sys.argv[1:])\n"
        "audio.decode(small16, 60); audio.decode(small8, 60)\n"
        "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "before, t0 = rss(), time.perf_counter()\n"
        "refused = []\n"
        "for path in (big16, big8):\n"
        "    try:\n"
        "        audio.decode(path, 60)\n"
        "    except audio.TooLong as exc:\n"
        "        refused.append(str(exc))\n"
        "print(json.dumps({'growth': rss() - before, 'seconds': time.perf_counter() - t0,\n"
        "                  'refused': refused}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(big16), str(big8), str(small16),
                           str(small8)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["refused"] == [
        "longer than --max-duration 60 s (36000 s of audio): refused before decoding it "
        "whole; raise --max-duration, or 0 for no limit",
        "longer than --max-duration 60 s (more audio than that): refused before decoding "
        "it whole; raise --max-duration, or 0 for no limit"]
    decoded = 36000 * 16000 * 4  # what decoding either file whole would hold
    assert result["growth"] < 64 * 2**20 < decoded // 30, result
    assert result["seconds"] < 10, result


# --- after a timeout, a clean pipeline ----------------------------------------------------
# A program whose loaded state a file changes as pyannote's caches and hooks would: a file
# named "slow*" changes it, then runs past --file-timeout (the alarm lands in its Python
# code, as it would inside the pipeline); every other file's output is the state it sees.
STATEFUL = (
    "import json, sys, time; from bundler.runtime import recordings\n"
    "class Stateful(recordings.Program):\n"
    "    name = 'stateful'; formats = ('txt',); default_formats = 'txt'; marker = 'txt'\n"
    "    loads = 0\n"
    "    def load(self, args, say):\n"
    "        Stateful.loads += 1\n"
    "        say(f'load {Stateful.loads}')\n"
    "        return type('L', (), {'seconds': 0.0, 'device': 'cpu', 'cache': {},\n"
    "                              'load': Stateful.loads})()\n"
    "    def process(self, loaded, job, waveform, args):\n"
    "        loaded.cache[job.rel] = 'half-updated'\n"
    "        if job.rel.startswith('slow'):\n"
    "            while True:\n"
    "                time.sleep(0.01)\n"
    "        text = json.dumps({'cache before this file': len(loaded.cache) - 1})\n"
    "        loaded.cache.clear()\n"
    "        return {'txt': text + '\\n'}, {'load': loaded.load}, 'ok'\n"
    "sys.exit(recordings.main(Stateful()))\n")


def test_after_a_timeout_in_model_work_the_next_file_gets_freshly_loaded_models(
        tmp_path: Path) -> None:
    """A timeout can fire anywhere inside the models' code and leave their state half
    updated: the next file must not see it. The next file's output equals an undisturbed
    run's; the reload is said on stderr and counted in --json; a file that fails to decode
    (no model touched) or a file done after a reload triggers none."""
    corpus = tmp_path / "in"
    for name in ("a.wav", "slow.wav", "t.wav", "u.wav"):
        _wav(corpus / name)
    (corpus / "broken.wav").write_bytes(b"RIFF not a wav")  # decoding fails: no reload
    proc = _fake_program_run(tmp_path, str(corpus), extra=("--file-timeout", "1"),
                             code=STATEFUL)
    assert proc.returncode == exits.EXIT_SOME_FAILED, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert {f["file"]: f["error"] for f in report["failures"]}.keys() == {"broken.wav",
                                                                          "slow.wav"}
    # What an undisturbed run writes for the file after the timeout.
    alone = tmp_path / "alone"
    _wav(alone / "t.wav")
    undisturbed = _fake_program_run(tmp_path / "alone", str(alone / "t.wav"), code=STATEFUL)
    assert undisturbed.returncode == 0, undisturbed.stderr
    out = tmp_path / "out"
    assert (out / "t.wav.txt").read_text() == (tmp_path / "alone/out/t.wav.txt").read_text()
    assert (out / "t.wav.txt").read_text() == '{"cache before this file": 0}\n'
    assert "stateful took longer than 1 s (--file-timeout)" in proc.stderr
    assert report["model_reloads"] == 1
    assert {o["file"]: o["load"] for o in report["outputs"]} == {"a.wav": 1, "t.wav": 2,
                                                                  "u.wav": 2}
    assert proc.stderr.count("stateful: load ") == 2
    assert ("stateful: slow.wav: stateful took longer than 1 s (--file-timeout)\n"
            "stateful: reloading the models: a timeout interrupted them on the previous "
            "file, which may have left them half-updated\nstateful: load 2\n") in proc.stderr


def test_pyav_holds_a_long_recording_once_not_twice(tmp_path: Path) -> None:
    """20 minutes at 44.1 kHz through PyAV, no limit: 77 MB of 16 kHz float32. The samples
    go into one array sized from the header's duration, not a list of frames joined at the
    end (which held the waveform twice: 154 MB). Measured as in the test above."""
    long = _silent_wav(tmp_path / "twenty-minutes-44k.wav", 1200, 44100)
    small = _silent_wav(tmp_path / "s.wav", 2, 44100)
    code = (
        "import json, resource, sys\n"
        "from pathlib import Path\n"
        "from bundler.runtime import audio\n"
        "audio.decode(Path(sys.argv[2]), 0)\n"
        "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "before = rss()\n"
        "wave = audio.decode(Path(sys.argv[1]), 0)\n"
        "print(json.dumps({'growth': rss() - before, 'samples': len(wave),\n"
        "                  'silent': not wave.any(), 'dtype': wave.dtype.name}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(long), str(small)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    decoded = 1200 * 16000 * 4
    assert result["samples"] == 1200 * 16000 and result["silent"]
    assert result["dtype"] == "float32"
    assert result["growth"] < 1.3 * decoded, result


def test_samples_past_the_headers_duration_are_kept_and_a_short_file_gives_back_the_rest(
        ) -> None:
    """The header's duration only sizes the array: a header that understates keeps every
    sample, in order; one that overstates far gets a copy of what came, not a view of the
    whole reservation; past the cap, TooLong."""
    import numpy as np

    chunks = [np.arange(i * 4, i * 4 + 4, dtype=np.float32) for i in range(5)]
    under = audio.Samples(expected=10)
    for chunk in chunks:
        under.add(chunk)
    assert under.total == 20 and np.array_equal(under.waveform(), np.arange(20))
    over = audio.Samples(expected=10 * audio.SAMPLE_RATE)
    over.add(chunks[0])
    wave = over.waveform()
    assert np.array_equal(wave, chunks[0]) and wave.base is None
    exact = audio.Samples(expected=8 + audio.SAMPLE_RATE)
    exact.add(chunks[0])
    exact.add(chunks[1])
    assert np.array_equal(exact.waveform(), np.arange(8))
    capped = audio.Samples(expected=100, cap=6)
    capped.add(chunks[0])
    with pytest.raises(audio.TooLong):
        capped.add(chunks[1])


def test_one_recording_in_memory_at_a_time(tmp_path: Path) -> None:
    """The shared loop lets the last file's samples go before it decodes the next: a batch
    of two 20-minute files (77 MB decoded each) peaks where one file alone does, not 77 MB
    above it."""
    for name in ("a.wav", "b.wav"):
        _silent_wav(tmp_path / "two" / name, 1200, 16000)
    _silent_wav(tmp_path / "one" / "a.wav", 1200, 16000)
    peaks = {}
    for batch in ("one", "two"):
        proc = _fake_program_run(tmp_path / batch, str(tmp_path / batch))
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["done"] == len(list((tmp_path / batch).glob("*.wav")))
        peaks[batch] = report["peak_rss_mb"]
    decoded_mb = 1200 * 16000 * 4 / 2**20
    assert peaks["two"] < peaks["one"] + decoded_mb / 2, peaks
