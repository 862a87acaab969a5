"""transcribe: who said what, for the recordings people have, on an isolated host.

    PREFIX/bin/transcribe [OPTIONS] INPUT...

Shipped verbatim in every bundle (``runtime/transcribe.py``, listed in SHA256SUMS) and
installed as ``PREFIX/bin/transcribe`` when the bundle carries a speech-recognition model
(a faster-whisper / CTranslate2 folder under ``models/``, named in ``manifest.json``'s
``asr``). Each recording is decoded once (no FFmpeg: ``runtime/audio.py``) and the
same waveform feeds both models: faster-whisper gives words with timestamps, the bundle's
pyannote pipeline gives speaker turns, and each word gets the speaker whose turn overlaps it
most (``runtime/transcript.py``). For every file it writes
``OUTPUT_DIR/<path relative to its INPUT>.<format>`` for ``--format`` from json, srt,
vtt, txt and rttm.

Everything users rely on in ``bin/diarize`` is the same here, from the same code: files
and folders, resumable runs, shards (``--shard``, Slurm arrays, Kubernetes Indexed Jobs),
``--json``, progress, the exit codes, and no connection attempt (onnxruntime's telemetry,
which faster-whisper's VAD would start, is off with the other offline variables).
"""

from __future__ import annotations

import argparse
import json
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

from . import audio, common, diarize, engines, exits, inputs, outputs, recordings, transcript

FORMATS = ("json", "srt", "vtt", "txt", "rttm")
TASKS = ("transcribe", "translate")
COMPUTE_TYPES = ("default", "auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16",
                 "int16", "float16", "bfloat16", "float32")
# What faster-whisper needs in a model folder to run with no network (without
# tokenizer.json it fetches openai/whisper-* from the Hub).
MODEL_FILES = ("model.bin", "config.json", "tokenizer.json")


@dataclass(frozen=True)
class AsrModel:
    """The bundle's ASR model, as the manifest describes it."""

    path: Path
    repo: str = "?"
    commit: str = "?"
    multilingual: bool = True
    compute_type: str | None = None


def prefix_root() -> Path:
    return Path(__file__).resolve().parent.parent


def bundled_model(root: Path | None = None) -> AsrModel | None:
    """The ASR model ``PREFIX/manifest.json`` names, or None (a bundle without one)."""
    root = prefix_root() if root is None else root
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    asr = manifest.get("asr") if isinstance(manifest, dict) else None
    if not isinstance(asr, dict) or not isinstance(asr.get("path"), str):
        return None
    return AsrModel(root / asr["path"], str(asr.get("repo", "?")), str(asr.get("commit", "?")),
                    bool(asr.get("multilingual", True)), asr.get("compute_type"))


@dataclass
class Loaded:
    pipeline: diarize.Loaded
    whisper: Any
    model: AsrModel
    device: str
    compute_type: str
    faster_whisper: str
    seconds: float
    threads: int
    vad: bool = True
    vad_note: str | None = None


def choose_vad(requested: bool | None, receipt: Path) -> tuple[bool, str | None]:
    """Whether the Silero VAD runs (``--vad``/``--no-vad``, on by default), and why it is off
    when it would have been on. faster-whisper runs it in onnxruntime: where the install
    found that onnxruntime cannot load on this host (it kills the process: see
    engines.onnxruntime_deferred), the VAD is off by default, and asked for it is an error
    rather than a crash on the first recording."""
    why = engines.onnxruntime_failure(receipt)
    if why is None:
        return requested is not False, None
    because = f"faster-whisper's VAD runs in onnxruntime, which cannot load on this host: {why}"
    if requested:
        raise exits.RunError(f"--vad: {because}", exits.EXIT_CANNOT_RUN)
    return False, None if requested is False else f"VAD off: {because}"


def whisper_options(args: argparse.Namespace, device: str, index: int, compute: str
                    ) -> dict[str, Any]:
    """``WhisperModel``'s keyword arguments: CTranslate2 computes with the pipeline's thread
    count (``--asr-threads``, else ``--threads``, else the cores this process may use, its
    cgroup quota included: engines.cpu_threads), one worker (one recording at a time), and
    never looks for the model online."""
    return {"device": device, "device_index": index, "compute_type": compute,
            "cpu_threads": engines.cpu_threads(args.asr_threads or args.threads),
            "num_workers": 1, "local_files_only": True}


class Transcribe(recordings.Program):
    name = "transcribe"
    done = "transcribed"
    formats = FORMATS
    default_formats = "json,srt,vtt"
    marker = "json"
    description = ("Who said what: a speaker-labelled transcript of each recording, offline, "
                   "with this bundle's\nspeech-recognition model and diarization pipeline. "
                   "Reads wav, flac, ogg, mp3, m4a/AAC,\nmp4, mov, mkv, webm/opus and more, "
                   "with no FFmpeg on the host.")
    examples = ("  transcribe call.mp3                 -> transcripts/call.mp3.json, .srt, "
                ".vtt\n"
                "  transcribe /srv/meetings -o /srv/out --format json,txt,rttm\n"
                "  transcribe interview.m4a --language de --task translate   # multilingual "
                "models\n"
                "  transcribe /srv/corpus --shard 3/16   # the 4th of 16 shares (or from "
                "Slurm)\n")

    def __init__(self, model: AsrModel | None = None) -> None:
        self.model = model

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        default = self.model.path if self.model else None
        p.add_argument("--model", type=Path, default=default, metavar="DIR",
                       help="the faster-whisper (CTranslate2) model folder (default: the "
                            f"bundle's, {default})")
        p.add_argument("--language", metavar="CODE",
                       help="the spoken language, e.g. en, de (default: detected, on "
                            "multilingual models; English-only models take only en)")
        p.add_argument("--task", choices=TASKS, default="transcribe",
                       help="transcribe, or translate into English (multilingual models)")
        p.add_argument("--vad", action=argparse.BooleanOptionalAction, default=None,
                       help="skip silence with the Silero VAD before recognition "
                            "(default: on; off where the install found that onnxruntime, "
                            "which runs it, cannot load, and --json says why)")
        p.add_argument("--beam-size", type=int, default=5, metavar="N",
                       help="beam search width (default: 5; 1 is greedy and fastest)")
        p.add_argument("--compute-type", choices=COMPUTE_TYPES, metavar="TYPE",
                       help="CTranslate2 compute type (default: int8 on CPU, float16 on GPU)")
        p.add_argument("--initial-prompt", metavar="TEXT",
                       help="text that sets the style or spelling of the first window")
        p.add_argument("--hotwords", metavar="TEXT",
                       help="words or phrases to favour (names, terms)")
        p.add_argument("--asr-threads", type=int, metavar="N",
                       help="CPU threads for recognition (default: --threads, else the "
                            "cores this process may use, from its affinity and cgroup quota, "
                            f"{engines.cpu_threads()})")
        diarize.add_pipeline_arguments(p)

    def check(self, args: argparse.Namespace) -> None:
        diarize.check_pipeline_arguments(args)
        for name in ("beam_size", "asr_threads"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise exits.RunError(f"--{name.replace('_', '-')} must be at least 1",
                                    exits.EXIT_USAGE)
        if args.model is None:
            raise exits.RunError("this bundle carries no speech-recognition model: pass "
                                "--model DIR, or build the bundle with --asr-model",
                                exits.EXIT_USAGE)
        model = self.model
        if model is None or args.model != model.path or model.multilingual:
            return
        if args.language not in (None, "en"):
            raise exits.RunError(f"--language {args.language}: {model.repo} is an English-only "
                                "model", exits.EXIT_USAGE)
        if args.task == "translate":
            raise exits.RunError(f"--task translate: {model.repo} is an English-only model (it "
                                "transcribes English only)", exits.EXIT_USAGE)

    def load(self, args: argparse.Namespace, say: Callable[[str], None]) -> Loaded:
        folder: Path = args.model
        missing = [n for n in MODEL_FILES if not (folder / n).is_file()]
        if missing:
            raise exits.RunError(f"speech-recognition model incomplete: {folder} has no "
                                f"{', '.join(missing)} (pass --model, or re-run install.sh)",
                                exits.EXIT_CANNOT_RUN)
        vad, vad_note = choose_vad(args.vad, diarize.engine_receipt(args.config))
        if vad_note:
            say(f"warning: {vad_note}")
        pipeline = diarize.load_from_args(args, say)
        t0 = time.perf_counter()
        try:
            import faster_whisper
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise exits.RunError("cannot import faster_whisper from this venv: "
                                f"{common.one_line(exc)}", exits.EXIT_CANNOT_RUN) from None
        device, index = "cpu", 0
        if pipeline.device.startswith("cuda"):
            device, index = "cuda", int(pipeline.device.partition(":")[2] or 0)
        model = self.model if self.model and folder == self.model.path else AsrModel(folder)
        compute = args.compute_type or model.compute_type or (
            "float16" if device == "cuda" else "int8")
        options = whisper_options(args, device, index, compute)
        try:
            whisper = WhisperModel(str(folder), **options)
        except Exception as exc:  # noqa: BLE001 - any load failure means nothing can run
            raise exits.RunError(f"cannot load the speech-recognition model from {folder}: "
                                f"{common.one_line(exc)}", exits.EXIT_CANNOT_RUN) from None
        seconds = time.perf_counter() - t0
        say(f"speech-recognition model loaded in {seconds:.1f} s on {device} ({compute}, "
            f"faster-whisper {faster_whisper.__version__})")
        return Loaded(pipeline, whisper, model, pipeline.device, compute,
                      str(faster_whisper.__version__), pipeline.seconds + seconds,
                      options["cpu_threads"], vad, vad_note)

    def process(self, loaded: Loaded, job: inputs.Job, waveform: Any, args: argparse.Namespace
                ) -> tuple[dict[str, str], dict[str, Any], str]:
        kwargs = {k: v for k, v in {"language": args.language,
                                    "initial_prompt": args.initial_prompt,
                                    "hotwords": args.hotwords,
                                    # bin/serve's requests (OpenAI's field); 0 by default
                                    "temperature": getattr(args, "temperature", None),
                                    }.items() if v is not None}
        pieces, info = loaded.whisper.transcribe(
            waveform, task=args.task, beam_size=args.beam_size, vad_filter=loaded.vad,
            word_timestamps=True, **kwargs)
        asr = [{"start": s.start, "end": s.end, "text": s.text,
                "words": [{"start": w.start, "end": w.end, "word": w.word,
                           "probability": w.probability} for w in (s.words or [])]}
               for s in pieces]  # a generator: recognition runs here
        result, matches = diarize.identified(
            diarize.diarize_one(loaded.pipeline, waveform, job.uri, recordings.speakers(args),
                                embeddings=bool(getattr(args, "known_voices", None))), args)
        # Non-overlapping turns where the pipeline gives them (pyannote 4): a word goes to one
        # speaker, and overlapped speech would otherwise split a word between two.
        turns = result.get("exclusive_segments") or result["segments"]
        segments = transcript.speaker_segments(asr, turns)
        labels = sorted({s["speaker"] for s in result["segments"]})
        words = sum(len(s["words"]) for s in segments)
        extra = {"file": job.rel, "uri": job.uri, "source": str(job.source),
                 "audio_seconds": round(len(waveform) / audio.SAMPLE_RATE, 3),
                 "language": info.language,
                 "language_probability": round(float(info.language_probability), 4),
                 "task": args.task, "speakers": labels,
                 "models": {"asr": {"repo": loaded.model.repo, "commit": loaded.model.commit,
                                    "path": str(args.model),
                                    "compute_type": loaded.compute_type,
                                    "faster_whisper": loaded.faster_whisper},
                            "diarization": {"config": str(args.config),
                                            "engine": (loaded.pipeline.engine.name
                                                       if loaded.pipeline.engine
                                                       else "pyannote"),
                                            "pyannote_audio": loaded.pipeline.pyannote_audio}},
                 "diarization": result["segments"],
                 **({"identification": matches} if matches is not None else {})}
        texts = {"json": transcript.to_json(segments, extra),
                 "srt": transcript.to_srt(segments), "vtt": transcript.to_vtt(segments),
                 "txt": transcript.to_txt(segments),
                 "rttm": outputs.rttm(job.uri, result["segments"])}
        fields = {"segments": len(segments), "words": words, "speakers": len(labels),
                  "language": info.language}
        return texts, fields, f"{words} words, {len(labels)} speaker(s), {info.language}"

    def report(self, loaded: Loaded | None) -> dict[str, Any]:
        return {"pyannote_audio": loaded.pipeline.pyannote_audio if loaded else None,
                "torch": str(loaded.pipeline.torch.__version__) if loaded else None,
                **diarize.engine_report(loaded.pipeline if loaded else None),
                "faster_whisper": loaded.faster_whisper if loaded else None,
                "asr_model": (self.model.repo if self.model else None),
                "compute_type": loaded.compute_type if loaded else None,
                "asr_threads": loaded.threads if loaded else None,
                "vad": loaded.vad if loaded else None,
                **({"vad_note": loaded.vad_note} if loaded and loaded.vad_note else {})}


def main(argv: Sequence[str] | None = None) -> int:
    return recordings.main(Transcribe(bundled_model()), argv)


if __name__ == "__main__":
    sys.exit(main())
