"""The orchestrator of the offline side: tarball integrity and safe unpacking, then the
bundle's own installer (``runtime/install.py``, what install.sh runs: integrity both ways,
host, install, config, smoke in a network namespace), then the config lint. Without the
install (``--no-install``), only the first step, on any host.

Returns a report (the CLI renders it as text or JSON). On failure the partial report is
attached to the raised error and the work folder is removed; the installer removes what it
made and nothing else, so a prefix given with ``--prefix`` keeps every file it had.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bundler import layout, traps
from bundler.bundlefile import whole
from bundler.errors import BundlerError
from bundler.hashing import sha256_file
from bundler.integrity import Limits, check_and_extract
from bundler.offline_install import check_interpreter, find_python, run_installer
from bundler.signing import verify_signature


@dataclass
class VerifyOptions:
    prefix: Path | None = None
    keep: bool = False
    smoke: bool = True
    workdir: Path | None = None
    limits: Limits = Limits()
    hash_members: bool = False
    allowed_signers: Path | None = None  # check <tarball>.sha256.sig with ssh-keygen first
    python: str | None = None  # install with it (default: this one, or python3.X on PATH)
    use_pip: bool = False  # the bundled pip instead of uv, as install.sh --pip
    install: bool = True  # False: intact and safe to unpack, on any host


def verify(tarball: Path, opts: VerifyOptions) -> dict[str, Any]:
    report: dict[str, Any] = {"ok": False, "bundle": str(tarball)}
    work = Path(tempfile.mkdtemp(prefix="pyannote-bundle-verify-", dir=opts.workdir))
    prefix = opts.prefix.resolve() if opts.prefix else work / "prefix"
    try:
        sidecar = None
        if opts.allowed_signers is not None:
            # the digest the tarball must match comes from the bytes the signature covers
            sidecar, signer = verify_signature(whole(tarball), opts.allowed_signers)
            report["signature"] = {"ok": True, "signer": signer}
        integrity = check_and_extract(tarball, work / "bundle", opts.limits, opts.hash_members,
                                      sidecar=sidecar)
        report["integrity"] = integrity.as_dict()
        if not opts.install:  # a staging host, a copy on removable media: any host will do
            report["target"] = integrity.manifest.get("target")
            report["install"] = {"skipped": True}
            report["smoke"] = {"ok": None, "skipped": True}
            report["ok"] = True
            return report
        want = str(integrity.manifest.get("target", {}).get("python"))
        python = find_python(want, opts.python) or sys.executable
        check_interpreter(integrity.manifest, python)  # the tool's advice (--python) comes first
        # An install in the work folder is removed once proven: compiling every module of
        # torch for it would cost more than the smoke test imports. One that stays
        # (--prefix, --keep) is compiled, as install.sh does.
        temporary = opts.prefix is None and not opts.keep
        # The onnx export is for what runs the install: the smoke test, or the users of a
        # kept prefix; an install removed unsmoked would export for nobody.
        installed = run_installer(integrity.root, prefix, python, smoke=opts.smoke,
                                  use_pip=opts.use_pip, compile_bytecode=not temporary,
                                  throwaway=temporary, export=opts.smoke or not temporary)
        report["host"] = installed["host"]
        report["install"] = {**installed["install"], "integrity": installed["integrity"]}
        # The config names the release's own paths (absolute, valid across upgrades).
        report["config"] = _lint(Path(installed["install"]["release"]), integrity.manifest)
        if installed.get("engines"):  # the onnx engine, exported and checked on this host
            report["engines"] = installed["engines"]
        smoke = installed.get("smoke") or {}
        report["network_isolation"] = smoke.get("network_isolation")
        report["smoke"] = smoke if opts.smoke else {"ok": None, "skipped": True}
        report["ok"] = True
        return report
    except BundlerError as exc:
        report["error"] = str(exc)
        exc.report = report  # type: ignore[attr-defined]
        raise
    finally:
        if not (opts.keep and report["ok"]):
            shutil.rmtree(work, ignore_errors=True)
        if report["ok"] and opts.install and opts.prefix is None and not opts.keep:
            report["install"]["prefix_removed"] = True


def _lint(prefix: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    config = yaml.safe_load((prefix / layout.PREFIX_CONFIG).read_text()) if (
        prefix / layout.PREFIX_CONFIG).is_file() else None
    if config is None:
        return {"ok": None, "checked": []}
    params = config.get("pipeline", {}).get("params", {})
    expected = {str(prefix / f["bundle_path"]): f["sha256"]
                for m in manifest.get("models", []) for f in m.get("files", [])}
    major = int(str(manifest.get("pyannote_audio", "3")).split(".")[0] or 3)
    checked = traps.check_config(params, base=prefix, sha256=expected,
                                 hash_file=lambda p: sha256_file(p)[0], pyannote_major=major)
    return {"ok": True, "checked": checked}
