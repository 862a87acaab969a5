"""The build-side check of a faster-whisper (CTranslate2) model folder.

``read_header`` walks a CTranslate2 ``model.bin`` and returns its spec name and each
variable's name, shape and dtype, seeking past every value: a 3 GB large-v3 costs tens of
kilobytes of reads. ``inspect_whisper`` checks a folder against the ways faster-whisper fails
offline and says what the model is (mel bins, vocabulary, multilingual). Every failure is a
``TrapError``; a hostile or truncated file gives one too, never a huge read or a hang.

Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bundler.errors import TrapError, shown
from bundler.traps import _fail  # one check of the trap ids

MODEL_BIN = "model.bin"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
PREPROCESSOR = "preprocessor_config.json"
# ctranslate2 reads vocabulary.json when both are there (models/model_reader.cc,
# load_vocabulary: ".json" first, then ".txt"). ctranslate2 4.8.5's converter writes the
# .json, 3.x's the .txt (Systran's faster-whisper-* models have the .txt).
VOCABULARIES = ("vocabulary.json", "vocabulary.txt")
OPTIONAL_FILES = (PREPROCESSOR,)

WHISPER_SPEC = "WhisperSpec"
CONV1 = "encoder/conv1/weight"  # (d_model, n_mels, 3): ctranslate2 takes n_mels from dim 1
EMBEDDINGS = "decoder/embeddings/weight"  # (vocabulary size, d_model)
# faster-whisper's FeatureExtractor(feature_size=80) when preprocessor_config.json is absent,
# unreadable or names no feature_size (faster_whisper/transcribe.py, _get_feature_kwargs).
DEFAULT_MEL_BINS = 80
# faster-whisper 1.2.1 never decides multilingual itself: it asks ctranslate2's
# `model.is_multilingual` (transcribe.py: language detection, the Hub tokenizer's name).
# ctranslate2 4.8.5 (src/models/whisper.cc, WhisperReplica) answers whether the vocabulary
# holds the empty token "": OpenAI's multilingual vocabularies do (51865 tokens; large-v3
# 51866), the English-only ones (51864) do not. Older ctranslate2 compared the vocabulary
# size instead (`== 51865`, then `>= 51865` for large-v3), which agrees on OpenAI's models.
# Checked against ctranslate2 4.8.5 itself: tiny.en's vocabulary with "" added, at any
# index and at either size, loads as multilingual; with another token added, it does not.
MULTILINGUAL_TOKEN = ""

# model.bin layout (ctranslate2 python/ctranslate2/specs/model_spec.py, ModelSpec._serialize;
# read back by src/models/model.cc, Model::load), little-endian, no padding:
#   u32 binary_version | string spec | u32 spec_revision | u32 n_variables
#   n_variables x (string name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | bytes)
#   u32 n_aliases | n_aliases x (string alias | string name)
# string: u16 length counting a trailing NUL, the UTF-8 bytes, then the NUL.
# Version 6 is what every ctranslate2 since 3.0.0 (the first with Whisper) through 4.8.5
# writes; model.cc reads 4 and 5 the same way (a dtype id and a byte count, added in 4).
# 1-3 differ (no spec name before 2, no aliases before 3, an item width and an element
# count instead of a dtype before 4) and no Whisper model was ever written with them.
BINARY_VERSIONS = (4, 5, 6)
# The DataType enum of include/ctranslate2/types.h, as _dtype_to_type_id writes it.
DTYPES = (("float32", 4), ("int8", 1), ("int16", 2), ("int32", 4), ("float16", 2),
          ("bfloat16", 2))
# Bounds for a hostile header. tiny.en has 148 variables, large-v3 about a thousand (more
# with int8 scales); ranks go to 3 (the convolutions); ctranslate2's names are short.
MAX_VARIABLES = 100_000
MAX_ALIASES = 100_000
MAX_RANK = 8
MAX_NAME = 1024
_MIN_VARIABLE = 2 + 2 + 1 + 1 + 4  # a one-byte name, rank 0, dtype, byte count
_MIN_ALIAS = 2 * (2 + 2)
# The JSON files and vocabularies are read whole: tiny.en's tokenizer.json is 2.1 MB.
MAX_JSON = 64 << 20
_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/")


@dataclass(frozen=True)
class Variable:
    """One variable of a model.bin: where its value starts and how many bytes it holds."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ModelHeader:
    """What a model.bin says about itself, without its weights."""

    binary_version: int
    spec: str
    spec_revision: int
    variables: tuple[Variable, ...]
    aliases: tuple[tuple[str, str], ...]  # (alias, the variable it names)

    def get(self, name: str) -> Variable | None:
        """The variable ``name``, following an alias as ctranslate2 does."""
        target = dict(self.aliases).get(name, name)
        return next((v for v in self.variables if v.name == target), None)


@dataclass(frozen=True)
class WhisperInfo:
    """A faster-whisper model folder that passed the check, and what it holds."""

    spec_revision: int
    binary_version: int
    n_mels: int
    d_model: int
    vocab_size: int  # rows of decoder/embeddings/weight, equal to the vocabulary file's tokens
    multilingual: bool
    encoder_layers: int
    decoder_layers: int
    vocabulary: str  # the vocabulary file ctranslate2 reads
    optional: tuple[str, ...]  # the optional files present (preprocessor_config.json)


class _Reader:
    """Bounded reads of a model.bin: every length is checked against what is left."""

    def __init__(self, stream: BinaryIO, where: str) -> None:
        # Offsets (in messages, in Variable) count from the model.bin's first byte: where
        # the stream stood when handed over.
        self.stream, self.where = stream, where
        self.start = stream.tell()
        self.size = stream.seek(0, os.SEEK_END) - self.start
        stream.seek(self.start)

    def tell(self) -> int:
        return self.stream.tell() - self.start

    @property
    def left(self) -> int:
        return self.size - self.tell()

    def damaged(self, problem: str) -> TrapError:
        return _fail("asr-files", f"{self.where} is damaged or not a CTranslate2 model: "
                     f"{problem}; copy the model folder again from its source (or convert it "
                     "again with ct2-transformers-converter)")

    def bytes(self, n: int, what: str) -> bytes:
        at = self.tell()
        if n > self.size - at:
            raise self.damaged(f"{what} of {n} bytes at offset {at} runs past the end of the "
                               f"file ({self.size} bytes): it is truncated")
        data = self.stream.read(n)
        if len(data) != n:
            raise self.damaged(f"{what} at offset {at}: the file ended early")
        return data

    def u8(self, what: str) -> int:
        return int(self.bytes(1, what)[0])

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.bytes(4, what))[0]
        return value

    def string(self, what: str) -> str:
        at = self.tell()
        (length,) = struct.unpack("<H", self.bytes(2, f"the length of {what}"))
        if length < 2 or length > MAX_NAME + 1:
            raise self.damaged(f"{what} at offset {at} claims {length} bytes (2 to "
                               f"{MAX_NAME + 1} expected: the text and a NUL)")
        raw = self.bytes(length, what)
        if raw[-1] != 0 or 0 in raw[:-1]:
            raise self.damaged(f"{what} at offset {at} is not one NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise self.damaged(f"{what} at offset {at} is not UTF-8") from None

    def skip(self, n: int, what: str) -> None:
        at = self.tell()
        if n > self.size - at:
            raise self.damaged(f"{what} of {n} bytes at offset {at} runs past the end of the "
                               f"file ({self.size} bytes): it is truncated")
        self.stream.seek(n, os.SEEK_CUR)


@contextmanager
def _opened(source: Path | BinaryIO) -> Iterator[tuple[BinaryIO, str]]:
    if isinstance(source, Path):
        with source.open("rb") as f:
            yield f, str(source)
    else:
        yield source, str(getattr(source, "name", MODEL_BIN))


def read_header(source: Path | BinaryIO) -> ModelHeader:
    """The spec, variables and aliases of a CTranslate2 ``model.bin`` (a path, or a seekable
    binary stream read from where it stands), skipping every value.

    Raises ``TrapError`` (``asr-files``) for a binary version other than 4-6, a truncated
    file, or any length, count, rank, dtype or size that is out of bounds or inconsistent.
    """
    with _opened(source) as (stream, where):
        reader = _Reader(stream, shown(where))
        version = reader.u32("the binary version")
        if version not in BINARY_VERSIONS:
            raise _fail("asr-files", f"{shown(where)}: CTranslate2 binary version {version}; "
                        f"this check reads versions {BINARY_VERSIONS[0]}-{BINARY_VERSIONS[-1]} "
                        "(ctranslate2 3.0 to 4.x write 6): convert the model again with a "
                        "ctranslate2 4.x ct2-transformers-converter, or check that it is a "
                        "model.bin at all")
        spec = reader.string("the spec name")
        revision = reader.u32("the spec revision")
        count = reader.u32("the variable count")
        if count > MAX_VARIABLES or count * _MIN_VARIABLE > reader.left:
            raise reader.damaged(f"it claims {count} variables, more than "
                                 f"{min(MAX_VARIABLES, reader.left // _MIN_VARIABLE)} fit")
        variables: list[Variable] = []
        seen: set[str] = set()
        for _ in range(count):
            name = reader.string("a variable name")
            if name in seen:
                raise reader.damaged(f"variable {shown(name)} appears twice")
            seen.add(name)
            rank = reader.u8(f"the rank of {shown(name)}")
            if rank > MAX_RANK:
                raise reader.damaged(f"variable {shown(name)} has rank {rank} (at most "
                                     f"{MAX_RANK})")
            shape = tuple(reader.u32(f"a dimension of {shown(name)}") for _ in range(rank))
            type_id = reader.u8(f"the dtype of {shown(name)}")
            if type_id >= len(DTYPES):
                raise reader.damaged(f"variable {shown(name)} has dtype id {type_id} (0 to "
                                     f"{len(DTYPES) - 1} known)")
            dtype, width = DTYPES[type_id]
            nbytes = reader.u32(f"the byte count of {shown(name)}")
            elements = 1
            for dim in shape:
                elements *= dim
            # ctranslate2 allocates by shape and reads n_bytes into it: they must agree.
            if elements * width != nbytes:
                raise reader.damaged(f"variable {shown(name)} of shape {shape} and dtype "
                                     f"{dtype} claims {nbytes} bytes, not {elements * width}")
            offset = reader.tell()
            reader.skip(nbytes, f"the value of {shown(name)}")
            variables.append(Variable(name, shape, dtype, offset, nbytes))
        n_aliases = reader.u32("the alias count")
        if n_aliases > MAX_ALIASES or n_aliases * _MIN_ALIAS > reader.left:
            raise reader.damaged(f"it claims {n_aliases} aliases, more than "
                                 f"{min(MAX_ALIASES, reader.left // _MIN_ALIAS)} fit")
        aliases = tuple((reader.string("an alias"), reader.string("an aliased name"))
                        for _ in range(n_aliases))
        if reader.left:
            raise reader.damaged(f"{reader.left} bytes follow the last alias")
        return ModelHeader(version, spec, revision, tuple(variables), aliases)


def inspect_whisper(folder: Path) -> WhisperInfo:
    """Check a faster-whisper model folder for what faster-whisper needs offline, and say what
    the model is. Reads model.bin's header only.

    Raises ``TrapError``: ``asr-files`` (a required file missing or damaged), ``asr-not-whisper``
    (model.bin is another CTranslate2 model), ``asr-tokenizer`` (no usable tokenizer.json),
    ``asr-mel-bins`` (the mel bins faster-whisper will compute are not the model's).
    """
    missing = [name for name in (MODEL_BIN, CONFIG) if not (folder / name).is_file()]
    vocabulary = next((name for name in VOCABULARIES if (folder / name).is_file()), None)
    if vocabulary is None:
        missing.append(" or ".join(VOCABULARIES))
    if missing or vocabulary is None:
        raise _fail("asr-files", f"{folder}: no {', no '.join(missing)}: ctranslate2 cannot "
                    "load a Whisper model without them; copy the whole model folder (model.bin, "
                    "config.json, vocabulary, tokenizer.json, preprocessor_config.json where the "
                    "model has one)")
    config = _json(folder / CONFIG, "asr-files", "ctranslate2 fails to load the model; copy "
                   "config.json again from the model's source")
    if not isinstance(config, dict):
        raise _fail("asr-files", f"{folder / CONFIG} is not a JSON object: ctranslate2 fails "
                    "to load the model; copy config.json again from the model's source")

    header = read_header(folder / MODEL_BIN)
    if header.spec != WHISPER_SPEC:
        raise _fail("asr-not-whisper", f"{folder / MODEL_BIN} is a CTranslate2 "
                    f"'{shown(header.spec)}' model, not a '{WHISPER_SPEC}': faster-whisper "
                    "cannot load it; use a faster-whisper model (e.g. Systran/faster-whisper-*) "
                    "or convert a Whisper model with ct2-transformers-converter")
    conv1, embeddings = header.get(CONV1), header.get(EMBEDDINGS)
    if conv1 is None or len(conv1.shape) != 3 or conv1.shape[2] != 3:
        got = "none" if conv1 is None else f"shape {conv1.shape}"
        raise _fail("asr-files", f"{folder / MODEL_BIN}: the Whisper variable {CONV1} should "
                    f"have shape (d_model, n_mels, 3), not {got}: the file is damaged; copy "
                    "the model folder again")
    d_model, n_mels = conv1.shape[0], conv1.shape[1]
    if embeddings is None or embeddings.shape[1:] != (d_model,):
        got = "none" if embeddings is None else f"shape {embeddings.shape}"
        raise _fail("asr-files", f"{folder / MODEL_BIN}: the Whisper variable {EMBEDDINGS} "
                    f"should have shape (vocabulary, {d_model}), not {got}: the file is "
                    "damaged; copy the model folder again")
    vocab_size = embeddings.shape[0]
    tokens = _read_tokens(folder / vocabulary)
    if len(tokens) != vocab_size:
        # ctranslate2 decides is_multilingual and the timestamp tokens from the vocabulary
        # file, and indexes the embeddings with its ids.
        raise _fail("asr-files", f"{folder / vocabulary} has {len(tokens)} tokens but "
                    f"{folder / MODEL_BIN} has {vocab_size} embedding rows: they come from "
                    "different models; copy the model folder again from one source")

    _check_tokenizer(folder)
    optional = tuple(name for name in OPTIONAL_FILES if (folder / name).is_file())
    _check_mel_bins(folder, n_mels, PREPROCESSOR in optional)
    layers: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
    for variable in header.variables:
        match = _LAYER.match(variable.name)
        if match:
            layers[match.group(1)].add(int(match.group(2)))
    return WhisperInfo(
        spec_revision=header.spec_revision, binary_version=header.binary_version,
        n_mels=n_mels, d_model=d_model, vocab_size=vocab_size,
        multilingual=MULTILINGUAL_TOKEN in tokens,
        encoder_layers=len(layers["encoder"]), decoder_layers=len(layers["decoder"]),
        vocabulary=vocabulary, optional=optional)


def _check_tokenizer(folder: Path) -> None:
    path = folder / TOKENIZER
    fix = ("copy tokenizer.json from the model's source (or from the openai/whisper-* "
           "repository the model was converted from) into the folder")
    if not path.is_file():
        raise _fail("asr-tokenizer", f"{path} is missing: without it faster-whisper fetches "
                    "openai/whisper-* from the Hugging Face Hub at run time (offline: 18 DNS "
                    f"attempts, then failure); {fix}")
    if not isinstance(_json(path, "asr-tokenizer", f"faster-whisper cannot load it; {fix}"),
                      dict):
        raise _fail("asr-tokenizer", f"{path} is not a JSON object: faster-whisper cannot "
                    f"load it; {fix}")


def _check_mel_bins(folder: Path, n_mels: int, has_preprocessor: bool) -> None:
    path = folder / PREPROCESSOR
    error = (f"faster-whisper computes {{got}} mel bins and the model takes {n_mels}: "
             f"'Invalid input features shape: expected (1, {n_mels}, 3000)'")
    if not has_preprocessor:
        if n_mels != DEFAULT_MEL_BINS:
            raise _fail("asr-mel-bins", f"{path} is missing: "
                        f"{error.format(got=DEFAULT_MEL_BINS)}; copy preprocessor_config.json "
                        f"(feature_size {n_mels}) from the model's source into the folder")
        return
    fix = f"write feature_size {n_mels} in it, or copy it again from the model's source"
    config = _json(path, "asr-mel-bins", f"faster-whisper ignores it and assumes "
                   f"{DEFAULT_MEL_BINS} mel bins; {fix}")
    if not isinstance(config, dict):
        raise _fail("asr-mel-bins", f"{path} is not a JSON object: faster-whisper fails to "
                    f"read it; {fix}")
    size = config.get("feature_size", DEFAULT_MEL_BINS)
    if not isinstance(size, int) or isinstance(size, bool) or size != n_mels:
        raise _fail("asr-mel-bins", f"{path} says feature_size {shown(repr(size))}: "
                    f"{error.format(got=shown(repr(size)))}; {fix}")


def _json(path: Path, trap: str, consequence: str) -> Any:
    """``path`` parsed, within MAX_JSON bytes, or the trap naming it."""
    size = path.stat().st_size
    if size > MAX_JSON:
        raise _fail(trap, f"{path} is {size} bytes, more than the {MAX_JSON >> 20} MiB such a "
                    f"file may be: {consequence}")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(trap, f"{path} is not valid JSON ({shown(str(exc))}): {consequence}") from None


def _read_tokens(path: Path) -> list[str]:
    """The tokens ctranslate2 reads from a vocabulary.json (a list of strings) or a
    vocabulary.txt (a line each, without a carriage return that ends every line:
    src/vocabulary.cc, load_tokens_from_text_file)."""
    if path.suffix == ".json":
        tokens = _json(path, "asr-files", "ctranslate2 cannot load the vocabulary; copy it again "
                       "from the model's source")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise _fail("asr-files", f"{path} is not a JSON list of tokens: ctranslate2 cannot "
                        "load it; copy it again from the model's source")
        return tokens
    size = path.stat().st_size
    if size > MAX_JSON:
        raise _fail("asr-files", f"{path} is {size} bytes, more than the {MAX_JSON >> 20} MiB a "
                    "vocabulary may be; copy it again from the model's source")
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    if lines and all(line.endswith(b"\r") for line in lines):
        lines = [line[:-1] for line in lines]
    return [line.decode("utf-8", "surrogateescape") for line in lines]
