"""Secrets and signatures: the Hub token never reaches a file, an argv, a child's environment
or a log, and a signed sidecar (ssh-keygen -Y) proves who built the bundle, whole or split,
while a tampered bundle, a key not allowed or a failed signing is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_LOCK, TinyBundle
from forge import TOKEN, _assert_refused, _build_argv, _hub, _verify

from bundler.build import BuildOptions, build
from bundler.spec import load_recipe


# --- secrets -------------------------------------------------------------------------------
def test_token_never_reaches_a_file_an_argv_or_a_child_env(tmp_path: Path, wheel_cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    seen: list[tuple[list[str], dict[str, str]]] = []
    real_run = subprocess.run

    def spy(args: Any, *a: Any, **kw: Any) -> Any:
        seen.append((list(args), dict(kw.get("env") or os.environ)))
        return real_run(args, *a, **kw)

    monkeypatch.setattr(subprocess, "run", spy)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level("DEBUG", logger="bundler")
    with _hub() as hub:
        result = build(load_recipe("speaker-diarization-3.1"),
                       BuildOptions(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                                    endpoint=hub.url, token=TOKEN, lockfile=TINY_LOCK))
    assert any("pip" in " ".join(args) for args, _ in seen), "the spy saw the pip children"
    for args, env in seen:
        assert not any(TOKEN in a for a in args), args
        assert TOKEN not in env.values()
    assert TOKEN not in caplog.text
    for path in [*(tmp_path / "out").iterdir(), *(tmp_path / "cache").rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in json.dumps(result.manifest)


# --- signatures (ssh-keygen -Y) ------------------------------------------------------------
def _keypair(tmp_path: Path, name: str) -> tuple[Path, str]:
    key = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
                   check=True)
    return key, key.with_suffix(".pub").read_text().strip()


def test_a_signed_sidecar_proves_who_built_the_bundle(tmp_path: Path, wheel_cache: Path,
                                                      tiny_bundle: TinyBundle) -> None:
    tiny_bundle()
    key, pub = _keypair(tmp_path, "release")
    _, other_pub = _keypair(tmp_path, "someone-else")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"release@example.org {pub}\n")
    out = tmp_path / "signed"
    with _hub() as hub:
        proc = subprocess.run([*_build_argv(out, wheel_cache), "--sign-key", str(key)],
                              capture_output=True, text=True,
                              env={**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    tarball = Path(proc.stdout.splitlines()[0])
    sidecar = tarball.with_name(tarball.name + ".sha256")
    assert sidecar.with_name(sidecar.name + ".sig").is_file()
    ok = subprocess.run(["pyannote-bundle", "-q", "verify", str(tarball), "--no-smoke", "--json",
                         "--allowed-signers", str(allowed)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["signature"] == {"ok": True, "signer": "release@example.org"}

    # Split for removable media: the signature travels beside the volumes and is checked
    # from them, as they are.
    usb = tmp_path / "usb"
    split = subprocess.run(["pyannote-bundle", "split", str(tarball), "--size",
                            f"{tarball.stat().st_size // 3 // 1024 + 1}K", "--output", str(usb)],
                           capture_output=True, text=True)
    assert split.returncode == 0, split.stderr
    assert (usb / sidecar.name).with_name(sidecar.name + ".sig").is_file()
    first = usb / f"{tarball.name}.part-000"
    parts = subprocess.run(["pyannote-bundle", "-q", "verify", str(first), "--no-smoke",
                            "--json", "--allowed-signers", str(allowed)],
                           capture_output=True, text=True)
    assert parts.returncode == 0, parts.stderr
    assert json.loads(parts.stdout)["signature"] == {"ok": True, "signer": "release@example.org"}
    allowed_other = tmp_path / "allowed_other"
    allowed_other.write_text(f"other@example.org {other_pub}\n")
    proc, prefix = _verify(first, tmp_path, "--allowed-signers", str(allowed_other))
    _assert_refused(proc, prefix, 10, "not signed by any key in")

    # Someone rewrites the tarball and its sidecar consistently: checksums alone pass, the
    # signature does not.
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 1
    tarball.write_bytes(bytes(data))
    sidecar.write_text(f"{hashlib.sha256(bytes(data)).hexdigest()}  {tarball.name}\n")
    proc, prefix = _verify(tarball, tmp_path, "--allowed-signers", str(allowed))
    _assert_refused(proc, prefix, 10, ".sha256.sig", "does not verify")

    # A bundle signed by a key that is not allowed.
    allowed.write_text(f"other@example.org {other_pub}\n")
    proc, prefix = _verify(tarball, tmp_path, "--allowed-signers", str(allowed))
    _assert_refused(proc, prefix, 10, "not signed by any key in")


def test_a_failed_signature_leaves_no_unsigned_bundle(tmp_path: Path, wheel_cache: Path,
                                                      tiny_bundle: TinyBundle) -> None:
    tiny_bundle()
    not_a_key = tmp_path / "not-a-key"
    not_a_key.write_text("hello\n")
    out = tmp_path / "unsigned"
    with _hub() as hub:
        proc = subprocess.run([*_build_argv(out, wheel_cache), "--sign-key", str(not_a_key)],
                              capture_output=True, text=True,
                              env={**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN})
    assert proc.returncode == 2 and "could not sign" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == [], "no tarball, sidecar or signature under the final names"
