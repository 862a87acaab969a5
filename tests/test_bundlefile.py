"""The bundle on disk (bundler.bundlefile): files published all together or not at all, and
the sidecar's form. Volumes: tests/test_parts.py; signatures: test_secrets_and_signing.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from bundler import bundlefile
from bundler.errors import IntegrityError, OutputError

SHA = "0" * 63 + "1"


def test_published_together_with_the_sidecar(tmp_path: Path) -> None:
    tarball = tmp_path / "out" / "b.tar"
    with bundlefile.publishing(tarball.parent, str(tarball), "its name") as pub:
        pub.write_text(tarball, "bytes")
        assert not tarball.exists()  # nothing under a final name before the end
        sidecar = pub.sidecar(tarball, SHA)
    assert sorted(p.name for p in tarball.parent.iterdir()) == ["b.tar", "b.tar.sha256"]
    assert sidecar.read_text() == f"{SHA}  b.tar\n"
    assert bundlefile.read_sidecar(tarball) == SHA


def test_a_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    tarball = tmp_path / "b.tar"
    with pytest.raises(KeyboardInterrupt):
        with bundlefile.publishing(tmp_path, str(tarball), "its name") as pub:
            pub.write_text(tarball, "bytes")
            pub.sidecar(tarball, SHA)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_write_error_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    tarball = tmp_path / "b.tar"
    with pytest.raises(OutputError) as refused:
        with bundlefile.publishing(tmp_path, str(tarball), "the bundle's name") as pub:
            pub.write_text(tarball, "bytes")
            raise OSError(28, "No space left on device")
    assert str(refused.value) == (f"cannot write {tarball}: No space left on device; "
                                  "nothing was left under the bundle's name")
    assert list(tmp_path.iterdir()) == []


def test_a_rename_that_fails_half_way_leaves_no_tarball_without_its_sidecar(
        tmp_path: Path) -> None:
    tarball = tmp_path / "b.tar"
    (tmp_path / "b.tar.sha256" / "taken").mkdir(parents=True)  # the sidecar's name: a folder
    with pytest.raises(OutputError, match="nothing was left under its name"):
        with bundlefile.publishing(tmp_path, str(tarball), "its name") as pub:
            pub.write_text(tarball, "bytes")
            pub.sidecar(tarball, SHA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar.sha256"]


@pytest.mark.parametrize(("text", "problem"), [
    ("not a digest  b.tar\n", "is not '<sha256>  <file name>'"),
    (f"{SHA}  other.tar\n", "names 'other.tar', not b.tar"),
])
def test_a_sidecar_that_does_not_describe_the_tarball_is_refused(tmp_path: Path, text: str,
                                                                 problem: str) -> None:
    tarball = tmp_path / "b.tar"
    bundlefile.sidecar_path(tarball).write_text(text)
    with pytest.raises(IntegrityError, match=problem):
        bundlefile.read_sidecar(tarball)
    assert bundlefile.read_sidecar(tmp_path / "absent.tar") is None
