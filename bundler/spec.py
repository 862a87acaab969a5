"""The data model: frozen dataclasses, parsed and validated once at the edge.

A *recipe* is a small TOML file shipped in ``bundler/recipes/``; ``--spec`` takes a user
file of the same form. Every field is checked here, so later stages can trust a Spec.
"""

from __future__ import annotations

import platform
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from bundler.errors import SpecError
from bundler.runtime.transcribe import COMPUTE_TYPES  # bin/transcribe's own list

SHA40 = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

PIPELINES = ("pyannote-3.1", "community-1")
ROLES = ("segmentation", "embedding", "pipeline")
ASR_ROLE = "asr"  # a faster-whisper (CTranslate2) model beside the pipeline: bin/transcribe
# The files taken from an ASR repo. Which are required is decided once they are listed, by
# bundler.asr (a missing tokenizer.json or a 128-mel model without its preprocessor config
# is a trap with its own message), so each is fetched when the repo has it.
ASR_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt",
             "vocabulary.json", "preprocessor_config.json")

ARCHES = ("x86_64", "aarch64")


# --- target -------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """The host a bundle is built for: CPython version, OS and CPU architecture."""

    python: str = "3.11"  # "3.X"
    arch: str = "x86_64"
    glibc: str = "2.28"  # the oldest glibc the target hosts have (manylinux tag ceiling)

    @property
    def slug(self) -> str:
        """e.g. ``py311-linux-x86_64``: used in lockfile and bundle names."""
        return f"py{self.python.replace('.', '')}-linux-{self.arch}"

    @property
    def abi(self) -> str:
        return f"cp{self.python.replace('.', '')}"

    @property
    def platforms(self) -> list[str]:
        """Wheel platform tags this target accepts, most specific first."""
        major, minor = (int(x) for x in self.glibc.split("."))
        tags = [f"manylinux_{major}_{m}_{self.arch}" for m in range(minor, 16, -1)]
        tags += [f"manylinux2014_{self.arch}"]
        if self.arch == "x86_64":
            tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
        return tags + [f"linux_{self.arch}"]

    @classmethod
    def host(cls) -> Target:
        """The machine this runs on."""
        return cls(python=f"{sys.version_info[0]}.{sys.version_info[1]}", arch=platform.machine())

    def matches_host(self) -> bool:
        host = Target.host()
        return sys.platform == "linux" and (host.python, host.arch) == (self.python, self.arch)

    def pip_download_args(self) -> list[str]:
        """Flags that make ``pip download`` pick wheels for this target, not the host."""
        if self.matches_host():
            return []
        args = ["--python-version", self.python, "--implementation", "cp"]
        for abi in (self.abi, "abi3", "none"):
            args += ["--abi", abi]
        for tag in self.platforms:
            args += ["--platform", tag]
        return args

    def supported_tags(self) -> frozenset[str]:
        """Every wheel tag (``py3-none-any`` form) an installer on this target accepts."""
        from packaging import tags

        if self.matches_host():
            return frozenset(str(t) for t in tags.sys_tags())
        version = tuple(int(x) for x in self.python.split("."))
        out = list(tags.cpython_tags(version, abis=[self.abi, "abi3", "none"],
                                     platforms=self.platforms))
        out += list(tags.compatible_tags(version, interpreter=self.abi, platforms=self.platforms))
        return frozenset(str(t) for t in out)

    def as_dict(self) -> dict[str, str]:
        return {"python": self.python, "platform": f"linux_{self.arch}", "arch": self.arch,
                "glibc": self.glibc, "slug": self.slug}

    @property
    def uv_platform(self) -> str:
        """``--python-platform`` for uv, e.g. ``aarch64-manylinux_2_28``."""
        return f"{self.arch}-manylinux_{self.glibc.replace('.', '_')}"

    @classmethod
    def from_slug(cls, slug: str) -> Target:
        """``py312-linux-aarch64`` -> Target(python="3.12", arch="aarch64")."""
        m = re.fullmatch(r"py3(\d{1,2})-linux-([a-z0-9_]+)", slug)
        if not m or m.group(2) not in ARCHES:
            raise SpecError("--target", "target", f"'{slug}' is not like py311-linux-x86_64 "
                            f"(architectures: {', '.join(ARCHES)})")
        return cls(python=f"3.{m.group(1)}", arch=m.group(2))


@dataclass(frozen=True)
class IndexOptions:
    """Where wheels come from: explicit, never this machine's pip configuration."""

    index_url: str = "https://pypi.org/simple"
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()

    def pip_args(self) -> list[str]:
        args = ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        return args

    def redacted(self) -> dict[str, Any]:
        """For the manifest: credentials in URLs are never recorded."""
        return {
            "index_url": redact_url(self.index_url),
            "extra_index_urls": [redact_url(u) for u in self.extra_index_urls],
            "find_links": [redact_url(u) for u in self.find_links],
        }


def redact_url(url: str) -> str:
    """``https://user:secret@host/x`` -> ``https://***@host/x``."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]+@", r"\1***@", url)


# --- models -------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFile:
    """One file of a Hub repo and where it lands in the bundle's ``models/``."""

    path: str  # in the repo
    bundle_path: str  # relative to models/
    sha256: str | None = None  # pinned; otherwise the Hub's LFS sha256 is the reference
    optional: bool = False  # taken when the repo has it (an ASR repo's optional files)


@dataclass(frozen=True)
class ModelRef:
    """A Hub repo at a revision, its role in the pipeline, and the files taken from it."""

    repo_id: str
    revision: str  # branch, tag or 40-hex commit; a branch is resolved and recorded
    role: str
    files: tuple[ModelFile, ...]
    license: str = "unknown"


def pyannote_model_name(repo_id: str) -> str:
    """The bundle name of a 3.1-recipe checkpoint.

    pyannote.audio picks the embedding loader by substring of the path (trap 1): a path
    containing ``pyannote`` goes to the pyannote loader first, whatever else it holds.
    """
    return f"pyannote_model_{repo_id.split('/', 1)[1]}.bin"


# --- the spec -----------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """A validated recipe: what goes into a bundle, for which target, from where."""

    name: str
    pipeline: str  # one of PIPELINES
    lockfile: str  # stem: lockfiles/<lockfile>-<target slug>.txt
    models: tuple[ModelRef, ...]
    config: Mapping[str, Any] = field(default_factory=dict)  # pyannote config (3.1 recipe)
    description: str = ""
    target: Target = field(default_factory=Target.host)
    source: str = "<spec>"
    # Indexes the recipe's wheels need besides the command line's (e.g. the PyTorch CPU
    # index for a CPU-only torch); added to --extra-index-url / --find-links.
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    # The ASR model's CTranslate2 compute type on the host (None: int8 on CPU, float16 on
    # GPU), and the --asr-model REPO[@REV] that added or replaced the spec's own, if any
    # (recorded so that rebuild asks for the same).
    asr_compute_type: str | None = None
    asr_override: str | None = None

    @property
    def asr(self) -> ModelRef | None:
        """The speech-recognition model, when the bundle carries one."""
        return next((m for m in self.models if m.role == ASR_ROLE), None)

    def index(self, cli: IndexOptions) -> IndexOptions:
        """The command line's index options plus the spec's own."""
        return IndexOptions(cli.index_url,
                            tuple(dict.fromkeys((*cli.extra_index_urls, *self.extra_index_urls))),
                            tuple(dict.fromkeys((*cli.find_links, *self.find_links))))

    def model(self, role: str) -> ModelRef:
        return next(m for m in self.models if m.role == role)


def recipe_names() -> list[str]:
    """Names of the recipes shipped in the package."""
    root = resources.files("bundler.recipes")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_recipe(name: str, target: Target | None = None) -> Spec:
    """Load a shipped recipe by name."""
    names = recipe_names()
    if name not in names:
        raise SpecError("--recipe", "name", f"unknown recipe '{name}'; known: {', '.join(names)}")
    text = resources.files("bundler.recipes").joinpath(f"{name}.toml").read_text()
    return parse_spec(text, f"recipe {name}", target)


def load_spec(path: Path, target: Target | None = None) -> Spec:
    """Load a user spec file (same form as a recipe)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), "-", f"cannot read: {exc.strerror}") from None
    return parse_spec(text, str(path), target)


_TOP_KEYS = {"name", "pipeline", "lockfile", "description", "models", "config", "index", "asr"}
_ASR_KEYS = {"repo", "revision", "license", "compute_type", "files"}
_INDEX_KEYS = {"extra_index_urls", "find_links"}
_MODEL_KEYS = {"repo", "revision", "role", "license", "files"}
_FILE_KEYS = {"path", "name", "sha256"}


def parse_spec(text: str, source: str, target: Target | None = None) -> Spec:
    """Parse and validate a spec; every problem names the field and the reason."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(source, "-", f"not valid TOML: {exc}") from None
    fields = _Fields(source)
    fields.no_unknown(data, _TOP_KEYS, "")
    name = fields.need(data, "name", "", str)
    if not NAME.match(name):
        raise SpecError(source, "name", "use lowercase letters, digits, '.', '_' and '-'")
    pipeline = fields.need(data, "pipeline", "", str)
    if pipeline not in PIPELINES:
        raise SpecError(source, "pipeline", f"'{pipeline}' is not one of {', '.join(PIPELINES)}")
    lockfile = data.get("lockfile", name)
    if not isinstance(lockfile, str) or not NAME.match(lockfile):
        raise SpecError(source, "lockfile",
                        "must be a lockfile stem like 'speaker-diarization-3.1'")
    config = data.get("config", {})
    if not isinstance(config, dict):
        raise SpecError(source, "config", "must be a table")
    urls = _parse_index(data.get("index", {}), fields)
    raw_models = fields.need(data, "models", "", list)
    if not raw_models:
        raise SpecError(source, "models", "at least one model is needed")
    models = [_parse_model(raw, i, pipeline, fields) for i, raw in enumerate(raw_models)]
    asr, compute_type = _parse_asr(data.get("asr"), fields)
    if asr is not None:
        models.append(asr)
    _check_models(models, pipeline, source)
    return Spec(name=name, pipeline=pipeline, lockfile=lockfile, models=tuple(models),
                config=config, description=str(data.get("description", "")),
                target=target or Target.host(), source=source,
                extra_index_urls=urls["extra_index_urls"], find_links=urls["find_links"],
                asr_compute_type=compute_type)


class _Fields:
    """The checks every table of a spec gets, naming the file and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def need(self, obj: Mapping[str, Any], key: str, where: str, kind: type) -> Any:
        if key not in obj:
            raise SpecError(self.source, f"{where}{key}", "missing")
        value = obj[key]
        if not isinstance(value, kind):
            raise SpecError(self.source, f"{where}{key}", f"must be a {kind.__name__}")
        return value

    def no_unknown(self, obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
        for key in obj:
            if key not in allowed:
                raise SpecError(self.source, f"{where}{key}",
                                f"unknown key (known: {', '.join(sorted(allowed))})")


def _parse_index(index: Any, fields: _Fields) -> dict[str, tuple[str, ...]]:
    """``[index]``: extra index URLs and find-links, each a list of URLs or paths."""
    if not isinstance(index, dict):
        raise SpecError(fields.source, "index", "must be a table")
    fields.no_unknown(index, _INDEX_KEYS, "index.")
    urls: dict[str, tuple[str, ...]] = {}
    for key in _INDEX_KEYS:
        value = index.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise SpecError(fields.source, f"index.{key}", "must be a list of URLs or paths")
        urls[key] = tuple(value)
    return urls


def _parse_model(raw: Any, i: int, pipeline: str, fields: _Fields) -> ModelRef:
    """One ``[[models]]`` table."""
    source, where = fields.source, f"models[{i}]."
    if not isinstance(raw, dict):
        raise SpecError(source, f"models[{i}]", "must be a table")
    fields.no_unknown(raw, _MODEL_KEYS, where)
    repo = fields.need(raw, "repo", where, str)
    if not REPO_ID.match(repo):
        raise SpecError(source, f"{where}repo", f"'{repo}' is not a Hub repo id 'org/name'")
    revision = raw.get("revision", "main")
    if not isinstance(revision, str) or not revision or any(c in revision for c in " \n"):
        raise SpecError(source, f"{where}revision", "must be a branch, tag or 40-hex commit")
    role = fields.need(raw, "role", where, str)
    if role not in ROLES:
        raise SpecError(source, f"{where}role", f"'{role}' is not one of {', '.join(ROLES)}")
    license_ = raw.get("license", "unknown")
    files = _parse_files(raw.get("files"), repo, pipeline, source, where)
    return ModelRef(repo, revision, role, files, str(license_))


def _parse_asr(asr: Any, fields: _Fields) -> tuple[ModelRef | None, str | None]:
    """``[asr]``: the speech-recognition model and its compute type, when there is one."""
    if asr is None:
        return None, None
    source = fields.source
    if not isinstance(asr, dict):
        raise SpecError(source, "asr", "must be a table")
    fields.no_unknown(asr, _ASR_KEYS, "asr.")
    compute_type = asr.get("compute_type")
    if compute_type is not None and compute_type not in COMPUTE_TYPES:
        raise SpecError(source, "asr.compute_type",
                        f"'{compute_type}' is not one of {', '.join(COMPUTE_TYPES)}")
    model = _asr_model(fields.need(asr, "repo", "asr.", str), asr.get("revision", "main"),
                       str(asr.get("license", "unknown")), asr.get("files"), source)
    return model, compute_type


def _check_models(models: list[ModelRef], pipeline: str, source: str) -> None:
    """The roles the pipeline needs, each once; no two files at one path in the bundle."""
    roles = [m.role for m in models]
    wanted = ("segmentation", "embedding") if pipeline == "pyannote-3.1" else ("pipeline",)
    for role in wanted:
        if roles.count(role) != 1:
            raise SpecError(source, "models", f"pipeline '{pipeline}' needs exactly one "
                            f"'{role}' model (has {roles.count(role)})")
    seen: set[str] = set()
    for model in models:
        for f in model.files:
            if f.bundle_path in seen:
                raise SpecError(source, "models", f"two files land at models/{f.bundle_path}")
            seen.add(f.bundle_path)


def _asr_model(repo: str, revision: Any, license_: str, files: Any, source: str,
               where: str = "asr.") -> ModelRef:
    """A faster-whisper repo: its files land in ``models/<repo name>/``."""
    if not REPO_ID.match(repo):
        raise SpecError(source, f"{where}repo", f"'{repo}' is not a Hub repo id 'org/name'")
    if not isinstance(revision, str) or not revision or any(c in revision for c in " \n@"):
        raise SpecError(source, f"{where}revision", "must be a branch, tag or 40-hex commit")
    folder = repo.split("/", 1)[1]
    if files is None:
        taken = tuple(ModelFile(f, f"{folder}/{f}", optional=True) for f in ASR_FILES)
    else:
        if not isinstance(files, list) or not files or not all(
                isinstance(f, str) and _safe_relpath(f) for f in files):
            raise SpecError(source, f"{where}files", "must be a list of file names in the repo")
        taken = tuple(ModelFile(f, f"{folder}/{f}") for f in files)
    return ModelRef(repo, revision, ASR_ROLE, taken, license_)


def with_asr_model(spec: Spec, model: str) -> Spec:
    """``spec`` with its ASR model added or replaced by ``REPO[@REVISION]`` (the command
    line's ``--asr-model``); the compute type the spec names is kept."""
    repo, _, revision = model.partition("@")
    asr = _asr_model(repo, revision or "main", "unknown", None, "--asr-model", where="")
    others = tuple(m for m in spec.models if m.role != ASR_ROLE)
    taken = {f.bundle_path for m in others for f in m.files}
    if any(f.bundle_path in taken for f in asr.files):
        raise SpecError("--asr-model", "repo", f"models/{repo.split('/', 1)[1]}/ is taken by "
                        "another model of the recipe")
    return replace(spec, models=(*others, asr), asr_override=model)


def _parse_files(raw: Any, repo: str, pipeline: str, source: str,
                 where: str) -> tuple[ModelFile, ...]:
    if raw is None:
        raw = [{"path": "pytorch_model.bin"}]
    if not isinstance(raw, list) or not raw:
        raise SpecError(source, f"{where}files", "must be a non-empty list of tables")
    files = []
    for j, item in enumerate(raw):
        fw = f"{where}files[{j}]."
        if not isinstance(item, dict):
            raise SpecError(source, f"{where}files[{j}]", "must be a table")
        for key in item:
            if key not in _FILE_KEYS:
                raise SpecError(source, f"{fw}{key}", "unknown key (known: name, path, sha256)")
        path = item.get("path")
        if not isinstance(path, str) or not _safe_relpath(path):
            raise SpecError(source, f"{fw}path", "must be a relative path inside the repo")
        default = (pyannote_model_name(repo) if pipeline == "pyannote-3.1"
                   else f"{repo.split('/', 1)[1]}/{path}")
        bundle_path = item.get("name", default)
        if not isinstance(bundle_path, str) or not _safe_relpath(bundle_path):
            raise SpecError(source, f"{fw}name", "must be a relative path inside models/")
        sha = item.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not SHA256.match(sha)):
            raise SpecError(source, f"{fw}sha256", "must be 64 lowercase hex digits")
        files.append(ModelFile(path, bundle_path, sha))
    return tuple(files)


def _safe_relpath(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)
