"""enroll: save a known voice, so that bin/diarize and bin/transcribe can name it.

    PREFIX/bin/enroll NAME CLIP... --voiceprints DIR [--replace]
    PREFIX/bin/enroll --list --voiceprints DIR
    PREFIX/bin/enroll --remove NAME --voiceprints DIR

Shipped verbatim in every bundle (``runtime/enroll.py``) and run by ``PREFIX/bin/enroll``
with the install's venv, offline as every program here (``offline.py``). Each CLIP is
decoded without FFmpeg (``audio.py``) and diarized by the install's own pipeline
(``diarize.load_from_args``, with the same ``--engine``): a clip must hold one voice and at
least ``voiceprints.MIN_SPEECH_S`` of speech, or the whole enrollment is refused in one
line. The voice's embedding is the pipeline's centroid of that one speaker: the space
``--voiceprints`` compares the speakers of a recording in. ``DIR/NAME.json`` keeps the
embedding, the embedding model, each clip's sha256 and seconds, never audio
(``voiceprints.py``). ``--remove`` deletes the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

if not __package__:  # run as a file: its folder is the package (runtime/_bootstrap.py)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    __package__ = __import__("_bootstrap").package(__file__)

from . import audio, common, diarize, exits, voiceprints
from .offline import NetworkAudit, go_offline

EPILOG = ("examples:\n"
          "  enroll alice alice-1.wav alice-2.m4a --voiceprints /srv/voices\n"
          "  diarize meeting.m4a --voiceprints /srv/voices     # alice named in the RTTM\n"
          "  enroll --list --voiceprints /srv/voices\n"
          "  enroll --remove alice --voiceprints /srv/voices\n"
          "\nexit codes:\n"
          f"  {exits.EXIT_OK:>3}  done\n"
          f"  {exits.EXIT_INTERNAL:>3}  internal error (rerun with --debug)\n"
          f"  {exits.EXIT_USAGE:>3}  bad usage: arguments, a clip refused (silent, more than "
          "one voice, too short), a bad voiceprint folder\n"
          f"  {exits.EXIT_CANNOT_RUN:>3}  nothing could run: config, model, pipeline or "
          "device unusable, the folder cannot be written\n"
          f"  {exits.EXIT_INTERRUPTED:>3}  interrupted\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise exits.RunError(f"{message} (see {self.prog} --help)", exits.EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="enroll", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Save a known voice from clips of it alone (at least "
                            f"{voiceprints.MIN_SPEECH_S} s of speech each), offline, with "
                            "this bundle's pipeline;\nthen diarize/transcribe --voiceprints "
                            "DIR name that speaker. A voiceprint holds an embedding,\nnever "
                            "audio; it is biometric data: DIR is made 0700, each file 0600.",
                epilog=EPILOG)
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="the voice's name, as outputs will show it (letters, digits, ' ._-')")
    p.add_argument("clips", nargs="*", metavar="CLIP", help="recordings of that voice alone")
    p.add_argument("--voiceprints", type=Path, required=True, metavar="DIR",
                   help="the folder of voiceprints (made 0700 when new)")
    p.add_argument("--replace", action="store_true",
                   help="replace a voiceprint of that name (default: refuse)")
    p.add_argument("--list", action="store_true", help="list the voiceprints in DIR")
    p.add_argument("--remove", metavar="NAME", help="delete NAME's voiceprint from DIR")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    diarize.add_pipeline_arguments(p, matching=False)
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--block-network", action="store_true",
                   help="refuse every connection attempt in-process (for hosts that cannot "
                        "disable the network otherwise); attempts are counted either way")
    p.add_argument("--debug", action="store_true", help="tracebacks for failures")
    return p


def check(args: argparse.Namespace) -> str:
    """What is asked: ``enroll``, ``list`` or ``remove``; RunError(EXIT_USAGE) otherwise."""
    if args.list or args.remove:
        if args.list and args.remove:
            raise exits.RunError("--list and --remove exclude each other", exits.EXIT_USAGE)
        if args.name or args.clips:
            raise exits.RunError(f"--{'list' if args.list else 'remove'} takes no NAME or "
                                 "CLIP", exits.EXIT_USAGE)
        if args.remove:
            voiceprints.check_name(args.remove)
        return "list" if args.list else "remove"
    if not args.name or not args.clips:
        raise exits.RunError("give a NAME and at least one CLIP (or --list, --remove NAME)",
                             exits.EXIT_USAGE)
    voiceprints.check_name(args.name)
    diarize.check_pipeline_arguments(args)
    for clip in args.clips:
        if not Path(clip).is_file():
            raise exits.RunError(f"{common.shown(clip)}: no such file", exits.EXIT_USAGE)
    if not args.replace and voiceprints.path_of(args.voiceprints, args.name).exists():
        raise exits.RunError(f"a voiceprint named '{args.name}' exists in {args.voiceprints}: "
                             "--replace it, or --remove it first", exits.EXIT_USAGE)
    return "enroll"


def voice_of(loaded: diarize.Loaded, model: voiceprints.EmbeddingModel, name: str,
             clips: Sequence[tuple[Path, str]], say: Any,
             max_seconds: float = audio.MAX_DURATION_S) -> voiceprints.Voiceprint:
    """The voiceprint ``name`` from ``clips`` (each ``(path, the name shown for it)``), with
    the pipeline ``loaded`` of the install whose embedding model is ``model``
    (``voiceprints.installed_model``): each clip decoded and diarized, refused unless it
    holds one voice (RunError, EXIT_USAGE, one line naming the clip). ``bin/serve``'s
    workers enroll through here too, with their loaded pipeline."""
    vectors, weights, kept = [], [], []
    for path, label in clips:
        try:
            waveform = audio.decode(path, max_seconds)
        except exits.FileFailed as exc:
            raise exits.RunError(f"{label}: {exc}", exits.EXIT_USAGE) from None
        seconds = len(waveform) / audio.SAMPLE_RATE
        result = diarize.diarize_one(loaded, waveform, path.name, {}, embeddings=True)
        vector, speech = voiceprints.clip_voice(result, label)
        speech = min(speech, seconds)  # pyannote's last turn may end past the clip's end
        say(f"{label}: {seconds:.1f} s, {speech:.1f} s of speech, one voice")
        vectors.append(vector)
        weights.append(speech)
        kept.append(voiceprints.Clip(common.sha256_file(path), round(seconds, 3),
                                     round(speech, 3)))
    return voiceprints.Voiceprint(name, model, voiceprints.combine(vectors, weights),
                                  tuple(kept), voiceprints.today())


def enroll(args: argparse.Namespace, say: Any) -> voiceprints.Voiceprint:
    """Each clip decoded and diarized, refused unless it holds one voice, then the voice
    saved: every clip is checked before anything is written."""
    model = voiceprints.installed_model(diarize.default_config().parent)  # before loading
    loaded = diarize.load_from_args(args, say)
    vp = voice_of(loaded, model, args.name, [(Path(c), common.shown(c)) for c in args.clips],
                  say)
    voiceprints.save(args.voiceprints, vp, replace=args.replace)
    return vp


def run(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    action = check(args)
    folder: Path = args.voiceprints
    if action == "list":
        prints = voiceprints.load_folder(folder) if any(folder.glob("*.json")) else []
        return {"action": "list", "voiceprints": [
            {"name": vp.name, "embedding_model": vp.model.as_dict(), "clips": len(vp.clips),
             "speech_seconds": round(sum(c.speech_seconds for c in vp.clips), 3),
             "created": vp.created} for vp in prints]}
    if action == "remove":
        path = voiceprints.remove(folder, args.remove)
        return {"action": "remove", "name": args.remove, "path": str(path)}
    t0 = time.perf_counter()
    vp = enroll(args, say)
    return {"action": "enroll", "name": vp.name,
            "path": str(voiceprints.path_of(folder, vp.name)),
            "embedding_model": vp.model.as_dict(), "clips": len(vp.clips),
            "speech_seconds": round(sum(c.speech_seconds for c in vp.clips), 3),
            "seconds": round(time.perf_counter() - t0, 3)}


def render(report: dict[str, Any]) -> str:
    if report["action"] == "list":
        rows = report["voiceprints"]
        if not rows:
            return "no voiceprints"
        return "\n".join(f"{r['name']}\t{r['clips']} clip(s), {r['speech_seconds']:.1f} s of "
                         f"speech, {r['created']}, {r['embedding_model']['repo']}"
                         for r in rows)
    if report["action"] == "remove":
        return f"removed {report['name']} ({report['path']})"
    return (f"enrolled {report['name']}: {report['clips']} clip(s), "
            f"{report['speech_seconds']:.1f} s of speech -> {report['path']}")


def main(argv: Sequence[str] | None = None) -> int:
    go_offline()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(argv)
    except exits.RunError as exc:
        print(f"enroll: error: {exc}", file=sys.stderr)
        return exc.code
    audit = NetworkAudit(block=args.block_network)
    sys.addaudithook(audit)

    def say(line: str) -> None:
        if not args.quiet:
            print(f"enroll: {line}", file=sys.stderr, flush=True)

    # stdout carries the result alone: what the libraries print goes to stderr meanwhile.
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        report = run(args, say)
    except exits.RunError as exc:
        print(f"enroll: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("enroll: interrupted (nothing was written)", file=sys.stderr)
        return exits.EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"enroll: internal error: {type(exc).__name__}: {common.one_line(exc)} "
              "(rerun with --debug)", file=sys.stderr)
        return exits.EXIT_INTERNAL
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
    # Counted as bin/diarize counts them (its summary's network_attempts): none is expected.
    report["network_attempts"] = len(audit.attempts)
    if audit.attempts:
        print(f"enroll: network: {len(audit.attempts)} connection attempt(s), first: "
              f"{audit.attempts[0]}", file=sys.stderr)
    print(json.dumps(report) if args.json else render(report), flush=True)
    return exits.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
