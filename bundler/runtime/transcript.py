"""transcript: who said what, from ASR words and diarization turns, and its file formats.

The pure part of ``bin/transcribe``: no audio, no models, no files, standard library only
(it ships verbatim and runs with the target's Python, 3.9 included).

Inputs, as plain dicts (faster-whisper's ``Segment``/``Word`` turned into dicts, and the
turns ``bin/diarize`` writes):

- a word: ``{"start": 1.0, "end": 1.4, "word": " hello", "probability": 0.98}``. ``word``
  carries its own leading space (none for languages written without spaces), so a text is
  the words joined with ``""``;
- an ASR segment: ``{"start", "end", "text", "words": [word, ...]}``; ``words`` is empty or
  ``None`` when the ASR ran without word timestamps;
- a turn: ``{"start": 0.5, "end": 3.2, "speaker": "SPEAKER_00"}``; turns may overlap.

A word goes to the speaker who talks most during it (:func:`assign_speakers`); segments are
cut where the speaker changes (:func:`speaker_segments`); :func:`to_srt`, :func:`to_vtt`,
:func:`to_txt` and :func:`to_json` render them; :func:`renamed` gives speakers their names
(a voiceprint's, or one a user set in the service). RTTM is not written here: it is the
diarization's own output (``diarize.rttm_lines``).

A speaker of ``None`` means "no diarization": the subtitle and text formats show it as
``UNKNOWN``; JSON keeps ``null``, so that a program reading it cannot mistake it for a
speaker really named UNKNOWN.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

UNKNOWN = "UNKNOWN"
# Output times are rounded to the millisecond: what SRT and WebVTT can say, and what JSON
# says too, so that every format of one recording agrees.
DECIMALS = 3


# --- speaker assignment --------------------------------------------------------------------
class _Turns:
    """The turns, sorted once by (start, end, speaker), with a max-end tree for overlap queries.

    Sorted by start, the turns that can touch ``[a, b]`` are a prefix (start <= b); the tree
    holds the largest end under each node, so the ones in that prefix that also reach ``a``
    are found in O((k + 1) log n) for k hits, whatever the turns look like. (A prefix scan
    would do for turns that never overlap, but one long turn, a speaker over background
    music, would make every later word scan back to it: O(words x turns).)
    """

    def __init__(self, turns: Iterable[Mapping[str, Any]]) -> None:
        clean = []
        for turn in turns:
            start, end = float(turn["start"]), float(turn["end"])
            # A turn with no finite time cannot be placed; a reversed one is read as a point.
            if math.isfinite(start) and math.isfinite(end):
                clean.append((start, max(start, end), turn["speaker"]))
        # str() in the key only orders the sort; the speaker keeps its own value.
        clean.sort(key=lambda t: (t[0], t[1], str(t[2])))
        self.starts = [t[0] for t in clean]
        self.ends = [t[1] for t in clean]
        self.speakers = [t[2] for t in clean]
        n = len(clean)
        self.size = 1 << max(0, n - 1).bit_length()
        tree = [-math.inf] * (2 * self.size)
        tree[self.size:self.size + n] = self.ends
        for node in range(self.size - 1, 0, -1):
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
        self.tree = tree
        # The earliest turn with the latest end among the first i + 1 turns: the nearest turn
        # before a word that no turn touches.
        self.latest: list[int] = []
        for i, end in enumerate(self.ends):
            best = self.latest[-1] if self.latest else i
            self.latest.append(i if end > self.ends[best] else best)

    def __len__(self) -> int:
        return len(self.starts)

    def touching(self, a: float, b: float) -> tuple[list[int], int]:
        """The turns whose closed interval meets ``[a, b]``, in sorted order, and the number of
        turns that start at or before ``b``."""
        limit = bisect_right(self.starts, b)
        hits: list[int] = []
        stack = [(1, 0, self.size)]
        while stack:
            node, lo, hi = stack.pop()
            if lo >= limit or self.tree[node] < a:
                continue
            if node >= self.size:
                hits.append(lo)
                continue
            mid = (lo + hi) // 2
            # Right pushed first: the left half pops first, so hits come out in sorted order.
            stack.append((2 * node + 1, mid, hi))
            stack.append((2 * node, lo, mid))
        return hits, limit

    def speaker_for(self, a: float, b: float) -> Any:
        """The speaker for the interval ``[a, b]`` (``a <= b``): see :func:`assign_speakers`."""
        if not self.starts:
            return None
        hits, limit = self.touching(a, b)
        if hits:
            totals: dict[Any, float] = {}
            for i in hits:
                overlap = min(b, self.ends[i]) - max(a, self.starts[i])
                if overlap > 0:
                    totals[self.speakers[i]] = totals.get(self.speakers[i], 0.0) + overlap
            if totals:
                # max() keeps the first of equals, and totals are filled in turn order: a tie
                # goes to the speaker whose overlapping turn starts first.
                return max(totals, key=totals.__getitem__)
            # Touching but not overlapping: a point inside a turn, or a word that meets a turn
            # at its edge. Distance 0, so the earliest such turn, as for the nearest below.
            return self.speakers[hits[0]]
        # Nothing touches: every turn before `limit` ends before a, every one from `limit` on
        # starts after b. The nearest on each side, and the earlier one on a tie.
        if limit == 0:
            return self.speakers[0]
        before = self.latest[limit - 1]
        if limit == len(self) or a - self.ends[before] <= self.starts[limit] - b:
            return self.speakers[before]
        return self.speakers[limit]


def _interval(start: Any, end: Any) -> tuple[float, float] | None:
    a, b = float(start), float(end)
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    # ASR sometimes ends a word before it starts: read it as the point where it starts.
    return a, max(a, b)


def _assign(words: Iterable[Mapping[str, Any]], turns: _Turns) -> list[dict[str, Any]]:
    out = []
    for word in words:
        span = _interval(word["start"], word["end"])
        speaker = turns.speaker_for(*span) if span is not None else None
        out.append({**word, "speaker": speaker})
    return out


def assign_speakers(words: Iterable[Mapping[str, Any]],
                    turns: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each word, copied, with ``speaker`` added; the inputs are not changed.

    The speaker is the one whose turns overlap the word ``[start, end]`` the most (overlaps
    summed per speaker). When no turn overlaps it, the speaker of the nearest turn, by the
    distance between the two intervals; a turn that contains a zero-length word, or meets a
    word at its edge, is at distance 0. ``None`` when there are no turns, or when the word's
    times are not finite numbers. A word whose end is before its start is the point at its
    start.

    Ties, so that the same input always gives the same transcript: turns are ordered by
    (start, end, speaker); equal overlaps go to the speaker whose overlapping turn comes first
    in that order, equal distances to the first turn in it (the one before the word, when
    one is before and one after).

    Turns are sorted once and searched with a tree: O((words + turns) log turns) for
    diarization-shaped input, however long the recording.
    """
    return _assign(words, _Turns(turns))


# --- segments --------------------------------------------------------------------------
def _ms(seconds: float) -> float:
    return round(seconds, DECIMALS)


def _segment(words: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "start": _ms(min(float(w["start"]) for w in words)),
        "end": _ms(max(float(w["end"]) for w in words)),
        "speaker": words[0]["speaker"],
        "text": "".join(str(w["word"]) for w in words).strip(),
        "words": [{"start": _ms(float(w["start"])), "end": _ms(float(w["end"])),
                   "word": w["word"], "probability": w.get("probability"),
                   "speaker": w["speaker"]} for w in words],
    }


def speaker_segments(asr_segments: Iterable[Mapping[str, Any]],
                     turns: Iterable[Mapping[str, Any]],
                     max_gap: float | None = None) -> list[dict[str, Any]]:
    """The transcript: the ASR segments, in their order, each cut where the speaker changes.

    Each output segment is ``{"start", "end", "speaker", "text", "words"}``: its words (with
    ``start``, ``end``, ``word``, ``probability`` and ``speaker``) in their order, ``text``
    their ``word`` strings joined and stripped, and ``start``/``end`` the first start and last
    end among them, so that a cut falls between two words and not at the ASR segment's
    edges. With ``max_gap`` (seconds), a pause between two words longer than it cuts too,
    so that a subtitle does not stay on screen through a silence.

    An ASR segment without words (no word timestamps) stays whole: its own times and text,
    ``words`` empty, and the speaker of its ``[start, end]`` by the rule of
    :func:`assign_speakers`. Times are rounded to the millisecond.
    """
    index = _Turns(turns)
    out: list[dict[str, Any]] = []
    for segment in asr_segments:
        words = _assign(segment.get("words") or [], index)
        if not words:
            span = _interval(segment["start"], segment["end"])
            out.append({
                "start": _ms(float(segment["start"])), "end": _ms(float(segment["end"])),
                "speaker": index.speaker_for(*span) if span is not None else None,
                "text": str(segment.get("text") or "").strip(), "words": []})
            continue
        run = [words[0]]
        for word in words[1:]:
            pause = float(word["start"]) - float(run[-1]["end"])
            if word["speaker"] != run[-1]["speaker"] or (max_gap is not None
                                                          and pause > max_gap):
                out.append(_segment(run))
                run = []
            run.append(word)
        out.append(_segment(run))
    return out


# --- formats ---------------------------------------------------------------------------
def label(speaker: Any) -> str:
    """The speaker as the subtitle and text formats show it: ``UNKNOWN`` for ``None``."""
    return UNKNOWN if speaker is None else one_line(str(speaker))


def one_line(text: str) -> str:
    """Every run of whitespace, line breaks included (``\\r``, ``\\n``, U+2028, ...), made one
    space, and the ends stripped: in SRT and WebVTT an empty line ends a cue, and a cue that
    is one line cannot hold one."""
    return " ".join(text.split())


def clock(seconds: float, separator: str) -> str:
    """``HH:MM:SS<separator>mmm``, rounded to the millisecond as the JSON times are; hours grow
    past two digits (``100:00:00,000``), negative times are 0.

    The millisecond count is rounded first and split after, so 59.9996 s is ``00:01:00``
    and never ``00:00:60``."""
    ms = max(0, int(round(round(float(seconds), DECIMALS) * 1000)))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def _cue_times(segment: Mapping[str, Any], separator: str) -> str:
    start, end = float(segment["start"]), float(segment["end"])
    # A zero-length cue (a segment of one zero-length word) is never shown by some players:
    # it is given the one millisecond it needs.
    end = max(end, start + 0.001)
    return f"{clock(start, separator)} --> {clock(end, separator)}"


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_srt(segments: Iterable[Mapping[str, Any]]) -> str:
    """SubRip: cues numbered from 1, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, then the one line
    ``[SPEAKER_00] text``, a blank line after each cue.

    SRT has no escapes: the text is made one line (:func:`one_line`) and ``-->``, which
    readers take for a timing line, becomes ``->``. ``<`` and ``&`` are left as they are."""
    cues = []
    for number, segment in enumerate(segments, 1):
        text = f"[{label(segment.get('speaker'))}] {one_line(str(segment.get('text') or ''))}"
        text = text.rstrip().replace("-->", "->")
        cues.append(f"{number}\n{_cue_times(segment, ',')}\n{text}\n\n")
    return "".join(cues)


def to_vtt(segments: Iterable[Mapping[str, Any]]) -> str:
    """WebVTT: ``WEBVTT`` and a blank line, then per segment ``HH:MM:SS.mmm --> HH:MM:SS.mmm``
    and the one line ``<v SPEAKER_00>text</v>``, a blank line after each cue.

    The text and the voice name are made one line (:func:`one_line`) and ``&``, ``<``, ``>``
    are written ``&amp;``, ``&lt;``, ``&gt;``; so a cue never holds a blank line or ``-->``
    (it becomes ``--&gt;``), and players show the characters as they were."""
    cues = ["WEBVTT\n\n"]
    for segment in segments:
        voice = _html_escape(label(segment.get("speaker")))
        text = _html_escape(one_line(str(segment.get("text") or "")))
        cues.append(f"{_cue_times(segment, '.')}\n<v {voice}>{text}</v>\n\n")
    return "".join(cues)


def to_txt(segments: Iterable[Mapping[str, Any]]) -> str:
    """Plain text, one line per turn: ``SPEAKER_00: text``, no blank lines, no times.

    Consecutive segments of one speaker make one turn, their texts joined with one space;
    each text is made one line (:func:`one_line`), so a line is always exactly one turn."""
    turns: list[tuple[Any, list[str]]] = []
    for segment in segments:
        speaker = segment.get("speaker")
        text = one_line(str(segment.get("text") or ""))
        if not turns or turns[-1][0] != speaker:
            turns.append((speaker, []))
        if text:
            turns[-1][1].append(text)
    return "".join(f"{label(speaker)}: {' '.join(texts)}".rstrip() + "\n"
                   for speaker, texts in turns)


def to_json(segments: Iterable[Mapping[str, Any]], extra: Mapping[str, Any]) -> str:
    """One JSON object: every key of ``extra`` (language, models, ...) and then ``segments``;
    UTF-8 text as it is (``ensure_ascii=False``), ``indent=1``, a final newline.

    Raises ValueError when ``extra`` has a ``segments`` key of its own, and for a time that
    is not a finite number (JSON has no NaN)."""
    if "segments" in extra:
        raise ValueError("extra must not have a 'segments' key: it would replace the segments")
    document = {**extra, "segments": [dict(s) for s in segments]}
    return json.dumps(document, ensure_ascii=False, indent=1, allow_nan=False) + "\n"


# --- speakers renamed -------------------------------------------------------------------
def renamed(result: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The result with each speaker label in ``names`` replaced, everywhere it appears."""
    if not names:
        return dict(result)

    def name(label: Any) -> Any:
        return names.get(label, label) if isinstance(label, str) else label

    out = dict(result)
    # Two labels may take one name (voiceprints matched with --no-exclusive): listed once.
    if isinstance(result.get("speakers"), list):
        out["speakers"] = list(dict.fromkeys(name(s) for s in result["speakers"]))
    for key in ("segments", "diarization", "exclusive_segments"):
        if isinstance(result.get(key), list):
            out[key] = [_renamed_segment(s, name) for s in result[key]]
    return out


def _renamed_segment(segment: Mapping[str, Any], name: Any) -> dict[str, Any]:
    seg = dict(segment)
    if "speaker" in seg:
        seg["speaker"] = name(seg["speaker"])
    if isinstance(seg.get("words"), list):
        seg["words"] = [{**w, "speaker": name(w.get("speaker"))} for w in seg["words"]]
    return seg
