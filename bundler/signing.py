"""Detached signatures of the sidecar digest with ``ssh-keygen -Y`` (OpenSSH 8.1+).

Checksums prove integrity, not origin. A release engineer who signs the sidecar with an
SSH key (``build --sign-key``) lets the isolated host check who built the bundle
(``verify --allowed-signers``) with a tool it already has and no new key format. The
signature covers the sidecar, and the sidecar's sha256 covers every byte of the tarball.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bundler.bundlefile import Sidecar, load_sidecar, sidecar_path, signature_path
from bundler.errors import InputError, IntegrityError
from bundler.subproc import last_lines, run

NAMESPACE = "pyannote-bundle"


def _ssh_keygen() -> str:
    path = shutil.which("ssh-keygen")
    if path is None:
        raise InputError("signing needs ssh-keygen (OpenSSH 8.1 or newer; Debian: "
                         "openssh-client)")
    return path


def sign(sidecar: Path, key: Path) -> Path:
    """Write ``<sidecar>.sig`` with the SSH private ``key`` (no passphrase prompt)."""
    if not key.is_file():
        raise InputError(f"--sign-key {key}: no such file")
    signature = signature_path(sidecar)
    signature.unlink(missing_ok=True)
    res = run([_ssh_keygen(), "-Y", "sign", "-q", "-n", NAMESPACE, "-f", str(key),
               str(sidecar)], env={"PATH": "/usr/bin:/bin", "SSH_ASKPASS_REQUIRE": "never"})
    if res.returncode != 0 or not signature.is_file():
        raise InputError(f"ssh-keygen could not sign {sidecar.name} with {key}: "
                         f"{last_lines(res.stderr, 1) or 'no signature written'} (a key "
                         "with a passphrase must be loaded in ssh-agent)")
    return signature


def verify_signature(tarball: Path, allowed_signers: Path) -> tuple[Sidecar, str]:
    """Check ``<tarball>.sha256.sig`` against ``allowed_signers``; return the sidecar and
    the signer's identity.

    The sidecar is read once: ``ssh-keygen`` checks the signature over those very bytes,
    and the caller takes the tarball's expected digest from the returned ``Sidecar`` (never
    from the file again, which could have been swapped in between). The sidecar must name
    ``tarball``: a genuine signed sidecar of another file is refused.
    """
    sidecar = load_sidecar(tarball)
    signature = signature_path(sidecar_path(tarball))
    if sidecar is None:
        raise IntegrityError(sidecar_path(tarball).name, "missing: a signed bundle needs its "
                             "sidecar")
    if not signature.is_file():
        raise IntegrityError(signature.name, "missing: --allowed-signers needs the sidecar's "
                             "signature beside it")
    keygen = _ssh_keygen()
    env = {"PATH": "/usr/bin:/bin"}
    found = run([keygen, "-Y", "find-principals", "-s", str(signature), "-f",
                 str(allowed_signers)], env=env)
    principal = found.stdout.strip().splitlines()[0] if found.returncode == 0 and \
        found.stdout.strip() else None
    if principal is None:
        raise IntegrityError(signature.name, f"not signed by any key in {allowed_signers}: "
                             "the bundle's origin cannot be trusted")
    proc = run([keygen, "-Y", "verify", "-f", str(allowed_signers), "-I", principal, "-n",
                NAMESPACE, "-s", str(signature)], env=env, stdin=sidecar.raw)
    if proc.returncode != 0:
        raise IntegrityError(signature.name, f"does not verify for {principal}: "
                             f"{last_lines(proc.stderr, 1)}")
    return sidecar, principal
