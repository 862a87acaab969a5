"""Stage: the small files of a bundle, rendered from ``templates/`` (Jinja).

Everything here is a pure function of its inputs: no clock, no host paths, so two builds
from the same inputs render the same bytes.
"""

from __future__ import annotations

import json
import math
import random
import struct
import wave
from collections.abc import Mapping
from importlib import resources
from io import BytesIO
from typing import Any

import jinja2
import yaml

from bundler.data import data_dir
from bundler.errors import InputError
from bundler.runtime.smoke_voiceprints import SAMPLE_TURNS
from bundler.spec import Spec
from bundler.traps import check_repo_config

DEFAULT_PREFIX = "/opt/pyannote-bundle"


def _env() -> jinja2.Environment:
    root = data_dir("templates")
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: root.joinpath(name).read_text()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def runtime_bytes(name: str) -> bytes:
    """A program shipped verbatim from ``bundler/runtime/`` (diarize.py, smoke.py,
    configure.py): the code that runs on the isolated host."""
    return resources.files("bundler.runtime").joinpath(name).read_bytes()


def sample_bytes(fmt: str) -> bytes:
    """The smoke sample in ``fmt``: wav is rendered here; the compressed copies are
    committed files (made from the same wav by tests/media.py), so that no encoder's
    version decides a bundle's bytes."""
    if fmt == "wav":
        return sample_wav()
    return asset_bytes(f"sample.{fmt}")


def asset_bytes(name: str) -> bytes:
    """A committed file of ``bundler/assets/`` (the transcription smoke sample)."""
    return resources.files("bundler.assets").joinpath(name).read_bytes()


def config_yaml(spec: Spec, model_paths: Mapping[str, str]) -> str:
    """models/config.yaml for the 3.1 recipe: the spec's config with the model paths set.

    ``model_paths`` maps a role (segmentation, embedding) to a path relative to the bundle
    root, e.g. ``models/pyannote_model_segmentation-3.0.bin``.
    """
    config: dict[str, Any] = json.loads(json.dumps(spec.config))  # deep copy
    params = config.setdefault("pipeline", {}).setdefault("params", {})
    for role, path in model_paths.items():
        params[role] = path
    return _env().get_template("config.yaml.j2").render(config=config, recipe=spec.name)


def config_yaml_from_repo(spec: Spec, repo_config: str, folder: str) -> str:
    """models/config.yaml for a pipeline repo (community-1): its own config.yaml with each
    ``$model/<sub>`` spelled out as ``{checkpoint: <folder>, subfolder: <sub>}``, the form
    pyannote 4 expands it to itself, so that it can be made absolute for a prefix.

    ``folder`` is where the repo's files lie, relative to the bundle root.
    """
    try:
        config = yaml.safe_load(repo_config)
    except yaml.YAMLError as exc:
        raise InputError(f"the pipeline repo's config.yaml is not YAML: {exc}") from None
    params = config.get("pipeline", {}).get("params") if isinstance(config, dict) else None
    if not isinstance(params, dict):
        raise InputError("the pipeline repo's config.yaml has no pipeline.params")

    def expand(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: expand(v) for k, v in node.items()}
        if isinstance(node, str) and node.startswith("$model/"):
            sub = node[len("$model/"):]
            if "@" in sub or not sub:
                raise InputError(f"config.yaml entry '{node}': a revision or an empty "
                                 "subfolder cannot be bundled")
            return {"checkpoint": folder, "subfolder": sub}
        return node

    expanded = expand(config)
    check_repo_config(expanded["pipeline"]["params"])
    return _env().get_template("config.yaml.j2").render(config=expanded, recipe=spec.name)


def install_sh(bundle_name: str, spec: Spec) -> str:
    return _env().get_template("install.sh.j2").render(
        bundle_name=bundle_name, target=spec.target,
        default_prefix=f"{DEFAULT_PREFIX}/{spec.name}",
    )


def readme_txt(bundle_name: str, spec: Spec, tool_version: str) -> str:
    return _env().get_template("README.txt.j2").render(
        bundle_name=bundle_name, target=spec.target, description=spec.description or spec.name,
        tool_version=tool_version,
    )


def manifest_json(manifest: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, fixed indentation, trailing newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def sample_wav(seconds: float = 10.0, rate: int = 16000) -> bytes:
    """A deterministic two-voice sample: alternating harmonic 'speakers' with pauses.

    Synthetic on purpose: no licence to track, and it exercises segmentation, embedding
    and clustering end to end. Decoded by soundfile in the smoke test (no FFmpeg).
    """
    rng = random.Random(0)
    turns = SAMPLE_TURNS  # the smoke test enrolls the first turn's voice (bin/enroll)
    n = int(seconds * rate)
    frames = bytearray()
    for i in range(n):
        t = i / rate
        x = rng.gauss(0.0, 0.003)
        for start, end, f0 in turns:
            if start <= t < end:
                env = 0.5 + 0.5 * math.sin(2 * math.pi * 3.0 * t)  # syllable-like rhythm
                x += env * sum(0.25 / k * math.sin(2 * math.pi * f0 * k * t) for k in (1, 2, 3))
        frames += struct.pack("<h", max(-32767, min(32767, int(x * 20000))))
    buf = BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    return buf.getvalue()
