"""The build side end to end on small real parts: a real wheel from PyPI (six), models from the
loopback Hub through huggingface_hub, a real tarball checked from outside with sha256sum."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import EMB, SEG, TINY_LOCK, TINY_UV_LOCK, TinyBundle
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from bundler import layout
from bundler.build import BuildOptions, build
from bundler.demo.hub import HubRepo, LoopbackHub
from bundler.errors import WheelError
from bundler.integrity import check_and_extract
from bundler.offline_install import make_venv
from bundler.spec import IndexOptions, load_recipe
from bundler.wheels import fetch_wheels

TOKEN = "hf_canary_0123456789abcdef"
LOCK = TINY_LOCK


def test_build_is_complete_checked_reproducible_and_token_free(tmp_path: Path) -> None:
    spec = load_recipe("speaker-diarization-3.1")
    repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG}, gated=True),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB})]
    results = []
    with LoopbackHub(repos, tokens=[TOKEN]) as hub:
        for out in ("a", "b"):
            opts = BuildOptions(output_dir=tmp_path / out, cache_dir=tmp_path / "cache",
                                endpoint=hub.url, token=TOKEN, lockfile=LOCK)
            results.append(build(spec, opts))
        assert any(r["authorized"] for r in hub.requests)
    a, b = (r.packed for r in results)
    assert a.path.read_bytes() == b.path.read_bytes(), "two builds must be byte-identical"
    subprocess.run(["sha256sum", "-c", a.sidecar.name], cwd=a.path.parent, check=True,
                   capture_output=True)
    work = tmp_path / "x"
    work.mkdir()
    subprocess.run(["tar", "-xf", str(a.path), "-C", str(work)], check=True)
    root = work / results[0].bundle_name
    subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=root, check=True,
                   capture_output=True)
    listed = {ln.split("  ", 1)[1] for ln in (root / "SHA256SUMS").read_text().splitlines()}
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert listed == present - {"SHA256SUMS"}
    assert (root / "models/pyannote_model_segmentation-3.0.bin").read_bytes() == SEG
    assert (root / "models/pyannote_model_wespeaker-voxceleb-resnet34-LM.bin").read_bytes() == EMB
    assert "pyannote_model_wespeaker" in (root / "models/config.yaml").read_text()
    manifest = json.loads((root / "manifest.json").read_text())
    assert [len(m["commit"]) for m in manifest["models"]] == [40, 40]
    assert manifest["wheels"][0]["sha256"] == hashlib.sha256(
        (root / "wheels" / manifest["wheels"][0]["filename"]).read_bytes()).hexdigest()
    with tarfile.open(a.path) as tar:
        assert tar.getmember(f"{results[0].bundle_name}/install.sh").mode == 0o755
    for path in [a.path, a.sidecar, *root.rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert check_and_extract(a.path, tmp_path / "verify").sidecar == "match"


def test_cli_rejects_unknown_recipe_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(["pyannote-bundle", "build", "--recipe", "nope", "--output",
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown recipe 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_verify_installs_offline_and_writes_an_absolute_config(tmp_path: Path,
        tiny_bundle: TinyBundle) -> None:
    tarball = tiny_bundle()
    prefix = tmp_path / "My Prefix"
    proc = subprocess.run(["pyannote-bundle", "-q", "verify", str(tarball), "--no-smoke", "--json",
                           "--prefix", str(prefix)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["integrity"]["sidecar"] == "match"
    assert report["config"]["checked"] == ["segmentation", "embedding"]
    assert (prefix / "venv/bin/python").exists()
    # The config names its own release's files, absolutely: a release never moves, and the
    # next one is smoke-tested with its own config while this one stays live.
    release = Path(report["install"]["release"])
    assert release.parent == prefix / "releases" and (prefix / "current").resolve() == release
    assert f'"{release}/models/pyannote_model_segmentation-3.0.bin"' in (
        prefix / "config.yaml").read_text()
    receipt = json.loads((prefix / ".pyannote-bundle-receipt.json").read_text())
    assert receipt["current"] == release.name and receipt["prefix_created"] is True
    # An install that stays is compiled as install.sh compiles it; verify's own temporary
    # one, removed once proven, is not (it would cost more than the smoke test imports).
    assert report["install"]["bytecode_compiled"] is True
    assert list((prefix / "venv/lib/python3.11/site-packages/__pycache__").glob("six.*.pyc"))
    temporary = subprocess.run(["pyannote-bundle", "-q", "verify", str(tarball), "--no-smoke",
                                "--json"], capture_output=True, text=True)
    assert temporary.returncode == 0, temporary.stderr
    assert json.loads(temporary.stdout)["install"]["bytecode_compiled"] is False


def test_verify_refuses_a_flipped_byte_and_installs_nothing(tmp_path: Path,
        tiny_bundle: TinyBundle) -> None:
    tarball = tiny_bundle()
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 1
    tarball.write_bytes(bytes(data))
    prefix = tmp_path / "prefix"
    proc = subprocess.run(["pyannote-bundle", "-q", "verify",
                           str(tarball), "--prefix", str(prefix)],
                          capture_output=True, text=True)
    assert proc.returncode == 10
    assert "sidecar" in proc.stderr and "Traceback" not in proc.stderr
    assert not prefix.exists()


def _repack(src: Path, dst: Path, drop: str | None = None,
            add: tuple[str, bytes] | None = None) -> None:
    """Copy a bundle tarball member by member, leaving one out or slipping one in."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        top = tin.getmembers()[0].name.split("/")[0]
        for m in tin.getmembers():
            if drop and m.name == f"{top}/{drop}":
                continue
            tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
        if add:
            info = tarfile.TarInfo(f"{top}/{add[0]}")
            info.size = len(add[1])
            tout.addfile(info, io.BytesIO(add[1]))


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "models/pyannote_model_segmentation-3.0.bin: listed in SHA256SUMS but missing"),
    ("extra", "models/extra.bin: present in the tarball but not listed in SHA256SUMS"),
    ("truncated", "truncated"),
])
def test_verify_refuses_a_repacked_bundle_naming_the_file(tmp_path: Path, case: str,
                                                          message: str,
                                                          tiny_bundle: TinyBundle) -> None:
    tarball = tiny_bundle()
    bad = tmp_path / "bad" / tarball.name
    bad.parent.mkdir()
    if case == "missing":
        _repack(tarball, bad, drop="models/pyannote_model_segmentation-3.0.bin")
    elif case == "extra":
        _repack(tarball, bad, add=("models/extra.bin", b"not from the build"))
    else:
        with tarfile.open(tarball) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("segmentation-3.0.bin"))
        bad.write_bytes(tarball.read_bytes()[: member.offset_data + member.size // 2])
    prefix = tmp_path / "prefix"
    proc = subprocess.run(["pyannote-bundle", "-q", "verify", str(bad), "--prefix", str(prefix)],
                          capture_output=True, text=True)
    assert proc.returncode == 10, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not prefix.exists()


def test_inspect_reads_the_manifest_without_unpacking_the_wheels(tmp_path: Path,
        tiny_bundle: TinyBundle) -> None:
    tarball = tiny_bundle()
    proc = subprocess.run(["pyannote-bundle", "inspect", str(tarball), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["recipe"]["name"] == "speaker-diarization-3.1"
    assert info["target"]["slug"] == "py311-linux-x86_64"
    assert [m["repo"] for m in info["models"]] == [
        "pyannote/segmentation-3.0", "pyannote/wespeaker-voxceleb-resnet34-LM"]
    seg = info["models"][0]["files"][0]
    assert seg["sha256"] == hashlib.sha256(SEG).hexdigest() and seg["size"] == len(SEG)
    assert info["wheels"]["count"] == 2 and info["manifest_matches_sha256sums"] is True
    pip_wheel = next(w for w in info["wheels"]["key"]) if info["wheels"]["key"] else None
    assert pip_wheel is None  # neither six nor pip is a key package
    # The stream stopped at the first wheel: the pip wheel (most of the tarball) was not read.
    with tarfile.open(tarball) as tar:
        first_wheel = min(m.offset for m in tar.getmembers() if "/wheels/" in m.name)
    # (read-ahead: up to two 64 KiB buffers past the first wheel's header)
    assert info["bytes_read"] < first_wheel + 128 * 1024 < info["size"] - 1024 * 1024
    text = subprocess.run(["pyannote-bundle", "inspect", str(tarball)], capture_output=True,
                          text=True).stdout
    assert "pyannote/segmentation-3.0 @ " in text and "Not verified" in text
    # Two pure-Python wheels: nothing needed from the host beyond glibc.
    assert info["host_requirements"]["libraries"] == []
    assert "host:     no library beyond glibc\n" in text


def test_inspect_says_what_the_host_must_provide() -> None:
    from bundler.inspection import render_text

    info = {"bundle": "b", "size": 1, "files": 3, "compression": "none", "sidecar": True,
            "wheels": {"count": 0, "size": 0, "key": {}}, "models": [],
            "manifest_matches_sha256sums": True,
            "host_requirements": {"glibc": "2.28", "optional_for": {"ffmpeg": "..."},
                                  "libraries": [
                                      {"soname": "libgomp.so.1", "required": True},
                                      {"soname": "libstdc++.so.6", "required": True},
                                      {"soname": "libavutil.so.58", "required": False}]}}
    assert ("host:     glibc >= 2.28; libgomp.so.1, libstdc++.so.6 (+1 optional: ffmpeg)"
            in render_text(info).splitlines())


@pytest.mark.parametrize(("argv", "code"), [
    (["inspect", "README.md"], 10),
    (["verify", "README.md"], 10),
    (["inspect", "no-such-bundle.tar"], 2),
    (["build", "--recipe", "speaker-diarization-9", "--output", "x"], 2),
])
def test_bad_input_gets_a_short_answer_and_no_traceback(argv: list[str], code: int) -> None:
    root = Path(__file__).parent.parent
    proc = subprocess.run(["pyannote-bundle", "-q", *argv], capture_output=True, text=True,
                          cwd=root)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and 1 <= len(proc.stderr.strip().splitlines()) <= 3


def test_sbom_lists_every_wheel_and_model_file_with_its_hash(tmp_path: Path,
                                                             tiny_bundle: TinyBundle) -> None:
    tarball = tiny_bundle()
    with tarfile.open(tarball) as tar:
        top = tar.getmembers()[0].name
        read = lambda name: tar.extractfile(f"{top}/{name}").read()  # noqa: E731
        sbom, manifest = json.loads(read("sbom.cdx.json")), json.loads(read("manifest.json"))
        sums = read("SHA256SUMS").decode()
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(sbom))
    assert error is None, f"not a valid CycloneDX 1.6 document: {error}"
    assert "  sbom.cdx.json\n" in sums and "sbom.cdx.json" in manifest["files"]
    by_ref = {c["bom-ref"]: c for c in sbom["components"]}
    for w in manifest["wheels"]:
        ref = f"pkg:pypi/{w['name']}@{w['version']}?file_name={w['filename']}"
        assert by_ref[ref]["hashes"] == [{"alg": "SHA-256", "content": w["sha256"]}]
    for m in manifest["models"]:
        for f in m["files"]:
            c = by_ref[f"hf:{m['repo']}@{m['commit']}/{f['path']}"]
            assert c["type"] == "machine-learning-model" and c["version"] == m["commit"]
            assert c["hashes"][0]["content"] == f["sha256"]
            assert c["licenses"][0]["license"]["id"] == m["license"]
    # bin/diarize's code and the installer are components too, hashed like the rest.
    programs = {p["path"]: p["sha256"] for p in manifest["programs"]}
    assert set(programs) == layout.HOST_PROGRAMS
    for path, sha in programs.items():
        assert by_ref[f"file:{path}"]["hashes"][0]["content"] == sha
        assert f"{sha}  {path}\n" in sums
    assert len(sbom["components"]) == len(manifest["wheels"]) + 2 + len(programs)
    assert sbom["metadata"]["timestamp"].startswith("2000-01-01")


def test_progress_is_plain_lines_off_a_terminal(tmp_path: Path, tiny_bundle: TinyBundle) -> None:
    tarball = tiny_bundle()
    proc = subprocess.run(["pyannote-bundle", "verify", str(tarball), "--no-smoke", "--prefix",
                           str(tmp_path / "p")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stderr and "\r" not in proc.stderr  # CI logs stay readable
    assert f"integrity: {tarball.name}" in proc.stderr and "install: " in proc.stderr
    quiet = subprocess.run(["pyannote-bundle", "-q", "verify", str(tarball), "--no-smoke",
                            "--prefix", str(tmp_path / "q")], capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_install_uses_the_bundled_uv_and_falls_back_to_pip(tmp_path: Path,
                                                           tiny_bundle: TinyBundle) -> None:
    tarball = tiny_bundle(lockfile=TINY_UV_LOCK)

    def verify(prefix: str, **env: str) -> dict[str, Any]:
        proc = subprocess.run(["pyannote-bundle", "-q", "verify", str(tarball), "--no-smoke",
                               "--json", "--prefix", str(tmp_path / prefix)],
                              capture_output=True, text=True, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))

    assert verify("uv")["install"]["method"] == "venv --without-pip + bundled uv"
    assert (tmp_path / "uv/venv/lib/python3.11/site-packages/six.py").is_file()
    assert not (tmp_path / "uv/.uv-install").exists(), "uv's cache is dropped"


def test_a_uv_that_cannot_run_falls_back_to_pip(tmp_path: Path, wheel_cache: Path,
                                                tiny_bundle: TinyBundle,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    tiny_bundle()  # the six and pip wheels, in the session cache
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("six-1.16.0-*.whl", "pip-26.3-*.whl"):
        (found,) = wheel_cache.rglob(name)
        (wheels / found.name).symlink_to(found)
    with zipfile.ZipFile(wheels / "uv-0.0.1-py3-none-any.whl", "w") as zf:
        zf.writestr("uv-0.0.1.data/scripts/uv",
                    "#!/bin/sh\necho 'uv: cannot run here' >&2\nexit 3\n")
    lock = tmp_path / "requirements.lock"
    lock.write_text(TINY_LOCK.read_text())
    method = make_venv(sys.executable, tmp_path / "venv", wheels, lock)
    assert method == "venv --without-pip + bundled pip"
    assert "uv could not install the wheels (uv: cannot run here); using pip" in \
        capsys.readouterr().err
    assert (tmp_path / "venv/lib/python3.11/site-packages/six.py").is_file()


@pytest.mark.parametrize("args, method", [((), "uv"), (("--pip",), "pip"),
                                          (("--no-compile",), "uv"),
                                          (("--pip", "--no-compile"), "pip")])
def test_install_sh_installs_with_uv_or_with_the_bundled_pip(
        tmp_path: Path, tiny_bundle: TinyBundle, args: tuple[str, ...], method: str) -> None:
    tarball = tiny_bundle(lockfile=TINY_UV_LOCK)
    (tmp_path / "x").mkdir()
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(tmp_path / "x")], check=True)
    (root,) = (tmp_path / "x").iterdir()
    prefix = tmp_path / "prefix"
    # The tiny bundle has no pyannote to smoke: --no-smoke, as a sysadmin may pass it too.
    proc = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"PYTHON={sys.executable}", "sh",
                           "./install.sh", str(prefix), "--no-smoke", *args], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"wheels installed offline with venv --without-pip + bundled {method}" in proc.stderr
    site = prefix / "venv/lib/python3.11/site-packages"
    assert (site / "six.py").is_file()
    assert (prefix / "bin/diarize").is_file() and (prefix / "config.yaml").is_file()
    # Bytecode is compiled, so a service user who cannot write the venv starts fast; not
    # with --no-compile (for an install removed right after its smoke test).
    compiled = list((site / "__pycache__").glob("six.cpython-*.pyc"))
    assert bool(compiled) is ("--no-compile" not in args), compiled


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal, valid pure-Python wheel that exists on no index."""
    dist = f"{name}-{version}"
    files = {f"{name}.py": b"VALUE = 1\n",
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\n"
                                           f"Version: {version}\n".encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
                                        b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},,\n" for p in files) + f"{dist}.dist-info/RECORD,,\n"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for p, data in files.items():
            zf.writestr(p, data)
        zf.writestr(f"{dist}.dist-info/RECORD", record)
    return path


def test_a_specs_own_index_options_reach_pip(tmp_path: Path, wheel_cache: Path,
                                             tiny_bundle: TinyBundle) -> None:
    tiny_bundle()  # six and pip in the session cache: only the local wheel is downloaded
    links = tmp_path / "links"
    links.mkdir()
    local = _wheel(links, "localpkg", "1.0")
    lock = tmp_path / "local.lock"
    lock.write_text(TINY_LOCK.read_text() + "localpkg==1.0 \\\n    --hash=sha256:"
                    f"{hashlib.sha256(local.read_bytes()).hexdigest()}\n")
    recipe = (Path(__file__).parent.parent / "bundler/recipes/speaker-diarization-3.1.toml")
    spec_file = tmp_path / "local.toml"
    spec_file.write_text(recipe.read_text() + f'\n[index]\nfind_links = ["{links}"]\n')
    repos = [HubRepo("pyannote/segmentation-3.0", {"pytorch_model.bin": SEG}),
             HubRepo("pyannote/wespeaker-voxceleb-resnet34-LM", {"pytorch_model.bin": EMB})]
    with LoopbackHub(repos) as hub:
        proc = subprocess.run(
            ["pyannote-bundle", "-q", "build", "--spec", str(spec_file), "--lockfile", str(lock),
             "--output", str(tmp_path / "out"), "--cache-dir", str(wheel_cache),
             "--index-url", "http://127.0.0.1:9/simple"],  # nothing listens there
            capture_output=True, text=True, env={**os.environ, "HF_ENDPOINT": hub.url})
    assert proc.returncode == 0, proc.stderr
    tarball = Path(proc.stdout.splitlines()[0])
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile(f"{names[0]}/manifest.json").read())
    assert any(n.endswith("/wheels/localpkg-1.0-py3-none-any.whl") for n in names)
    assert manifest["index"]["find_links"] == [str(links)]


def test_an_unreachable_index_is_said_so(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.write_text(f"nosuchpkg-xyz==1.0 --hash=sha256:{'ab' * 32}\n")
    with pytest.raises(WheelError, match="an index could not be reached"):
        fetch_wheels(lock, load_recipe("speaker-diarization-3.1").target,
                     IndexOptions("http://127.0.0.1:9/simple"), tmp_path / "cache", 0)


def test_every_verb_teaches_with_an_example_and_completes() -> None:
    top = subprocess.run(["pyannote-bundle", "--help"], capture_output=True, text=True).stdout
    for verb in ("build", "verify", "inspect", "lock", "demo", "recipes", "rebuild", "delta",
                 "apply", "split"):
        assert f"  {verb} " in top
        text = subprocess.run(["pyannote-bundle", verb, "--help"], capture_output=True,
                              text=True).stdout
        assert "Example" in text and f"pyannote-bundle {verb}" in text, verb
    assert "130  interrupted" in top  # the exit-code table
    done = subprocess.run(["pyannote-bundle"], capture_output=True, text=True,
                          env={**os.environ, "_PYANNOTE_BUNDLE_COMPLETE": "bash_complete",
                               "COMP_WORDS": "pyannote-bundle insp", "COMP_CWORD": "1"})
    assert done.stdout.strip() == "plain,inspect"
