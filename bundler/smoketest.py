"""Offline stage: the smoke diarization, in a child process with the network disabled.

Isolation, strongest first: a fresh network namespace (``unshare -n`` as root,
``unshare -rn`` where user namespaces are allowed), else an in-process guard that makes
every socket connect fail. The child probes a loopback listener of ours: inside a new
namespace even loopback is down, so a probe that gets through proves the isolation failed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler import layout
from bundler.errors import NetworkAttempted, SmokeError
from bundler.progress import task

TOLERANCE_S = 0.5  # segment boundaries may move this much against the expected result
TIMEOUT_S = 900


@dataclass(frozen=True)
class Isolation:
    name: str
    argv: tuple[str, ...]
    guard: bool


def detect_isolation() -> Isolation:
    unshare = shutil.which("unshare")
    if unshare:
        for flags, name in (("-n", "network namespace (unshare -n)"),
                            ("-rn", "user and network namespace (unshare -rn)")):
            ok = subprocess.run([unshare, flags, "true"], capture_output=True).returncode == 0
            if ok:
                return Isolation(name, (unshare, flags), False)
    return Isolation("in-process socket guard (no network namespace available)", (), True)


def run_smoke(prefix: Path, isolation: Isolation) -> dict[str, Any]:
    """Run the bundled smoke.py in ``prefix`` (it runs ``bin/diarize`` on the samples);
    return its JSON result, or raise SmokeError, or NetworkAttempted when the diarizing
    process tried to connect anywhere."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    probe = f"127.0.0.1:{listener.getsockname()[1]}"
    home = tempfile.mkdtemp(prefix="smoke-home-")
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", **layout.OFFLINE_ENV}
    argv = [*isolation.argv, str(prefix / layout.PREFIX_VENV / "bin" / "python"),
            str(prefix / layout.SMOKE_SCRIPT), "--prefix", str(prefix), "--probe", probe]
    if isolation.guard:
        argv.append("--guard-sockets")
    try:
        with task(f"smoke: diarizing the sample, network disabled by {isolation.name}"):
            proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                                  timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SmokeError(f"smoke diarization did not finish in {TIMEOUT_S} s") from None
    finally:
        listener.close()
        shutil.rmtree(home, ignore_errors=True)
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SmokeError(f"smoke.py printed no result (exit {proc.returncode}): "
                         f"{' | '.join(proc.stderr.strip().splitlines()[-2:])}") from None
    if result.get("network_attempts"):
        raise NetworkAttempted(result["network_attempts"],
                               (result.get("network_attempt_details") or ["?"])[0])
    if not result.get("ok"):
        raise SmokeError(f"smoke diarization failed: {result.get('error')}")
    if any(v != "blocked" for v in result.get("network_probes", {}).values()):
        raise SmokeError(f"the smoke process reached the network through {isolation.name}: "
                         "isolation failed")
    return result


def compare(result: dict[str, Any], expected: dict[str, Any]) -> None:
    """Fail when the result differs from the one recorded on the build host: the wav's
    segments, and each container's where the expected result has them."""
    _compare("sample", result, expected)
    for fmt, want in sorted(expected.get("formats", {}).items()):
        _compare(f"sample.{fmt}", result.get("formats", {}).get(fmt, {}), want)


def _compare(what: str, result: dict[str, Any], expected: dict[str, Any]) -> None:
    got, want = result.get("segments", []), expected.get("segments", [])
    if result.get("speakers") != expected.get("speakers") or len(got) != len(want):
        raise SmokeError(f"smoke result for {what} differs from the build host's: {len(got)} "
                         f"segments / {result.get('speakers')} speakers, expected "
                         f"{len(want)} / {expected.get('speakers')}")
    for g, w in zip(got, want, strict=True):
        if abs(g["start"] - w["start"]) > TOLERANCE_S or abs(g["end"] - w["end"]) > TOLERANCE_S:
            raise SmokeError(f"smoke segment {g} of {what} differs from the expected {w} by "
                             f"more than {TOLERANCE_S} s")
