"""Volumes on a small real bundle: split, joined by cat, read as they are by verify and
inspect; a missing, swapped or damaged part named and refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EMB, SEG, TINY_LOCK

from bundler.build import BuildOptions, build
from bundler.bundlefile import parse_size
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.errors import InputError
from bundler.spec import load_recipe

CLI = [sys.executable, "-m", "bundler"]
PART = 300 * 1024


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, wheel_cache: Path) -> Path:
    repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG}),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB})]
    with LoopbackHub(repos) as hub:
        opts = BuildOptions(output_dir=tmp_path_factory.mktemp("b"), cache_dir=wheel_cache,
                            endpoint=hub.url, lockfile=TINY_LOCK, compression="none")
        return build(load_recipe("speaker-diarization-3.1"), opts).packed.path


@pytest.fixture
def parts(bundle: Path, tmp_path: Path) -> list[Path]:
    proc = _cli("split", str(bundle), "--size", f"{PART // 1024}K", "--output",
                str(tmp_path / "usb"))
    assert proc.returncode == 0, proc.stderr
    out = [Path(line) for line in proc.stdout.splitlines()]
    return [p for p in out if ".part-" in p.name]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd)


def test_parse_size() -> None:
    assert parse_size("650M") == 650 * 1024**2
    assert parse_size("1G") == 1024**3
    assert parse_size("4GB") == 4 * 1000**3 < 4 * 1024**3  # fits FAT32
    assert parse_size("4095m") == 4095 * 1024**2
    assert parse_size("12345") == 12345
    for bad in ("", "0", "4B", "1.5G", "-1M", "4X"):
        with pytest.raises(InputError, match="650M"):
            parse_size(bad)


def test_split_and_cat_give_the_bundle_back(bundle: Path, parts: list[Path]) -> None:
    usb = parts[0].parent
    assert [p.name for p in parts] == [f"{bundle.name}.part-{i:03d}" for i in range(len(parts))]
    assert len(parts) == -(-bundle.stat().st_size // PART) >= 3
    assert all(p.stat().st_size == PART for p in parts[:-1]) and parts[-1].stat().st_size <= PART
    assert sorted(p.name for p in usb.iterdir()) == sorted(
        [p.name for p in parts] + [bundle.name + ".parts.sha256", bundle.name + ".sha256"])
    # coreutils alone: check the parts, join them, check the bundle
    for args in (["sha256sum", "-c", bundle.name + ".parts.sha256"],
                 ["sh", "-c", f"cat {bundle.name}.part-* > {bundle.name}"],
                 ["sha256sum", "-c", bundle.name + ".sha256"],
                 ["cmp", bundle.name, str(bundle)]):
        proc = subprocess.run(args, cwd=usb, capture_output=True, text=True)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)


def test_verify_and_inspect_read_the_parts_as_they_are(bundle: Path, parts: list[Path],
                                                       tmp_path: Path) -> None:
    usb = parts[0].parent
    listing = usb / (bundle.name + ".parts.sha256")
    for given in (parts[0], listing):
        proc = _cli("-q", "verify", str(given), "--no-smoke", "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads(proc.stdout)
        assert report["integrity"]["sidecar"] == "match"
    assert not (usb / bundle.name).exists()  # never joined on disk
    whole = json.loads(_cli("inspect", str(bundle), "--json").stdout)
    split = json.loads(_cli("inspect", str(parts[0]), "--json").stdout)
    assert split["bundle"] == whole["bundle"] and split["size"] == whole["size"]
    assert split["models"] == whole["models"] and split["sidecar"] is True


def _refused(given: Path, name: str, words: str) -> None:
    proc = _cli("-q", "verify", str(given), "--no-smoke")
    assert proc.returncode == 10, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert name in line and words in line, line
    assert "Traceback" not in proc.stderr


def test_missing_part_is_named(parts: list[Path]) -> None:
    parts[1].unlink()
    _refused(parts[0], parts[1].name, "missing")


def test_missing_part_is_named_without_the_list(bundle: Path, parts: list[Path]) -> None:
    (parts[0].parent / (bundle.name + ".parts.sha256")).unlink()
    parts[1].unlink()
    _refused(parts[0], parts[1].name, "missing")


def test_swapped_parts_are_named(parts: list[Path]) -> None:
    a, b = parts[1], parts[2]
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    _refused(parts[0], parts[1].name, "swapped")


def test_damaged_last_part_is_named(parts: list[Path]) -> None:
    data = bytearray(parts[-1].read_bytes())
    data[len(data) // 2] ^= 1
    parts[-1].write_bytes(bytes(data))
    _refused(parts[0], parts[-1].name, "damaged")


def test_damaged_part_is_named_without_the_sidecar(bundle: Path, parts: list[Path]) -> None:
    """Without the bundle's digest, each part is hashed as it is read, against its line."""
    (parts[0].parent / (bundle.name + ".sha256")).unlink()
    data = bytearray(parts[1].read_bytes())
    data[len(data) // 2] ^= 1
    parts[1].write_bytes(bytes(data))
    _refused(parts[0], parts[1].name, "damaged")


def test_split_refuses_a_damaged_bundle_and_writes_nothing(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / bundle.name
    data = bytearray(bundle.read_bytes())
    data[1000] ^= 1
    copy.write_bytes(bytes(data))
    shutil.copy(bundle.with_name(bundle.name + ".sha256"), tmp_path)
    out = tmp_path / "usb"
    proc = _cli("split", str(copy), "--size", "100K", "--output", str(out))
    assert proc.returncode == 10 and "sidecar" in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())
    proc = _cli("split", str(bundle), "--size", "10X", "--output", str(out))
    assert proc.returncode == 2 and "650M" in proc.stderr
