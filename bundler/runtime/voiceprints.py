"""Voiceprints: a known voice saved once (``bin/enroll``), then found among the speakers
``bin/diarize`` and ``bin/transcribe`` diarize (``--voiceprints DIR``).

Where the embeddings come from (pyannote.audio 3.4.0's and 4.0.7's sources):

- **a diarized speaker's centroid**, in the pipeline's own embedding space: pyannote 4's
  ``SpeakerDiarization.apply`` returns a ``DiarizeOutput`` whose ``speaker_embeddings`` row
  ``i`` is the centroid of ``speaker_diarization.labels()[i]`` (VBx: the mean of the chunk
  embeddings weighted by each chunk's responsibility; zeros for a speaker that clustering
  did not make, when the speaker count asked for more); pyannote 3.x returns
  ``(annotation, centroids)`` for ``pipeline(file, return_embeddings=True)`` in the same
  order (agglomerative clustering: the mean of the cluster's embeddings), and
  ``np.zeros((0, dimension))`` when nobody speaks. ``diarize.diarize_one(...,
  embeddings=True)`` asks for them either way.
- **an enrollment clip's embedding**, with the same model computed the same way: the
  clip goes through the same pipeline (``diarize_one``), whose ``get_embeddings`` computes
  the embedding of each chunk under each local speaker's mask with ``pipeline._embedding``;
  that method is exactly what ``engines.apply`` replaces (``use_fast_embeddings``: the
  WeSpeaker trunk once per chunk, in PyTorch or onnxruntime, the masks and the pooling
  pyannote's own), so a voiceprint and the speakers it is compared with come from the same
  engine's code. The diarization of the clip also says whether it holds one voice, and
  how many seconds of speech; the clip's centroid is its embedding. Several clips give
  the mean of their (unit) embeddings, weighted by their seconds of speech.

The file, ``DIR/NAME.json`` (no audio): ``name``, ``embedding_model`` (``repo``,
``commit``, ``sha256`` of its weights, from the install's ``manifest.json``), ``embedding``,
``clips`` (each clip's ``sha256``, ``seconds`` and ``speech_seconds``), ``created`` (UTC
date). A voiceprint is biometric data: the folder is made 0700 and each file is written
0600, atomically. A folder is loaded whole or refused: a file of another embedding model
(its vectors would compare with nothing), two files of one name, a file that cannot be
read or parsed; each is one line and ``EXIT_USAGE``.

Matching: the cosine similarity of each diarized speaker's centroid with each voiceprint.
By default each name goes to at most one speaker and each speaker takes at most one name
(the one-to-one assignment with the largest total similarity, among pairs at or above the
threshold: ``assign``); ``--no-exclusive`` gives each speaker its most similar voiceprint,
two speakers possibly the same name. Below ``--match-threshold`` no name is given.

Standard library only, Python 3.9 (numpy arrays are read through ``tolist``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .common import one_line, shown, write_atomic
from .exits import EXIT_CANNOT_RUN, EXIT_USAGE, RunError

FORMAT = 1
SUFFIX = ".json"
# Where pyannote itself separates speakers in this embedding space: pyannote/speaker-
# diarization-3.1 clusters the WeSpeaker ResNet34-LM embeddings (unit-normalised, centroid
# linkage, Euclidean) with a tuned threshold of 0.7045654963945799 (its config.yaml; this
# project's 3.1 recipe), and for unit vectors d = sqrt(2 - 2 cos): clusters less similar than
# cos = 1 - d**2 / 2 = 0.7518 are kept apart as different speakers. A name given below that
# would name a speaker the pipeline holds to be someone else. Not measured on the shipped
# weights (no public copy could be run here): calibrate it on the site's own voices
# (benchmarks/voiceprints.py --calibrate; docs/voiceprints.md).
DEFAULT_THRESHOLD = 0.75
# Below this much speech, one clip's embedding is too noisy to stand for a voice.
MIN_SPEECH_S = 1.2
# The longest clip bin/serve enrolls (a reference or a stored voice's clip): OpenAI asks for
# 2-10 s references and pyannoteAI takes up to 30 s; a worker's time is shared.
MAX_CLIP_S = 30.0
# A name is a file name, an RTTM field (spaces become "_") and a subtitle label: letters,
# digits, and " ._-" inside, at most 64 characters. A pipeline label is refused as a name,
# so that an output never leaves the reader guessing whether a speaker was identified.
NAME = re.compile(r"[^\W_](?:[\w .-]{0,62}[^\W])?")
LABEL = re.compile(r"SPEAKER_\d+", re.IGNORECASE)


def check_name(name: str) -> str:
    """``name`` if it can be a voiceprint's name; RunError(EXIT_USAGE) saying why not."""
    if not NAME.fullmatch(name):
        raise RunError(f"'{shown(name, 80)}' cannot be a voiceprint name: use letters, digits "
                       "and ' ._-' inside, at most 64 characters", EXIT_USAGE)
    if LABEL.fullmatch(name):
        raise RunError(f"'{name}' is how the pipeline labels unknown speakers: choose another "
                       "name", EXIT_USAGE)
    return name


# --- the embedding model a voiceprint belongs to ------------------------------------------
@dataclass(frozen=True)
class EmbeddingModel:
    """The embedding model: its Hub repo, commit, and the sha256 of its weights."""

    repo: str
    commit: str
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return {"repo": self.repo, "commit": self.commit, "sha256": self.sha256}

    def __str__(self) -> str:
        return f"{self.repo}@{self.commit[:12]}"


def embedding_model(manifest: Mapping[str, Any]) -> EmbeddingModel:
    """The embedding model a manifest names: the model of role ``embedding`` (the 3.1
    recipe) and its ``.bin``, else the ``pipeline`` repo (community-1) and its
    ``embedding/`` weights. RunError(EXIT_CANNOT_RUN) when it names none."""
    models = manifest.get("models") if isinstance(manifest, Mapping) else None
    for role, wanted in (("embedding", ""), ("pipeline", "embedding/")):
        for model in models if isinstance(models, list) else []:
            if not isinstance(model, Mapping) or model.get("role") != role:
                continue
            for entry in model.get("files") or []:
                path = str(entry.get("path", "")) if isinstance(entry, Mapping) else ""
                if path.startswith(wanted) and path.endswith(".bin"):
                    return EmbeddingModel(str(model.get("repo")), str(model.get("commit")),
                                          str(entry.get("sha256")))
    raise RunError("this install's manifest.json names no embedding model: voiceprints "
                   "cannot say which model made them", EXIT_CANNOT_RUN)


def installed_model(root: Path) -> EmbeddingModel:
    """The embedding model of the install at ``root`` (``root/manifest.json``)."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {root / 'manifest.json'} (voiceprints need it): "
                       f"{one_line(exc)}", EXIT_CANNOT_RUN) from None
    return embedding_model(manifest)


# --- the file ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    """What a voiceprint keeps of one enrollment clip: never its audio."""

    sha256: str
    seconds: float
    speech_seconds: float


@dataclass(frozen=True)
class Voiceprint:
    name: str
    model: EmbeddingModel
    embedding: tuple[float, ...]
    clips: tuple[Clip, ...]
    created: str

    def summary(self) -> dict[str, Any]:
        """What may be shown of it (``bin/serve``'s answers): everything but the embedding."""
        return {"object": "voiceprint", "name": self.name,
                "embedding_model": self.model.as_dict(),
                "clips": [{"sha256": c.sha256, "seconds": c.seconds,
                           "speech_seconds": c.speech_seconds} for c in self.clips],
                "created": self.created}

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "name": self.name, "embedding_model": self.model.as_dict(),
            "embedding": list(self.embedding),
            "clips": [{"sha256": c.sha256, "seconds": c.seconds,
                       "speech_seconds": c.speech_seconds} for c in self.clips],
            "created": self.created}, indent=1) + "\n"


class Corrupt(ValueError):
    """A voiceprint file that is not one."""


def parse(text: str) -> Voiceprint:
    """A voiceprint from its file's text; Corrupt saying what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise Corrupt(f"not JSON ({one_line(exc, 80)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise Corrupt(f"not a voiceprint (format {FORMAT})")
    try:
        model = data["embedding_model"]
        vector = tuple(float(x) for x in data["embedding"])
        clips = tuple(Clip(str(c["sha256"]), float(c["seconds"]), float(c["speech_seconds"]))
                      for c in data["clips"])
        vp = Voiceprint(str(data["name"]), EmbeddingModel(str(model["repo"]),
                        str(model["commit"]), str(model["sha256"])), vector, clips,
                        str(data["created"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise Corrupt(f"a field is missing or wrong ({one_line(exc, 80)})") from None
    if not vector or not all(math.isfinite(x) for x in vector) or norm(vector) == 0:
        raise Corrupt("its embedding is empty, zero or not finite")
    return vp


def path_of(folder: Path, name: str) -> Path:
    return folder / f"{check_name(name)}{SUFFIX}"


def save(folder: Path, vp: Voiceprint, replace: bool = False) -> Path:
    """Write ``folder/NAME.json`` (0600, atomically) in ``folder`` (made 0700). An existing
    voiceprint of that name is replaced only when asked."""
    path = path_of(folder, vp.name)
    try:
        if not folder.is_dir():
            folder.mkdir(mode=0o700, parents=True)
            os.chmod(folder, 0o700)  # mkdir's mode is narrowed by the umask, never widened
        if not replace and any(p.name == path.name for p in folder.iterdir()):
            raise RunError(f"a voiceprint named '{vp.name}' exists in {folder}: --replace it, "
                           f"or --remove it first", EXIT_USAGE)
        write_atomic(path, vp.to_json(), 0o600)
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc}",
                       EXIT_CANNOT_RUN) from None
    return path


def remove(folder: Path, name: str) -> Path:
    """Delete ``folder/NAME.json`` (really: the file is unlinked)."""
    path = path_of(folder, name)
    try:
        path.unlink()
    except FileNotFoundError:
        raise RunError(f"no voiceprint named '{name}' in {folder}", EXIT_USAGE) from None
    except OSError as exc:
        raise RunError(f"cannot remove {path}: {exc.strerror or exc}",
                       EXIT_CANNOT_RUN) from None
    return path


def load_file(path: Path, model: EmbeddingModel | None = None) -> Voiceprint:
    """The voiceprint in ``path``, of ``model`` when given; RunError(EXIT_USAGE), one line,
    for a file that cannot be read, is not a voiceprint, is not named after its voice, or
    was made with another embedding model (its vectors would compare with nothing)."""
    try:
        vp = parse(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RunError(f"cannot read voiceprint {path}: {exc.strerror or exc}",
                       EXIT_USAGE) from None
    except (Corrupt, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is not a usable voiceprint: {one_line(exc, 120)}",
                       EXIT_USAGE) from None
    if vp.name != path.name[:-len(SUFFIX)]:
        raise RunError(f"{path} holds the voiceprint of '{shown(vp.name, 80)}': a "
                       "voiceprint's file is named after it (renamed by hand?)", EXIT_USAGE)
    if model is not None and vp.model != model:
        raise RunError(f"{path} was made with the embedding model {vp.model}, this "
                       f"install's is {model}: enroll '{vp.name}' again with this "
                       "install", EXIT_USAGE)
    return vp


def owner_folder(state_dir: Path, owner: str) -> Path:
    """``bin/serve``'s voiceprints of one key: ``STATE/voiceprints/OWNER``, named after the
    key's name as the job store knows it (never the key), ``_`` for a server without keys
    (no key name starts so). Replicas share the state dir, so each sees the same prints."""
    return state_dir / "voiceprints" / (owner or "_")


def load_folder(folder: Path, model: EmbeddingModel | None = None) -> list[Voiceprint]:
    """Every voiceprint in ``folder``, sorted by name, all of ``model`` when given; the
    whole folder refused (RunError, EXIT_USAGE, one line) for any file that is not a
    voiceprint of that model or whose name another file holds too."""
    if not folder.is_dir():
        raise RunError(f"--voiceprints {folder}: no such folder", EXIT_USAGE)
    try:
        files = sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIX)
                       and not p.name.startswith("."))
    except OSError as exc:
        raise RunError(f"cannot read {folder}: {exc.strerror or exc}", EXIT_USAGE) from None
    prints: dict[str, Voiceprint] = {}
    where: dict[str, Path] = {}
    for path in files:
        vp = load_file(path, model)
        key = vp.name.casefold()
        if key in prints:
            raise RunError(f"two voiceprints of one name: {where[key]} and {path}",
                           EXIT_USAGE)
        prints[key], where[key] = vp, path
    if not prints:
        raise RunError(f"--voiceprints {folder}: no voiceprints there (make them with "
                       "bin/enroll)", EXIT_USAGE)
    dims = {len(vp.embedding) for vp in prints.values()}
    if len(dims) > 1:
        raise RunError(f"the voiceprints in {folder} have embeddings of sizes "
                       f"{sorted(dims)}: not one model's", EXIT_USAGE)
    return sorted(prints.values(), key=lambda vp: vp.name)


# --- making one ----------------------------------------------------------------------------
def norm(vector: Sequence[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def combine(embeddings: Sequence[Sequence[float]], weights: Sequence[float]
            ) -> tuple[float, ...]:
    """The clips' embeddings as one: the mean of their unit vectors weighted by each clip's
    seconds of speech, itself a unit vector (cosine similarity ignores length)."""
    total = [0.0] * len(embeddings[0])
    for vector, weight in zip(embeddings, weights):
        n = norm(vector)
        for i, x in enumerate(vector):
            total[i] += weight * x / n
    n = norm(total)
    return tuple(x / n for x in total)


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


# --- matching ------------------------------------------------------------------------------
def cosine(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Cosine similarity, None for a zero vector (a speaker pyannote gave no centroid)."""
    na, nb = norm(a), norm(b)
    if not (na > 0 and nb > 0 and math.isfinite(na) and math.isfinite(nb)) or len(a) != len(b):
        return None  # NaN fails every comparison: never a name, never "NaN" in JSON
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


@dataclass(frozen=True)
class Match:
    """One diarized speaker: the name it was given (None: none at or above the threshold)
    and the similarity to that name's voiceprint, or, when unnamed, the highest similarity
    any voiceprint had (None when the speaker has no centroid)."""

    speaker: str
    identified_as: Optional[str]
    similarity: Optional[float]

    def as_dict(self) -> dict[str, Any]:
        return {"speaker": self.speaker, "identified_as": self.identified_as,
                "similarity": None if self.similarity is None else round(self.similarity, 4)}


def assign(weights: Sequence[Sequence[float | None]]) -> list[tuple[int, int]]:
    """The one-to-one assignment of rows to columns with the largest total weight, using
    only the pairs whose weight is not None (the others stay unassigned): exact (the
    Hungarian method on a square matrix padded with "unassigned", O(n^3)). Among assignments
    of equal total, the one that prefers earlier rows and columns wins: each weight is
    lowered by less than the 1e-6 that rounding leaves, by its rank, so ties always break
    the same way, here and on every host. scipy's ``linear_sum_assignment`` would do the
    same in the venv, but not before it exists, nor in tests without scipy; one solver
    keeps one answer."""
    rows = len(weights)
    cols = len(weights[0]) if rows else 0
    if not rows or not cols:
        return []
    n = rows + cols  # each row may stay unassigned (a dummy column) and each column too
    eps = 1e-9 / (rows * cols)
    # Costs are negated weights; every pair with a dummy costs 0. An allowed pair weighs a
    # little more than nothing (1e-7), so that a similarity of exactly 0 at a threshold of 0
    # still names; a pair not allowed costs more than leaving both unassigned ever could.
    cost = [[0.0] * n for _ in range(n)]
    for i in range(rows):
        for j in range(cols):
            w = weights[i][j]
            cost[i][j] = 1e6 if w is None else -(round(w, 6) + 1e-7 - eps * (i * cols + j))
    match = _hungarian(cost)
    return [(i, j) for i, j in enumerate(match[:rows]) if j < cols and weights[i][j] is not None]


def _hungarian(cost: list[list[float]]) -> list[int]:
    """The column of each row in a minimum-cost perfect assignment of a square matrix
    (Kuhn-Munkres with potentials, Jonker-Volgenant style shortest augmenting paths)."""
    n = len(cost)
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    p, way = [0] * (n + 1), [0] * (n + 1)  # p[j]: the row holding column j (1-based)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = [inf] * (n + 1)
        used = [False] * (n + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    row_to_col = [0] * n
    for j in range(1, n + 1):
        if p[j]:
            row_to_col[p[j] - 1] = j - 1
    return row_to_col


def match(centroids: Mapping[str, Sequence[float] | None], prints: Sequence[Voiceprint],
          threshold: float = DEFAULT_THRESHOLD, exclusive: bool = True) -> list[Match]:
    """Each speaker (in label order) and the name it is identified as, if any."""
    speakers = sorted(centroids)
    names = sorted(prints, key=lambda vp: vp.name)
    sims = [[None if centroids[s] is None else cosine(centroids[s] or (), vp.embedding)
             for vp in names] for s in speakers]
    best = [max((x for x in row if x is not None), default=None) for row in sims]
    chosen: dict[int, int] = {}
    if exclusive:
        allowed = [[x if x is not None and x >= threshold else None for x in row]
                   for row in sims]
        chosen = dict(assign(allowed))
    else:
        for i, row in enumerate(sims):
            top = best[i]
            if top is not None and top >= threshold:
                chosen[i] = next(j for j, x in enumerate(row) if x == top)
    out = []
    for i, speaker in enumerate(speakers):
        j = chosen.get(i)
        out.append(Match(speaker, names[j].name, sims[i][j]) if j is not None
                   else Match(speaker, None, best[i]))
    return out


def names(matches: Iterable[Match]) -> dict[str, str]:
    """``{label: name}`` for the speakers identified: what the outputs rename."""
    return {m.speaker: m.identified_as for m in matches if m.identified_as is not None}


# --- the options bin/diarize and bin/transcribe share ----------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--voiceprints", type=Path, metavar="DIR",
                   help="name the speakers whose voice is enrolled in DIR (bin/enroll): each "
                        "speaker's embedding against each voiceprint, by cosine similarity")
    p.add_argument("--match-threshold", type=float, metavar="T",
                   help="the least similarity (0 to 1) that names a speaker (default: "
                        f"{DEFAULT_THRESHOLD}, where pyannote's own clustering parts "
                        "speakers; calibrate it on your recordings: docs/voiceprints.md)")
    p.add_argument("--no-exclusive", dest="exclusive", action="store_false",
                   help="let two speakers take the same name (default: each name goes to "
                        "one speaker at most)")


def check_arguments(args: argparse.Namespace, root: Path) -> Optional[list[Voiceprint]]:
    """The voiceprints ``--voiceprints`` names, checked against the install at ``root``
    (None without the option); RunError for bad values."""
    threshold = args.match_threshold
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise RunError("--match-threshold must be between 0 and 1", EXIT_USAGE)
    if args.voiceprints is None:
        if threshold is not None or not args.exclusive:
            raise RunError("--match-threshold and --no-exclusive need --voiceprints DIR",
                           EXIT_USAGE)
        return None
    prints = load_folder(args.voiceprints)  # a bad folder is named even in a broken install
    model = installed_model(root)
    return load_folder(args.voiceprints, model) if any(vp.model != model for vp in prints) \
        else prints


def identify(result: Mapping[str, Any], prints: Sequence[Voiceprint],
             args: argparse.Namespace) -> list[Match]:
    """The matches for ``diarize_one``'s result (asked with ``embeddings=True``)."""
    threshold = DEFAULT_THRESHOLD if args.match_threshold is None else args.match_threshold
    return match(result.get("speaker_embeddings") or {}, prints, threshold, args.exclusive)


# --- one enrollment clip ----------------------------------------------------------------------
def speech_seconds(segments: Iterable[Mapping[str, Any]]) -> float:
    """Seconds in which someone speaks: the union of the turns (overlaps counted once)."""
    total, end = 0.0, -math.inf
    for start, stop in sorted((float(s["start"]), float(s["end"])) for s in segments):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def clip_voice(result: Mapping[str, Any], clip: str) -> tuple[list[float], float]:
    """The voice in one enrollment clip, from ``diarize_one``'s result on it (asked with
    ``embeddings=True``): ``(embedding, seconds of speech)``. RunError(EXIT_USAGE) for a clip
    that cannot stand for one voice: silent, more than one voice, too little speech."""
    segments = result.get("segments") or []
    voices = sorted({str(s["speaker"]) for s in segments})
    speech = speech_seconds(segments)
    if not voices:
        raise RunError(f"{clip}: no speech in it (silent?): enroll from a clip of the voice "
                       "speaking", EXIT_USAGE)
    if len(voices) > 1:
        raise RunError(f"{clip}: the pipeline hears {len(voices)} voices in it: enroll from "
                       "clips of one voice alone", EXIT_USAGE)
    if speech < MIN_SPEECH_S:
        raise RunError(f"{clip}: only {speech:.1f} s of speech, at least {MIN_SPEECH_S} s "
                       "are needed", EXIT_USAGE)
    vector = (result.get("speaker_embeddings") or {}).get(voices[0])
    if not vector or norm(vector) == 0:
        raise RunError(f"{clip}: the pipeline gave its voice no embedding", EXIT_USAGE)
    return list(vector), speech
