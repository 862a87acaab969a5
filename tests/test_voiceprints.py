"""Voiceprints, fast: the matching (exclusive or not, ties, the threshold's edges, more
voiceprints than speakers and the reverse), the file (round trip, modes, refusals of a
folder), the clip refusals, the options of bin/diarize, bin/transcribe and bin/enroll, and
the names in every output format.

The embeddings here are small hand-made vectors: what is tested is the arithmetic and the
files, not a model. A real enrolment and a real dialogue run in the slow end-to-end tests.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bundler.runtime import diarize, enroll, exits, outputs, transcribe, transcript
from bundler.runtime import voiceprints as v

MODEL = v.EmbeddingModel("pyannote/speaker-diarization-community-1", "6" * 40, "a" * 64)
OTHER = v.EmbeddingModel("pyannote/wespeaker-voxceleb-resnet34-LM", "7" * 40, "b" * 64)


def _vp(name: str, vector: tuple[float, ...], model: v.EmbeddingModel = MODEL
        ) -> v.Voiceprint:
    return v.Voiceprint(name, model, vector, (v.Clip("c" * 64, 5.0, 4.2),), "2026-12-07")


def _named(matches: list[v.Match]) -> dict[str, str | None]:
    return {m.speaker: m.identified_as for m in matches}


# --- matching ------------------------------------------------------------------------------
def test_exclusive_matching_is_the_best_one_to_one_assignment_not_the_greedy_one() -> None:
    # Greedy would give alice to S0 (0.9, the highest pair) and leave S1 nothing above the
    # threshold; the assignment with the largest total names both speakers.
    prints = [_vp("alice", (1.0, 0.0, 0.0)), _vp("bob", (0.0, 1.0, 0.0))]
    centroids = {"SPEAKER_00": (0.9, 0.8, 0.0), "SPEAKER_01": (0.8, 0.1, 0.0)}
    got = v.match(centroids, prints, threshold=0.5)
    assert _named(got) == {"SPEAKER_00": "bob", "SPEAKER_01": "alice"}
    assert [m.as_dict() for m in got] == [
        {"speaker": "SPEAKER_00", "identified_as": "bob", "similarity": 0.6644},
        {"speaker": "SPEAKER_01", "identified_as": "alice", "similarity": 0.9923}]


def test_not_exclusive_each_speaker_takes_its_nearest_name_even_the_same_one() -> None:
    prints = [_vp("alice", (1.0, 0.0)), _vp("bob", (0.0, 1.0))]
    centroids = {"SPEAKER_00": (0.9, 0.1), "SPEAKER_01": (0.8, 0.2)}
    assert _named(v.match(centroids, prints, 0.5, exclusive=False)) == {
        "SPEAKER_00": "alice", "SPEAKER_01": "alice"}
    # exclusive: alice once; bob is below the threshold for the other speaker
    assert _named(v.match(centroids, prints, 0.5)) == {"SPEAKER_00": "alice",
                                                        "SPEAKER_01": None}


def test_the_threshold_names_at_the_value_and_not_below_it() -> None:
    prints = [_vp("alice", (1.0, 0.0))]
    at = {"SPEAKER_00": (0.6, 0.8)}  # cosine exactly 0.6
    assert _named(v.match(at, prints, 0.6)) == {"SPEAKER_00": "alice"}
    assert _named(v.match(at, prints, 0.6, exclusive=False)) == {"SPEAKER_00": "alice"}
    assert _named(v.match(at, prints, 0.6001)) == {"SPEAKER_00": None}
    assert _named(v.match(at, prints, 0.6001, exclusive=False)) == {"SPEAKER_00": None}
    # an unnamed speaker still says how near the best voiceprint came
    assert v.match(at, prints, 0.7)[0].as_dict() == {"speaker": "SPEAKER_00",
                                                     "identified_as": None, "similarity": 0.6}
    # the edges of the range: 0 names an orthogonal voice, 1 only the same direction
    ortho = {"SPEAKER_00": (0.0, 1.0)}
    assert _named(v.match(ortho, prints, 0.0)) == {"SPEAKER_00": "alice"}
    assert _named(v.match({"SPEAKER_00": (2.0, 0.0)}, prints, 1.0)) == {"SPEAKER_00": "alice"}
    assert _named(v.match({"SPEAKER_00": (-1.0, 0.0)}, prints, 0.0)) == {"SPEAKER_00": None}


def test_ties_break_the_same_way_every_time_earlier_label_and_name_first() -> None:
    prints = [_vp("bob", (1.0, 0.0)), _vp("alice", (1.0, 0.0))]  # identical voices
    centroids = {"SPEAKER_01": (1.0, 0.0), "SPEAKER_00": (1.0, 0.0)}
    assert _named(v.match(centroids, prints, 0.5)) == {"SPEAKER_00": "alice",
                                                        "SPEAKER_01": "bob"}
    one = [_vp("alice", (1.0, 0.0))]
    assert _named(v.match(centroids, one, 0.5)) == {"SPEAKER_00": "alice",
                                                     "SPEAKER_01": None}
    assert _named(v.match({"SPEAKER_00": (1.0, 0.0)}, prints, 0.5, exclusive=False)) == {
        "SPEAKER_00": "alice"}


def test_more_voiceprints_than_speakers_and_more_speakers_than_voiceprints() -> None:
    prints = [_vp(n, vec) for n, vec in (("alice", (1.0, 0.0, 0.0)), ("bob", (0.0, 1.0, 0.0)),
                                         ("carol", (0.0, 0.0, 1.0)))]
    assert _named(v.match({"SPEAKER_00": (0.1, 0.2, 0.9)}, prints, 0.5)) == {
        "SPEAKER_00": "carol"}
    many = {"SPEAKER_00": (0.0, 1.0, 0.1), "SPEAKER_01": (0.1, 0.1, 0.1),
            "SPEAKER_02": (0.9, 0.0, 0.2), "SPEAKER_03": (0.2, 0.95, 0.0)}
    assert _named(v.match(many, prints[:2], 0.5)) == {
        "SPEAKER_00": "bob", "SPEAKER_01": None, "SPEAKER_02": "alice", "SPEAKER_03": None}


def test_a_speaker_without_a_centroid_is_never_named() -> None:
    # pyannote pads the centroids with zeros for a speaker clustering did not make
    for exclusive in (True, False):
        got = v.match({"SPEAKER_00": None, "SPEAKER_01": (0.0, 0.0),
                       "SPEAKER_02": (float("nan"), 1.0)}, [_vp("alice", (1.0, 0.0))],
                      0.0, exclusive=exclusive)
        assert [m.as_dict() for m in got] == [
            {"speaker": f"SPEAKER_0{i}", "identified_as": None, "similarity": None}
            for i in range(3)]


@pytest.mark.parametrize("seed", range(40))
def test_assign_is_the_exact_optimum_against_every_assignment(seed: int) -> None:
    import random

    rng = random.Random(seed)
    rows, cols = rng.randint(1, 5), rng.randint(1, 5)
    weights = [[None if rng.random() < 0.3 else round(rng.random(), 3) for _ in range(cols)]
               for _ in range(rows)]
    got = v.assign(weights)
    assert len({j for _, j in got}) == len(got) and len({i for i, _ in got}) == len(got)
    assert all(weights[i][j] is not None for i, j in got)
    best = 0.0
    for k in range(min(rows, cols) + 1):
        for rs in itertools.combinations(range(rows), k):
            for cs in itertools.permutations(range(cols), k):
                pairs = [weights[i][j] for i, j in zip(rs, cs, strict=True)]
                if None not in pairs:
                    best = max(best, sum(p for p in pairs if p is not None))
    assert sum(weights[i][j] or 0.0 for i, j in got) == pytest.approx(best, abs=1e-9)


# --- the file ------------------------------------------------------------------------------
def test_a_voiceprint_round_trips_in_a_private_folder(tmp_path: Path) -> None:
    folder = tmp_path / "voices"
    vp = _vp("Ada Lovelace", (0.25, -0.5, 1.0))
    path = v.save(folder, vp)
    assert path == folder / "Ada Lovelace.json"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert v.load_folder(folder, MODEL) == [vp]
    data = json.loads(path.read_text())
    assert set(data) == {"format", "name", "embedding_model", "embedding", "clips", "created"}
    assert data["embedding_model"] == {"repo": MODEL.repo, "commit": MODEL.commit,
                                       "sha256": MODEL.sha256}
    assert [p.name for p in folder.iterdir()] == ["Ada Lovelace.json"]  # no temporary left


def test_saving_an_existing_name_is_refused_unless_replaced_and_remove_deletes(
        tmp_path: Path) -> None:
    folder = tmp_path / "voices"
    v.save(folder, _vp("alice", (1.0, 0.0)))
    with pytest.raises(exits.RunError, match="exists") as err:
        v.save(folder, _vp("alice", (0.0, 1.0)))
    assert err.value.code == exits.EXIT_USAGE
    v.save(folder, _vp("alice", (0.0, 1.0)), replace=True)
    assert v.load_folder(folder)[0].embedding == (0.0, 1.0)
    v.remove(folder, "alice")
    assert list(folder.iterdir()) == []
    with pytest.raises(exits.RunError, match="no voiceprint named 'alice'"):
        v.remove(folder, "alice")


def _refused(folder: Path, model: v.EmbeddingModel | None = MODEL) -> str:
    with pytest.raises(exits.RunError) as err:
        v.load_folder(folder, model)
    assert err.value.code == exits.EXIT_USAGE
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_folder_with_another_models_voiceprint_is_refused_naming_both(
        tmp_path: Path) -> None:
    v.save(tmp_path, _vp("alice", (1.0, 0.0)))
    v.save(tmp_path, _vp("bob", (0.0, 1.0), OTHER))
    text = _refused(tmp_path)
    assert str(OTHER) in text and str(MODEL) in text and "bob.json" in text
    assert len(v.load_folder(tmp_path, None)) == 2  # --list shows them all


@pytest.mark.parametrize("content, why", [
    (b"{not json", "not JSON"),
    (b'{"format": 1, "name": "alice"}', "missing"),
    (b'{"format": 9}', "not a voiceprint"),
    (b"\xff\xfe", "not a usable voiceprint"),
])
def test_a_corrupt_voiceprint_refuses_the_folder_in_one_line(
        tmp_path: Path, content: bytes, why: str) -> None:
    v.save(tmp_path, _vp("bob", (0.0, 1.0)))
    (tmp_path / "alice.json").write_bytes(content)
    assert why in _refused(tmp_path)


def test_a_zero_or_non_finite_embedding_is_corrupt(tmp_path: Path) -> None:
    for vector in ((0.0, 0.0), (float("nan"), 1.0)):
        text = _vp("alice", (1.0, 0.0)).to_json().replace("1.0,\n  0.0", ", ".join(
            json.dumps(x) if x == x else "NaN" for x in vector))
        (tmp_path / "alice.json").write_text(text)
        assert "embedding" in _refused(tmp_path)


def test_two_files_of_one_name_and_a_renamed_file_are_refused(tmp_path: Path) -> None:
    v.save(tmp_path, _vp("alice", (1.0, 0.0)))
    (tmp_path / "Alice.json").write_text(_vp("Alice", (0.0, 1.0)).to_json())
    assert "two voiceprints of one name" in _refused(tmp_path)
    (tmp_path / "Alice.json").unlink()
    (tmp_path / "carol.json").write_text(_vp("dave", (0.0, 1.0)).to_json())
    assert "holds the voiceprint of 'dave'" in _refused(tmp_path)


def test_an_unreadable_voiceprint_and_a_missing_or_empty_folder_are_refused(
        tmp_path: Path) -> None:
    assert "no such folder" in _refused(tmp_path / "nope")
    assert "no voiceprints there" in _refused(tmp_path)
    path = v.save(tmp_path, _vp("alice", (1.0, 0.0)))
    if os.geteuid() != 0:  # root reads any file
        path.chmod(0)
        assert "cannot read voiceprint" in _refused(tmp_path)


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "a\nb", "x" * 65, "SPEAKER_00",
                                  "speaker_3", "-dash", "trailing "])
def test_names_that_cannot_be_a_voiceprint(name: str) -> None:
    with pytest.raises(exits.RunError) as err:
        v.check_name(name)
    assert err.value.code == exits.EXIT_USAGE and "\n" not in str(err.value)


def test_the_embedding_model_is_read_from_either_recipes_manifest() -> None:
    community = {"models": [{"role": "pipeline", "repo": "pyannote/community-1",
                             "commit": "1" * 40, "files": [
                                 {"path": "segmentation/pytorch_model.bin", "sha256": "s"},
                                 {"path": "embedding/pytorch_model.bin", "sha256": "e"}]}]}
    assert v.embedding_model(community) == v.EmbeddingModel("pyannote/community-1",
                                                             "1" * 40, "e")
    three = {"models": [{"role": "segmentation", "repo": "pyannote/segmentation-3.0",
                         "commit": "2" * 40, "files": [{"path": "pytorch_model.bin",
                                                        "sha256": "s"}]},
                        {"role": "embedding", "repo": "pyannote/wespeaker-voxceleb-resnet34-LM",
                         "commit": "3" * 40, "files": [{"path": "pytorch_model.bin",
                                                        "sha256": "w"}]}]}
    assert v.embedding_model(three).sha256 == "w"
    with pytest.raises(exits.RunError) as err:
        v.embedding_model({"models": []})
    assert err.value.code == exits.EXIT_CANNOT_RUN


# --- one enrollment clip -------------------------------------------------------------------
def _clip(segments: list[tuple[float, float, str]], vectors: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    return {"segments": [{"start": a, "end": b, "speaker": s} for a, b, s in segments],
            "speaker_embeddings": vectors if vectors is not None else
            {s: [1.0, 0.0] for _, _, s in segments}}


def test_a_clip_of_one_voice_gives_its_embedding_and_seconds_of_speech() -> None:
    got = v.clip_voice(_clip([(0.0, 1.0, "SPEAKER_00"), (0.5, 1.5, "SPEAKER_00"),
                              (2.0, 2.5, "SPEAKER_00")]), "a.wav")
    assert got == ([1.0, 0.0], 2.0)


@pytest.mark.parametrize("segments, vectors, why", [
    ([], {}, "no speech in it"),
    ([(0.0, 2.0, "SPEAKER_00"), (2.0, 4.0, "SPEAKER_01")], None, "hears 2 voices"),
    ([(0.0, 0.7, "SPEAKER_00"), (1.0, 1.49, "SPEAKER_00")], None, "only 1.2 s of speech"),
    ([(0.0, 3.0, "SPEAKER_00")], {"SPEAKER_00": None}, "no embedding"),
])
def test_a_clip_that_cannot_stand_for_one_voice_is_refused(
        segments: list[tuple[float, float, str]], vectors: Any, why: str) -> None:
    with pytest.raises(exits.RunError) as err:
        v.clip_voice(_clip(segments, vectors), "a.wav")
    assert err.value.code == exits.EXIT_USAGE and why in str(err.value)
    assert str(err.value).startswith("a.wav: ")


def test_clips_combine_into_one_unit_vector_weighted_by_speech() -> None:
    got = v.combine([[2.0, 0.0], [0.0, 1.0]], [3.0, 1.0])
    assert got == pytest.approx((0.9486833, 0.3162278))


# --- the options ----------------------------------------------------------------------------
def _args(argv: list[str], program: Any = None) -> argparse.Namespace:
    from bundler.runtime import recordings

    program = program or diarize.Diarize()
    return recordings.parser(program).parse_args(["x.wav", *argv])


def _prefix(tmp_path: Path, model: v.EmbeddingModel = MODEL) -> Path:
    tmp_path.mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"models": [{
        "role": "pipeline", "repo": model.repo, "commit": model.commit,
        "files": [{"path": "embedding/pytorch_model.bin", "sha256": model.sha256}]}]}))
    return tmp_path


@pytest.mark.parametrize("program", [diarize.Diarize(), transcribe.Transcribe()],
                         ids=["diarize", "transcribe"])
def test_both_programs_take_the_voiceprint_options_from_one_place(
        program: Any, tmp_path: Path) -> None:
    args = _args(["--voiceprints", str(tmp_path), "--match-threshold", "0.7",
                  "--no-exclusive"], program)
    assert (args.voiceprints, args.match_threshold, args.exclusive) == (tmp_path, 0.7, False)
    plain = _args([], program)
    assert (plain.voiceprints, plain.match_threshold, plain.exclusive) == (None, None, True)


@pytest.mark.parametrize("argv, why", [
    (["--match-threshold", "1.5", "--voiceprints", "."], "between 0 and 1"),
    (["--match-threshold", "-0.1", "--voiceprints", "."], "between 0 and 1"),
    (["--match-threshold", "0.5"], "need --voiceprints"),
    (["--no-exclusive"], "need --voiceprints"),
])
def test_bad_voiceprint_options_are_usage_errors(argv: list[str], why: str,
                                                 tmp_path: Path) -> None:
    with pytest.raises(exits.RunError) as err:
        v.check_arguments(_args(argv), tmp_path)
    assert err.value.code == exits.EXIT_USAGE and why in str(err.value)


def test_the_folder_is_checked_against_the_installs_model_before_any_model_loads(
        tmp_path: Path) -> None:
    folder = tmp_path / "voices"
    v.save(folder, _vp("alice", (1.0, 0.0)))
    args = _args(["--voiceprints", str(folder)])
    assert v.check_arguments(args, _prefix(tmp_path / "a")) == [_vp("alice", (1.0, 0.0))]
    with pytest.raises(exits.RunError, match="made with the embedding model"):
        v.check_arguments(args, _prefix(tmp_path / "b", OTHER))
    with pytest.raises(exits.RunError) as err:
        v.check_arguments(args, tmp_path / "no-install")
    assert err.value.code == exits.EXIT_CANNOT_RUN


def test_bin_diarize_refuses_a_bad_folder_in_one_line_before_loading(tmp_path: Path) -> None:
    (tmp_path / "x.wav").write_bytes(b"RIFF")
    (tmp_path / "voices").mkdir()
    (tmp_path / "voices" / "alice.json").write_text("{")
    res = subprocess.run([sys.executable, diarize.__file__, str(tmp_path / "x.wav"),
                          "--voiceprints", str(tmp_path / "voices"), "-o",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == exits.EXIT_USAGE
    lines = res.stderr.strip().splitlines()
    assert "alice.json is not a usable voiceprint: not JSON" in lines[0]
    assert len(lines) == 1 and lines[0].startswith("diarize: error: "), res.stderr
    assert "Traceback" not in res.stderr


# --- names in every output -----------------------------------------------------------------
def test_identified_speakers_are_named_in_every_format_and_json_says_how() -> None:
    known = [_vp("Ada Lovelace", (1.0, 0.0)), _vp("bob", (0.0, 1.0))]
    args = argparse.Namespace(known_voices=known, match_threshold=None, exclusive=True)
    result = {"segments": [{"start": 0.0, "end": 1.0, "speaker": "SPEAKER_00"},
                           {"start": 1.0, "end": 2.0, "speaker": "SPEAKER_01"},
                           {"start": 2.0, "end": 3.0, "speaker": "SPEAKER_02"}],
              "exclusive_segments": [{"start": 0.0, "end": 1.0, "speaker": "SPEAKER_00"}],
              "speaker_embeddings": {"SPEAKER_00": [0.9, 0.1], "SPEAKER_01": [-1.0, 0.1],
                                     "SPEAKER_02": [0.1, 0.9]}}
    renamed, matches = diarize.identified(dict(result), args)
    assert matches == [
        {"speaker": "SPEAKER_00", "identified_as": "Ada Lovelace", "similarity": 0.9939},
        {"speaker": "SPEAKER_01", "identified_as": None, "similarity": 0.0995},
        {"speaker": "SPEAKER_02", "identified_as": "bob", "similarity": 0.9939}]
    assert "speaker_embeddings" not in renamed  # never written to an output
    assert [s["speaker"] for s in renamed["segments"]] == ["Ada Lovelace", "SPEAKER_01", "bob"]
    assert renamed["exclusive_segments"][0]["speaker"] == "Ada Lovelace"
    assert outputs.rttm("u", renamed["segments"]).split("\n")[0].split()[7] == "Ada_Lovelace"
    words = [{"start": 0.1, "end": 0.5, "word": " Hello"}, {"start": 1.1, "end": 1.5,
                                                            "word": " hi"}]
    segs = transcript.speaker_segments([{"start": 0, "end": 2, "text": "", "words": words}],
                                       renamed["segments"])
    assert "[Ada Lovelace] Hello" in transcript.to_srt(segs)
    assert "<v Ada Lovelace>" in transcript.to_vtt(segs)
    assert "Ada Lovelace" in transcript.to_txt(segs)
    # without --voiceprints nothing changes and the embeddings are dropped all the same
    plain, none = diarize.identified(dict(result), argparse.Namespace(known_voices=None))
    assert none is None and plain["segments"] == result["segments"]
    assert "speaker_embeddings" not in plain


# --- bin/enroll's command line ---------------------------------------------------------------
def _enroll(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, enroll.__file__, *argv], capture_output=True,
                          text=True)


@pytest.mark.parametrize("argv, why", [
    (["alice"], "at least one CLIP"),
    (["--list", "alice"], "takes no NAME"),
    (["--list", "--remove", "alice"], "exclude each other"),
    (["SPEAKER_01", "a.wav"], "labels unknown speakers"),
    (["alice", "missing.wav"], "no such file"),
    (["--remove", "nobody"], "no voiceprint named 'nobody'"),
])
def test_enroll_refuses_bad_usage_in_one_line(argv: list[str], why: str,
                                              tmp_path: Path) -> None:
    res = _enroll(*argv, "--voiceprints", str(tmp_path))
    assert res.returncode == exits.EXIT_USAGE, res.stderr
    assert res.stderr.count("\n") == 1 and why in res.stderr and res.stdout == ""


def test_enroll_lists_and_removes_really(tmp_path: Path) -> None:
    v.save(tmp_path, _vp("alice", (1.0, 0.0)))
    v.save(tmp_path, _vp("bob", (0.0, 1.0), OTHER))
    listed = _enroll("--list", "--voiceprints", str(tmp_path), "--json", "--block-network")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["network_attempts"] == 0  # counted, as bin/diarize's
    rows = json.loads(listed.stdout)["voiceprints"]
    assert [(r["name"], r["embedding_model"]["repo"]) for r in rows] == [
        ("alice", MODEL.repo), ("bob", OTHER.repo)]
    gone = _enroll("--remove", "alice", "--voiceprints", str(tmp_path))
    assert gone.returncode == 0 and "removed alice" in gone.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bob.json"]


def test_enroll_refuses_to_overwrite_before_loading_any_model(tmp_path: Path) -> None:
    v.save(tmp_path, _vp("alice", (1.0, 0.0)))
    clip = tmp_path / "a.wav"
    clip.write_bytes(b"RIFF")
    res = _enroll("alice", str(clip), "--voiceprints", str(tmp_path))
    assert res.returncode == exits.EXIT_USAGE and "--replace" in res.stderr


# --- shipped and installed ---------------------------------------------------------------------
def test_every_bundle_ships_enroll_and_configure_writes_bin_enroll(tmp_path: Path) -> None:
    from test_transcribe import _configure

    from bundler import layout

    assert {layout.ENROLL_SCRIPT, layout.VOICEPRINTS_MODULE} <= set(layout.PROGRAMS)
    from bundler.runtime import install

    assert layout.PREFIX_ENROLL in install.STABLE and layout.PREFIX_ENROLL in install.OPTIONAL
    prefix = _configure(tmp_path, {"bundle": "x"})
    wrapper = (prefix / layout.PREFIX_ENROLL).read_text()
    assert (prefix / layout.PREFIX_ENROLL).stat().st_mode & 0o111
    assert "runtime/enroll.py" in wrapper and " -I " in wrapper


def test_enroll_help_runs_with_the_standard_library_alone() -> None:
    # bin/enroll --help must answer before anything heavy is imported, like bin/diarize's
    res = subprocess.run([sys.executable, "-I", "-S", enroll.__file__, "--help"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--voiceprints" in res.stdout and "exit codes" in res.stdout


# --- the centroids from either pyannote (their shapes, from 3.4.0's and 4.0.7's sources) -------
class _Turn:
    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end


class _Annotation:
    """What diarize_one reads of pyannote.core's Annotation: tracks and sorted labels."""

    def __init__(self, turns: list[tuple[float, float, str]]) -> None:
        self.turns = turns

    def itertracks(self, yield_label: bool = True) -> Any:
        return ((_Turn(a, b), "_", s) for a, b, s in self.turns)

    def labels(self) -> list[str]:
        return sorted({s for _, _, s in self.turns})


class _Tensor:
    def unsqueeze(self, _dim: int) -> _Tensor:
        return self


class _Torch:
    @staticmethod
    def from_numpy(_array: Any) -> _Tensor:
        return _Tensor()


TURNS = [(0.0, 2.0, "SPEAKER_00"), (2.0, 4.0, "SPEAKER_01"), (4.0, 5.0, "SPEAKER_02")]


class _Pipeline3:
    """pyannote 3.x: ``apply(..., return_embeddings=False, hook=None)``; with it,
    ``(annotation, centroids)``, rows in ``labels()`` order, zero-padded."""

    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}

    def apply(self, file: Any, num_speakers: Any = None, min_speakers: Any = None,
              max_speakers: Any = None, return_embeddings: bool = False,
              hook: Any = None) -> Any:
        raise AssertionError("called through __call__")

    def __call__(self, file: Any, **kwargs: Any) -> Any:
        import numpy as np

        self.kwargs = kwargs
        annotation = _Annotation(TURNS)
        if not kwargs.get("return_embeddings"):
            return annotation
        return annotation, np.array([[1.0, 0.0], [0.0, 2.0], [np.nan, np.nan]])


class _Output4:
    def __init__(self, embeddings: Any) -> None:
        self.speaker_diarization = _Annotation(TURNS)
        self.exclusive_speaker_diarization = _Annotation(TURNS)
        self.speaker_embeddings = embeddings


class _Pipeline4:
    """pyannote 4.x: ``apply(..., hook=None, **kwargs)`` returns a DiarizeOutput whose
    ``speaker_embeddings`` are always there (None with oracle clustering)."""

    def __init__(self, embeddings: Any) -> None:
        self.embeddings = embeddings
        self.kwargs: dict[str, Any] = {}

    def apply(self, file: Any, num_speakers: Any = None, min_speakers: Any = None,
              max_speakers: Any = None, hook: Any = None, **kwargs: Any) -> Any:
        raise AssertionError("called through __call__")

    def __call__(self, file: Any, **kwargs: Any) -> Any:
        self.kwargs = kwargs
        return _Output4(self.embeddings)


def _loaded(pipeline: Any) -> diarize.Loaded:
    return diarize.Loaded(pipeline, _Torch(), "cpu", "x", 0.0)


WANTED = {"SPEAKER_00": [1.0, 0.0], "SPEAKER_01": [0.0, 2.0], "SPEAKER_02": None}


def test_pyannote_3_is_asked_for_its_centroids_and_they_follow_the_labels() -> None:
    import numpy as np

    p3 = _Pipeline3()
    got = diarize.diarize_one(_loaded(p3), np.zeros(16000, np.float32), "u", {},
                              embeddings=True)
    assert p3.kwargs.get("return_embeddings") is True
    assert got["speaker_embeddings"] == WANTED
    assert [s["speaker"] for s in got["segments"]] == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_02"]
    plain = diarize.diarize_one(_loaded(p3), np.zeros(16000, np.float32), "u", {})
    assert "return_embeddings" not in p3.kwargs and "speaker_embeddings" not in plain


def test_pyannote_4_gives_its_centroids_unasked_and_oracle_clustering_none() -> None:
    import numpy as np

    p4 = _Pipeline4(np.array([[1.0, 0.0], [0.0, 2.0]]))  # fewer rows than labels
    got = diarize.diarize_one(_loaded(p4), np.zeros(16000, np.float32), "u", {},
                              embeddings=True)
    assert "return_embeddings" not in p4.kwargs  # 4.x would swallow it in **kwargs
    assert got["speaker_embeddings"] == WANTED and got["exclusive_segments"]
    with pytest.raises(exits.RunError) as err:
        diarize.diarize_one(_loaded(_Pipeline4(None)), np.zeros(16000, np.float32), "u", {},
                            embeddings=True)
    assert err.value.code == exits.EXIT_CANNOT_RUN


def test_the_default_threshold_is_where_pyannotes_own_clustering_parts_speakers() -> None:
    """The 3.1 recipe clusters unit-normalised embeddings by centroid linkage at a Euclidean
    distance; for unit vectors that is cosine 1 - d**2 / 2 (voiceprints.DEFAULT_THRESHOLD's
    comment): the default is that similarity, to two decimals, and a name given at it goes to
    a speaker the pipeline would not have told apart from the voice."""
    import tomllib

    recipe = Path(v.__file__).parents[1] / "recipes" / "speaker-diarization-3.1.toml"
    clustering = tomllib.loads(recipe.read_text())["config"]["params"]["clustering"]
    assert clustering["method"] == "centroid"
    d = clustering["threshold"]
    assert v.DEFAULT_THRESHOLD == round(1 - d * d / 2, 2) == 0.75
    # The identity it rests on, checked on two unit vectors at that distance.
    a, b = (1.0, 0.0), (1 - d * d / 2, (1 - (1 - d * d / 2) ** 2) ** 0.5)
    assert abs(((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5 - d) < 1e-12
    assert abs(v.cosine(a, b) - (1 - d * d / 2)) < 1e-12
