"""Offline smoke test of a pyannote-bundle install: the user's own command on the samples.

    python3 smoke.py --prefix PREFIX [--probe HOST:PORT]... [--guard-sockets]

Runs ``PREFIX/bin/diarize`` (exactly what a user runs) on the bundled sample in three
containers (``smoke/sample.wav``, ``.mp3``, ``.m4a``) and checks that every one became
speech segments, with no connection attempt from the diarizing process (it counts its own
attempts: ``network_attempts``). Where the install has ``bin/transcribe`` (a bundle with a
speech-recognition model), it also transcribes ``smoke/dialogue.flac`` (real speech) in
every output format, and reports the transcript (``transcript``). Before that it tries a
TCP connect to each ``--probe`` address (the caller passes a loopback listener of its own:
inside a fresh network namespace even loopback is down, so a probe that gets through means
the isolation failed).
``--guard-sockets`` (hosts with no network namespace) makes this process's connects fail and
runs diarize with ``--block-network``.

Prints exactly one JSON object on stdout: ``{"ok": true, "segments": [...], "formats":
{...}, ...}`` (the wav's segments at the top, as in ``smoke/expected.json``), or
``{"ok": false, "error": "..."}`` with exit status 1. Standard library only (and the
installer's ``runtime/install.py``, beside ``smoke/`` in the bundle and the release).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

if __package__:  # imported by the tool and its tests
    from bundler.runtime.install import exit_text
else:  # run as a program from smoke/: the installer's helper, from runtime/ beside it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))
    from install import exit_text  # type: ignore[no-redef]

SAMPLES = ("wav", "mp3", "m4a")
TIMEOUT_S = 1800


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

    original_connect = socket.socket.connect
    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
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


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def run_program(argv: list[str], block_network: bool
                ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """An installed program (``bin/diarize``, ``bin/transcribe``) on the samples, as a user
    runs it, with the smallest batches: its process and the summary it printed (--json)."""
    name = Path(argv[0]).name
    argv = [argv[0], "--json", "--quiet", "--overwrite", "--embedding-batch-size", "1",
            "--segmentation-batch-size", "1", *argv[1:]]
    if block_network:
        argv.append("--block-network")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SmokeError(f"{name} did not finish in {TIMEOUT_S} s") from None
    sys.stderr.write(proc.stderr)
    try:
        summary: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        # A process killed by a signal (a crash in a native library) prints nothing more.
        said = last_line(proc.stderr)
        raise SmokeError(f"{name} printed no summary ({exit_text(proc.returncode)})"
                         + (f": {said}" if said else "")) from None
    return proc, summary


def smoke(prefix: Path, block_network: bool) -> dict[str, Any]:
    diarize = prefix / "bin" / "diarize"
    if not diarize.is_file():
        raise SmokeError(f"{diarize} is missing: the install did not finish")
    samples = {fmt: prefix / "smoke" / f"sample.{fmt}" for fmt in SAMPLES}
    for path in samples.values():
        if not path.is_file():
            raise SmokeError(f"sample not found: {path}")
    out = Path(tempfile.mkdtemp(prefix="pyannote-bundle-smoke-"))
    try:
        proc, summary = run_program(
            [str(diarize), "--format", "rttm,json", "--output-dir", str(out),
             *map(str, samples.values())], block_network)
        formats: dict[str, Any] = {}
        for fmt, path in samples.items():
            record = out / f"{path.name}.json"
            failure = next((f["error"] for f in summary.get("failures", [])
                            if f["file"] == path.name), None)
            if failure is not None or not record.is_file():
                formats[fmt] = {"ok": False, "error": failure or "no output written"}
                continue
            data = json.loads(record.read_text())
            rttm = (out / f"{path.name}.rttm").read_text().splitlines()
            formats[fmt] = {"ok": bool(data["segments"]) and len(rttm) == len(
                                data["segments"]),
                            "segments": data["segments"], "speakers": len(data["speakers"]),
                            "audio_seconds": data["audio_seconds"]}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    transcribed = transcribe(prefix, block_network) \
        if (prefix / "bin" / "transcribe").is_file() else None
    wav = formats["wav"]
    result: dict[str, Any] = {
        "ok": proc.returncode == 0 and all(f["ok"] for f in formats.values()),
        "segments": wav.get("segments", []),
        "speakers": wav.get("speakers", 0),
        "formats": formats,
        "network_attempts": summary.get("network_attempts"),
        "network_attempt_details": summary.get("network_attempt_details", []),
        "seconds": summary.get("wall_seconds"),
        "load_seconds": summary.get("load_seconds"),
        "diarize_seconds": summary.get("diarize_seconds"),
        "audio_seconds": summary.get("audio_seconds"),
        "rtf": summary.get("rtf"),
        "peak_rss_mb": summary.get("peak_rss_mb"),
        "pyannote_audio": summary.get("pyannote_audio"),
        "torch": summary.get("torch"),
        "device": summary.get("device"),
        "engine": summary.get("engine"),
        "engine_note": summary.get("engine_note"),
        "embedding_batch_size": 1,
        "segmentation_batch_size": 1,
    }
    if transcribed is not None:
        result["transcript"] = transcribed
        result["network_attempts"] = (summary.get("network_attempts") or 0) + (
            transcribed.get("network_attempts") or 0)
        result["network_attempt_details"] = (summary.get("network_attempt_details") or []) + (
            transcribed.get("network_attempt_details") or [])
    bad = {fmt: f.get("error", "no speech segments") for fmt, f in formats.items()
           if not f["ok"]}
    if transcribed is not None and not transcribed["ok"]:
        bad["dialogue.flac"] = f"bin/transcribe: {transcribed.get('error')}"
    if bad:
        result["error"] = "; ".join(f"sample.{fmt}: {why}" for fmt, why in bad.items())
        result["ok"] = False
    elif proc.returncode != 0:
        result["error"] = f"diarize {exit_text(proc.returncode)}: {last_line(proc.stderr)}"
    elif result["network_attempts"]:
        result["ok"] = False
        result["error"] = (f"the programs made {result['network_attempts']} connection "
                           f"attempt(s) (first: {result['network_attempt_details'][0]}); an "
                           "isolated host must see none")
    return result


TRANSCRIBE_FORMATS = ("json", "srt", "vtt", "txt", "rttm")


def transcribe(prefix: Path, block_network: bool) -> dict[str, Any]:
    """``PREFIX/bin/transcribe`` on ``smoke/dialogue.flac``, every format: what it heard."""
    sample = prefix / "smoke" / "dialogue.flac"
    if not sample.is_file():
        return {"ok": False, "error": f"sample not found: {sample}"}
    out = Path(tempfile.mkdtemp(prefix="pyannote-bundle-smoke-asr-"))
    try:
        try:
            proc, summary = run_program(
                [str(prefix / "bin" / "transcribe"), "--format", ",".join(TRANSCRIBE_FORMATS),
                 "--output-dir", str(out), str(sample)], block_network)
        except SmokeError as exc:
            return {"ok": False, "error": str(exc)}
        outputs = {fmt: out / f"{sample.name}.{fmt}" for fmt in TRANSCRIBE_FORMATS}
        missing = [fmt for fmt, path in outputs.items() if not path.is_file()]
        if proc.returncode != 0 or missing:
            failure = next((f["error"] for f in summary.get("failures", [])), None)
            return {"ok": False, "error": failure or f"exit {proc.returncode}, no "
                                                     f"{', '.join(missing)} written",
                    "network_attempts": summary.get("network_attempts")}
        data = json.loads(outputs["json"].read_text())
        segments = data.get("segments") or []
        text = " ".join(s["text"].strip() for s in segments).strip()
        words = [w for s in segments for w in s.get("words") or []]
        return {"ok": bool(text) and all(w.get("speaker") for w in words),
                "error": None if text else "no words recognised in real speech",
                "text": text, "words": len(words),
                "speakers": len({s["speaker"] for s in segments}),
                "language": data.get("language"), "segments": len(segments),
                "formats": sorted(fmt for fmt, p in outputs.items() if p.stat().st_size),
                "seconds": summary.get("wall_seconds"),
                "load_seconds": summary.get("load_seconds"),
                "network_attempts": summary.get("network_attempts"),
                "network_attempt_details": summary.get("network_attempt_details", [])}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    result: dict[str, Any]
    try:
        parser = _Parser(description="Offline smoke test: bin/diarize on the samples.")
        parser.add_argument("--prefix", type=Path, required=True)
        parser.add_argument("--guard-sockets", action="store_true")
        parser.add_argument("--probe", action="append", default=[], metavar="HOST:PORT")
        args = parser.parse_args(argv)
        if args.guard_sockets:
            guard_sockets()
        probes = {a: probe(a) for a in dict.fromkeys(args.probe)}
        result = smoke(args.prefix.resolve(), args.guard_sockets)
        result["network_probes"] = probes
        if args.guard_sockets:
            result["isolation"] = "socket guard"
    except SmokeError as exc:
        result = {"ok": False, "error": str(exc)}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
