"""diarize: who spoke when, for the recordings people have, on an isolated host.

    PREFIX/bin/diarize [OPTIONS] INPUT...

Shipped verbatim in every bundle (``runtime/diarize.py``, listed in SHA256SUMS) and run by
``PREFIX/bin/diarize`` with the install's own venv. Each INPUT is a file or a folder,
walked recursively for audio and video files by extension. For every file it writes
``OUTPUT_DIR/<path relative to its INPUT>.rttm`` (``meetings/a.m4a`` ->
``OUTPUT_DIR/meetings/a.m4a.rttm``), and ``.json`` with ``--format rttm,json``.

Decoding needs no FFmpeg on the host: soundfile (libsndfile, inside its wheel) reads wav,
flac, ogg and mp3; PyAV (FFmpeg's libraries, inside its wheel) reads the rest (m4a/AAC,
mp4/mov/mkv, webm/opus, ...) and resamples. Every file becomes 16 kHz mono float32 in
memory and goes to the pipeline as a waveform, loaded once per process.

Offline by construction: the variables that keep huggingface_hub and pyannote's
telemetry off the network are set before either is imported, caches go to a writable
per-user folder (never the prefix), and every connection attempt the process makes is
counted (``network_attempts`` in ``--json``); ``--block-network`` refuses them too.

``--engine`` chooses what computes the models (``runtime/engines.py``): pyannote's own
code, or the fast paths (the embedding trunk once per chunk, in PyTorch or onnxruntime).
What is checked: at install, onnx against pytorch on the smoke sample (``ENGINE_CHECK``);
against pyannote's own RTTM, only in the project's end-to-end tests.

What every program that reads recordings shares is in its own runtime module: the per-file
loop, options, progress and summary (``recordings.py``), the offline environment and network
audit (``offline.py``), inputs and shards (``inputs.py``), decoding (``audio.py``), the device
(``devices.py``), outputs (``outputs.py``), exit codes (``exits.py``); this file holds the
pyannote pipeline, which ``bin/transcribe`` uses too, and what diarize makes of a file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: its folder is the package (runtime/_bootstrap.py)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    __package__ = __import__("_bootstrap").package(__file__)

from . import (
    audio,
    common,
    devices,
    engines,
    exits,
    inputs,
    outputs,
    recordings,
    transcript,
    voiceprints,
)

FORMATS = ("rttm", "json")
# What --help says the engines' check proves: exactly what export.export compares.
ENGINE_CHECK = (f"the install checks onnx against pytorch on the smoke sample "
                f"(segmentation scores and embeddings within {engines.TOLERANCE_TEXT}, "
                f"the same RTTM); pytorch and onnx against pyannote's own RTTM are checked "
                f"only in the project's end-to-end tests, on their recordings")


# --- the pipeline ------------------------------------------------------------------------
def check_config(config: Path) -> None:
    """A missing config or model file named before pyannote takes it for a Hub id (trap 3)."""
    import yaml

    if not config.is_file():
        raise exits.RunError(f"config not found: {config} (pass --config, or re-run "
                            "install.sh)", exits.EXIT_CANNOT_RUN)
    try:
        data = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise exits.RunError(f"cannot read {config}: {common.one_line(exc)}",
                            exits.EXIT_CANNOT_RUN) from None
    params = data.get("pipeline", {}).get("params", {}) if isinstance(data, dict) else {}
    for key in ("segmentation", "embedding", "plda"):
        value = params.get(key)
        if isinstance(value, dict) and isinstance(value.get("checkpoint"), str):
            value = str(Path(value["checkpoint"]) / str(value.get("subfolder", "")))
        if not isinstance(value, str):
            continue
        value = value.replace("$model", str(config.parent))
        if value.startswith("/") and not Path(value).exists():
            raise exits.RunError(f"{key} model not found: {value} (named in {config})",
                                exits.EXIT_CANNOT_RUN)


@dataclass
class Loaded:
    pipeline: Any
    torch: Any
    device: str
    pyannote_audio: str
    seconds: float
    engine: engines.Engine | None = None


def load_pipeline(config: Path, device: str, batch: dict[str, int | None],
                  warn: Callable[[str], None], engine: str = "pyannote",
                  threads: int | None = None) -> Loaded:
    check_config(config)
    t0 = time.perf_counter()
    import warnings

    # pyannote 4 warns at import that torchcodec cannot load FFmpeg: diarize never asks
    # torchcodec for anything (it decodes itself), so that warning would only mislead.
    warnings.filterwarnings("ignore", message=r"(?s).*torchcodec")
    # pyannote finds the embedding model's shortest input by running it on ever shorter
    # ones, and torch warns about each too-short one: a search, not a fault in the run.
    warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom is <= 0")
    engines.limit_native_pools(engines.cpu_threads(threads))
    try:
        import torch

        Pipeline = engines.load_pyannote()  # without onnxruntime: the onnx engine loads it
        from pyannote.audio import __version__ as version
    except ImportError as exc:
        raise exits.RunError(f"cannot import pyannote.audio from this venv: {common.one_line(exc)}",
                           exits.EXIT_CANNOT_RUN) from None
    except OSError as exc:
        # Importing writes: torch a generated module to the temp dir, matplotlib (pulled in
        # by pyannote) its config dir. A read-only root with no writable /tmp fails here.
        raise exits.RunError(f"cannot import pyannote.audio: {common.one_line(exc)} (a "
                             "read-only root needs a writable temp dir: a volume at /tmp)",
                             exits.EXIT_CANNOT_RUN) from None
    chosen = devices.choose_device(device, torch, warn)
    try:
        pipeline = Pipeline.from_pretrained(str(config))
    except Exception as exc:  # noqa: BLE001 - any load failure means nothing can run
        raise exits.RunError(f"cannot load the pipeline from {config}: {common.one_line(exc)}",
                           exits.EXIT_CANNOT_RUN) from None
    if pipeline is None:  # pyannote 3.x prints and returns None on a failed load (trap 3)
        raise exits.RunError(f"cannot load the pipeline from {config} (pyannote returned "
                           "None; see above)", exits.EXIT_CANNOT_RUN)
    for attr, value in batch.items():
        if value is not None and hasattr(pipeline, attr):
            setattr(pipeline, attr, value)
    if chosen != "cpu":
        pipeline.to(torch.device(chosen))
    try:
        ran = engines.apply(pipeline, engine, chosen, threads, engine_receipt(config))
    except engines.EngineUnavailable as exc:
        raise exits.RunError(f"--engine {engine}: {exc}", exits.EXIT_CANNOT_RUN) from None
    if ran.note and engine != "auto":
        warn(f"--engine {engine}: {ran.note}; running {ran.name}")
    return Loaded(pipeline, torch, chosen, str(version), time.perf_counter() - t0, ran)


def engine_receipt(config: Path) -> Path:
    """What was exported and checked for the onnx engine, beside the config it was made
    from: ``engines.json`` in the install's release (``PREFIX/config.yaml`` links there)."""
    return config.resolve().parent / engines.RECEIPT


def diarize_one(loaded: Loaded, waveform: Any, uri: str,
                speakers: dict[str, int | None], embeddings: bool = False) -> dict[str, Any]:
    """Run the pipeline on one waveform; the segments (and 4.x's exclusive ones), and with
    ``embeddings`` each speaker's centroid in the embedding model's space
    (``speaker_embeddings``: ``{label: [float, ...] or None}``; see voiceprints.py)."""
    tensor = loaded.torch.from_numpy(waveform).unsqueeze(0)
    kwargs: dict[str, Any] = {k: v for k, v in speakers.items() if v is not None}
    if embeddings and not _returns_embeddings(loaded.pipeline):
        kwargs["return_embeddings"] = True  # 3.x: (annotation, centroids)
    stages = StageClock()
    output = loaded.pipeline({"waveform": tensor, "sample_rate": audio.SAMPLE_RATE, "uri": uri},
                             hook=stages, **kwargs)
    centroids = None
    if isinstance(output, tuple):
        output, centroids = output
    annotation = getattr(output, "speaker_diarization", output)  # 4.x DiarizeOutput / 3.x
    result: dict[str, Any] = {"segments": _segments(annotation),
                              "stage_seconds": stages.seconds()}
    exclusive = getattr(output, "exclusive_speaker_diarization", None)
    if exclusive is not None:
        result["exclusive_segments"] = _segments(exclusive)
    if embeddings:
        centroids = getattr(output, "speaker_embeddings", centroids)
        result["speaker_embeddings"] = speaker_embeddings(annotation, centroids)
    return result


def _returns_embeddings(pipeline: Any) -> bool:
    """Whether the pipeline's result carries the centroids itself (pyannote 4's
    DiarizeOutput, unless ``legacy``), or must be asked (3.x's ``return_embeddings``)."""
    import inspect

    return "return_embeddings" not in inspect.signature(pipeline.apply).parameters


def speaker_embeddings(annotation: Any, centroids: Any) -> dict[str, list[float] | None]:
    """``{label: centroid}``: pyannote orders the rows as ``annotation.labels()``. A row of
    zeros (a speaker clustering did not make), of NaN (pyannote's mean over no embedding:
    a speaker no chunk gave one) or no row at all is None."""
    labels = [str(label) for label in annotation.labels()]
    if centroids is None:
        raise exits.RunError("this pipeline gives no speaker embeddings (oracle clustering, "
                             "or pyannote 4's legacy output): voiceprints cannot be matched",
                             exits.EXIT_CANNOT_RUN)
    rows = centroids.tolist() if hasattr(centroids, "tolist") else list(centroids)
    out: dict[str, list[float] | None] = {}
    for i, label in enumerate(labels):
        row = [float(x) for x in rows[i]] if i < len(rows) else None
        out[label] = row if row and any(row) and all(map(math.isfinite, row)) else None
    return out


class StageClock:
    """A pipeline hook: the seconds of each stage, from the steps pyannote reports
    (segmentation, speaker counting, embeddings batch by batch, then clustering and
    reconstruction until the discrete diarization)."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.totals: dict[str, float] = {}

    def __call__(self, step: str, artifact: Any = None, **_kwargs: Any) -> None:
        now = time.perf_counter()
        name = {"discrete_diarization": "clustering"}.get(step, step)
        if name in ("segmentation", "embeddings", "clustering"):
            self.totals[name] = self.totals.get(name, 0.0) + now - self.last
        self.last = now

    def seconds(self) -> dict[str, float]:
        total = time.perf_counter() - self.started
        out = {k: round(v, 3) for k, v in self.totals.items()}
        out["other"] = round(max(0.0, total - sum(self.totals.values())), 3)
        return out


def _segments(annotation: Any) -> list[dict[str, Any]]:
    return [{"start": round(float(turn.start), 3), "end": round(float(turn.end), 3),
             "speaker": str(label)}
            for turn, _, label in annotation.itertracks(yield_label=True)]


# --- the program -------------------------------------------------------------------------
def default_config() -> Path:
    """The install's config: ``PREFIX/config.yaml`` beside ``PREFIX/runtime/``."""
    return Path(__file__).resolve().parent.parent / "config.yaml"


def add_pipeline_arguments(p: argparse.ArgumentParser, matching: bool = True) -> None:
    """The pyannote pipeline's options, shared with bin/transcribe (and, without the
    voiceprint matching, ``matching``, with bin/enroll)."""
    config = default_config()
    p.add_argument("--config", type=Path, default=config,
                   help=f"the pipeline config (default: {config})")
    p.add_argument("--embedding-batch-size", type=int, metavar="N",
                   help="lower it to use less memory (default: the config's)")
    p.add_argument("--segmentation-batch-size", type=int, metavar="N",
                   help="lower it to use less memory (default: the config's)")
    p.add_argument("--engine", choices=engines.ENGINES, default="auto",
                   help="what computes the models: auto (default: onnx on a CPU where the "
                        "install's check passed, else pytorch), pytorch (the fast path, in "
                        "PyTorch), onnx (onnxruntime, CPU), pyannote (pyannote's own code, "
                        "untouched); "
                        + ENGINE_CHECK)
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for the models, every engine (default: the cores this "
                        "process may use, from its affinity and cgroup quota)")
    if matching:
        voiceprints.add_arguments(p)


def check_pipeline_arguments(args: argparse.Namespace) -> None:
    """Refuse bad pipeline options; ``args.known_voices``: the voiceprints ``--voiceprints``
    names, loaded and checked before any model (None without it)."""
    for name in ("embedding_batch_size", "segmentation_batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise exits.RunError(f"--{name.replace('_', '-')} must be at least 1",
                                exits.EXIT_USAGE)
    if hasattr(args, "match_threshold"):  # the matching options (not bin/enroll's)
        args.known_voices = voiceprints.check_arguments(args, default_config().parent)


def identified(result: dict[str, Any], args: argparse.Namespace
               ) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """``diarize_one``'s result with the speakers ``--voiceprints`` identifies renamed (every
    output then says the name), and the matches (None without ``--voiceprints``)."""
    known = getattr(args, "known_voices", None)
    embeddings = result.pop("speaker_embeddings", None)
    if not known:
        return result, None
    matches = voiceprints.identify({"speaker_embeddings": embeddings}, known, args)
    return (transcript.renamed(result, voiceprints.names(matches)),
            [m.as_dict() for m in matches])


def load_from_args(args: argparse.Namespace, say: Callable[[str], None]) -> Loaded:
    loaded = load_pipeline(args.config, args.device,
                           {"embedding_batch_size": args.embedding_batch_size,
                            "segmentation_batch_size": args.segmentation_batch_size}, say,
                           args.engine, args.threads)
    engine = loaded.engine.name if loaded.engine else "pyannote"
    say(f"pipeline loaded in {loaded.seconds:.1f} s on {loaded.device} "
        f"(pyannote.audio {loaded.pyannote_audio}, engine {engine})")
    return loaded


class Diarize(recordings.Program):
    name = "diarize"
    done = "diarized"
    formats = FORMATS
    default_formats = "rttm"
    marker = "rttm"
    description = ("Who spoke when: an RTTM file for each recording, offline, with this "
                   "bundle's pipeline.\nReads wav, flac, ogg, mp3, m4a/AAC, mp4, mov, mkv, "
                   "webm/opus and more, with no FFmpeg on the host.")
    examples = ("  diarize call.mp3                          -> diarization/call.mp3.rttm\n"
                "  diarize /srv/meetings --output-dir /srv/rttm --format rttm,json\n"
                "  diarize /srv/corpus --shard 3/16          # the 4th of 16 shares\n"
                "  sbatch --array=0-15 ...  diarize /srv/corpus   # shard from Slurm\n")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_pipeline_arguments(p)

    def check(self, args: argparse.Namespace) -> None:
        check_pipeline_arguments(args)

    def load(self, args: argparse.Namespace, say: Callable[[str], None]) -> Loaded:
        return load_from_args(args, say)

    def process(self, loaded: Loaded, job: inputs.Job, waveform: Any, args: argparse.Namespace
                ) -> tuple[dict[str, str], dict[str, Any], str]:
        result, matches = identified(
            diarize_one(loaded, waveform, job.uri, recordings.speakers(args),
                        embeddings=bool(getattr(args, "known_voices", None))), args)
        segments = result["segments"]
        labels = sorted({s["speaker"] for s in segments})
        record = {"file": job.rel, "uri": job.uri, "source": str(job.source),
                  "audio_seconds": round(len(waveform) / audio.SAMPLE_RATE, 3),
                  "sample_rate": audio.SAMPLE_RATE,
                  "speakers": labels, **result,
                  **({"identification": matches} if matches is not None else {}),
                  "pyannote_audio": loaded.pyannote_audio,
                  "engine": loaded.engine.name if loaded.engine else "pyannote",
                  "config": str(args.config)}
        texts = {"json": json.dumps(record, indent=1) + "\n",
                 "rttm": outputs.rttm(job.uri, segments)}
        return (texts, {"segments": len(segments), "speakers": len(labels),
                        "stage_seconds": result["stage_seconds"]},
                f"{len(labels)} speaker(s)")

    def report(self, loaded: Loaded | None) -> dict[str, Any]:
        return {"pyannote_audio": loaded.pyannote_audio if loaded else None,
                "torch": str(loaded.torch.__version__) if loaded else None,
                **engine_report(loaded)}


def engine_report(loaded: Loaded | None) -> dict[str, Any]:
    """``engine`` (what ran), ``engine_requested``, ``threads`` and, when the request fell
    back, ``engine_note`` (why)."""
    if loaded is None or loaded.engine is None:
        return {"engine": None}
    return loaded.engine.report()


def main(argv: Sequence[str] | None = None) -> int:
    return recordings.main(Diarize(), argv)


if __name__ == "__main__":
    sys.exit(main())
