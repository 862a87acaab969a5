"""pyannote's known traps, as data, with the checks shared by build and verify.

Each trap has an id (what goes wrong is said beside it) and a check that raises TrapError
with a message that names the file or pin and the fix. See KNOWLEDGE.md for where each was met.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bundler.errors import TrapError

# The id of each trap (the [id] of a TrapError), and what goes wrong:
TRAPS = frozenset({
    # pyannote picks the embedding loader by substring of the path: without 'pyannote' in it,
    # 'speechbrain', 'nvidia' or 'wespeaker' anywhere in the path routes it to another loader
    # (ONNX: INVALID_PROTOBUF)
    "loader-routing",
    # 3.x resolves relative model paths against the current directory, not the config's folder
    "relative-path",
    # a Hub id left in the config makes pyannote reach for the Hub offline
    "hub-id",
    # a missing local path is taken for a Hub id (HFValidationError / 'NoneType' has no
    # attribute 'eval')
    "missing-file",
    # a model file that differs from the bundle's manifest
    "checksum",
    # huggingface-hub >= 1.0 removed use_auth_token, which pyannote 3.x passes
    "hf-hub-1",
    # torchaudio 2.9 removed AudioMetaData: pyannote 3.x fails on import
    "torchaudio-2.9",
    # torch >= 2.6 with lightning >= 2.6 loads checkpoints weights_only: UnpicklingError on
    # pyannote checkpoints
    "weights-only",
    # pyannote 4.x always loads a PLDA and reaches for the Hub without a local plda folder
    "missing-plda",
    # pyannote 4.x reads files only through torchcodec and the host's FFmpeg, 3.x not
    # m4a/mp4/webm: bin/diarize decodes with soundfile and PyAV, which the lock must hold
    "decoders",
    # a faster-whisper model folder without model.bin, config.json or a vocabulary (or with
    # one of them damaged): ctranslate2 cannot load it (bundler.asr)
    "asr-files",
    # a model.bin that is another CTranslate2 model than a WhisperSpec: faster-whisper cannot
    # load it
    "asr-not-whisper",
    # no tokenizer.json beside the model: faster-whisper fetches openai/whisper-* from the
    # Hub at run time (offline: 18 DNS attempts, then failure)
    "asr-tokenizer",
    # a model that is not 80-mel (large-v3, large-v3-turbo, distil-large-v3: 128) without a
    # preprocessor_config.json saying so: faster-whisper computes 80 mel bins and fails
    # ('Invalid input features shape: expected (1, 128, 3000)')
    "asr-mel-bins",
    # a bundle with a speech-recognition model whose lock has no faster-whisper: bin/transcribe
    # would fail on the isolated host at its first file
    "asr-runtime",
})

MODEL_KEYS = ("segmentation", "embedding", "plda")
_FILE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".onnx", ".safetensors", ".npz", ".yaml"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")


def _fail(trap: str, message: str) -> TrapError:
    if trap not in TRAPS:  # a check, not an assert: it must hold under python -O too
        raise ValueError(f"unknown trap id {trap!r}")
    return TrapError(trap, message)


def check_config(params: Mapping[str, Any], *, base: Path, sha256: Mapping[str, str],
                 hash_file: Any = None, pyannote_major: int = 3) -> list[str]:
    """Lint a rendered 3.1-format config's ``pipeline.params``; returns the checks passed.

    ``sha256`` maps each absolute model path to the hash the manifest records;
    ``hash_file`` (path -> hex) checks the bytes when given.
    """
    passed = []
    for key in MODEL_KEYS:
        value = params.get(key)
        if value is None:
            if key == "plda" and pyannote_major >= 4:
                raise _fail("missing-plda", "pyannote.audio 4.x needs pipeline.params.plda "
                            "to name a local folder with xvec_transform.npz and plda.npz")
            continue
        if isinstance(value, Mapping):
            passed.append(_check_folder(key, value, sha256, hash_file))
            continue
        if not isinstance(value, str):
            continue
        if value.startswith("$model/"):
            raise _fail("relative-path", f"pipeline.params.{key} is '{value}': in an install "
                        "config it must be an absolute {checkpoint, subfolder} mapping")
        if not value.startswith("/"):
            if (_HUB_ID.match(value) and Path(value).suffix not in _FILE_SUFFIXES
                    and not (base / value).exists()):
                raise _fail("hub-id", f"pipeline.params.{key} is '{value}', a Hub id: offline "
                            "it must be a local path")
            raise _fail("relative-path", f"pipeline.params.{key} is the relative path "
                        f"'{value}': write it absolute (pyannote 3.x resolves it against the "
                        "current directory)")
        path = Path(value)
        if key == "embedding" and "pyannote" not in value:
            routed = next((w for w in ("speechbrain", "nvidia", "wespeaker") if w in value), None)
            why = f"it contains '{routed}', so" if routed else "without it"
            raise _fail("loader-routing", f"the embedding path {value} lacks 'pyannote': {why} "
                        "pyannote may load it with the wrong loader; name the file "
                        "pyannote_model_<name>.bin")
        if not path.exists():
            raise _fail("missing-file", f"pipeline.params.{key}: {value} does not exist")
        expected = sha256.get(value)
        if hash_file is not None and expected is not None and path.is_file():
            actual = hash_file(path)
            if actual != expected:
                raise _fail("checksum", f"{value}: sha256 {actual} differs from the "
                            f"manifest's {expected}")
        passed.append(key)
    return passed


def _check_folder(key: str, value: Mapping[str, Any], sha256: Mapping[str, str],
                  hash_file: Any) -> str:
    """A ``{checkpoint, subfolder}`` entry: absolute, present, complete, and hashing right."""
    checkpoint, sub = str(value.get("checkpoint", "")), str(value.get("subfolder", ""))
    if not checkpoint.startswith("/"):
        raise _fail("relative-path", f"pipeline.params.{key}.checkpoint is '{checkpoint}': "
                    "write it absolute")
    folder = Path(checkpoint) / sub
    if not folder.is_dir():
        raise _fail("missing-file", f"pipeline.params.{key}: {folder} is not a folder")
    needed = ("xvec_transform.npz", "plda.npz") if key == "plda" else ("pytorch_model.bin",)
    for name in needed:
        if not (folder / name).is_file():
            raise _fail("missing-plda" if key == "plda" else "missing-file",
                        f"pipeline.params.{key}: {folder / name} is missing")
    if hash_file is not None:
        for path, expected in sha256.items():
            if Path(path).parent == folder and Path(path).is_file():
                actual = hash_file(Path(path))
                if actual != expected:
                    raise _fail("checksum", f"{path}: sha256 {actual} differs from the "
                                f"manifest's {expected}")
    return key


def check_pins(pins: Mapping[str, str], asr: bool = False) -> None:
    """Lint a lock's pins (name -> version) for the version traps of pyannote 3.x / 4.x;
    ``asr``: the bundle carries a speech-recognition model, so the lock needs faster-whisper."""
    from packaging.version import Version

    pa = pins.get("pyannote-audio")
    if pa is None:
        return
    major = Version(pa).major
    if major == 3:
        hub = pins.get("huggingface-hub")
        if hub and Version(hub).major >= 1:
            raise _fail("hf-hub-1", f"pyannote.audio {pa} with huggingface-hub {hub}: pin "
                        "huggingface-hub<1.0")
        ta = pins.get("torchaudio")
        if ta and Version(ta).release[:2] >= (2, 9):
            raise _fail("torchaudio-2.9", f"pyannote.audio {pa} with torchaudio {ta}: pin "
                        "torchaudio<2.9 and the matching torch")
    torch = pins.get("torch")
    lightnings = [pins[n] for n in ("lightning", "pytorch-lightning") if n in pins]
    if torch and Version(torch).release[:2] >= (2, 6) and major == 3:
        if any(Version(v).release[:2] >= (2, 6) for v in lightnings):
            raise _fail("weights-only", f"pyannote.audio {pa}, torch {torch} and lightning "
                        f"{max(lightnings)}: pin lightning and pytorch-lightning <2.6")
    if major == 4 and Version(pa) < Version("4.0.3"):
        raise _fail("weights-only", f"pyannote.audio {pa}: 4.0.0-4.0.2 fail to load "
                    "checkpoints with torch >= 2.6; use >= 4.0.3")
    if asr and "faster-whisper" not in pins:
        raise _fail("asr-runtime", "the bundle carries a speech-recognition model, but the "
                    "lock has no faster-whisper: bin/transcribe could not run it; add "
                    "faster-whisper (and ctranslate2) to the .in and lock again")
    missing = [name for name in ("soundfile", "av") if name not in pins]
    if missing:
        # bin/diarize decodes files itself: pyannote 4 reads files only through torchcodec
        # and the host's FFmpeg, 3.x not m4a/mp4/webm (trap 7).
        raise _fail("decoders", f"the lock has no {' and no '.join(missing)}: bin/diarize "
                    "decodes recordings with soundfile and av (PyAV) and needs no FFmpeg; add "
                    "both to the .in and lock again")


def check_repo_config(params: Mapping[str, Any]) -> None:
    """Lint a pipeline repo's ``pipeline.params`` (community-1 form) at build time."""
    if "plda" not in params:
        raise _fail("missing-plda", "the pipeline's config.yaml names no plda: pyannote.audio "
                    "4.x would fetch one from the Hub; add `plda: $model/plda` and ship the "
                    "plda folder")
    for key in MODEL_KEYS:
        value = params.get(key)
        if (isinstance(value, str) and _HUB_ID.match(value)
                and Path(value).suffix not in _FILE_SUFFIXES):
            raise _fail("hub-id", f"pipeline.params.{key} is '{value}', a Hub id: bundle it "
                        "in the repo and name it $model/<folder>")


def check_pipeline(pipeline: str, pyannote_audio: str) -> None:
    """Refuse a recipe format on a pyannote.audio generation that cannot run it offline."""
    from packaging.version import Version

    major = Version(pyannote_audio).major
    if pipeline == "pyannote-3.1" and major >= 4:
        raise _fail("missing-plda", f"the 3.1 recipe format on pyannote.audio {pyannote_audio}: "
                    "4.x always loads a PLDA, which the 3.1 models do not include, and would "
                    "reach for the Hub; use the speaker-diarization-community-1 recipe, or "
                    "pin pyannote.audio 3.x")
    if pipeline == "community-1" and major < 4:
        raise _fail("missing-plda", f"the community-1 recipe needs pyannote.audio >= 4.0.3 "
                    f"(VBx clustering with a PLDA); the lock pins {pyannote_audio}")
