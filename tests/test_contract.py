"""The tool and the programs it ships agree: exit codes, file names, the SHA256SUMS format,
the sidecar, the way a name is shown in a message.

The programs under ``bundler/runtime/`` run on the isolated host without the tool, so they
cannot import it; the tool imports them instead (``layout`` takes the installer's file names
and the offline variables from the shipped programs, ``bundler.offline_install`` the installer's
exit codes). Where a program must keep its own copy (``apply.py`` travels alone inside a
delta; ``install.py`` runs before any venv exists) of a helper the other runtime modules take
from ``runtime/common.py``, the copy is proved equal here. The
offline variables: tests/test_stages.py (configure.py reads them from the shipped module).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bundler import bundlefile, errors, layout
from bundler.checksums import format_checksums, parse_checksums
from bundler.runtime import apply, common, install


@pytest.mark.parametrize("program", [install, apply], ids=["install.py", "apply.py"])
def test_a_shipped_programs_exit_codes_are_the_tools(program: object) -> None:
    codes = {name: value for name, value in vars(program).items() if name.startswith("EXIT_")}
    assert {"EXIT_USAGE", "EXIT_OUTPUT", "EXIT_INTEGRITY"} <= set(codes)
    assert {name: getattr(errors, name, None) for name in codes} == codes


def test_the_file_names_are_the_installers() -> None:
    assert (layout.CHECKSUMS, layout.MANIFEST, layout.LOCK, layout.WHEELS_DIR,
            layout.CONFIGURE, layout.HOSTLIBS_SCRIPT, layout.SMOKE_SCRIPT, layout.EXPECTED) == (
        install.CHECKSUMS, install.MANIFEST, install.LOCK, install.WHEELS, install.CONFIGURE,
        install.HOSTLIBS, install.SMOKE, install.EXPECTED)
    assert set(install.COPIED) == {layout.MODELS_DIR, layout.SMOKE_DIR, layout.RUNTIME_DIR}
    assert {layout.PREFIX_CONFIG, layout.PREFIX_DIARIZE, layout.PREFIX_TRANSCRIBE} <= set(
        install.STABLE)
    # apply.py's own copies, inside every delta
    assert (apply.CHECKSUMS, apply.SIDECAR_SUFFIX) == (layout.CHECKSUMS,
                                                        bundlefile.SIDECAR_SUFFIX)


# Names as bundles hold them: nested, with a space, non-ASCII, a leading dash.
FILES = {layout.MANIFEST: b"{}\n", f"{layout.MODELS_DIR}/a b.bin": b"weights",
         f"{layout.WHEELS_DIR}/\u00e9t\u00e9-1.0-py3-none-any.whl": b"PK",
         f"{layout.SMOKE_DIR}/-x.json": b"[]"}


def _unpacked(root: Path, files: dict[str, bytes], listing: bytes) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / layout.CHECKSUMS).write_bytes(listing)
    return root


def test_the_installer_reads_the_list_the_tool_writes(tmp_path: Path) -> None:
    sums = {rel: hashlib.sha256(data).hexdigest() for rel, data in FILES.items()}
    listing = format_checksums(list(sums.items()))
    assert parse_checksums(listing) == sums
    report = install.check_integrity(_unpacked(tmp_path, FILES, listing))
    assert report["files"] == len(FILES)


@pytest.mark.parametrize("line", [
    "{sha}  ",  # no path
    "{sha} {path}",  # one space: not sha256sum's form
    "{upper}  {path}",  # sha256sum writes lowercase
    "{short}  {path}",
    "not a line at all",
])
def test_both_readers_refuse_a_malformed_line(tmp_path: Path, line: str) -> None:
    sha = hashlib.sha256(FILES[layout.MANIFEST]).hexdigest()
    text = line.format(sha=sha, upper=sha.upper(), short=sha[:63], path=layout.MANIFEST)
    listing = (text + "\n").encode()
    with pytest.raises(ValueError, match="line 1 is not"):
        parse_checksums(listing)
    with pytest.raises(install.Failure, match="line 1 is not") as refused:
        install.check_integrity(_unpacked(tmp_path, {layout.MANIFEST: FILES[layout.MANIFEST]},
                                          listing))
    assert refused.value.code == errors.EXIT_INTEGRITY


def test_one_sidecar_form_for_the_tool_and_apply_py(tmp_path: Path) -> None:
    """The sidecar the tool publishes is read by apply.py's reader, and apply.py's
    (written as it writes it) by the tool's."""
    sha = hashlib.sha256(b"bundle").hexdigest()
    tarball = tmp_path / "b.tar"
    with bundlefile.publishing(tmp_path, str(tarball), "its name") as pub:
        pub.write_text(tarball, "bundle")
        pub.sidecar(tarball, sha)
    raw = apply.read_sidecar(tarball)
    assert raw is not None and apply.sidecar_digest(raw, tarball.name) == sha == \
        bundlefile.read_sidecar(tarball)
    other = tmp_path / "c.tar"
    other.with_name(other.name + apply.SIDECAR_SUFFIX).write_text(f"{sha}  {other.name}\n")
    assert bundlefile.read_sidecar(other) == sha


NAMES = ["plain.wav", "a\nb", "\x1b[31mred", "\u00e9t\u00e9", "\u202eevil", "x" * 500,
         "bad\udcffbyte", "back\\slash", ""]


@pytest.mark.parametrize("name", NAMES, ids=range(len(NAMES)))
@pytest.mark.parametrize("limit", [200, 40])
def test_apply_py_shows_a_name_as_the_installer_does(name: str, limit: int) -> None:
    shown = install.shown(name, limit)
    assert apply._shown(name, limit) == shown
    assert shown.isprintable() and "\n" not in shown and len(shown) <= limit + 3


def _code(function: object) -> str:
    """A function's code as the parser sees it, without its name and docstring."""
    import ast
    import inspect
    import textwrap

    node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    assert isinstance(node, ast.FunctionDef)
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    return "\n".join(ast.dump(part) for part in (node.args, *body))


def test_the_installers_hasher_is_the_runtimes_own(tmp_path: Path) -> None:
    """install.py's sha256_of is common.sha256_file, line for line, with the same block size."""
    assert _code(install.sha256_of) == _code(common.sha256_file)
    assert install.BUFSIZE == common.BUFSIZE
    data = bytes(range(256)) * (common.BUFSIZE // 256 + 3)  # more than one block
    (tmp_path / "f").write_bytes(data)
    assert install.sha256_of(tmp_path / "f") == common.sha256_file(tmp_path / "f") == (
        hashlib.sha256(data).hexdigest())


def test_the_delta_appliers_hasher_gives_the_runtimes_digest(tmp_path: Path) -> None:
    """apply.py travels alone in a delta, with a hasher of its own (it names a wrong base
    by its sha256): the same digest as common.sha256_file, across block boundaries."""
    assert apply.BUFSIZE == common.BUFSIZE
    for size in (0, 1, common.BUFSIZE, common.BUFSIZE + 1, 3 * common.BUFSIZE - 7):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        (tmp_path / "f").write_bytes(data)
        assert apply._file_sha256(tmp_path / "f") == common.sha256_file(tmp_path / "f") == (
            hashlib.sha256(data).hexdigest())


def test_the_installers_json_writer_writes_as_the_runtimes(tmp_path: Path) -> None:
    """install.py's write_json gives what common.write_atomic gives for the same text: the
    same bytes, the mode the umask gives a new file, nothing beside it afterwards."""
    import json
    import os

    data = {"b": [1, "\u00e9"], "a": {"ok": True}}
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    old = os.umask(0o027)
    try:
        install.write_json(tmp_path / "installer.json", data)
        common.write_atomic(tmp_path / "runtime.json", text)
    finally:
        os.umask(old)
    mine, theirs = tmp_path / "installer.json", tmp_path / "runtime.json"
    assert mine.read_bytes() == theirs.read_bytes()
    assert mine.stat().st_mode & 0o777 == theirs.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["installer.json", "runtime.json"]
