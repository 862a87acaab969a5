"""The orchestrator of the offline side: integrity -> host -> install -> config -> smoke.

Returns a report (the CLI renders it as text or JSON). On failure the partial report is
attached to the raised error, the work folder is removed, and nothing stays installed.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bundler import layout, traps
from bundler.errors import BundlerError
from bundler.install import check_host, find_python, install, remove_install
from bundler.integrity import Limits, check_and_extract
from bundler.signing import verify_signature
from bundler.smoketest import compare, detect_isolation, run_smoke
from bundler.wheels import sha256_file


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


def verify(tarball: Path, opts: VerifyOptions) -> dict[str, Any]:
    report: dict[str, Any] = {"ok": False, "bundle": str(tarball)}
    work = Path(tempfile.mkdtemp(prefix="pyannote-bundle-verify-", dir=opts.workdir))
    prefix = opts.prefix or work / "prefix"
    installed = False
    try:
        if opts.allowed_signers is not None:
            report["signature"] = {"ok": True, "signer": verify_signature(
                tarball.with_name(tarball.name + layout.SIDECAR_SUFFIX), opts.allowed_signers)}
        integrity = check_and_extract(tarball, work / "bundle", opts.limits, opts.hash_members)
        report["integrity"] = integrity.as_dict()
        want = str(integrity.manifest.get("target", {}).get("python"))
        python = find_python(want, opts.python) or sys.executable
        report["host"] = check_host(integrity.manifest, python, integrity.root)
        inst = install(integrity.root, prefix, python=python)
        installed = True
        report["install"] = inst.as_dict()
        report["config"] = _lint(prefix, integrity.manifest)
        if opts.smoke:
            isolation = detect_isolation()
            report["network_isolation"] = isolation.name
            result = run_smoke(prefix, isolation)
            expected_path = integrity.root / layout.EXPECTED
            if expected_path.is_file():
                compare(result, json.loads(expected_path.read_text()))
                result["expected"] = "match"
            report["smoke"] = {"ok": True, **result}
        else:
            report["smoke"] = {"ok": None, "skipped": True}
            report["network_isolation"] = None
        report["ok"] = True
        return report
    except BundlerError as exc:
        report["error"] = str(exc)
        exc.report = report  # type: ignore[attr-defined]
        if installed:
            remove_install(prefix, created=opts.prefix is None or not opts.keep)
        raise
    finally:
        if not (opts.keep and report["ok"]):
            shutil.rmtree(work, ignore_errors=True)
        if report["ok"] and opts.prefix is None and not opts.keep:
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
