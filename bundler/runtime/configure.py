"""Make an install prefix usable: config with absolute paths, the offline environment, and
``bin/diarize``.

    python3 configure.py PREFIX

Run by the bundle's installer (``runtime/install.py``, which install.sh and ``pyannote-bundle
verify`` both run) with the host's python3 (stdlib only), in a new release folder
(``PREFIX/releases/<id>``, given as PREFIX here) after its venv is installed and ``models/``,
``smoke/`` and ``runtime/`` are copied. It writes:

- ``PREFIX/config.yaml``: pyannote 3.x resolves relative model paths against the current
  directory, not the config (trap 2), so every ``models/...`` value becomes absolute;
- ``PREFIX/pyannote.env``: the offline variables, to be sourced;
- ``PREFIX/venv/lib/pythonX.Y/site-packages/pyannote_bundle_offline.pth``: the same
  variables as defaults for every process of the venv, so that ``venv/bin/python`` run from
  a service, a notebook or cron without sourcing anything still makes no connection attempt
  (pyannote.audio 4 sends telemetry unless told not to: trap 9); a variable the user set
  wins;
- ``PREFIX/bin/diarize``: runs ``runtime/diarize.py`` with the venv, isolated from the
  caller's ``PYTHONPATH``;
- ``PREFIX/bin/transcribe``: the same for ``runtime/transcribe.py``, when the bundle carries
  a speech-recognition model (``manifest.json``'s ``asr``);
- ``PREFIX/bin/serve``: the same for ``runtime/serve.py`` (the service), and its hardened
  systemd unit, ``PREFIX/share/systemd/pyannote-serve.service``;
- ``PREFIX/bin/enroll``: the same for ``runtime/enroll.py`` (voiceprints).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

VALUE = re.compile(r'^(\s*[A-Za-z_][\w.-]*:\s*)("models/[^"]*"|models/\S*)\s*$')
OFFLINE_PTH = "pyannote_bundle_offline.pth"
DIARIZE = "bin/diarize"
TRANSCRIBE = "bin/transcribe"
SERVE = "bin/serve"
ENROLL = "bin/enroll"
UNIT = "share/systemd/pyannote-serve.service"
SERVICE_USER = "pyannote-serve"


def absolute_config(text: str, prefix: Path) -> str:
    """The config with every ``models/...`` value made absolute under ``prefix``."""
    out = []
    for line in text.splitlines():
        m = VALUE.match(line)
        if m:
            rel = json.loads(m.group(2)) if m.group(2).startswith('"') else m.group(2)
            line = m.group(1) + json.dumps(str(prefix / rel))
        out.append(line)
    return "\n".join(out) + "\n"


def shipped(prefix: Path, name: str) -> Any:
    """``PREFIX/runtime/<name>`` (copied into the prefix before this runs), loaded alone:
    this file sits at the bundle's top, beside no package. Only modules that import no
    sibling and nothing but the standard library load so (``offline.py``, ``common.py``)."""
    path = prefix / "runtime" / name
    spec = importlib.util.spec_from_file_location(f"pyannote_bundle_{Path(name).stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def offline_env(prefix: Path) -> dict[str, str]:
    """The offline variables: the runtime programs' own list, read from
    ``PREFIX/runtime/offline.py``, so that the variables exist in one place."""
    return dict(shipped(prefix, "offline.py").OFFLINE_ENV)


def env_file(prefix: Path, env: dict[str, str]) -> str:
    lines = ["# Source this before running pyannote: it keeps every library off the network."]
    lines += [f"export {k}={v}" for k, v in env.items()]
    lines.append(f"export PYANNOTE_BUNDLE_CONFIG={shell_quote(str(prefix / 'config.yaml'))}")
    return "\n".join(lines) + "\n"


def offline_pth(env: dict[str, str]) -> str:
    """One ``import`` line (site runs those at start-up): the offline defaults."""
    pairs = ", ".join(f"({k!r}, {v!r})" for k, v in env.items())
    return (f"import os; [os.environ.setdefault(k, v) for k, v in ({pairs},)]"
            "  # pyannote-bundle: offline by default\n")


def comment_safe(text: str) -> str:
    """``text`` for a comment line: every non-printable character escaped as Python writes
    it, so a newline in a prefix cannot end the comment and become a command. (The
    installer refuses such a prefix; this holds whoever runs configure.py.)"""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def wrapper(prefix: Path, program: str) -> str:
    """``bin/<program>``: ``runtime/<program>.py`` run by the venv's python, isolated (-I)."""
    python = shell_quote(str(prefix / "venv" / "bin" / "python"))
    script = shell_quote(str(prefix / "runtime" / f"{program}.py"))
    return ("#!/bin/sh\n"
            f"# {program} with the pyannote bundle installed in {comment_safe(str(prefix))}; "
            "--help for usage.\n"
            f'exec {python} -I {script} "$@"\n')


def systemd_quote(s: str) -> str:
    """One word of a systemd command line: quoted, its specifiers (%) kept literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def systemd_unit(prefix: Path) -> str:
    """``bin/serve`` as a systemd service: its own system user, a private state dir, the
    file system read-only but for it, no privileges, no devices, no other namespaces."""
    serve = systemd_quote(str(prefix / SERVE))
    state = f"/var/lib/{SERVICE_USER}"
    return f"""\
# bin/serve of the pyannote bundle in {comment_safe(str(prefix))}, as a hardened service.
# Enable it (as root):
#   useradd --system --home-dir {state} --shell /usr/sbin/nologin {SERVICE_USER}
#   cp {comment_safe(str(prefix / UNIT))} /etc/systemd/system/ && systemctl daemon-reload
#   systemctl enable --now {SERVICE_USER}
# Keys (clients on other hosts need one; without keys it answers on loopback only):
#   runuser -u {SERVICE_USER} -- env STATE_DIRECTORY={state} \\
#     {comment_safe(str(prefix / SERVE))} keys add NAME
# then set --host 0.0.0.0 below (systemctl edit {SERVICE_USER}), or put a TLS reverse
# proxy in front. On a GPU host, delete PrivateDevices=yes (it hides /dev/nvidia*).
[Unit]
Description=pyannote-bundle speech service (OpenAI-compatible, offline)
After=network.target

[Service]
Type=exec
User={SERVICE_USER}
Group={SERVICE_USER}
ExecStart={serve} --host 127.0.0.1 --port 8000 --state-dir {state}
StateDirectory={SERVICE_USER}
StateDirectoryMode=0700
CacheDirectory={SERVICE_USER}
Environment=XDG_CACHE_HOME=/var/cache/{SERVICE_USER}
UMask=0077
KillSignal=SIGTERM
TimeoutStopSec=660
Restart=on-failure
RestartSec=5
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service

[Install]
WantedBy=multi-user.target
"""


def has_asr(prefix: Path) -> bool:
    """Whether the release's manifest names a speech-recognition model."""
    try:
        manifest = json.loads((prefix / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("asr"), dict)


def site_packages(prefix: Path) -> Path:
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return prefix / "venv" / "lib" / version / "site-packages"


def shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 configure.py PREFIX", file=sys.stderr)
        return 2
    prefix = Path(argv[0]).resolve()
    config = (prefix / "models" / "config.yaml").read_text()
    env = offline_env(prefix)
    # Every file here is for every user of the prefix, whatever the installer's umask.
    write = shipped(prefix, "common.py").write_atomic
    write(prefix / "config.yaml", absolute_config(config, prefix), 0o644)
    write(prefix / "pyannote.env", env_file(prefix, env), 0o644)
    site = site_packages(prefix)
    if not site.is_dir():
        print(f"configure.py: {site} is missing: is the venv made with this python3?",
              file=sys.stderr)
        return 1
    write(site / OFFLINE_PTH, offline_pth(env), 0o644)
    write(prefix / DIARIZE, wrapper(prefix, "diarize"), 0o755)
    if has_asr(prefix):
        write(prefix / TRANSCRIBE, wrapper(prefix, "transcribe"), 0o755)
    write(prefix / SERVE, wrapper(prefix, "serve"), 0o755)
    write(prefix / ENROLL, wrapper(prefix, "enroll"), 0o755)
    (prefix / UNIT).parent.mkdir(parents=True, exist_ok=True)
    write(prefix / UNIT, systemd_unit(prefix), 0o644)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
