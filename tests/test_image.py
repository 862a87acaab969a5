"""`pyannote-bundle image`: the OCI writer, the base checks, and (slow) real images.

Fast: the deterministic layer and archive writers, the chroot-safe layer unpacking (a
hostile base that links a host file cannot chmod it), the installer's sandbox (a user
namespace also as root, a /dev of four nodes, no network), base blobs checked against
their digests and diff_ids, --allowed-signers, two default-base cache fills at once, and
bad input (a base without the bundle's Python, with another Python, for another
architecture, not an image; a damaged bundle): one line, the documented exit code, nothing
left in --output. Bases here are hand-made OCI layouts of a few files.

Slow (root, mmdebstrap, podman, skopeo, docker-registry): images of the tiny real bundles
(two real wheels installed by the bundle's own installer inside a real Debian base made by
mmdebstrap), built twice under another umask and TZ, a one-parameter update, run by
podman with no network, a read-only root and an unprivileged user, and carried through a
real registry (CNCF distribution on 127.0.0.1) and back. The image of the real 3.1 bundle
is tested in tests/test_e2e.py, which builds that bundle.

podman on this project's machines needs runc, cgroupfs and small rlimits: those are this
sandbox's quirks, set in a containers.conf of the tests' own (CONTAINERS_CONF), never in
the product.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import EMB, SEG, TINY_UV_LOCK, TinyBundle
from e2e import podman_env, require_image_tools
from forge import flip_byte

from bundler import image, oci, sandbox
from bundler.build import BuildOptions, build
from bundler.bundlefile import sidecar_path
from bundler.cli import main
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.errors import InputError, IntegrityError
from bundler.signing import sign
from bundler.spec import load_recipe

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]


# --- helpers ------------------------------------------------------------------------------
def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> subprocess.CompletedProcess[str]:
    with pytest.raises(SystemExit) as exit_:
        main(["-q", *argv])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, int(exit_.value.code or 0), out, err)


def layer_tar(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def hand_made_base(folder: Path, files: dict[str, bytes], arch: str = ARCH,
                   layer: bytes | None = None, diff_id: str | None = None) -> Path:
    """An OCI layout folder of one layer holding ``files`` (or the tar ``layer``), whose
    config lists ``diff_id`` (default: the layer's true one)."""
    layer = layer_tar(files) if layer is None else layer
    ld = hashlib.sha256(layer).hexdigest()
    config = oci.archive.canonical({"architecture": arch, "os": "linux",
                              "rootfs": {"type": "layers",
                                         "diff_ids": [diff_id or f"sha256:{ld}"]}})
    cd = hashlib.sha256(config).hexdigest()
    manifest = oci.archive.canonical({
        "schemaVersion": 2, "mediaType": oci.archive.MT_MANIFEST,
        "config": {"mediaType": oci.archive.MT_CONFIG, "digest": f"sha256:{cd}",
                   "size": len(config)},
        "layers": [{"mediaType": oci.archive.MT_LAYER, "digest": f"sha256:{ld}",
                    "size": len(layer)}]})
    md = hashlib.sha256(manifest).hexdigest()
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for d, data in ((ld, layer), (cd, config), (md, manifest)):
        (blobs / d).write_bytes(data)
    (folder / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (folder / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": oci.archive.MT_MANIFEST, "digest": f"sha256:{md}", "size": len(manifest)}]}))
    return folder


def oci_archive(layout: Path, archive: Path) -> Path:
    """An OCI layout folder as an oci-archive file."""
    with tarfile.open(archive, "w") as tar:
        for p in sorted(layout.rglob("*")):
            tar.add(p, p.relative_to(layout).as_posix(), recursive=False)
    return archive


def blob_named(layout: Path, pick: str) -> Path:
    """The layout's manifest, config or layer blob."""
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest_path = blobs / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(manifest_path.read_text())
    return {"manifest": manifest_path,
            "config": blobs / manifest["config"]["digest"].split(":")[1],
            "layer": blobs / manifest["layers"][0]["digest"].split(":")[1]}[pick]


def entries_of(root: Path) -> list[oci.archive.Entry]:
    out = []
    for p in sorted(root.rglob("*")):
        name = p.relative_to(root).as_posix()
        if p.is_symlink():
            out.append(oci.archive.Entry(name, "symlink", 0o777, target=os.readlink(p)))
        elif p.is_dir():
            out.append(oci.archive.Entry(name, "dir", 0o755))
        else:
            out.append(oci.archive.Entry(name, "file", 0o644, p.stat().st_size, p))
    return out


# --- the writers --------------------------------------------------------------------------
def test_layers_are_byte_identical_whatever_the_files_times_and_owners(tmp_path: Path) -> None:
    root = tmp_path / "r"
    deep = root / ("long-folder-name-" * 8) / "x"
    deep.mkdir(parents=True)
    (deep / "module.py").write_text("print(1)\n")
    (root / "a.txt").write_text("a")
    os.symlink("a.txt", root / "link")
    first = io.BytesIO()
    oci.archive.write_layer(entries_of(root), first)
    os.utime(root / "a.txt", (1, 1))
    os.utime(deep / "module.py", (2_000_000_000, 2_000_000_000))
    second = io.BytesIO()
    oci.archive.write_layer(entries_of(root), second)
    assert first.getvalue() == second.getvalue()
    raw = first.getvalue()
    assert b"PaxHeader" not in raw and b"mtime=" not in raw  # no PAX records with times
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [e.name for e in entries_of(root)]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {
        (oci.archive.LAYER_EPOCH, 0, 0, "", "")}
    assert any(len(m.name) > 100 for m in members)  # a GNU long name, read back whole
    assert next(m for m in members if m.name == "link").linkname == "a.txt"


def test_archive_is_an_oci_layout_whose_digests_match_and_is_the_same_twice(
        tmp_path: Path) -> None:
    blobs = [oci.archive.bytes_blob(b"layer bytes" * 100, oci.archive.MT_LAYER),
             oci.archive.bytes_blob(b'{"config":{}}', oci.archive.MT_CONFIG)]
    index = oci.archive.canonical({"schemaVersion": 2, "manifests": []})
    a, b = tmp_path / "a.oci.tar", tmp_path / "b.oci.tar"
    oci.archive.write_archive(a, blobs, index)
    oci.archive.write_archive(b, list(reversed(blobs)), index)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        names = tar.getnames()
        assert names == sorted(names) and names[-2:] == ["index.json", "oci-layout"]
        for m in tar.getmembers():
            if m.name.startswith("blobs/sha256/") and m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                assert hashlib.sha256(f.read()).hexdigest() == m.name.rsplit("/", 1)[1]
    assert a.stat().st_size % oci.archive.RECORD == 0


def test_an_archive_that_fails_midway_leaves_no_file(tmp_path: Path) -> None:
    def broken(out: Any) -> None:
        out.write(b"half")
        raise OSError(28, "No space left on device")

    blob = oci.archive.Blob("0" * 64, 10, oci.archive.MT_LAYER, broken)
    with pytest.raises(OSError):
        oci.archive.write_archive(tmp_path / "x.oci.tar", [blob], b"{}")
    assert list(tmp_path.iterdir()) == []


def staged(folder: Path, size: int = 3 * oci.archive.BLOCK + 7) -> list[oci.archive.Entry]:
    """A little staged layer: a folder, a file whose size is no multiple of a block, a link."""
    (folder / "lib").mkdir(parents=True)
    (folder / "lib" / "data.bin").write_bytes(bytes(range(256)) * (size // 256) + b"x" * 7)
    os.symlink("data.bin", folder / "lib" / "link")
    return entries_of(folder)


def test_a_layer_is_streamed_once_under_the_digest_of_its_bytes(tmp_path: Path) -> None:
    """The layer goes into the archive in one pass: its member's name, rewritten once the
    layer ended, is the sha256 of the bytes it holds (the header checksum patched too, or
    tarfile would refuse the member), the same bytes as the layer written alone; its staged
    files are gone; a second layer of the same bytes is stored once; the image is the same
    as the one write_archive writes (only the order of the blobs differs), and the archive
    is the same twice."""
    alone = io.BytesIO()
    oci.archive.write_layer(staged(tmp_path / "probe"), alone)
    layer = oci.archive.bytes_blob(alone.getvalue(), oci.archive.MT_LAYER)
    config = oci.archive.bytes_blob(b'{"config":{}}', oci.archive.MT_CONFIG)
    index = oci.archive.canonical({"schemaVersion": 2, "manifests": []})
    archives = []
    for run in ("a", "b"):
        path = tmp_path / f"{run}.oci.tar"
        with oci.archive.ArchiveWriter(path) as archive:
            first = archive.add_layer(staged(tmp_path / run / "1"), "venv", "v")
            again = archive.add_layer(staged(tmp_path / run / "2"), "models", "m")
            archive.add(config)
            archive.finish(index)
        assert (first.digest, first.size) == (again.digest, again.size) \
            == (layer.digest, layer.size) and first.diff_id == layer.digest
        assert not [p for p in (tmp_path / run).rglob("*") if p.is_file()]
        archives.append(path.read_bytes())
    assert archives[0] == archives[1]
    with tarfile.open(fileobj=io.BytesIO(archives[0])) as tar:
        names = tar.getnames()
        blob = tar.extractfile(f"blobs/sha256/{layer.digest}")
        assert blob is not None and blob.read() == alone.getvalue()
    assert names == ["blobs", "blobs/sha256", f"blobs/sha256/{layer.digest}",
                     f"blobs/sha256/{config.digest}", "index.json", "oci-layout"]
    oci.archive.write_archive(tmp_path / "sorted.oci.tar", [config, layer], index)
    with tarfile.open(tmp_path / "sorted.oci.tar") as tar:
        assert sorted(tar.getnames()) == sorted(names)
    assert len(archives[0]) == (tmp_path / "sorted.oci.tar").stat().st_size


def test_a_layer_that_fails_midway_leaves_no_archive_and_its_files_staged(
        tmp_path: Path) -> None:
    entries = staged(tmp_path / "stage")
    vanished = oci.archive.Entry("lib/gone", "file", 0o644, 10, tmp_path / "stage" / "gone")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileNotFoundError):
        with oci.archive.ArchiveWriter(out / "x.oci.tar") as archive:
            archive.add_layer([*entries, vanished], "venv", "v")
    assert list(out.iterdir()) == []
    assert (tmp_path / "stage" / "lib" / "data.bin").is_file()


def test_a_base_layer_cannot_write_outside_the_staged_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    layer = tmp_path / "l.tar"
    layer.write_bytes(layer_tar({}, {"etc": str(outside), "up": "../../outside"}))
    oci.rootfs.apply_layer(layer, root)
    second = tmp_path / "l2.tar"
    second.write_bytes(layer_tar({"etc/passwd": b"pwned", "up/x": b"pwned",
                                  "usr/bin/.wh.gone": b""}))
    oci.rootfs.apply_layer(second, root)
    assert list(outside.iterdir()) == []
    # chroot semantics: the link's absolute target is the root's own folder
    assert (root / tmp_path.relative_to("/") / "outside" / "passwd").read_bytes() == b"pwned"


def hostile_layer(host_file: Path, mode: int = 0o4777) -> bytes:
    """A symbolic link to a file of the build host, and a hard link to that link with a
    setuid, world-writable mode: chmod through the link would reach the host's file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        sym = tarfile.TarInfo("x")
        sym.type, sym.linkname = tarfile.SYMTYPE, str(host_file)
        tar.addfile(sym)
        hard = tarfile.TarInfo("y")
        hard.type, hard.linkname, hard.mode = tarfile.LNKTYPE, "x", mode
        tar.addfile(hard)
        owned = tarfile.TarInfo("z")  # a directory entry on a link: chmod/chown would follow
        owned.type, owned.mode, owned.uid = tarfile.DIRTYPE, 0o4777, 1234
        tar.addfile(owned)
    return buf.getvalue()


def test_a_hard_link_to_a_link_cannot_chmod_a_host_file(tmp_path: Path) -> None:
    host_file = tmp_path / "host-secret"
    host_file.write_text("secret")
    host_file.chmod(0o600)
    root = tmp_path / "root"
    root.mkdir()
    layer = tmp_path / "l.tar"
    layer.write_bytes(hostile_layer(host_file))
    with pytest.raises(InputError, match="hard link 'y' -> 'x' does not name a regular"):
        oci.rootfs.apply_layer(layer, root)
    assert stat.S_IMODE(host_file.stat().st_mode) == 0o600
    assert host_file.read_text() == "secret"
    # A link over a folder entry: the folder entry replaces the link, the host is untouched.
    other = tmp_path / "l2.tar"
    other.write_bytes(layer_tar({}, {"z": str(tmp_path)}))
    oci.rootfs.apply_layer(other, root)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        d = tarfile.TarInfo("z")
        d.type, d.mode = tarfile.DIRTYPE, 0o4777
        tar.addfile(d)
    other.write_bytes(buf.getvalue())
    before = stat.S_IMODE(tmp_path.stat().st_mode)
    oci.rootfs.apply_layer(other, root)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == before
    assert (root / "z").is_dir() and not (root / "z").is_symlink()
    assert stat.S_IMODE((root / "z").stat().st_mode) == 0o777  # no setuid in the stage


def test_a_whiteout_with_a_dot_slash_prefix_removes_the_dotfile(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    first, second = tmp_path / "1.tar", tmp_path / "2.tar"
    first.write_bytes(layer_tar({"./.x": b"1", "./wh.x": b"keep", "./etc/.profile": b"p"}))
    second.write_bytes(layer_tar({"./.wh..x": b"", "./etc/.wh..profile": b""}))
    oci.rootfs.apply_layer(first, root)
    oci.rootfs.apply_layer(second, root)
    assert sorted(p.name for p in root.rglob("*")) == ["etc", "wh.x"]
    assert oci.rootfs.member_name("./.wh.x") == ".wh.x"
    assert oci.rootfs.member_name("/a/./b") == "a/b"


def shell_root(root: Path) -> None:
    """A staged root holding only the host's dash and the libraries it loads."""
    dash = Path("/usr/bin/dash").resolve()
    libs = subprocess.run(["ldd", str(dash)], capture_output=True, text=True,
                          check=True).stdout
    for path in [str(dash), *(w for w in libs.split() if w.startswith("/"))]:
        dest = root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(Path(path).read_bytes())
        dest.chmod(0o755)


@pytest.mark.skipif(not Path("/usr/bin/dash").is_file(), reason="needs dash")
def test_the_installer_runs_in_a_user_namespace_with_a_minimal_dev_and_no_network(
        tmp_path: Path) -> None:
    """The bundle's installer (here a dash script run as the base's "python") is root only
    inside its namespace: what it writes belongs to an unprivileged id on the host, it
    sees four device nodes instead of the host's /dev, and only a loopback interface."""
    root = tmp_path / "root"
    root.mkdir()
    shell_root(root)
    elsewhere = tmp_path / "elsewhere"  # a base's /dev that is a link out of the root
    elsewhere.mkdir()
    os.symlink(elsewhere, root / "dev")
    runtime = root / sandbox.SOURCE_DIR / "b" / "runtime"
    runtime.mkdir(parents=True)
    (runtime / "install.py").write_text(
        'for f in /dev/*; do echo "$f"; done > /devices\n'
        'while read -r line; do echo "${line%%:*}"; done < /proc/net/dev > /net\n'
        ': > /dev/null && echo ok > /dev/null\n'
        'while read -r a b c; do echo "$a $b $c"; done < /proc/self/uid_map > /uid_map\n')
    image.install_in_root(root, "b", f"/{Path('/usr/bin/dash').resolve().relative_to('/')}",
                          None)
    devices = (root / "devices").read_text().split()
    assert devices == [f"/dev/{n}" for n in ("fd", "null", "random", "shm", "stderr",
                                             "stdin", "stdout", "urandom", "zero")]
    assert (root / "net").read_text().splitlines()[2:] == ["lo"]  # two header lines, then lo
    owner = (root / "devices").stat().st_uid
    assert owner == (oci.rootfs.STAGE_ID if os.geteuid() == 0 else os.geteuid())
    assert owner != 0
    if os.geteuid() == 0:  # a range: the installer can make itself nobody (65534) inside
        assert (root / "uid_map").read_text() == f"0 {oci.rootfs.STAGE_ID} 65536\n"
    assert not any((root / "dev").iterdir())  # the mounts went with the namespace
    assert not (root / "dev").is_symlink() and not any(elsewhere.iterdir())


def test_no_user_namespace_is_a_refusal_never_real_root(tmp_path: Path) -> None:
    """Where unshare cannot make a user namespace (here: an unshare that always fails, as
    with user.max_user_namespaces=0), the installer does not run at all."""
    (tmp_path / "root").mkdir()
    with pytest.raises(image.ImageError, match="this host cannot make a user namespace "
                       r"\(unshare failed\): the bundle's installer is never run as the "
                       "host's root"):
        with sandbox.user_namespace(tmp_path / "root", "/bin/false"):
            pytest.fail("entered")


def test_dpkg_status_becomes_the_package_list() -> None:
    status = (b"Package: python3\nStatus: install ok installed\nVersion: 3.11.2-1+b1\n"
              b"Architecture: amd64\n\nPackage: gone\nStatus: deinstall ok config-files\n"
              b"Version: 1\n")
    assert oci.base.dpkg_packages(status) == [{"name": "python3", "version": "3.11.2-1+b1",
                                            "arch": "amd64"}]


# --- bad input: one line, the exit code, nothing left -------------------------------------
@pytest.mark.parametrize(("files", "arch", "words"), [
    ({"bin/sh": b"#!"}, ARCH, ["has no python3.11", "no Python"]),
    ({"usr/bin/python3.9": b"\x7fELF"}, ARCH, ["has no python3.11", "python3.9"]),
    ({"usr/bin/python3.11": b"\x7fELF"}, "s390x", ["is for s390x", "linux x86_64"]),
], ids=["no-python", "other-python", "other-arch"])
def test_a_base_that_cannot_run_the_bundle_is_refused(
        tiny_bundle: TinyBundle, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        files: dict[str, bytes], arch: str, words: list[str]) -> None:
    if os.uname().machine != "x86_64" and "x86_64" in words[-1]:
        pytest.skip("the message names this host's architecture")
    bundle = tiny_bundle()
    base = hand_made_base(tmp_path / "base", files, arch)
    out = tmp_path / "img"
    proc = cli(capsys, "image", str(bundle), "--output", str(out), "--base", str(base),
               "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 11, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr
    assert list(out.iterdir()) == []


def test_a_damaged_bundle_or_a_folder_that_is_no_image_is_refused(
        tiny_bundle: TinyBundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tiny_bundle()
    out = tmp_path / "img"
    proc = cli(capsys, "image", str(bundle), "--output", str(out), "--base",
               str(tmp_path), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 2 and "not an OCI image layout" in proc.stderr, proc.stderr
    assert list(out.iterdir()) == []
    flip_byte(bundle, bundle.stat().st_size // 2)
    proc = cli(capsys, "image", str(bundle), "--output", str(out), "--base",
               str(hand_made_base(tmp_path / "base", {"usr/bin/python3.11": b""})))
    assert proc.returncode == 10, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []


def test_help_names_the_exit_codes_and_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    proc = cli(capsys, "image", "--help")
    assert proc.returncode == 0
    assert "exit 11" in proc.stdout and "skopeo copy --preserve-digests" in proc.stdout


def test_a_hostile_base_archive_cannot_chmod_a_host_file(
        tiny_bundle: TinyBundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's reproduction, through the CLI: a base whose layer links to a host file
    and hard-links that link with mode 04777. The layer is refused; the file is as it was."""
    host_file = tmp_path / "host-file"
    host_file.write_text("host")
    host_file.chmod(0o600)
    bundle = tiny_bundle()
    layout = hand_made_base(tmp_path / "base", {}, layer=hostile_layer(host_file))
    archive = oci_archive(layout, tmp_path / "hostile.oci.tar")
    out = tmp_path / "img"
    proc = cli(capsys, "image", str(bundle), "--output", str(out), "--base",
               f"oci-archive:{archive}", "--cache-dir", str(tmp_path / "cache"))
    assert stat.S_IMODE(host_file.stat().st_mode) == 0o600
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "hard link 'y' -> 'x' does not name a regular file" in proc.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(("pick", "words"), [
    ("manifest", "its manifest sha256:"),
    ("config", "its config sha256:"),
    ("layer", "its layer 0 sha256:"),
    ("diff_id", "layer 0 unpacks to sha256:"),
])
def test_a_base_blob_that_is_not_what_its_digest_says_is_refused_before_use(
        tiny_bundle: TinyBundle, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        pick: str, words: str) -> None:
    """Every base blob is hashed before it is read, and the layer's tar against the
    config's diff_ids: a base that is not the one its digest names (the image's
    base.digest label) is refused, exit 10, one line, nothing left."""
    bundle = tiny_bundle()
    files = {"usr/bin/python3.11": b"\x7fELF"}
    if pick == "diff_id":
        layout = hand_made_base(tmp_path / "base", files, diff_id="sha256:" + "0" * 64)
    else:
        layout = hand_made_base(tmp_path / "base", files)
        blob = blob_named(layout, pick)
        if pick == "layer":  # another layer of the same size: a file of the host, say
            blob.write_bytes(layer_tar({"usr/bin/python3.11": b"\x7fELG"}))
        else:
            data = json.loads(blob.read_text())
            data["annotations"] = {"x": "y"}
            blob.write_bytes(oci.archive.canonical(data))
    out = tmp_path / "img"
    proc = cli(capsys, "image", str(bundle), "--output", str(out), "--base", str(layout),
               "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 10, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert words in proc.stderr and "the base is damaged or was altered" in proc.stderr
    assert list(out.iterdir()) == []


def test_a_gzip_base_layer_is_checked_against_its_diff_id(tmp_path: Path) -> None:
    tar = layer_tar({"usr/bin/python3.11": b"\x7fELF"})
    packed = gzip.compress(tar, mtime=0)
    desc = {"digest": f"sha256:{hashlib.sha256(packed).hexdigest()}", "size": len(packed)}
    (tmp_path / "l").write_bytes(packed)
    true = f"sha256:{hashlib.sha256(tar).hexdigest()}"
    assert oci.reader.check_layer(tmp_path / "l", "b", 0, desc, true, True) == true[7:]
    with pytest.raises(IntegrityError, match="not the diff_id"):
        oci.reader.check_layer(tmp_path / "l", "b", 0, desc, desc["digest"], True)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_a_bundle_signed_by_a_key_not_allowed_is_refused_before_it_is_read(
        tiny_bundle: TinyBundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """image --allowed-signers checks the sidecar's signature as verify does, first."""
    bundle = tiny_bundle()
    keys = {}
    for name in ("release", "intruder"):
        key = tmp_path / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(key)], check=True)
        keys[name] = key
    sign(sidecar_path(bundle), keys["intruder"])
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"release@example.org {keys['release'].with_suffix('.pub').read_text()}")
    # A base that would fail (exit 11) if the bundle were read: the signature comes first.
    base = hand_made_base(tmp_path / "base", {"bin/sh": b"#!"})
    out = tmp_path / "img"
    proc = cli(capsys, "image", str(bundle), "--output", str(out), "--base", str(base),
               "--allowed-signers", str(allowed))
    assert proc.returncode == 10, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "not signed by any key in" in proc.stderr
    assert list(out.iterdir()) == []
    # Signed by the allowed key: the signature passes and the build goes on to the base.
    sign(sidecar_path(bundle), keys["release"])
    proc = cli(capsys, "image", str(bundle), "--output", str(out), "--base", str(base),
               "--allowed-signers", str(allowed))
    assert proc.returncode == 11 and "has no python3.11" in proc.stderr, proc.stderr


STAND_IN_MMDEBSTRAP = """#!{python}
# mmdebstrap's stand-in (no Debian mirror in a fast test): a tiny root as a tar at the
# path it is given; the n-th call (counted in {log}) takes n + 1 s after writing it.
import fcntl, io, sys, tarfile, time
with open("{log}", "a+") as log:
    fcntl.flock(log, fcntl.LOCK_EX)
    log.seek(0)
    n = len(log.read().splitlines())
    log.write("call\\n")
with tarfile.open(sys.argv[-2], "w") as tar:
    for name, data in (("var/lib/dpkg/status", b"Package: python3\\nStatus: install ok "
                        b"installed\\nVersion: 3.11\\n"), ("usr/bin/python3.11", b"")):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
time.sleep(n + 1)
"""


def test_two_builds_filling_the_default_base_cache_at_once_both_succeed(
        tmp_path: Path) -> None:
    """The second build waits for the first (a lock), then uses the entry it made: one
    mmdebstrap run, the same base for both, no temporary name shared between them."""
    tools = tmp_path / "bin"
    tools.mkdir()
    log = tmp_path / "calls"
    stand_in = tools / "mmdebstrap"
    stand_in.write_text(STAND_IN_MMDEBSTRAP.format(python=sys.executable, log=log))
    stand_in.chmod(0o755)
    cache = tmp_path / "cache"
    code = ("import sys; from pathlib import Path; from bundler.oci import base; "
            "print(base.default_base('3.11', sys.argv[1], Path(sys.argv[2]), "
            "'http://mirror.invalid/debian', []).digest)")
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}
    runs = [subprocess.Popen([sys.executable, "-c", code, os.uname().machine, str(cache)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [(p.wait(timeout=60), *p.communicate()) for p in runs]
    assert [r[0] for r in results] == [0, 0], [r[2][-500:] for r in results]
    assert results[0][1] == results[1][1] and results[0][1].startswith("sha256:")
    assert log.read_text().splitlines() == ["call"]
    entries = sorted(p.name for p in (cache / "image-bases").iterdir())
    assert len(entries) == 2 and entries[0].endswith(".lock")  # no temporary left
    assert sorted(p.name for p in (cache / "image-bases" / entries[1]).iterdir()) == [
        "base.json", "layer.tar"]


# --- slow: real images --------------------------------------------------------------------
@pytest.fixture
def image_tools() -> None:
    require_image_tools()


needs_tools = pytest.mark.usefixtures("image_tools")

@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """podman with this sandbox's settings and a storage of its own (removed after)."""
    with podman_env(tmp_path_factory.mktemp("podman")) as env:
        yield env


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("image-cache")


def tiny_variant(folder: Path, cache: Path, threshold: float | None = None) -> Path:
    """A tiny real bundle (six, pip and uv, which installs it as it installs every real
    bundle; two small model files); with ``threshold``, the same bundle with one
    clustering parameter changed."""
    spec = load_recipe("speaker-diarization-3.1")
    if threshold is not None:
        config = json.loads(json.dumps(spec.config))
        config["params"]["clustering"]["threshold"] = threshold
        spec = dataclasses.replace(spec, config=config)
    repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG}),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB})]
    with LoopbackHub(repos) as hub:
        opts = BuildOptions(output_dir=folder, cache_dir=cache, endpoint=hub.url,
                            lockfile=TINY_UV_LOCK)
        return build(spec, opts).packed.path


def build_cli(bundle: Path, out: Path, cache: Path, env: dict[str, str] | None = None,
              umask: str = "022", *extra: str) -> dict[str, Any]:
    proc = subprocess.run(["sh", "-c", f'umask {umask} && exec "$@"', "sh", "pyannote-bundle",
                           "image", str(bundle), "--output", str(out), "--cache-dir",
                           str(cache), "--json", *extra], capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory: pytest.TempPathFactory, base_cache: Path,
                wheel_cache: Path) -> dict[str, Any]:
    """The tiny bundle's image, the same built again under umask 077 and another TZ, and a
    one-parameter update's image; with the seconds each took."""
    d = tmp_path_factory.mktemp("tiny-images")
    bundle = tiny_variant(d / "b1", wheel_cache)
    update = tiny_variant(d / "b2", wheel_cache, threshold=0.5)
    started = time.monotonic()
    first = build_cli(bundle, d / "i1", base_cache)
    first_s = time.monotonic() - started
    started = time.monotonic()
    again = build_cli(bundle, d / "i2", base_cache,
                      {**os.environ, "TZ": "Asia/Kathmandu", "LC_ALL": "C"}, umask="077")
    again_s = time.monotonic() - started
    updated = build_cli(update, d / "i3", base_cache)
    return {"bundle": bundle, "first": first, "again": again, "updated": updated,
            "seconds": (round(first_s, 1), round(again_s, 1))}


@pytest.mark.slow
@needs_tools
def test_the_same_bundle_gives_the_same_image_digest(tiny_images: dict[str, Any]) -> None:
    first, again = tiny_images["first"], tiny_images["again"]
    print(f"tiny image: first build {tiny_images['seconds'][0]} s (with the Debian base), "
          f"second {tiny_images['seconds'][1]} s")
    assert first["digest"] == again["digest"]
    assert Path(first["path"]).read_bytes() == Path(again["path"]).read_bytes()
    assert [x["role"] for x in first["layers"]] == ["base", "venv", "models", "config"]
    assert first["base"]["packages"] > 50  # recorded from dpkg's status


@pytest.mark.slow
@needs_tools
def test_a_parameter_update_changes_only_the_config_layer(tiny_images: dict[str, Any]) -> None:
    old, new = tiny_images["first"]["layers"], tiny_images["updated"]["layers"]
    assert [x["digest"] for x in old[:3]] == [x["digest"] for x in new[:3]]
    assert old[3]["digest"] != new[3]["digest"]
    shared = sum(x["size"] for x in new[:3])
    assert shared / sum(x["size"] for x in new) >= 0.99
    # and the update is in the image: the installed config has the new threshold
    with tarfile.open(tiny_images["updated"]["path"]) as tar:
        f = tar.extractfile(f"blobs/sha256/{new[3]['digest'].split(':')[1]}")
        assert f is not None
        with tarfile.open(fileobj=f) as layer:
            cfg = layer.extractfile(f"{image.PREFIX}/releases/image/config.yaml")
            assert cfg is not None and "threshold: 0.5" in cfg.read().decode()


def test_inspect_reads_an_image_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    layer = layer_tar({"x": b"y"})
    labels = {f"{image.LABEL}.bundle": "b", f"{image.LABEL}.layers": "base"}
    config = oci.archive.canonical({"architecture": "amd64", "os": "linux", "config": {
        "Labels": labels, "User": image.USER, "Entrypoint": [image.ENTRYPOINT]}})
    lb = oci.archive.bytes_blob(layer, oci.archive.MT_LAYER)
    cb = oci.archive.bytes_blob(config, oci.archive.MT_CONFIG)
    manifest = oci.archive.canonical({
        "schemaVersion": 2, "config": {"digest": f"sha256:{cb.digest}"},
        "layers": [{"digest": f"sha256:{lb.digest}", "size": lb.size,
                    "mediaType": oci.archive.MT_LAYER}]})
    mb = oci.archive.bytes_blob(manifest, oci.archive.MT_MANIFEST)
    index = oci.archive.canonical({"manifests": [{"digest": f"sha256:{mb.digest}", "annotations": {
        "org.opencontainers.image.ref.name": "t"}}]})
    path = tmp_path / "x.oci.tar"
    oci.archive.write_archive(path, [lb, cb, mb], index)
    proc = cli(capsys, "inspect", str(path), "--json")
    info = json.loads(proc.stdout)
    assert info["digest"] == f"sha256:{mb.digest}" and info["bundle"] == "b"
    assert info["layers"][0]["role"] == "base" and info["layers"][0]["present"]
    assert info["user"] == "65534:65534" and info["tag"] == "t"
    # Another manifest under the same name: inspect hashes the bytes whose digest it prints.
    other = oci.archive.canonical({**json.loads(manifest), "annotations": {"a": "b"}})
    forged = oci.archive.Blob(mb.digest, len(other), oci.archive.MT_MANIFEST,
                        lambda out: out.write(other))
    oci.archive.write_archive(path, [lb, cb, forged], index)
    proc = cli(capsys, "inspect", str(path), "--json")
    assert proc.returncode == 10, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert f"its manifest sha256:{mb.digest} has sha256 " in proc.stderr


STAND_IN_PODMAN = """#!{python}
# podman's stand-in for a fast test: what the image's diarize would write in /out, plus a
# decoy the container could also leave there; it records who can reach the folder.
import os, sys
out = sys.argv[sys.argv.index("-v") + 1].split(":")[0]
line = "SPEAKER sample 1 {{:.3f}} 1.000 <NA> <NA> {{}} <NA> <NA>\\n"
with open(os.path.join(out, "a-decoy.rttm"), "w") as f:
    f.writelines(line.format(t, f"S{{t}}") for t in range(5))
with open(os.path.join(out, "sample.wav.rttm"), "w") as f:
    f.writelines(line.format(t, f"S{{t % 2}}") for t in range(4))
with open("{log}", "w") as f:
    f.write(oct(os.stat(os.path.dirname(out)).st_mode & 0o777))
print('{{"ok": true, "engine": "onnx"}}')
"""


def test_the_self_test_reads_the_one_file_diarize_writes_in_a_private_folder(
        tmp_path: Path) -> None:
    """The container's output folder sits in a folder private to this tool (0700), and the
    result is the sample's own RTTM, not the first *.rttm the container left there."""
    lb = oci.archive.bytes_blob(layer_tar({"x": b"y"}), oci.archive.MT_LAYER)
    cb = oci.archive.bytes_blob(oci.archive.canonical({"architecture": "amd64", "config": {}}),
                                oci.archive.MT_CONFIG)
    mb = oci.archive.bytes_blob(oci.archive.canonical({
        "schemaVersion": 2, "config": {"digest": f"sha256:{cb.digest}"},
        "layers": [{"digest": f"sha256:{lb.digest}", "size": lb.size}]}), oci.archive.MT_MANIFEST)
    archive = tmp_path / "x.oci.tar"
    oci.archive.write_archive(archive, [lb, cb, mb], oci.archive.canonical(
        {"manifests": [{"digest": f"sha256:{mb.digest}"}]}))
    log = tmp_path / "parent-mode"
    podman = tmp_path / "podman"
    podman.write_text(STAND_IN_PODMAN.format(python=sys.executable, log=log))
    podman.chmod(0o755)
    result = image.self_test(archive, runtime=str(podman))
    assert (result["segments"], result["speakers"]) == (4, 2)
    assert log.read_text() == "0o700"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
@needs_tools
def test_podman_runs_the_image_offline_read_only_as_any_user_and_a_registry_carries_it(
        tiny_images: dict[str, Any], podman: dict[str, str], tmp_path: Path) -> None:
    archive = tiny_images["first"]["path"]
    for user in ("65534:65534", "12345:54321"):
        run = subprocess.run(["podman", "run", "--rm", "--network", "none", "--read-only",
                              "--user", user, f"oci-archive:{archive}", "--help"],
                             env=podman, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "usage:" in run.stdout.lower() and "--output-dir" in run.stdout
    # The offline variables are in the image's own config: no sourcing needed.
    env = subprocess.run(["podman", "run", "--rm", "--network", "none", "--read-only",
                          "--entrypoint", "env", f"oci-archive:{archive}"], env=podman,
                         capture_output=True, text=True, timeout=600)
    assert "HF_HUB_OFFLINE=1" in env.stdout and "PYANNOTE_METRICS_ENABLED=false" in env.stdout
    # A real registry on loopback: skopeo pushes the archive as it is, podman pulls it back.
    port = _free_port()
    (tmp_path / "registry.yml").write_text(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: "
        f"{tmp_path / 'store'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    registry = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "registry.yml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        ref = f"127.0.0.1:{port}/pyannote-bundle:tiny"
        push = subprocess.run(["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false",
                               f"oci-archive:{archive}", f"docker://{ref}"], env=podman,
                              capture_output=True, text=True, timeout=600)
        assert push.returncode == 0, push.stderr[-2000:]
        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                              f"docker://{ref}"], env=podman, capture_output=True,
                             timeout=120).stdout
        # The registry holds the very manifest the archive has: same digest, same layers.
        assert f"sha256:{hashlib.sha256(raw).hexdigest()}" == tiny_images["first"]["digest"]
        pull = subprocess.run(["podman", "pull", "--tls-verify=false", ref], env=podman,
                              capture_output=True, text=True, timeout=600)
        assert pull.returncode == 0, pull.stderr[-2000:]
        run = subprocess.run(["podman", "run", "--rm", "--network", "none", "--read-only",
                              "--user", "65534", ref, "--help"], env=podman,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and "--output-dir" in run.stdout, run.stderr[-2000:]
    finally:
        registry.terminate()
        registry.wait(timeout=30)



@pytest.mark.slow
@needs_tools
def test_self_test_fails_clearly_when_the_image_cannot_diarize_and_inspect_reads_it(
        tiny_images: dict[str, Any], podman: dict[str, str]) -> None:
    """The tiny bundle carries no pyannote: its image's bin/diarize cannot diarize the
    sample, and the self-test must say so (exit 13), not pass."""
    archive = tiny_images["first"]["path"]
    proc = subprocess.run(["pyannote-bundle", "-q", "image", archive, "--self-test"],
                          env=podman, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 13, proc.stderr[-2000:]
    assert "bin/diarize failed on its sample" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    shown = subprocess.run(["pyannote-bundle", "inspect", archive], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert tiny_images["first"]["digest"] in shown.stdout
    assert "speaker-diarization-3.1-0-py311" in shown.stdout
    for role in ("base", "venv", "models", "config"):
        assert f"  {role} " in shown.stdout


@pytest.mark.slow
@needs_tools
def test_a_site_base_with_gzip_layers_is_used_as_it_is(
        tiny_images: dict[str, Any], base_cache: Path, podman: dict[str, str],
        tmp_path: Path) -> None:
    """--base DIR: an OCI layout whose one layer is the Debian root gzipped (as registries
    serve them): its blob goes into the image unchanged, the install runs on its python."""
    (raw,) = base_cache.glob("image-bases/*/layer.tar")
    data = raw.read_bytes()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=1) as f:
        f.write(data)
    layer = gz.getvalue()
    ld, diff = hashlib.sha256(layer).hexdigest(), hashlib.sha256(data).hexdigest()
    base = tmp_path / "site-base"
    config = oci.archive.canonical({"architecture": ARCH, "os": "linux", "config": {
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "SITE=1"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff}"]}})
    cd = hashlib.sha256(config).hexdigest()
    manifest = oci.archive.canonical({"schemaVersion": 2, "mediaType": oci.archive.MT_MANIFEST,
                                "config": {"mediaType": oci.archive.MT_CONFIG,
                                           "digest": f"sha256:{cd}", "size": len(config)},
                                "layers": [{"mediaType": oci.archive.MT_LAYER_GZIP,
                                            "digest": f"sha256:{ld}", "size": len(layer)}]})
    md = hashlib.sha256(manifest).hexdigest()
    (base / "blobs" / "sha256").mkdir(parents=True)
    for d, b in ((ld, layer), (cd, config), (md, manifest)):
        (base / "blobs" / "sha256" / d).write_bytes(b)
    (base / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (base / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": oci.archive.MT_MANIFEST, "digest": f"sha256:{md}", "size": len(manifest)}]}))
    res = build_cli(tiny_images["bundle"], tmp_path / "img", base_cache, None, "022",
                    "--base", str(base))
    assert res["layers"][0]["digest"] == f"sha256:{ld}" and res["base"]["digest"] == \
        f"sha256:{md}"
    # The layers the install made are the same whatever base carried the same root.
    assert [x["digest"] for x in res["layers"][1:3]] == \
        [x["digest"] for x in tiny_images["first"]["layers"][1:3]]
    run = subprocess.run(["podman", "run", "--rm", "--network", "none", "--read-only",
                          "--entrypoint", "env", f"oci-archive:{res['path']}"], env=podman,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "SITE=1" in run.stdout and "HF_HUB_OFFLINE=1" in run.stdout
