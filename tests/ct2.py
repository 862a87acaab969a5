"""Small, format-true CTranslate2 Whisper models for the tests: a ``model.bin`` in the byte
layout ctranslate2's ``ModelSpec._serialize`` writes (binary version 6, ``WhisperSpec``
revision 3), with the variable names and shapes of a converted Whisper model at tiny
dimensions and zero weights, and the files a faster-whisper folder holds beside it.

``raw_model_bin`` writes the layout from parts, so a test can damage any of them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

# The DataType ids of include/ctranslate2/types.h, and each item's width.
DTYPE_IDS = {"float32": (0, 4), "int8": (1, 1), "int16": (2, 2), "int32": (3, 4),
             "float16": (4, 2), "bfloat16": (5, 2)}
Var = tuple[str, tuple[int, ...], str]  # name, shape, dtype
EN_VOCABULARY = 51864  # tiny.en's decoder/embeddings/weight rows (multilingual: 51865, 51866)
PROJECTION_ALIAS = ("decoder/projection/weight", "decoder/embeddings/weight")


def string(text: str | bytes) -> bytes:
    """A model.bin string: u16 length counting the NUL, the UTF-8 bytes, the NUL."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<H", len(raw) + 1) + raw + b"\0"


def variable(name: str, shape: Sequence[int], dtype: str, nbytes: int | None = None) -> bytes:
    """One variable entry with a zero value (``nbytes`` set: the claimed size, no value)."""
    type_id, width = DTYPE_IDS[dtype]
    size = width
    for dim in shape:
        size *= dim
    head = (string(name) + struct.pack("<B", len(shape))
            + b"".join(struct.pack("<I", d) for d in shape) + struct.pack("<B", type_id))
    if nbytes is not None:
        return head + struct.pack("<I", nbytes)
    return head + struct.pack("<I", size) + bytes(size)


def raw_model_bin(variables: Iterable[bytes], *, spec: str = "WhisperSpec", revision: int = 3,
                  version: int = 6, count: int | None = None,
                  aliases: Sequence[tuple[str, str]] = (PROJECTION_ALIAS,)) -> bytes:
    """A model.bin from entries made by ``variable`` (``count``: the count it claims)."""
    entries = list(variables)
    return (struct.pack("<I", version) + string(spec) + struct.pack("<I", revision)
            + struct.pack("<I", len(entries) if count is None else count) + b"".join(entries)
            + struct.pack("<I", len(aliases))
            + b"".join(string(a) + string(n) for a, n in aliases))


def whisper_variables(n_mels: int = 80, d_model: int = 8, vocabulary: int = EN_VOCABULARY,
                      layers: int = 1, dtype: str = "float16") -> list[Var]:
    """Every variable a converted Whisper model holds (tiny.en's names), sorted as
    ctranslate2 writes them; ``d_model`` a multiple of 2 (two attention heads)."""
    d = d_model

    def norm(scope: str) -> list[Var]:
        return [(f"{scope}/beta", (d,), dtype), (f"{scope}/gamma", (d,), dtype)]

    def linear(scope: str, rows: int, cols: int) -> list[Var]:
        return [(f"{scope}/bias", (rows,), dtype), (f"{scope}/weight", (rows, cols), dtype)]

    def ffn(scope: str) -> list[Var]:
        return [*norm(f"{scope}/ffn/layer_norm"), *linear(f"{scope}/ffn/linear_0", 4 * d, d),
                *linear(f"{scope}/ffn/linear_1", d, 4 * d)]

    def self_attention(scope: str) -> list[Var]:
        s = f"{scope}/self_attention"
        return [*norm(f"{s}/layer_norm"), *linear(f"{s}/linear_0", 3 * d, d),
                *linear(f"{s}/linear_1", d, d)]

    out: list[Var] = [
        ("decoder/activation", (), "int8"), ("decoder/alibi", (), "int8"),
        ("decoder/alignment_heads", (), "int16"), ("decoder/alignment_layer", (), "int16"),
        ("decoder/embeddings/weight", (vocabulary, d), dtype),
        *norm("decoder/layer_norm"), ("decoder/num_heads", (), "int16"),
        ("decoder/position_encodings/encodings", (448, d), dtype),
        ("decoder/pre_norm", (), "int8"), ("decoder/scale_embeddings", (), "int8"),
        ("decoder/start_from_zero_embedding", (), "int8"),
        ("encoder/conv1/bias", (d,), dtype), ("encoder/conv1/weight", (d, n_mels, 3), dtype),
        ("encoder/conv2/bias", (d,), dtype), ("encoder/conv2/weight", (d, d, 3), dtype),
        *norm("encoder/layer_norm"), ("encoder/num_heads", (), "int16"),
        ("encoder/position_encodings/encodings", (1500, d), dtype),
    ]
    for i in range(layers):
        a = f"decoder/layer_{i}/attention"
        out += [*norm(f"{a}/layer_norm"), *linear(f"{a}/linear_0", d, d),
                *linear(f"{a}/linear_1", 2 * d, d), *linear(f"{a}/linear_2", d, d),
                *ffn(f"decoder/layer_{i}"), *self_attention(f"decoder/layer_{i}")]
        out += [*ffn(f"encoder/layer_{i}"), *self_attention(f"encoder/layer_{i}")]
    return sorted(out)


def _scalar(name: str, dtype: str) -> bytes:
    """A scalar with the value ctranslate2's converter gives it (zeros elsewhere)."""
    type_id, width = DTYPE_IDS[dtype]
    # tiny.en's values (6 heads there); activation 3 is GELU (common_spec.Activation).
    values = {"decoder/num_heads": 2, "encoder/num_heads": 2, "decoder/pre_norm": 1,
              "decoder/activation": 3, "decoder/alignment_layer": -1,
              "decoder/alignment_heads": 1}
    value = values.get(name, 0)
    raw = value.to_bytes(width, "little", signed=True)
    return (string(name) + struct.pack("<B", 0) + struct.pack("<B", type_id)
            + struct.pack("<I", width) + raw)


def write_model_bin(path: Path, variables: Sequence[Var], **kw: object) -> Path:
    """A format-true model.bin at ``path`` (``kw``: ``raw_model_bin``'s)."""
    entries = [variable(n, s, t) if s else _scalar(n, t) for n, s, t in variables]
    path.write_bytes(raw_model_bin(entries, **kw))  # type: ignore[arg-type]
    return path


def whisper_tokens(multilingual: bool = False, languages: int = 99) -> list[str]:
    """A vocabulary laid out as OpenAI's: BPE tokens (the multilingual ones end with the empty
    token ""), <|endoftext|>, <|startoftranscript|>, the languages, the task tokens, then 1,501
    timestamps. 51,864 tokens for an English-only model, 51,865 multilingual, 51,866 with
    large-v3's 100 languages."""
    text = [f"t{i}" for i in range(50256)] + ([""] if multilingual else [])
    langs = ["<|en|>"] + [f"<|l{i}|>" for i in range(1, languages)]
    tasks = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
             "<|nocaptions|>", "<|notimestamps|>"]
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    return [*text, "<|endoftext|>", "<|startoftranscript|>", *langs, *tasks, *stamps]


def whisper_folder(folder: Path, *, n_mels: int = 80, multilingual: bool = False,
                   languages: int = 99, feature_size: int | None = None,
                   tokenizer: bool = True, vocabulary_file: str = "vocabulary.txt",
                   rows: int | None = None) -> Path:
    """A faster-whisper model folder: model.bin (``rows`` embedding rows, by default one per
    token), config.json, the vocabulary, tokenizer.json (unless ``tokenizer`` is False) and,
    with ``feature_size``, a preprocessor_config.json saying it."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = whisper_tokens(multilingual, languages)
    write_model_bin(folder / "model.bin",
                    whisper_variables(n_mels, vocabulary=rows or len(tokens)))
    sot = tokens.index("<|startoftranscript|>")
    (folder / "config.json").write_text(json.dumps({
        "alignment_heads": [[0, 0]], "lang_ids": list(range(sot + 1, sot + 1 + languages)),
        "suppress_ids": [220, sot - 1], "suppress_ids_begin": [220, sot - 1]}, indent=2))
    if vocabulary_file.endswith(".json"):
        (folder / vocabulary_file).write_text(json.dumps(tokens))
    else:
        (folder / vocabulary_file).write_text("".join(f"{t}\n" for t in tokens))
    if tokenizer:
        (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    if feature_size is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor",
            "feature_size": feature_size, "hop_length": 160, "n_fft": 400,
            "sampling_rate": 16000}, indent=2))
    return folder
