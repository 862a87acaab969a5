"""bin/transcribe's pure part, fast: which speaker said each word, where a segment is cut,
and the SRT, WebVTT, text and JSON it writes.

Speaker assignment is also checked against a brute-force reference on random turns, ties
and a turn over the whole recording included, so the search tree cannot drift from the
rule its docstring states.
"""

from __future__ import annotations

import ast
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from bundler.runtime import transcript as t

SOURCE = Path(t.__file__)


def _w(start: float, end: float, word: str = " w", probability: float = 0.9) -> dict[str, Any]:
    return {"start": start, "end": end, "word": word, "probability": probability}


def _turn(start: float, end: float, speaker: str) -> dict[str, Any]:
    return {"start": start, "end": end, "speaker": speaker}


def _speakers(words: list[dict[str, Any]], turns: list[dict[str, Any]]) -> list[Any]:
    return [w["speaker"] for w in t.assign_speakers(words, turns)]


def _seg(start: float, end: float, text: str, speaker: Any = "SPEAKER_00") -> dict[str, Any]:
    return {"start": start, "end": end, "speaker": speaker, "text": text, "words": []}


# --- assign_speakers -------------------------------------------------------------------
def test_a_word_straddling_two_turns_goes_to_the_larger_overlap() -> None:
    turns = [_turn(0, 2.0, "A"), _turn(2.0, 5, "B")]
    assert _speakers([_w(1.7, 2.6), _w(1.5, 2.2)], turns) == ["B", "A"]


def test_overlaps_are_summed_per_speaker() -> None:
    # A has two short pieces inside the word (0.3 + 0.3), B one piece of 0.4: A wins on the sum.
    turns = [_turn(0.0, 1.3, "A"), _turn(1.3, 1.7, "B"), _turn(1.7, 3.0, "A")]
    assert _speakers([_w(1.0, 2.0)], turns) == ["A"]


def test_a_word_in_silence_goes_to_the_nearest_turn() -> None:
    turns = [_turn(0, 1, "A"), _turn(5, 6, "B")]
    assert _speakers([_w(1.5, 2.0), _w(3.5, 4.6), _w(7, 8), _w(-3, -2)], turns) == \
        ["A", "B", "B", "A"]
    # Exactly halfway: the earlier turn.
    assert _speakers([_w(2.5, 3.5)], turns) == ["A"]


def test_overlapping_turns_of_two_speakers() -> None:
    # Pyannote gives overlapped speech as two turns at once.
    turns = [_turn(0, 4, "A"), _turn(2, 6, "B")]
    assert _speakers([_w(1.0, 2.5), _w(3.5, 5.0), _w(2.5, 3.5)], turns) == ["A", "B", "A"]
    # An equal overlap goes to the speaker whose turn starts first, whatever the input order.
    assert _speakers([_w(2.5, 3.5)], list(reversed(turns))) == ["A"]
    assert _speakers([_w(2.5, 3.5)], [_turn(2, 6, "B"), _turn(2, 6, "A")]) == ["A"]


def test_no_turns_means_no_speaker_and_no_words_means_nothing() -> None:
    assert _speakers([_w(0, 1), _w(1, 1)], []) == [None, None]
    assert t.assign_speakers([], [_turn(0, 1, "A")]) == []


def test_a_zero_length_word_is_a_point() -> None:
    turns = [_turn(0, 2, "A"), _turn(1, 3, "B"), _turn(5, 6, "C")]
    words = [_w(0.5, 0.5), _w(2.5, 2.5), _w(1.5, 1.5), _w(4.5, 4.5), _w(3.0, 3.0)]
    # Inside A only; inside B only; inside both (the earlier turn); in silence (nearest);
    # on B's edge (distance 0).
    assert _speakers(words, turns) == ["A", "B", "A", "C", "B"]


def test_a_word_touching_a_turn_at_its_edge_is_at_distance_zero() -> None:
    turns = [_turn(0, 1, "A"), _turn(1.2, 5, "B")]
    assert _speakers([_w(1.0, 1.1)], turns) == ["A"]
    # A reversed word is the point where it starts.
    assert _speakers([_w(1.19, 0.2)], turns) == ["B"]


def test_words_are_copied_in_order_and_the_inputs_left_alone() -> None:
    words = [_w(3, 4, " b"), _w(0, 1, " a")]
    turns = [_turn(2, 5, "B"), _turn(0, 2, "A")]
    before = json.dumps([words, turns])
    out = t.assign_speakers(words, turns)
    assert [(w["word"], w["speaker"]) for w in out] == [(" b", "B"), (" a", "A")]
    assert out[0]["probability"] == 0.9
    assert json.dumps([words, turns]) == before


def test_words_or_turns_without_finite_times() -> None:
    nan = float("nan")
    turns = [_turn(nan, 3, "X"), _turn(0, 1, "A")]
    assert _speakers([_w(0.2, 0.8), _w(nan, 1.0)], turns) == ["A", None]


def _reference(word: dict[str, Any], turns: list[dict[str, Any]]) -> Any:
    """The rule of assign_speakers' docstring, O(turns) per word."""
    if not turns:
        return None
    a, b = word["start"], max(word["start"], word["end"])
    ordered = sorted(turns, key=lambda x: (x["start"], x["end"], x["speaker"]))
    totals: dict[str, float] = {}
    for turn in ordered:
        overlap = min(b, turn["end"]) - max(a, turn["start"])
        if overlap > 0:
            totals[turn["speaker"]] = totals.get(turn["speaker"], 0.0) + overlap
    if totals:
        return max(totals, key=totals.__getitem__)
    return min(ordered, key=lambda x: max(0.0, x["start"] - b, a - x["end"]))["speaker"]


@pytest.mark.parametrize("seed", range(20))
def test_assignment_matches_the_brute_force_rule(seed: int) -> None:
    rng = random.Random(seed)
    # Quarter seconds: many exact ties, touching edges and zero-length words and turns.
    q = lambda: rng.randrange(0, 200) / 4  # noqa: E731
    turns = []
    for _ in range(rng.randrange(0, 40)):
        start = q()
        turns.append(_turn(start, start + rng.randrange(0, 12) / 4, rng.choice("ABCD")))
    if seed % 3 == 0:
        turns.append(_turn(-1, 60, "LONG"))  # a speaker under everything: the case a scan hates
    words = []
    for _ in range(200):
        start = q()
        words.append(_w(start, start + rng.randrange(0, 6) / 4))
    assert _speakers(words, turns) == [_reference(w, turns) for w in words]


def test_twenty_thousand_words_against_five_thousand_turns() -> None:
    # Timing is not asserted (machines differ); a naive O(words x turns) version would still
    # be visibly slow here, and the answer must be right on a known pattern.
    turns = [_turn(4.0 * i, 4.0 * i + 4, f"S{i % 3}") for i in range(5000)]
    words = [_w(4.0 * i + j + 0.1, 4.0 * i + j + 0.9) for i in range(5000) for j in range(4)]
    # Every fourth word straddles into the next turn, by more on the far side.
    words[3::4] = [_w(4.0 * i + 3.7, 4.0 * i + 4.5) for i in range(5000)]
    expected = [f"S{i % 3}" for i in range(5000) for _ in range(3)]
    got = _speakers(words, turns)
    assert [s for n, s in enumerate(got) if n % 4 != 3] == expected
    assert got[3::4] == [f"S{(i + 1) % 3}" for i in range(4999)] + ["S1"]
    # A turn under the whole recording, starting first: every word ties with it, and it wins.
    everyone = _speakers(words, [*turns, _turn(-1, 30000, "BG")])
    assert set(everyone) == {"BG"} and len(everyone) == 20000


# --- speaker_segments ------------------------------------------------------------------
def test_a_speaker_change_inside_an_asr_segment_cuts_it() -> None:
    asr = [{"start": 0.0, "end": 4.0, "text": " Hello there. Hi!", "words": [
        _w(0.1, 0.5, " Hello"), _w(0.5, 1.0, " there."), _w(2.2, 2.6, " Hi!")]}]
    turns = [_turn(0, 1.5, "SPEAKER_00"), _turn(2.0, 3.0, "SPEAKER_01")]
    out = t.speaker_segments(asr, turns)
    assert [(s["start"], s["end"], s["speaker"], s["text"]) for s in out] == [
        (0.1, 1.0, "SPEAKER_00", "Hello there."), (2.2, 2.6, "SPEAKER_01", "Hi!")]
    assert [w["word"] for w in out[0]["words"]] == [" Hello", " there."]
    assert out[1]["words"] == [{"start": 2.2, "end": 2.6, "word": " Hi!", "probability": 0.9,
                                "speaker": "SPEAKER_01"}]


def test_a_speaker_who_comes_back_is_a_third_segment() -> None:
    asr = [{"start": 0, "end": 3, "text": "", "words": [
        _w(0.1, 0.4, " a"), _w(1.1, 1.4, " b"), _w(2.1, 2.4, " c")]}]
    turns = [_turn(0, 1, "A"), _turn(1, 2, "B"), _turn(2, 3, "A")]
    assert [(s["speaker"], s["text"]) for s in t.speaker_segments(asr, turns)] == \
        [("A", "a"), ("B", "b"), ("A", "c")]


def test_segments_keep_the_asr_order_and_are_never_merged_across_asr_segments() -> None:
    asr = [{"start": 0, "end": 1, "text": " one", "words": [_w(0, 1, " one")]},
           {"start": 1, "end": 2, "text": " two", "words": [_w(1, 2, " two")]}]
    out = t.speaker_segments(asr, [_turn(0, 2, "A")])
    assert [s["text"] for s in out] == ["one", "two"]


def test_max_gap_cuts_at_a_long_pause() -> None:
    asr = [{"start": 0, "end": 9, "text": "", "words": [
        _w(0, 1, " a"), _w(1.5, 2, " b"), _w(5, 6, " c")]}]
    turns = [_turn(0, 9, "A")]
    assert [s["text"] for s in t.speaker_segments(asr, turns)] == ["a b c"]
    assert [s["text"] for s in t.speaker_segments(asr, turns, max_gap=1.0)] == ["a b", "c"]


def test_a_segment_without_words_stays_whole() -> None:
    asr = [{"start": 0.5, "end": 4.0, "text": " no word times ", "words": None},
           {"start": 5.5, "end": 6.5, "text": " nor here", "words": []}]
    turns = [_turn(0, 1.5, "A"), _turn(1.5, 4.0, "B"), _turn(7, 8, "C")]
    out = t.speaker_segments(asr, turns)
    assert out == [_seg(0.5, 4.0, "no word times", "B"), _seg(5.5, 6.5, "nor here", "C")]


def test_no_turns_gives_segments_without_a_speaker() -> None:
    asr = [{"start": 0, "end": 2, "text": " a b", "words": [_w(0, 1, " a"), _w(1, 2, " b")]}]
    out = t.speaker_segments(asr, [])
    assert [(s["speaker"], s["text"]) for s in out] == [(None, "a b")]
    assert t.speaker_segments([], [_turn(0, 1, "A")]) == []


def test_times_are_rounded_to_the_millisecond() -> None:
    asr = [{"start": 0, "end": 2, "text": "", "words": [_w(0.12345, 1.99951, " a")]}]
    (seg,) = t.speaker_segments(asr, [_turn(0, 2, "A")])
    assert (seg["start"], seg["end"]) == (0.123, 2.0)
    assert (seg["words"][0]["start"], seg["words"][0]["end"]) == (0.123, 2.0)


# --- SRT and WebVTT ----------------------------------------------------------------------
def test_srt_cues() -> None:
    segments = [_seg(0.0, 1.5, "Hello."), _seg(2.0, 3.25, "Hi!", "SPEAKER_01")]
    assert t.to_srt(segments) == (
        "1\n00:00:00,000 --> 00:00:01,500\n[SPEAKER_00] Hello.\n\n"
        "2\n00:00:02,000 --> 00:00:03,250\n[SPEAKER_01] Hi!\n\n")
    assert t.to_srt([]) == ""


def test_vtt_cues() -> None:
    segments = [_seg(0.0, 1.5, "Hello."), _seg(2.0, 3.25, "Hi!", "SPEAKER_01")]
    assert t.to_vtt(segments) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:01.500\n<v SPEAKER_00>Hello.</v>\n\n"
        "00:00:02.000 --> 00:00:03.250\n<v SPEAKER_01>Hi!</v>\n\n")
    assert t.to_vtt([]) == "WEBVTT\n\n"


@pytest.mark.parametrize(("seconds", "srt"), [
    (3661.5, "01:01:01,500"),
    (360000.0, "100:00:00,000"),
    (360000.0 + 59 * 60 + 59.999, "100:59:59,999"),
    (59.9996, "00:01:00,000"),
    (3599.9996, "01:00:00,000"),
    (59.9994, "00:00:59,999"),
    (1.0016, "00:00:01,002"),
    (-0.2, "00:00:00,000"),
])
def test_clock(seconds: float, srt: str) -> None:
    assert t.clock(seconds, ",") == srt
    assert t.clock(seconds, ".") == srt.replace(",", ".")


def test_subtitle_times_past_an_hour_and_past_a_hundred_hours() -> None:
    segments = [_seg(3600 + 0.25, 3602, "a"), _seg(360000.0, 360001.9996, "b")]
    srt, vtt = t.to_srt(segments), t.to_vtt(segments)
    assert "01:00:00,250 --> 01:00:02,000" in srt
    assert "100:00:00,000 --> 100:00:02,000" in srt
    assert "01:00:00.250 --> 01:00:02.000" in vtt
    assert "100:00:00.000 --> 100:00:02.000" in vtt


def test_a_zero_length_cue_gets_a_millisecond() -> None:
    assert "00:00:01,000 --> 00:00:01,001" in t.to_srt([_seg(1.0, 1.0, "uh")])


HOSTILE = "a < b & c --> d\n\nnext\r\nline\u2028sep  end\n"


def _cue_blocks(text: str) -> list[list[str]]:
    return [block.split("\n") for block in text.split("\n\n") if block]


def test_vtt_escapes_markup_and_cannot_end_a_cue_early() -> None:
    vtt = t.to_vtt([_seg(0, 1, HOSTILE, "<b>&\nx")])
    assert vtt == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n"
                   "<v &lt;b&gt;&amp; x>a &lt; b &amp; c --&gt; d next line sep end</v>\n\n")
    (header, cue) = _cue_blocks(vtt)
    assert header == ["WEBVTT"] and len(cue) == 2
    assert "-->" not in cue[1]


def test_srt_text_is_one_line_without_an_arrow() -> None:
    srt = t.to_srt([_seg(0, 1, HOSTILE, "SPEAKER\n\n00")])
    assert srt == ("1\n00:00:00,000 --> 00:00:01,000\n"
                   "[SPEAKER 00] a < b & c -> d next line sep end\n\n")
    (cue,) = _cue_blocks(srt)
    assert len(cue) == 3


def test_no_speaker_is_shown_as_unknown_but_stays_null_in_json() -> None:
    segments = [_seg(0, 1, "hi", None)]
    assert "[UNKNOWN] hi" in t.to_srt(segments)
    assert "<v UNKNOWN>hi</v>" in t.to_vtt(segments)
    assert t.to_txt(segments) == "UNKNOWN: hi\n"
    assert json.loads(t.to_json(segments, {}))["segments"][0]["speaker"] is None


def test_utf8_text_is_kept_in_every_format(tmp_path: Path) -> None:
    segments = [_seg(0, 1, "café 漢字", "SPEAKER_é")]
    outputs = {"srt": t.to_srt(segments), "vtt": t.to_vtt(segments), "txt": t.to_txt(segments),
               "json": t.to_json(segments, {"language": "fr"})}
    for ext, text in outputs.items():
        path = tmp_path / f"out.{ext}"
        path.write_text(text, encoding="utf-8")
        raw = path.read_bytes()
        assert "café 漢字".encode() in raw, ext
        assert b"\\u" not in raw, ext
    assert json.loads(outputs["json"])["segments"][0]["text"] == "café 漢字"


# --- TXT and JSON ------------------------------------------------------------------------
def test_txt_merges_consecutive_segments_of_one_speaker() -> None:
    segments = [_seg(0, 1, "Hello."), _seg(1, 2, "How are\nyou?"), _seg(2, 3, "Fine.", "B"),
                _seg(3, 4, "", "B"), _seg(3, 4, "Thanks.", "B"), _seg(4, 5, "Good.")]
    assert t.to_txt(segments) == \
        "SPEAKER_00: Hello. How are you?\nB: Fine. Thanks.\nSPEAKER_00: Good.\n"
    assert t.to_txt([_seg(0, 1, "", "A")]) == "A:\n"
    assert t.to_txt([]) == ""


def test_json_has_the_extra_keys_and_the_segments() -> None:
    segments = [_seg(0, 1, "hi")]
    extra = {"language": "en", "models": {"asr": "small", "diarization": "3.1"}}
    text = t.to_json(segments, extra)
    assert text.endswith("}\n") and text.startswith('{\n "language": "en",\n')
    assert json.loads(text) == {**extra, "segments": segments}
    with pytest.raises(ValueError, match="segments"):
        t.to_json(segments, {"segments": []})
    with pytest.raises(ValueError):
        t.to_json([_seg(float("nan"), 1, "x")], {})


def test_the_whole_chain_round_trips_through_json() -> None:
    asr = [{"start": 0, "end": 3, "text": "", "words": [
        _w(0.1, 0.5, " Bonjour"), _w(0.5, 0.9, " à"), _w(1.6, 2.0, " vous")]}]
    segments = t.speaker_segments(asr, [_turn(0, 1.2, "A"), _turn(1.2, 3, "B")])
    assert json.loads(t.to_json(segments, {}))["segments"] == segments
    assert t.to_txt(segments) == "A: Bonjour à\nB: vous\n"


# --- what the target's Python can run ----------------------------------------------------
def test_the_module_parses_as_python_3_9_and_imports_only_the_standard_library() -> None:
    source = SOURCE.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    modules = {alias.name.split(".")[0] for node in ast.walk(tree)
               if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    assert modules and modules <= set(sys.stdlib_module_names) | {"__future__"}
    # Outside annotations (deferred by the __future__ import), `X | Y` would fail on 3.9.
    assert "from __future__ import annotations" in source
