"""`pyannote-bundle image`: the OCI writer, the base checks, and (slow) real images.

Fast: the deterministic layer and archive writers, the chroot-safe layer unpacking, and
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
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import EMB, SEG, TINY_UV_LOCK, TinyBundle
from e2e import podman_env, require_image_tools
from forge import flip_byte

from bundler import image
from bundler.build import BuildOptions, build
from bundler.cli import main
from bundler.loopback_hub import HubRepo, LoopbackHub
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


def hand_made_base(folder: Path, files: dict[str, bytes], arch: str = ARCH) -> Path:
    """An OCI layout folder of one layer holding ``files``."""
    layer = layer_tar(files)
    ld = hashlib.sha256(layer).hexdigest()
    config = image.canonical({"architecture": arch, "os": "linux",
                              "rootfs": {"type": "layers", "diff_ids": [f"sha256:{ld}"]}})
    cd = hashlib.sha256(config).hexdigest()
    manifest = image.canonical({
        "schemaVersion": 2, "mediaType": image.MT_MANIFEST,
        "config": {"mediaType": image.MT_CONFIG, "digest": f"sha256:{cd}",
                   "size": len(config)},
        "layers": [{"mediaType": image.MT_LAYER, "digest": f"sha256:{ld}",
                    "size": len(layer)}]})
    md = hashlib.sha256(manifest).hexdigest()
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for d, data in ((ld, layer), (cd, config), (md, manifest)):
        (blobs / d).write_bytes(data)
    (folder / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (folder / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": image.MT_MANIFEST, "digest": f"sha256:{md}", "size": len(manifest)}]}))
    return folder


def entries_of(root: Path) -> list[image.Entry]:
    out = []
    for p in sorted(root.rglob("*")):
        name = p.relative_to(root).as_posix()
        if p.is_symlink():
            out.append(image.Entry(name, "symlink", 0o777, target=os.readlink(p)))
        elif p.is_dir():
            out.append(image.Entry(name, "dir", 0o755))
        else:
            out.append(image.Entry(name, "file", 0o644, p.stat().st_size, p))
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
    image.write_layer(entries_of(root), first)
    os.utime(root / "a.txt", (1, 1))
    os.utime(deep / "module.py", (2_000_000_000, 2_000_000_000))
    second = io.BytesIO()
    image.write_layer(entries_of(root), second)
    assert first.getvalue() == second.getvalue()
    raw = first.getvalue()
    assert b"PaxHeader" not in raw and b"mtime=" not in raw  # no PAX records with times
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [e.name for e in entries_of(root)]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {
        (image.LAYER_EPOCH, 0, 0, "", "")}
    assert any(len(m.name) > 100 for m in members)  # a GNU long name, read back whole
    assert next(m for m in members if m.name == "link").linkname == "a.txt"


def test_archive_is_an_oci_layout_whose_digests_match_and_is_the_same_twice(
        tmp_path: Path) -> None:
    blobs = [image.bytes_blob(b"layer bytes" * 100, image.MT_LAYER),
             image.bytes_blob(b'{"config":{}}', image.MT_CONFIG)]
    index = image.canonical({"schemaVersion": 2, "manifests": []})
    a, b = tmp_path / "a.oci.tar", tmp_path / "b.oci.tar"
    image.write_archive(a, blobs, index)
    image.write_archive(b, list(reversed(blobs)), index)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        names = tar.getnames()
        assert names == sorted(names) and names[-2:] == ["index.json", "oci-layout"]
        for m in tar.getmembers():
            if m.name.startswith("blobs/sha256/") and m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                assert hashlib.sha256(f.read()).hexdigest() == m.name.rsplit("/", 1)[1]
    assert a.stat().st_size % image.RECORD == 0


def test_an_archive_that_fails_midway_leaves_no_file(tmp_path: Path) -> None:
    def broken(out: Any) -> None:
        out.write(b"half")
        raise OSError(28, "No space left on device")

    blob = image.Blob("0" * 64, 10, image.MT_LAYER, broken)
    with pytest.raises(OSError):
        image.write_archive(tmp_path / "x.oci.tar", [blob], b"{}")
    assert list(tmp_path.iterdir()) == []


def test_a_base_layer_cannot_write_outside_the_staged_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    layer = tmp_path / "l.tar"
    layer.write_bytes(layer_tar({}, {"etc": str(outside), "up": "../../outside"}))
    image.apply_layer(layer, root)
    second = tmp_path / "l2.tar"
    second.write_bytes(layer_tar({"etc/passwd": b"pwned", "up/x": b"pwned",
                                  "usr/bin/.wh.gone": b""}))
    image.apply_layer(second, root)
    assert list(outside.iterdir()) == []
    # chroot semantics: the link's absolute target is the root's own folder
    assert (root / tmp_path.relative_to("/") / "outside" / "passwd").read_bytes() == b"pwned"


def test_dpkg_status_becomes_the_package_list() -> None:
    status = (b"Package: python3\nStatus: install ok installed\nVersion: 3.11.2-1+b1\n"
              b"Architecture: amd64\n\nPackage: gone\nStatus: deinstall ok config-files\n"
              b"Version: 1\n")
    assert image.dpkg_packages(status) == [{"name": "python3", "version": "3.11.2-1+b1",
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
    config = image.canonical({"architecture": "amd64", "os": "linux", "config": {
        "Labels": labels, "User": image.USER, "Entrypoint": [image.ENTRYPOINT]}})
    lb, cb = image.bytes_blob(layer, image.MT_LAYER), image.bytes_blob(config, image.MT_CONFIG)
    manifest = image.canonical({"schemaVersion": 2, "config": {"digest": f"sha256:{cb.digest}"},
                                "layers": [{"digest": f"sha256:{lb.digest}", "size": lb.size,
                                            "mediaType": image.MT_LAYER}]})
    mb = image.bytes_blob(manifest, image.MT_MANIFEST)
    index = image.canonical({"manifests": [{"digest": f"sha256:{mb.digest}", "annotations": {
        "org.opencontainers.image.ref.name": "t"}}]})
    path = tmp_path / "x.oci.tar"
    image.write_archive(path, [lb, cb, mb], index)
    proc = cli(capsys, "inspect", str(path), "--json")
    info = json.loads(proc.stdout)
    assert info["digest"] == f"sha256:{mb.digest}" and info["bundle"] == "b"
    assert info["layers"][0]["role"] == "base" and info["layers"][0]["present"]
    assert info["user"] == "65534:65534" and info["tag"] == "t"


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
    config = image.canonical({"architecture": ARCH, "os": "linux", "config": {
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "SITE=1"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff}"]}})
    cd = hashlib.sha256(config).hexdigest()
    manifest = image.canonical({"schemaVersion": 2, "mediaType": image.MT_MANIFEST,
                                "config": {"mediaType": image.MT_CONFIG,
                                           "digest": f"sha256:{cd}", "size": len(config)},
                                "layers": [{"mediaType": image.MT_LAYER_GZIP,
                                            "digest": f"sha256:{ld}", "size": len(layer)}]})
    md = hashlib.sha256(manifest).hexdigest()
    (base / "blobs" / "sha256").mkdir(parents=True)
    for d, b in ((ld, layer), (cd, config), (md, manifest)):
        (base / "blobs" / "sha256" / d).write_bytes(b)
    (base / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (base / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": image.MT_MANIFEST, "digest": f"sha256:{md}", "size": len(manifest)}]}))
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
