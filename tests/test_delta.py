"""Deltas on small real bundles: the new bundle rebuilt byte for byte, with the tool and with
python3 alone; a wrong base, a truncated or damaged delta refused with nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import EMB, SEG, TINY_LOCK

from bundler.build import BuildOptions, build
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.pack import Entry, pack
from bundler.spec import load_recipe

CLI = [sys.executable, "-m", "bundler"]
OFFLINE = ("unshare", "-n") if shutil.which("unshare") and subprocess.run(
    ["unshare", "-n", "true"], capture_output=True).returncode == 0 else ()


def _build(out: Path, cache: Path, emb: bytes) -> Path:
    spec = load_recipe("speaker-diarization-3.1")
    repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG}),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": emb})]
    with LoopbackHub(repos) as hub:
        opts = BuildOptions(output_dir=out, cache_dir=cache, endpoint=hub.url,
                            lockfile=TINY_LOCK, compression="none")
        return build(spec, opts).packed.path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, wheel_cache: Path) -> tuple[Path, Path]:
    """OLD and NEW: the same recipe, one model file differs (as a new model commit)."""
    root = tmp_path_factory.mktemp("pair")
    old = _build(root / "old", wheel_cache, EMB)
    new = _build(root / "new", wheel_cache, EMB + b"retrained")
    assert old.name == new.name and old.read_bytes() != new.read_bytes()
    return old, new


@pytest.fixture(scope="module")
def delta(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    old, new = pair
    out = tmp_path_factory.mktemp("delta")
    proc = _cli("delta", str(old), str(new), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.splitlines()[0])
    assert path.parent == out and path.is_file()
    return path


def _cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_delta_is_small_and_named_after_both(pair: tuple[Path, Path], delta: Path) -> None:
    old, new = pair
    stem = new.name[:-len(".tar")]
    assert delta.name == f"{stem}.from-{_sha(old)[:12]}.delta.tar"
    side = delta.with_name(delta.name + ".sha256")
    assert side.read_text() == f"{_sha(delta)}  {delta.name}\n"
    with tarfile.open(delta) as tar:
        names = [m.name.partition("/")[2] for m in tar.getmembers() if m.isfile()]
        meta = json.loads(tar.extractfile(f"{delta.name[:-4]}/delta.json").read())  # type: ignore[union-attr]
    # The wheels are untouched: none of them crosses again.
    carried = [m["name"] for m in meta["members"] if m.get("from") == "delta"]
    assert carried and not any("/wheels/" in n for n in carried)
    assert any(n.endswith("pyannote_model_wespeaker-voxceleb-resnet34-LM.bin") or "wespeaker"
               in n for n in carried), carried
    assert "apply.py" in names and "delta.json" in names
    assert meta["base"]["sha256"] == _sha(old) and meta["target"]["sha256"] == _sha(new)
    assert delta.stat().st_size < new.stat().st_size / 4


def test_apply_with_the_tool_rebuilds_new_byte_for_byte(pair: tuple[Path, Path], delta: Path,
                                                         tmp_path: Path) -> None:
    old, new = pair
    proc = _cli("apply", str(delta), "--base", str(old), "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    rebuilt = tmp_path / "out" / new.name
    assert rebuilt.read_bytes() == new.read_bytes()
    assert (tmp_path / "out" / (new.name + ".sha256")).read_text() == \
        new.with_name(new.name + ".sha256").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [new.name,
                                                                  new.name + ".sha256"]
    check = subprocess.run(["sha256sum", "-c", new.name + ".sha256"], cwd=tmp_path / "out",
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_apply_py_alone_offline_in_a_clean_environment(pair: tuple[Path, Path], delta: Path,
                                                       tmp_path: Path) -> None:
    """What the sysadmin runs: tar -xf, then python3 apply.py, no tool, no network, no env."""
    old, new = pair
    subprocess.run(["tar", "-xf", str(delta), "-C", str(tmp_path)], check=True)
    folder = tmp_path / delta.name[:-len(".tar")]
    proc = subprocess.run([*OFFLINE, "env", "-i", "PATH=/usr/bin:/bin", "python3",
                           str(folder / "apply.py"), "--base", str(old), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert subprocess.run(["cmp", str(tmp_path / "out" / new.name), str(new)]).returncode == 0
    assert (tmp_path / "out" / (new.name + ".sha256")).read_text() == \
        new.with_name(new.name + ".sha256").read_text()


def test_apply_py_is_the_shipped_runtime_file(delta: Path) -> None:
    """One implementation: the delta carries bundler/runtime/apply.py verbatim."""
    from bundler.runtime import apply as runtime_apply

    with tarfile.open(delta) as tar:
        shipped = tar.extractfile(f"{delta.name[:-4]}/apply.py").read()  # type: ignore[union-attr]
    assert shipped == Path(runtime_apply.__file__).read_bytes()


def _refused(proc: subprocess.CompletedProcess[str], out: Path, code: int, words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert words in lines[-1], lines
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_wrong_base_is_refused(pair: tuple[Path, Path], delta: Path, tmp_path: Path) -> None:
    old, new = pair
    # NEW as its own base: its sidecar says it is not the base, before anything is written.
    out = tmp_path / "a"
    _refused(_cli("apply", str(delta), "--base", str(new), "--output", str(out)), out, 10,
             _sha(old))
    # The same size, one byte off in a wheel the delta takes from it, and no sidecar:
    # the result's sha256 does not match, and the base's own says why.
    with tarfile.open(old) as tar:
        wheel = next(m for m in tar.getmembers() if "/wheels/" in m.name)
    bad = tmp_path / "bad" / old.name
    bad.parent.mkdir()
    data = bytearray(old.read_bytes())
    data[wheel.offset_data + wheel.size // 2] ^= 1
    bad.write_bytes(bytes(data))
    out = tmp_path / "b"
    _refused(_cli("apply", str(delta), "--base", str(bad), "--output", str(out)), out, 10,
             "has sha256")
    out.mkdir()
    (out / "keep.txt").write_text("mine")  # an output folder that exists is left as it was
    proc = _cli("apply", str(delta), "--base", str(bad), "--output", str(out))
    assert proc.returncode == 10 and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_base_damaged_only_where_the_update_replaces_it_still_gives_new(
        pair: tuple[Path, Path], delta: Path, tmp_path: Path) -> None:
    """What the base must be is what the result needs from it: the result is checked
    against the new bundle's sha256 either way."""
    old, new = pair
    with tarfile.open(old) as tar:
        replaced = next(m for m in tar.getmembers() if "wespeaker" in m.name and m.isfile())
    data = bytearray(old.read_bytes())
    data[replaced.offset_data + 10] ^= 1
    base = tmp_path / old.name
    base.write_bytes(bytes(data))
    proc = _cli("apply", str(delta), "--base", str(base), "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / new.name).read_bytes() == new.read_bytes()


@pytest.mark.parametrize("sidecar", [True, False])
def test_truncated_delta_is_refused(delta: Path, pair: tuple[Path, Path], tmp_path: Path,
                                    sidecar: bool) -> None:
    old, _ = pair
    cut = tmp_path / delta.name
    cut.write_bytes(delta.read_bytes()[: delta.stat().st_size // 2])
    if sidecar:
        shutil.copy(delta.with_name(delta.name + ".sha256"), tmp_path)
    out = tmp_path / "out"
    _refused(_cli("apply", str(cut), "--base", str(old), "--output", str(out)), out, 10,
             delta.name)


@pytest.mark.parametrize("where", ["delta.json", "payload"])
@pytest.mark.parametrize("sidecar", [True, False])
def test_flipped_byte_in_the_delta_is_refused(delta: Path, pair: tuple[Path, Path],
                                              tmp_path: Path, where: str, sidecar: bool) -> None:
    old, _ = pair
    with tarfile.open(delta) as tar:
        member = next(m for m in tar.getmembers()
                      if (m.name.endswith("/delta.json") if where == "delta.json"
                          else "/payload/" in m.name and m.size > 1000))
    data = bytearray(delta.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x20
    bad = tmp_path / delta.name
    bad.write_bytes(bytes(data))
    if sidecar:
        shutil.copy(delta.with_name(delta.name + ".sha256"), tmp_path)
    out = tmp_path / "out"
    _refused(_cli("apply", str(bad), "--base", str(old), "--output", str(out)), out, 10,
             "damaged")
    # and apply.py alone, from the unpacked damaged delta
    subprocess.run(["tar", "-xf", str(bad), "-C", str(tmp_path)], check=True)
    proc = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "python3",
                           str(tmp_path / delta.name[:-4] / "apply.py"), "--base", str(old),
                           "--output", str(out)], capture_output=True, text=True)
    _refused(proc, out, 10, "damaged")


def test_compressed_bundles_are_refused_with_a_reason(pair: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    import zstandard

    old, new = pair
    zst = tmp_path / (new.name + ".zst")
    zst.write_bytes(zstandard.ZstdCompressor().compress(new.read_bytes()))
    proc = _cli("delta", str(old), str(zst), "--output", str(tmp_path / "out"))
    _refused(proc, tmp_path / "out", 2, "uncompressed")


def test_inspect_shows_what_a_delta_needs_and_makes(pair: tuple[Path, Path],
                                                    delta: Path) -> None:
    old, new = pair
    proc = _cli("inspect", str(delta), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["kind"] == "delta"
    assert info["needs"] == {"name": old.name, "sha256": _sha(old), "size": old.stat().st_size}
    assert info["makes"] == {"name": new.name, "sha256": _sha(new), "size": new.stat().st_size}
    assert info["from_base"]["bytes"] > info["from_delta"]["bytes"] > 0
    text = _cli("inspect", str(delta)).stdout
    assert _sha(old) in text and f"--base {old.name}" in text


def test_delta_is_reproducible(pair: tuple[Path, Path], delta: Path, tmp_path: Path) -> None:
    old, new = pair
    proc = _cli("delta", str(old), str(new), "--output", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / delta.name).read_bytes() == delta.read_bytes()


def test_build_with_base_and_split_size_writes_the_delta_and_volumes(
        pair: tuple[Path, Path], delta: Path, wheel_cache: Path, tmp_path: Path) -> None:
    """The release engineer's one command: the new bundle, its delta and its volumes."""
    import os

    old, new = pair
    repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG}),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM",
                     {"pytorch_model.bin": EMB + b"retrained"})]
    out = tmp_path / "out"
    with LoopbackHub(repos) as hub:
        proc = _cli("-q", "build", "--lockfile", str(TINY_LOCK), "--output", str(out),
                    "--cache-dir", str(wheel_cache), "--base", str(old), "--split-size",
                    "500K", env={**os.environ, "HF_ENDPOINT": hub.url})
    assert proc.returncode == 0, proc.stderr
    built = out / new.name
    assert built.read_bytes() == new.read_bytes()  # reproducible: the same bundle
    assert (out / delta.name).read_bytes() == delta.read_bytes()  # and the same delta
    parts = sorted(out.glob(new.name + ".part-*"))
    assert len(parts) >= 2 and b"".join(p.read_bytes() for p in parts) == new.read_bytes()
    assert (out / (new.name + ".parts.sha256")).is_file()
    # bad input fails before anything is built
    proc = _cli("build", "--output", str(tmp_path / "x"), "--split-size", "lots")
    assert proc.returncode == 2 and not (tmp_path / "x").exists()
    proc = _cli("build", "--output", str(tmp_path / "x"), "--base", str(old),
                "--compression", "zstd")
    assert proc.returncode == 2 and "uncompressed" in proc.stderr


def test_new_verbs_teach_with_an_example() -> None:
    for verb in ("delta", "apply", "split"):
        text = _cli(verb, "--help").stdout
        assert "Example" in text and f"pyannote-bundle {verb}" in text, verb
    assert "pyannote-bundle inspect" in _cli("inspect", "--help").stdout


def test_apply_py_runs_on_the_oldest_python_it_promises(pair: tuple[Path, Path], delta: Path,
                                                        tmp_path: Path) -> None:
    """An isolated host may have only Python 3.9: apply.py is standard library, 3.9 syntax."""
    from e2e import pyenv_python

    py39 = pyenv_python(9)
    if py39 is None:
        pytest.skip("no CPython 3.9 from pyenv on this host")
    old, new = pair
    subprocess.run(["tar", "-xf", str(delta), "-C", str(tmp_path)], check=True)
    proc = subprocess.run(["env", "-i", str(py39), "-I",
                           str(tmp_path / delta.name[:-4] / "apply.py"), "--base", str(old),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / new.name).read_bytes() == new.read_bytes()


def test_apply_never_follows_a_link_planted_at_its_temporary_names(
        pair: tuple[Path, Path], delta: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user who can write the output folder plants links at the names apply will
    use (they end in the pid: guessable); root running apply must not write through them,
    and must not remove what it did not make."""
    import os

    from bundler.runtime import apply as runtime_apply

    old, new = pair
    out = tmp_path / "shared-out"
    out.mkdir()
    victim = tmp_path / "victim.conf"
    victim.write_text("keep me\n")
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    planted = [out / f".{new.name}.sha256.partial-4242", out / f".{new.name}.partial-4242"]
    for name in planted:
        name.symlink_to(victim)
        with pytest.raises(runtime_apply.CannotWrite, match="File exists"):
            runtime_apply.apply_delta(delta, old, out)
        assert victim.read_text() == "keep me\n"
        assert name.is_symlink()  # not ours: left as it was
        assert not (out / new.name).exists() and not (out / f"{new.name}.sha256").exists()
        name.unlink()
    assert sorted(p.name for p in out.iterdir()) == []


def test_apply_refuses_to_write_over_its_own_base(pair: tuple[Path, Path], delta: Path,
                                                 tmp_path: Path) -> None:
    old, new = pair
    here = tmp_path / "bundles"
    here.mkdir()
    base = here / new.name  # the old bundle, under the new one's name
    shutil.copy(old, base)
    proc = _cli("apply", str(delta), "--base", str(base), "--output", str(here))
    assert proc.returncode == 2, proc.stderr
    assert "would replace the base" in proc.stderr and "Traceback" not in proc.stderr
    assert base.read_bytes() == old.read_bytes()


# --- hostile deltas ------------------------------------------------------------------------
def _forged(delta: Path, out_dir: Path, change: Callable[[Any], Any]) -> Path:
    """A copy of ``delta`` whose delta.json is ``change(meta)`` (an object, or raw bytes),
    re-summed with the tool's own packer (SHA256SUMS and the sidecar made again): every
    checksum passes, and only the data check can tell."""
    entries = []
    with tarfile.open(delta) as tar:
        for m in tar.getmembers():
            rel = m.name.partition("/")[2]
            if not m.isfile() or rel == "SHA256SUMS":
                continue
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            if rel == "delta.json":
                meta = change(json.loads(data))
                data = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
            entries.append(Entry.from_bytes(rel, data))
    out_dir.mkdir(parents=True, exist_ok=True)
    return pack(entries, top=delta.name[:-len(".tar")], output_dir=out_dir,
                compression="none", mtime=0).path


def _set(path: str, value: Any) -> Callable[[Any], Any]:
    """``meta`` with the field at ``path`` (dots; ``members.base``: the first member taken
    from the base, ``members.delta``: the first from the payload) set to ``value``."""

    def change(meta: Any) -> Any:
        obj = meta
        *parents, last = path.split(".")
        for key in parents:
            obj = next(m for m in obj if m.get("from") == key) if isinstance(obj, list) \
                else obj[key]
        obj[last] = value
        return meta

    return change


def _drop(key: str) -> Callable[[Any], Any]:
    def change(meta: Any) -> Any:
        del meta[key]
        return meta

    return change


def _whole_base_many_times(meta: Any) -> Any:
    """The 90 KB list that would write until the disk is full: hundreds of members, each the
    whole base, with honest names, digests and target size."""
    some = next(m for m in meta["members"] if m.get("from") == "base")
    meta["members"] += [{**some, "lead": "", "offset": 0, "size": meta["base"]["size"]}
                        for _ in range(600)]
    return meta


def _no_offset(meta: Any) -> Any:
    del next(m for m in meta["members"] if m.get("from") == "base")["offset"]
    return meta


def _no_source(meta: Any) -> Any:
    for m in meta["members"]:
        if m.get("from") == "base":
            del m["from"]
            return meta
    raise AssertionError("no member from the base")


HOSTILE_LISTS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "not JSON": (lambda meta: b'{"format": ', "is not JSON"),
    "nested too deep": (lambda meta: b"[" * 200_000 + b"]" * 200_000, "is not JSON"),
    "a list": (lambda meta: [meta], "delta.json is list, not an object"),
    "no members": (_drop("members"), "members is missing"),
    "no target": (_drop("target"), "target is missing"),
    "no tail": (_drop("tail"), "delta.tail is missing"),
    "members not a list": (_set("members", {"a": 1}), "members is missing or not a list"),
    "a member not an object": (lambda m: {**m, "members": [*m["members"], 7]}, "is not an object"),
    "size a string": (_set("members.base.size", "1024"), "size is str, not int"),
    "size a float": (_set("members.base.size", 1024.0), "size is float, not int"),
    "size a bool": (_set("members.base.size", True), "size is bool, not int"),
    "negative size": (_set("members.delta.size", -1), "below 0"),
    "negative offset": (_set("members.base.offset", -512), "offset is -512, below 0"),
    "offset past the base": (_set("members.base.offset", 1 << 40), "of a base of"),
    "no offset": (_no_offset, "offset is missing"),
    "base size negative": (_set("base.size", -1), "base.size is -1, below 0"),
    "payload not in the delta": (_set("members.delta.sha256", "ab" * 32), "the delta has none"),
    "payload size differs": (_set("members.delta.size", 3), "bytes; the delta has"),
    "unknown source": (_set("members.base.from", "elsewhere"), "not base or delta"),
    "data without a source": (_no_source, "and no source"),
    "lead not base64": (_set("members.base.lead", "**not base64**"), "lead is not base64"),
    "sha256 not hex": (_set("target.sha256", "Z" * 64), "target.sha256 is not 64"),
    "target in a folder": (_set("target.name", "../evil.tar"), "not a plain file name"),
    "target dot-dot": (_set("target.name", ".."), "not a plain file name"),
    "target empty": (_set("target.name", ""), "not a plain file name"),
    "target with NUL": (_set("target.name", "a\x00b.tar"), "not a plain file name"),
    "target with a newline": (_set("target.name", "a.tar\nffff  b.tar"),
                              "not a plain file name"),
    "target size off by one": (lambda m: _set("target.size", m["target"]["size"] + 1)(m),
                               "not the target's"),
    "whole base 600 times": (_whole_base_many_times, "make more than"),
}


@pytest.mark.parametrize("case", HOSTILE_LISTS)
def test_a_malformed_delta_list_is_refused_before_anything_is_written(
        pair: tuple[Path, Path], delta: Path, tmp_path: Path, case: str) -> None:
    """delta.json is data: checked field by field before one byte is written, exit 10 in one
    line (no traceback, no exit 5, no disk filled), by the tool and by apply.py alone."""
    old, _ = pair
    change, words = HOSTILE_LISTS[case]
    bad = _forged(delta, tmp_path / "forged", change)
    out = tmp_path / "out"
    proc = _cli("apply", str(bad), "--base", str(old), "--output", str(out))
    _refused(proc, out, 10, words)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    subprocess.run(["tar", "-xf", str(bad), "-C", str(tmp_path)], check=True)
    alone = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "python3", "-I",
                            str(tmp_path / delta.name[:-4] / "apply.py"), "--base", str(old),
                            "--output", str(out)], capture_output=True, text=True)
    _refused(alone, out, 10, words)
    assert len(alone.stderr.strip().splitlines()) == 1, alone.stderr
    shown = _cli("inspect", str(bad))
    assert shown.returncode == 10 and "Traceback" not in shown.stderr, shown.stderr


def test_a_forged_list_that_is_well_formed_still_rebuilds_only_the_recorded_bundle(
        pair: tuple[Path, Path], delta: Path, tmp_path: Path) -> None:
    """The data check is no second opinion on the result: a well-formed list that makes
    other bytes of the right size is refused by the target's sha256, as before."""
    old, _ = pair

    def swap(meta: Any) -> Any:
        base_members = [m for m in meta["members"] if m.get("from") == "base"]
        a = next(m for m in base_members if m["size"] > 100)
        a["offset"] += 1  # one byte later in the base, still inside it
        return meta

    bad = _forged(delta, tmp_path / "forged", swap)
    out = tmp_path / "out"
    _refused(_cli("apply", str(bad), "--base", str(old), "--output", str(out)), out, 10,
             "damaged")


# --- signed deltas --------------------------------------------------------------------------
def _keypair(folder: Path, name: str) -> tuple[Path, str]:
    key = folder / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
                   check=True)
    return key, key.with_suffix(".pub").read_text().strip()


@pytest.fixture(scope="module")
def signed(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, Path]:
    """A delta signed by the release key, and allowed_signers files for it and another."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("no ssh-keygen on this host")
    old, new = pair
    root = tmp_path_factory.mktemp("signed")
    key, pub = _keypair(root, "release")
    other_key, other_pub = _keypair(root, "someone-else")
    (root / "allowed_signers").write_text(f"release@example.org {pub}\n")
    (root / "allowed_other").write_text(f"other@example.org {other_pub}\n")
    proc = _cli("delta", str(old), str(new), "--output", str(root / "out"), "--sign-key",
                str(key))
    assert proc.returncode == 0, proc.stderr
    path, sidecar, signature = (Path(line) for line in proc.stdout.splitlines())
    assert signature == sidecar.with_name(sidecar.name + ".sig") and signature.is_file()
    return {"delta": path, "allowed": root / "allowed_signers",
            "allowed_other": root / "allowed_other", "key": key, "other_key": other_key}


def _copy_delta(delta: Path, dest: Path, *suffixes: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in ("", *suffixes):
        shutil.copy(delta.with_name(delta.name + suffix), dest)
    return dest / delta.name


def test_apply_allowed_signers_checks_the_delta_before_reading_it(
        pair: tuple[Path, Path], signed: dict[str, Path], tmp_path: Path) -> None:
    old, new = pair
    d, allowed = signed["delta"], signed["allowed"]
    out = tmp_path / "ok"
    proc = _cli("apply", str(d), "--base", str(old), "--output", str(out), "--json",
                "--allowed-signers", str(allowed))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["signature"] == {"ok": True, "signer": "release@example.org"}
    assert (out / new.name).read_bytes() == new.read_bytes()

    def refused(delta_path: Path, signers: Path, code: int, *words: str) -> None:
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        proc = _cli("apply", str(delta_path), "--base", str(old), "--output", str(out),
                    "--allowed-signers", str(signers))
        for w in words:
            _refused(proc, out, code, w)
        assert not out.exists()

    # Signed by a key that is not allowed: verify's words and exit code.
    refused(d, signed["allowed_other"], 10, "not signed by any key in")
    # No signature beside it.
    refused(_copy_delta(d, tmp_path / "nosig", ".sha256"), allowed, 10,
            ".sha256.sig: missing: --allowed-signers needs")
    # A forged delta whose sidecar was made again to match: the signature catches it, and
    # before the delta is read (its list is not even JSON: that would be another message).
    forged = _forged(d, tmp_path / "forged", lambda meta: b"not json")
    shutil.copy(d.with_name(d.name + ".sha256.sig"), forged.parent)
    refused(forged, allowed, 10, "does not verify for release@example.org")
    # The signed sidecar kept, the tarball changed: the sidecar's digest catches it.
    changed = _copy_delta(d, tmp_path / "changed", ".sha256", ".sha256.sig")
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 1
    changed.write_bytes(bytes(data))
    refused(changed, allowed, 10, "does not match its sidecar")
    # An unpacked folder has no signed sidecar: bad usage.
    subprocess.run(["tar", "-xf", str(d), "-C", str(tmp_path)], check=True)
    refused(tmp_path / d.name[:-4], allowed, 2, "not an unpacked folder")


def _docs_command(prefix: str) -> str:
    """The command line of docs/installing.md's "Apply an update" that starts with
    ``prefix``."""
    docs = (Path(__file__).parent.parent / "docs" / "installing.md").read_text()
    section = docs.split("\n## Apply an update\n", 1)[1].split("\n## ", 1)[0]
    (line,) = [ln.strip() for ln in section.splitlines() if ln.strip().startswith(prefix)]
    return line


def test_the_docs_python3_only_check_passes_a_signed_delta_and_refuses_a_forged_one(
        signed: dict[str, Path], tmp_path: Path) -> None:
    """Exactly the ssh-keygen line of docs/installing.md (its example name replaced by the
    real one), with sh, in the folder that holds the delta and allowed_signers."""
    verify_line = _docs_command("ssh-keygen -Y verify")
    sums_line = _docs_command("sha256sum -c")
    example = "NEW.from-0123456789ab.delta.tar"
    assert example in verify_line and "-n pyannote-bundle" in verify_line

    def run(folder: Path, line: str) -> subprocess.CompletedProcess[str]:
        shutil.copy(signed["allowed"], folder / "allowed_signers")
        return subprocess.run(["sh", "-c", line.replace(example, signed["delta"].name)],
                              cwd=folder, capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin"})

    good = _copy_delta(signed["delta"], tmp_path / "good", ".sha256", ".sha256.sig").parent
    proc = run(good, verify_line)
    assert proc.returncode == 0, proc.stderr
    assert "release@example.org" in proc.stdout + proc.stderr
    assert run(good, sums_line).returncode == 0

    # Rewritten with a matching sidecar, the genuine signature beside it: refused.
    forged = _forged(signed["delta"], tmp_path / "forged",
                     _set("target.sha256", "0" * 64)).parent
    shutil.copy(signed["delta"].with_name(signed["delta"].name + ".sha256.sig"), forged)
    assert run(forged, sums_line).returncode == 0  # the checksums alone pass
    proc = run(forged, verify_line)
    assert proc.returncode != 0, proc.stdout

    # Signed by a key allowed_signers does not hold: refused.
    other = _copy_delta(signed["delta"], tmp_path / "other", ".sha256").parent
    sidecar = other / (signed["delta"].name + ".sha256")
    subprocess.run(["ssh-keygen", "-Y", "sign", "-q", "-n", "pyannote-bundle", "-f",
                    str(signed["other_key"]), str(sidecar)], check=True)
    proc = run(other, verify_line)
    assert proc.returncode != 0, proc.stdout


# --- what was authenticated is what is applied (issue 31) ----------------------------------
APPLY_PY = Path(__file__).parent.parent / "bundler" / "runtime" / "apply.py"


def test_a_replayed_older_signed_delta_is_refused(pair: tuple[Path, Path],
                                                  signed: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """An older delta, genuinely signed by the release key (its own sidecar and signature
    intact), renamed to the name of the delta the user means to apply: the sidecar names
    the file it covers, so the signature vouches for the older name only. Refused by the
    tool and by apply.py alone, exit 10, one line, nothing written."""
    old, _ = pair
    other = tmp_path / "older" / "pyannote-older.tar"  # another bundle the same base rebuilds
    other.parent.mkdir()
    shutil.copy(old, other)
    made = _cli("delta", str(old), str(other), "--output", str(tmp_path / "older-delta"),
                "--sign-key", str(signed["key"]))
    assert made.returncode == 0, made.stderr
    older = Path(made.stdout.splitlines()[0])
    assert older.name != signed["delta"].name
    replay = tmp_path / "replay" / signed["delta"].name
    replay.parent.mkdir()
    for suffix in ("", ".sha256", ".sha256.sig"):
        shutil.copy(older.with_name(older.name + suffix), replay.with_name(replay.name + suffix))
    out = tmp_path / "out"
    proc = _cli("apply", str(replay), "--base", str(old), "--output", str(out),
                "--allowed-signers", str(signed["allowed"]))
    _refused(proc, out, 10, f"names '{older.name}', not {replay.name}")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    alone = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "python3", "-I",
                            str(APPLY_PY), "--delta", str(replay), "--base", str(old),
                            "--output", str(out)], capture_output=True, text=True)
    _refused(alone, out, 10, f"names '{older.name}', not {replay.name}")


@pytest.mark.parametrize("verb", ["apply", "verify"])
def test_a_sidecar_swapped_after_the_signature_check_cannot_pass(
        pair: tuple[Path, Path], signed: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, verb: str) -> None:
    """The genuine signed sidecar is in place while ssh-keygen checks the signature; then
    it is swapped for the sidecar of another file (a forged delta; for verify, another
    bundle) that lies at the tarball's name. The sidecar is read once: the digest checked is
    the signed one, and the other file is refused, exit 10, nothing written."""
    from bundler.delta import apply
    from bundler.errors import BundlerError
    from bundler.signing import sign
    from bundler.verify import VerifyOptions, verify

    old, new = pair
    if verb == "apply":
        genuine = signed["delta"]
        other = _forged(genuine, tmp_path / "forged", _set("target.name", "forged.tar"))
    else:  # OLD's sidecar signed; NEW (same file name, its own sidecar) at its name
        genuine = tmp_path / "signed-bundle" / old.name
        genuine.parent.mkdir()
        shutil.copy(old, genuine)
        shutil.copy(old.with_name(old.name + ".sha256"), genuine.parent)
        sign(genuine.with_name(genuine.name + ".sha256"), signed["key"])
        other = new
    target = tmp_path / "swap" / genuine.name
    target.parent.mkdir()
    shutil.copy(other, target)
    sidecar = target.with_name(target.name + ".sha256")
    shutil.copy(genuine.with_name(genuine.name + ".sha256"), sidecar)
    shutil.copy(genuine.with_name(genuine.name + ".sha256.sig"), target.parent)
    other_sidecar = other.with_name(other.name + ".sha256").read_bytes()
    assert other_sidecar != sidecar.read_bytes()

    real_run = subprocess.run
    checked: list[bool] = []

    def swap_after_verify(args: Any, *a: Any, **kw: Any) -> Any:
        res = real_run(args, *a, **kw)
        if "-Y" in args and "verify" in args:
            checked.append(res.returncode == 0)
            sidecar.write_bytes(other_sidecar)
        return res

    monkeypatch.setattr(subprocess, "run", swap_after_verify)
    out = tmp_path / "out"
    with pytest.raises(BundlerError, match="does not match") as refused:
        if verb == "apply":
            apply(target, old, out, signed["allowed"])
        else:
            verify(target, VerifyOptions(allowed_signers=signed["allowed"], install=False,
                                         workdir=tmp_path))
    assert checked == [True], "the genuine signature was checked, then the sidecar swapped"
    assert refused.value.exit_code == 10
    assert not out.exists()


@pytest.mark.parametrize("how", ["renamed over it", "rewritten in place"])
@pytest.mark.parametrize("entry", ["tool", "apply.py"])
def test_a_delta_swapped_after_it_was_hashed_is_not_applied(
        pair: tuple[Path, Path], delta: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, how: str, entry: str) -> None:
    """The delta is swapped for a forged one (consistently re-summed, its target renamed)
    at the moment it is first read as a tar, after a check that hashed it by name. What is
    applied comes from the one open file that was hashed: the genuine bundle is rebuilt, or
    the delta is refused; the forged one never is."""
    import os

    from bundler.delta import apply
    from bundler.errors import DeltaError
    from bundler.runtime import apply as runtime_apply

    old, new = pair
    path = _copy_delta(delta, tmp_path / "d", ".sha256")
    forged = _forged(delta, tmp_path / "forged", _set("target.name", "forged.tar"))
    real_open = tarfile.open
    swapped: list[bool] = []

    def swap_then_open(*a: Any, **kw: Any) -> Any:
        if not swapped:
            swapped.append(True)
            if how == "renamed over it":
                os.replace(forged, path)
            else:
                with open(path, "r+b") as f:
                    f.write(forged.read_bytes())
                    f.truncate()
        return real_open(*a, **kw)

    monkeypatch.setattr(tarfile, "open", swap_then_open)
    out = tmp_path / "out"
    try:
        if entry == "tool":
            apply(path, old, out)
        else:
            runtime_apply.apply_delta(path, old, out)
    except (DeltaError, runtime_apply.ApplyError) as exc:
        assert exc.exit_code == 10 and "does not match its sidecar" in str(exc), exc
        assert not out.exists() or not any(out.iterdir())
    else:
        assert sorted(p.name for p in out.iterdir()) == [new.name, new.name + ".sha256"]
        assert (out / new.name).read_bytes() == new.read_bytes()
    assert swapped and not (out / "forged.tar").exists()
