"""Offline smoke diarization for a pyannote-bundle install (stdlib + the bundled venv only).

    python smoke.py --config CONFIG_YAML --audio WAV [--batch-size N] [--guard-sockets]
                    [--segmentation-batch-size N] [--probe HOST:PORT]...

Sets the offline environment before anything heavy is imported, optionally makes every
inet socket connect (and DNS lookup) fail in-process (--guard-sockets, for hosts without
network namespaces), tries a TCP connect to each --probe address (the caller passes
a loopback listener of its own: inside a fresh network namespace even loopback is down), loads
``Pipeline.from_pretrained(CONFIG_YAML)``, decodes WAV with soundfile and diarizes it in
memory (no FFmpeg). Prints exactly one JSON object on stdout: ``{"ok": true, ...}`` with the
segments and figures (``load_seconds`` = import + load, ``rtf`` = diarize time / audio
duration), or ``{"ok": false, "error": "..."}`` and exit status 1 (traceback on stderr only
with SMOKE_DEBUG=1). Anything else the libraries print goes to stderr.
"""

from __future__ import annotations

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "PYANNOTE_METRICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

STAGE = "start"


class SmokeError(Exception):
    """A failure with a message meant for the operator."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SmokeError(f"bad arguments: {message}")


def guard_sockets() -> None:
    """Make every inet connect and every name lookup in this process fail."""

    def refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise ConnectionRefusedError("network disabled by smoke.py --guard-sockets")

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse()
        return original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        try:
            connect(self, address)
        except OSError as exc:
            return exc.errno or 111
        return 0

    original_connect = socket.socket.connect
    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
    socket.getaddrinfo = refuse
    socket.create_connection = refuse


def probe(address: str, timeout: float = 2.0) -> str:
    """'open' if a TCP connect to HOST:PORT succeeds, else 'blocked'."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return "open"
    except (OSError, ValueError):
        return "blocked"


def check_config(config: Path) -> None:
    """Fail clearly on a missing config or a missing model path it references (trap 3)."""
    import yaml

    if not config.is_file():
        raise SmokeError(f"config not found: {config}")
    params = (yaml.safe_load(config.read_text()) or {}).get("pipeline", {}).get("params", {})
    for key in ("segmentation", "embedding", "plda"):
        value = params.get(key)
        if not isinstance(value, str):
            continue
        value = value.replace("$model", str(config.parent))
        if value.startswith("/") or Path(value).suffix in (".bin", ".ckpt", ".pt"):
            if not Path(value).exists():
                where = "" if value.startswith("/") else ", relative to the current directory"
                raise SmokeError(f"{key} model file not found: {value} (from {config}{where})")


def diarize(args: argparse.Namespace) -> dict[str, Any]:
    global STAGE
    STAGE = "load"
    check_config(args.config)
    if not args.audio.is_file():
        raise SmokeError(f"audio file not found: {args.audio}")
    t0 = time.perf_counter()
    import numpy as np
    import soundfile as sf
    import torch
    from pyannote.audio import Pipeline
    from pyannote.audio import __version__ as pyannote_version

    pipeline = Pipeline.from_pretrained(str(args.config))
    if pipeline is None:
        raise SmokeError(f"Pipeline.from_pretrained({args.config}) returned None")
    for attr, value in (
        ("embedding_batch_size", args.batch_size),
        ("segmentation_batch_size", args.segmentation_batch_size),
    ):
        if hasattr(pipeline, attr):
            setattr(pipeline, attr, value)
    t1 = time.perf_counter()

    STAGE = "decode audio"
    data, sample_rate = sf.read(str(args.audio), dtype="float32", always_2d=True)
    waveform = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1))).unsqueeze(0)
    audio_seconds = waveform.shape[1] / sample_rate

    STAGE = "diarize"
    t2 = time.perf_counter()
    output = pipeline({"waveform": waveform, "sample_rate": sample_rate})
    t3 = time.perf_counter()
    annotation = getattr(output, "speaker_diarization", output)  # 4.x DiarizeOutput / 3.x
    segments = [
        {"start": round(turn.start, 3), "end": round(turn.end, 3), "speaker": str(label)}
        for turn, _, label in annotation.itertracks(yield_label=True)
    ]
    if not segments:
        raise SmokeError("pipeline returned no speech segments")
    return {
        "ok": True,
        "segments": segments,
        "speakers": len({s["speaker"] for s in segments}),
        "seconds": round(t3 - t0 - (t2 - t1), 3),
        "load_seconds": round(t1 - t0, 3),
        "diarize_seconds": round(t3 - t2, 3),
        "audio_seconds": round(audio_seconds, 3),
        "rtf": round((t3 - t2) / audio_seconds, 3) if audio_seconds else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "pyannote_audio": pyannote_version,
        "torch": torch.__version__,
        "embedding_batch_size": args.batch_size,
        "segmentation_batch_size": args.segmentation_batch_size,
    }


def main(argv: list[str] | None = None) -> int:
    global STAGE
    result: dict[str, Any] | None
    stdout = os.dup(1)
    os.dup2(2, 1)  # keep stdout for our JSON only, even against C-level prints
    try:
        STAGE = "parse arguments"
        parser = _Parser(description="Offline smoke diarization.")
        parser.add_argument("--config", type=Path, required=True)
        parser.add_argument("--audio", type=Path, required=True)
        parser.add_argument("--batch-size", type=int, default=1, help="embedding batch size")
        parser.add_argument("--segmentation-batch-size", type=int, default=1)
        parser.add_argument("--guard-sockets", action="store_true")
        parser.add_argument("--probe", action="append", default=[], metavar="HOST:PORT")
        args = parser.parse_args(argv)
        if args.guard_sockets:
            guard_sockets()
        STAGE = "probe network"
        probes = {a: probe(a) for a in dict.fromkeys(args.probe)}
        result = diarize(args)
        result["network_probes"] = probes
        if args.guard_sockets:
            result["isolation"] = "socket guard"
        code = 0
    except SystemExit as exc:
        if exc.code:  # pragma: no cover - only argparse exits, and its errors raise SmokeError
            raise
        result, code = None, 0  # --help (printed on stderr)
    except BaseException as exc:  # noqa: BLE001 - report every failure as one JSON line
        if os.environ.get("SMOKE_DEBUG") == "1":
            traceback.print_exc()
        text = str(exc) if isinstance(exc, SmokeError) else f"{type(exc).__name__}: {exc}"
        detail = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(text.split()))
        if "Weights only load failed" in detail:  # trap 5
            detail = (
                "UnpicklingError: torch.load(weights_only=True) refused the checkpoint "
                "(pytorch-lightning>=2.6: pin <2.6, or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1)"
            )
        if "LocalEntryNotFoundError" in detail:  # trap 3: a Hub id where a path should be
            detail = (
                "LocalEntryNotFoundError: something the config names is not a local path "
                "and the Hub is offline (pyannote 4.x also needs a local `plda:` folder)"
            )
        detail = detail if len(detail) <= 500 else detail[:497] + "..."
        result, code = {"ok": False, "error": f"{STAGE} failed: {detail}"}, 1
    sys.stdout.flush()
    os.dup2(stdout, 1)
    os.close(stdout)
    if result is not None:
        print(json.dumps(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
