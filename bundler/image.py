"""`image`: a bundle installed into a reproducible OCI image archive, with no daemon.

    pyannote-bundle image BUNDLE --output DIR [--base oci-archive:FILE | --base DIR]

The bundle is checked and unpacked as ``verify`` does, then installed by its own installer
(``runtime/install.py``, what ``install.sh`` runs) into ``/opt/diarization`` inside the base
image's root file system, run there with ``chroot`` in user, mount, PID and network
namespaces of its own (``sandbox``; SECURITY.md says what it can and cannot reach): the
venv is made by the base's own ``python3.X``, so every absolute path it writes (shebangs,
``pyvenv.cfg``) is right inside the image. The result is cut into layers that change at
different rates:

=========  ===================================================================  ==========
layer      holds                                                                 changes
=========  ===================================================================  ==========
base       the base image's layers, as they are (default: Debian from mmdebstrap)  rarely
venv       ``releases/image/venv``: the Python environment (GBs)                   wheels
models     ``releases/image/models`` but its ``*.yaml``: the weights               a model
config     everything else: configs, runtime, samples, receipt, stable links       anything
=========  ===================================================================  ==========

Layers are written as ``oci.archive`` writes them (deterministic, uncompressed: why is
said there), with modes as the installer made them (it forces umask 022). The release is
always named ``image`` (``install.py --release image``), so a parameter or a model update
leaves the venv layer byte-identical: a registry already holding it transfers only the
rest. The bundle's time is the image's ``created``.

The pipeline, one step each: check the bundle (``integrity``), stage the base's root
(``oci.base``, ``oci.rootfs``), install in it (``sandbox``), capture the install into
layers, configure the image, write ``<bundle>.oci.tar`` (``oci.archive``). Each layer is
streamed once from the staged files into the archive, hashed as it goes
(``ArchiveWriter.add_layer``), and its staged files are removed once it is in: at the peak
the disk holds about one copy of the installed image beside the base, not two. The blobs
are in the archive in the image's order (base layers, venv, models, config, then the
config and manifest blobs), the same order for the same inputs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from bundler import __version__
from bundler.errors import (
    CannotWrite,
    HostMismatch,
    ImageError,
    SmokeError,
)
from bundler.integrity import Limits, check_and_extract
from bundler.oci.archive import (
    LAYER_EPOCH,
    MT_CONFIG,
    MT_INDEX,
    MT_MANIFEST,
    OCI_ARCH,
    ArchiveWriter,
    Blob,
    Entry,
    bytes_blob,
    canonical,
)
from bundler.oci.base import DEFAULT_MIRROR, Base, default_base, given_base
from bundler.oci.reader import image_ref, read_from_image, read_image
from bundler.oci.rootfs import apply_layer, find_python, pythons_in
from bundler.offline_install import installer_knows
from bundler.sandbox import SOURCE_DIR, sandbox
from bundler.subproc import last_lines

log = logging.getLogger("bundler")

PREFIX = "opt/diarization"  # inside the image, without the leading slash
RELEASE = "image"  # install.py --release: the same release path in every image
ENTRYPOINT = f"/{PREFIX}/bin/diarize"
TRANSCRIBE = f"/{PREFIX}/bin/transcribe"
USER = "65534:65534"  # nobody:nogroup on Debian; the image runs as any UID all the same
WORKDIR = "work"  # an empty folder owned by root: nothing needs to write there
OFFLINE_PTH = "pyannote_bundle_offline.pth"  # configure.py's, in the venv: config layer
PROJECT_URL = "https://github.com/pyannote-bundle/pyannote-bundle"

LABEL = "io.github.pyannote-bundle"


# --- data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageOptions:
    """What ``build_image`` needs beside the bundle."""

    output_dir: Path
    cache_dir: Path
    base: str | None = None  # oci-archive:FILE, or an OCI layout folder; None: Debian
    tag: str | None = None  # org.opencontainers.image.ref.name in index.json
    mirror: str = DEFAULT_MIRROR  # for the default base (a snapshot.debian.org URL pins it)
    allowed_signers: Path | None = None  # the sidecar's signature, as verify checks it


@dataclass(frozen=True)
class ImageResult:
    """What was written, for the CLI to render."""

    path: Path
    digest: str  # "sha256:<hex>" of the manifest: what a registry calls the image
    config_digest: str
    tag: str
    bundle: str
    bundle_sha256: str
    base: dict[str, Any]
    layers: list[dict[str, Any]]
    size: int
    entrypoint: list[str]
    transcribe: bool
    signer: str | None = None  # who signed the bundle, with --allowed-signers

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "digest": self.digest,
                "config_digest": self.config_digest, "tag": self.tag, "bundle": self.bundle,
                "bundle_sha256": self.bundle_sha256, "base": self.base,
                "layers": self.layers, "size": self.size, "entrypoint": self.entrypoint,
                "transcribe": TRANSCRIBE if self.transcribe else None,
                "signature": {"ok": True, "signer": self.signer} if self.signer else None}


# --- install inside the base -------------------------------------------------------------
def install_in_root(root: Path, bundle_dir: str, python: str, release: str | None) -> None:
    """Run the bundle's installer in ``root`` (``sandbox``: chroot, no network, a user
    namespace)."""
    argv = [python, "-I", f"/{SOURCE_DIR}/{bundle_dir}/runtime/install.py", f"/{PREFIX}",
            "--no-smoke", "--json", *(["--release", release] if release else [])]
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8", "TZ": "UTC",
           # py_compile writes hash-checked bytecode under SOURCE_DATE_EPOCH: the same
           # bytes on every build, and valid whatever the files' mtimes in the image.
           "SOURCE_DATE_EPOCH": str(LAYER_EPOCH)}
    log.info("image: installing the bundle into /%s inside the base (chroot, user "
             "namespace, no network)", PREFIX)
    try:
        res = sandbox(root, argv, env, 3 * 3600)
    except subprocess.TimeoutExpired:
        raise ImageError("the installer did not finish in 3 h inside the base") from None
    if res.returncode != 0:
        try:
            message = json.loads(res.stdout.strip().splitlines()[-1]).get("error")
        except (ValueError, IndexError, AttributeError):
            message = None
        raise ImageError(f"the bundle's installer failed inside the base (exit "
                         f"{res.returncode}): {message or last_lines(res.stderr, 2)}")


def capture(root: Path, release: str) -> dict[str, list[Entry]]:
    """The install's entries under /opt/diarization (and the working folder), by layer."""
    rel_root = f"{PREFIX}/releases/{release}/"
    entries: dict[str, Entry] = {}

    def add(path: Path) -> None:
        name = path.relative_to(root).as_posix()
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            entries[name] = Entry(name, "symlink", 0o777, target=os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            entries[name] = Entry(name, "dir", stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode):
            entries[name] = Entry(name, "file", stat.S_IMODE(st.st_mode), st.st_size, path)
        else:
            raise ImageError(f"/{name} is not a file, folder or link: the install made "
                             "something an image cannot carry")

    for anc in PurePosixPath(PREFIX).parents:
        if str(anc) != ".":
            add(root / str(anc))
    venv = root / PREFIX / "releases" / release / "venv"
    for folder, dirs, files in os.walk(root / PREFIX):
        if Path(folder) != venv and not Path(folder).is_relative_to(venv):
            # Bytecode configure.py left by loading runtime/offline.py and common.py: it records
            # the staged file's mtime, so it differs per build, and the image's fixed
            # mtimes would make Python ignore it anyway. (The venv's is hash-checked.)
            dirs[:] = [d for d in dirs if d != "__pycache__"]
        add(Path(folder))
        for name in dirs + files:
            p = Path(folder, name)
            if p.is_symlink() or not p.is_dir():
                add(p)
    work = root / WORKDIR
    work.mkdir(exist_ok=True)
    os.chmod(work, 0o755)
    add(work)

    def role(name: str) -> str:
        if name.startswith(rel_root + "venv/") and not name.endswith("/" + OFFLINE_PTH):
            return "venv"
        if name.startswith(rel_root + "models/") and not name.endswith((".yaml", ".yml")):
            return "models"
        if name.startswith(rel_root + "onnx/"):
            # The onnx engine's files (tens of MB), exported from the weights: they change
            # with them, not with a parameter, so a parameter update stays a small layer.
            return "models"
        return "config"

    layers: dict[str, dict[str, Entry]] = {"venv": {}, "models": {}, "config": {}}
    for name, entry in entries.items():
        r = role(name)
        if entry.kind == "dir" and r != "config":
            layers[r][name] = entry
            continue
        layers[r][name] = entry
        for anc in PurePosixPath(name).parents:  # each layer carries the folders it needs
            a = str(anc)
            if a != "." and a in entries:
                layers[r].setdefault(a, entries[a])
    # A folder in the config layer only when that layer holds something in it (or it is
    # one of its own): the venv's and models' own folders stay in their layers.
    cfg = layers["config"]
    for name, entry in list(cfg.items()):
        if entry.kind == "dir" and role(name) != "config":
            if not any(k.startswith(name + "/") for k in cfg if cfg[k].kind != "dir"):
                del cfg[name]
    return {r: sorted(es.values(), key=lambda e: e.name.split("/")) for r, es in
            layers.items()}


# --- the whole image ---------------------------------------------------------------------
def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_tag(bundle: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", bundle)[:128]


def image_config(base: Base, blobs: list[Blob], manifest: dict[str, Any], labels:
                 dict[str, str], created: str, offline_env: dict[str, str],
                 has_asr: bool) -> dict[str, Any]:
    base_cfg = base.config.get("config") or {}
    env = {k: v for k, v in (e.split("=", 1) for e in base_cfg.get("Env") or [] if "=" in e)}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update({"LANG": "C.UTF-8", "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
                "PYANNOTE_BUNDLE_CONFIG": f"/{PREFIX}/config.yaml"})
    env.update(offline_env)
    history = [h for h in base.config.get("history") or [] if isinstance(h, dict)]
    if sum(1 for h in history if not h.get("empty_layer")) != len(base.layers):
        history = [{"created": created, "created_by": f"base layer: {b.holds}"}
                   for b in base.layers]
    history += [{"created": created, "created_by": f"pyannote-bundle {__version__} image: "
                 f"{b.role} layer ({b.holds})"} for b in blobs]
    return {
        "created": created,
        "architecture": OCI_ARCH.get(str((manifest.get("target") or {}).get("arch"))),
        "os": "linux",
        "config": {
            "User": USER,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Entrypoint": [ENTRYPOINT],
            "Cmd": ["--help"],
            "WorkingDir": f"/{WORKDIR}",
            "Labels": labels,
        },
        "rootfs": {"type": "layers",
                   "diff_ids": [f"sha256:{b.diff_id}" for b in [*base.layers, *blobs]]},
        "history": history,
    }


def image_blobs(base: Base, blobs: list[Blob], manifest: dict[str, Any], name: str,
                bundle_sha256: str, has_asr: bool, tag: str) -> tuple[Blob, Blob, bytes]:
    """The image's config and manifest blobs and its index.json, once its layers
    (``blobs``, after the base's) are known: labels and annotations say which bundle, which
    base and which tool made it."""
    from bundler.runtime.offline import OFFLINE_ENV

    epoch = int((manifest.get("build") or {}).get("source_date_epoch") or LAYER_EPOCH)
    created = _iso(epoch)
    annotations = {
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.source": PROJECT_URL,
        "org.opencontainers.image.version": name,
        "org.opencontainers.image.revision": bundle_sha256,
        "org.opencontainers.image.title": name,
        "org.opencontainers.image.description": "pyannote.audio speaker diarization, offline: "
                                                f"{ENTRYPOINT} FILE_OR_FOLDER --output-dir DIR",
        "org.opencontainers.image.base.digest": base.digest,
        "org.opencontainers.image.base.name": base.name,
    }
    labels = {**annotations,
              f"{LABEL}.bundle": name,
              f"{LABEL}.bundle.sha256": bundle_sha256,
              f"{LABEL}.tool": f"pyannote-bundle {__version__}",
              f"{LABEL}.layers": ",".join(["base"] * len(base.layers)
                                          + [b.role for b in blobs]),
              f"{LABEL}.transcribe": TRANSCRIBE if has_asr else ""}
    if base.packages:
        labels[f"{LABEL}.base.packages"] = " ".join(f"{p['name']}={p['version']}"
                                                    for p in base.packages)
    config = canonical(image_config(base, blobs, manifest, labels, created,
                                    dict(OFFLINE_ENV), has_asr))
    config_blob = bytes_blob(config, MT_CONFIG)
    all_layers = [*base.layers, *blobs]
    image_manifest = canonical({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": f"sha256:{config_blob.digest}",
                   "size": config_blob.size},
        "layers": [{"mediaType": b.media_type, "digest": f"sha256:{b.digest}",
                    "size": b.size} for b in all_layers],
        "annotations": annotations})
    manifest_blob = bytes_blob(image_manifest, MT_MANIFEST)
    index = canonical({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
        {"mediaType": MT_MANIFEST, "digest": f"sha256:{manifest_blob.digest}",
         "size": manifest_blob.size,
         "annotations": {"org.opencontainers.image.ref.name": tag}}]})
    return config_blob, manifest_blob, index


def build_image(bundle: Path, opts: ImageOptions) -> ImageResult:
    """Install ``bundle`` into its base and write ``<bundle>.oci.tar`` in the output folder.

    Nothing is left in the output folder on failure: the staged root lives in a hidden
    work folder there (the same file system as the archive), removed in every case."""
    try:
        opts.output_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".pyannote-bundle-image-", dir=opts.output_dir))
    except OSError as exc:
        if CannotWrite.matches(exc):
            raise CannotWrite("the image", opts.output_dir, exc, "--output") from None
        raise
    import signal
    import threading

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # as Ctrl-C: the installer is killed, the work removed

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, stop)
    try:
        return _build(bundle, opts, work)
    except OSError as exc:
        if CannotWrite.matches(exc) or exc.errno == errno.ENOSPC:
            raise CannotWrite("the image", opts.output_dir, exc, "--output") from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work, ignore_errors=True)
        if work.exists():  # files the chroot made as another owner: one more try
            # --one-file-system: a mount the installer left (it cannot: its mounts go with
            # its namespace) is never descended into.
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(work)], check=False)


def _build(bundle: Path, opts: ImageOptions, work: Path) -> ImageResult:
    root = work / "root"
    root.mkdir()
    signer = sidecar = None
    if opts.allowed_signers is not None:  # before a byte of the bundle is read, as verify
        from bundler.bundlefile import whole
        from bundler.signing import verify_signature

        # the digest the bundle must match comes from the very bytes the signature covers
        sidecar, signer = verify_signature(whole(bundle), opts.allowed_signers)
    log.info("image: checking %s", bundle.name)
    integrity = check_and_extract(bundle, root / SOURCE_DIR, Limits(), sidecar=sidecar)
    manifest = integrity.manifest
    target = manifest.get("target") or {}
    want_py, arch = str(target.get("python")), str(target.get("arch"))
    name = str(manifest.get("bundle") or integrity.top)
    # The base: the site's, or Debian with the shared libraries the wheels need.
    if opts.base:
        base = given_base(opts.base, work, arch)
    else:
        libs = (manifest.get("host_requirements") or {}).get("libraries") or []
        pkgs = sorted({str(lib["debian"]) for lib in libs if isinstance(lib, dict)
                       and lib.get("required") and re.fullmatch(r"[a-z0-9][a-z0-9.+-]+",
                                                                str(lib.get("debian")))})
        base = default_base(want_py, arch, opts.cache_dir, opts.mirror, pkgs)
    base_arch = str(base.config.get("architecture"))
    if base_arch != OCI_ARCH.get(arch, arch):
        raise HostMismatch(f"the base {base.name} is for {base_arch}; the bundle {name} is "
                           f"for linux {arch} ({OCI_ARCH.get(arch, arch)}): use a base for "
                           f"{OCI_ARCH.get(arch, arch)}")
    log.info("image: unpacking the base %s", base.name)
    for layer in base.layer_files:
        apply_layer(layer, root)
    python = find_python(root, want_py)
    if python is None:
        have = pythons_in(root)
        raise HostMismatch(f"the base {base.name} has no python{want_py} (the bundle {name} "
                           f"is for CPython {want_py}; the base has "
                           f"{', '.join(have) or 'no Python'} in /usr/bin and /usr/local/bin): "
                           f"use a base with python{want_py}")
    installer = integrity.root / "runtime" / "install.py"
    # Bundles made before the installer took --release name their release by the bundle's
    # digest: their image's venv layer then carries it in its paths.
    release = RELEASE if installer_knows(installer, "--release") else None
    if release is None:
        log.warning("image: this bundle's installer cannot name its release: the venv layer "
                    "will carry the bundle's digest in its paths and be shared with no other "
                    "bundle's image (rebuild the bundle with this pyannote-bundle)")
    install_in_root(root, integrity.top, python, release)
    shutil.rmtree(root / SOURCE_DIR)
    receipt = json.loads((root / PREFIX / ".pyannote-bundle-receipt.json").read_text())
    release = str(receipt["current"])
    onnx = (receipt.get("engines") or {}).get("onnx") or {}
    if onnx.get("ok") is not True:  # said, never silent: the image is about 3x slower
        log.warning("image: the onnx engine was not made inside the base (%s): the image "
                    "diarizes with the pytorch engine",
                    onnx.get("error") or onnx.get("skipped") or "this bundle's installer "
                    "exports it only with its smoke test: rebuild the bundle")
    parts = capture(root, release)
    has_asr = (root / PREFIX / "bin" / "transcribe").exists()
    holds = {"venv": f"/{PREFIX}/releases/{release}/venv: the Python environment",
             "models": f"/{PREFIX}/releases/{release}/models: the model weights (and "
                       "onnx/, the onnx engine exported from them)",
             "config": f"/{PREFIX}: configs, runtime, samples, bin/diarize"
                       + (", bin/transcribe" if has_asr else "")}
    tag = opts.tag or default_tag(name)
    path = opts.output_dir / f"{name}.oci.tar"
    log.info("image: writing %s (each layer streamed once, hashed as it goes)", path)
    with ArchiveWriter(path) as archive:
        for base_layer in base.layers:
            archive.add(base_layer)
        blobs = [archive.add_layer(parts[r], r, holds[r]) for r in ("venv", "models", "config")]
        config_blob, manifest_blob, index = image_blobs(base, blobs, manifest, name,
                                                        integrity.sha256, has_asr, tag)
        archive.add(config_blob)
        archive.add(manifest_blob)
        size = archive.finish(index)
    all_layers = [*base.layers, *blobs]
    return ImageResult(
        path=path, digest=f"sha256:{manifest_blob.digest}",
        config_digest=f"sha256:{config_blob.digest}", tag=tag, bundle=name,
        bundle_sha256=integrity.sha256,
        base={"name": base.name, "digest": base.digest, "packages": len(base.packages)},
        layers=[{"role": b.role, "digest": f"sha256:{b.digest}", "size": b.size,
                 "holds": b.holds} for b in all_layers],
        size=size, entrypoint=[ENTRYPOINT], transcribe=has_asr, signer=signer)


def render_result(res: ImageResult) -> str:
    lines = [f"{res.path}", f"digest:  {res.digest}", f"tag:     {res.tag}",
             f"base:    {res.base['name']} ({res.base['digest']})", "layers:"]
    lines += [f"  {b['role']:<7} {b['size'] / 1e6:>10.1f} MB  {b['digest'][:19]}  {b['holds']}"
              for b in res.layers]
    lines.append(f"run:     podman run --rm --read-only --network none -v DIR:/{WORKDIR} "
                 f"oci-archive:{res.path} FILE_OR_FOLDER")
    return "\n".join(lines)


# --- inspect and the self-test -------------------------------------------------------------


def check_engine(summary: dict[str, Any]) -> str:
    """The engine ``bin/diarize --json`` says it ran (its summary, ``summary``): an image
    must run the onnx engine, which its installer exported and checked inside the base;
    anything else is a SmokeError that names the engine and why (``engine_note``)."""
    engine = summary.get("engine")
    if engine != "onnx":
        note = summary.get("engine_note") or "bin/diarize gave no reason"
        raise SmokeError(f"the image's {ENTRYPOINT} runs the {engine} engine, not onnx "
                         f"(about 3x slower on a CPU): {note}")
    return engine


def self_test(archive: Path, runtime: str = "podman") -> dict[str, Any]:
    """Run the image's entrypoint on its bundled sample with no network, read-only, as
    65534, check that it ran the onnx engine (``check_engine``), and compare with the
    bundle's smoke/expected.json (when it has one)."""
    from bundler.runtime.install import compare

    exe = shutil.which(runtime)
    if exe is None:
        raise SmokeError(f"--self-test runs the image with {runtime}, which is not installed "
                         "(Debian/Ubuntu: apt-get install podman)")
    digest = read_image(archive).manifest_digest
    ref = image_ref(archive)
    base = [exe, "run", "--rm", "--network", "none", "--read-only", "--user", USER]
    sample = f"/{PREFIX}/smoke/sample.wav"
    private = tempfile.mkdtemp(prefix="pyannote-bundle-image-test-")  # 0700
    try:
        # The container's user (65534, or a subordinate id under rootless podman) writes its
        # RTTM in ``out``, which it reaches through the bind mount; no other user of the
        # build host can reach it: its parent is private to this tool.
        out = Path(private) / "out"
        out.mkdir()
        os.chmod(out, 0o777)
        res = subprocess.run([*base, "-v", f"{out}:/out", ref,
                              sample, "--output-dir", "/out", "--json"],
                             capture_output=True, text=True, errors="replace",
                             stdin=subprocess.DEVNULL, timeout=1800)
        if res.returncode != 0:
            raise SmokeError(f"the image's {ENTRYPOINT} failed on its sample (exit "
                             f"{res.returncode}): {last_lines(res.stderr, 2)}")
        try:
            summary = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SmokeError(f"the image's {ENTRYPOINT} --json printed no summary: "
                             f"{last_lines(res.stdout or res.stderr, 2)}") from None
        engine = check_engine(summary if isinstance(summary, dict) else {})
        # The one file diarize writes for it (not any *.rttm the container left there),
        # never read through a link the container made.
        rttm = out / f"{PurePosixPath(sample).name}.rttm"
        text = rttm.read_text() if rttm.is_file() and not rttm.is_symlink() else ""
        segments: list[dict[str, Any]] = []
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 8 and f[0] == "SPEAKER":
                segments.append({"start": float(f[3]), "end": float(f[3]) + float(f[4]),
                                 "speaker": f[7]})
    finally:
        shutil.rmtree(private, ignore_errors=True)
    if not segments:
        raise SmokeError(f"the image's {ENTRYPOINT} wrote no speech segments for its sample")
    result: dict[str, Any] = {
        "segments": [{"start": round(s["start"], 3), "end": round(s["end"], 3)}
                     for s in segments],
              "speakers": len({s["speaker"] for s in segments})}
    matched = None
    # PREFIX/smoke is a link through current/ to the release: read the release's own file.
    expected = read_from_image(archive, f"{PREFIX}/releases/*/smoke/expected.json")
    if expected is not None:
        from bundler.runtime.install import Failure

        try:
            compare(result, {k: v for k, v in json.loads(expected).items()
                             if k in ("segments", "speakers")})
            matched = True
        except Failure as exc:
            raise SmokeError(f"the image's result differs from smoke/expected.json: "
                             f"{exc}") from None
    return {"ok": True, "image": digest, "runtime": runtime, "engine": engine,
            "segments": len(segments), "speakers": result["speakers"],
            "expected": "match" if matched else "absent"}


