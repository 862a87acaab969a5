"""Every path inside a bundle and an install prefix, named once.

The builder and the verifier import these names, so the two sides cannot drift. The names
the bundle's installer reads on the isolated host (``runtime/install.py``, which cannot
import the tool) are taken from it, and the offline variables from the runtime's shared
module; tests/test_contract.py checks the copies a program must keep for itself.
The files beside a tarball (sidecar, signature, volumes) are bundler.bundlefile's.
"""

from __future__ import annotations

from bundler.runtime import install as _installer
from bundler.runtime.offline import OFFLINE_ENV as _RUNTIME_OFFLINE_ENV

# --- inside the bundle (relative to its single top-level folder) ---------------
CHECKSUMS: str = _installer.CHECKSUMS
MANIFEST: str = _installer.MANIFEST
SBOM = "sbom.cdx.json"  # CycloneDX 1.6: every wheel and model file with its sha256
INSTALL_SH = "install.sh"
README = "README.txt"
# writes the absolute config, env file and bin/diarize for a prefix
CONFIGURE: str = _installer.CONFIGURE
LOCK: str = _installer.LOCK  # hashes of the exact wheels shipped in wheels/
WHEELS_DIR: str = _installer.WHEELS
MODELS_DIR = "models"
CONFIG = f"{MODELS_DIR}/config.yaml"
SMOKE_DIR = "smoke"
SMOKE_SCRIPT: str = _installer.SMOKE
SAMPLE_AUDIO = f"{SMOKE_DIR}/sample.wav"
# The smoke test diarizes the sample in each of these containers, through bin/diarize.
SAMPLES = {"wav": SAMPLE_AUDIO, "mp3": f"{SMOKE_DIR}/sample.mp3",
           "m4a": f"{SMOKE_DIR}/sample.m4a"}
EXPECTED: str = _installer.EXPECTED
# Real speech (two synthetic voices, known text) that bin/transcribe reads in the smoke test;
# shipped only in bundles that carry an ASR model.
DIALOGUE = f"{SMOKE_DIR}/dialogue.flac"
RUNTIME_DIR = "runtime"  # code that runs on the isolated host, shipped verbatim
DIARIZE_SCRIPT = f"{RUNTIME_DIR}/diarize.py"
# Speaker-labelled transcripts (bin/transcribe, installed when the bundle has an ASR model),
# and the word-to-speaker logic and file formats it uses.
TRANSCRIBE_SCRIPT = f"{RUNTIME_DIR}/transcribe.py"
TRANSCRIPT_MODULE = f"{RUNTIME_DIR}/transcript.py"
# Known voices: bin/enroll saves them, and bin/diarize/bin/transcribe --voiceprints match them.
ENROLL_SCRIPT = f"{RUNTIME_DIR}/enroll.py"
VOICEPRINTS_MODULE = f"{RUNTIME_DIR}/voiceprints.py"
# What computes the pipeline's models (--engine); the installer's ONNX export for it.
ENGINES_MODULE = f"{RUNTIME_DIR}/engines.py"
EXPORT_SCRIPT: str = _installer.EXPORT
# What every program that reads recordings shares: the per-file loop and its options, and
# the rooms it goes through (one module each), the small helpers, and the bootstrap that
# lets a program run as a file import them (runtime/_bootstrap.py).
RECORDINGS_MODULE = f"{RUNTIME_DIR}/recordings.py"
SHARED_MODULES = ("offline.py", "inputs.py", "audio.py", "devices.py", "outputs.py",
                  "exits.py", "common.py", "_bootstrap.py")
# bin/serve (runtime/serve.py): the OpenAI-compatible service, and its rooms: the HTTP side,
# the worker processes, the job store (embedded, and shared in PostgreSQL), the answers'
# formats, the streamed uploads.
SERVE_SCRIPT = f"{RUNTIME_DIR}/serve.py"
SERVICE_MODULES = ("service.py", "pool.py", "worker.py", "jobstore.py", "pgstore.py", "stores.py",
                   "responses.py", "uploads.py", "page.py", "voices.py")
# The page bin/serve answers GET / with (runtime/page.py serves it): plain files, no build.
PAGE_FILES = ("page/index.html", "page/app.js", "page/app.css", "page/icon.svg")
# Checks the host has the shared libraries the wheels need (manifest host_requirements).
HOSTLIBS_SCRIPT: str = _installer.HOSTLIBS
# The one installer: install.sh runs it on the isolated host, verify runs it too.
INSTALLER = f"{RUNTIME_DIR}/install.py"
# The smoke test's voiceprint check (bin/enroll, then bin/diarize --voiceprints): smoke.py
# imports it from runtime/, as it imports the installer.
SMOKE_VOICEPRINTS = f"{RUNTIME_DIR}/smoke_voiceprints.py"
# Every program shipped verbatim from bundler/runtime/: its path in the bundle -> its file
# there.
PROGRAMS = {
    CONFIGURE: "configure.py",
    DIARIZE_SCRIPT: "diarize.py",
    RECORDINGS_MODULE: "recordings.py",
    **{f"{RUNTIME_DIR}/{name}": name for name in SHARED_MODULES},
    ENGINES_MODULE: "engines.py",
    EXPORT_SCRIPT: "export.py",
    TRANSCRIBE_SCRIPT: "transcribe.py",
    TRANSCRIPT_MODULE: "transcript.py",
    ENROLL_SCRIPT: "enroll.py",
    VOICEPRINTS_MODULE: "voiceprints.py",
    SERVE_SCRIPT: "serve.py",
    **{f"{RUNTIME_DIR}/{name}": name for name in SERVICE_MODULES},
    **{f"{RUNTIME_DIR}/{name}": name for name in PAGE_FILES},
    HOSTLIBS_SCRIPT: "hostlibs.py",
    INSTALLER: "install.py",
    SMOKE_SCRIPT: "smoke.py",
    SMOKE_VOICEPRINTS: "smoke_voiceprints.py",
}
# The code the bundle runs on the isolated host: the programs above and install.sh. The
# manifest's ``programs`` and the SBOM name each one with its sha256.
HOST_PROGRAMS = frozenset({*PROGRAMS, INSTALL_SH})

EXECUTABLES = frozenset({INSTALL_SH})

# --- inside an install prefix (the installer, runtime/install.py, names its own) -----
PREFIX_CONFIG = "config.yaml"  # absolute paths, rendered for the release
PREFIX_DIARIZE = "bin/diarize"  # written by configure.py: runtime/diarize.py with the venv
PREFIX_TRANSCRIBE = "bin/transcribe"  # the same for runtime/transcribe.py, with an ASR model
PREFIX_SERVE = "bin/serve"  # the same for runtime/serve.py, in every install
PREFIX_ENROLL = "bin/enroll"  # the same for runtime/enroll.py (voiceprints), in every install
PREFIX_SYSTEMD_UNIT = "share/systemd/pyannote-serve.service"  # bin/serve as a service

# The offline variables: a bundled environment never reaches for the network. One list, in
# the program that runs on the isolated host (configure.py reads it from there too).
OFFLINE_ENV: dict[str, str] = dict(_RUNTIME_OFFLINE_ENV)
