"""Write the install prefix's config.yaml (absolute model paths) and pyannote.env.

    python3 configure.py PREFIX

Run by install.sh and by `pyannote-bundle verify`, with the host's python3 (stdlib only).
pyannote 3.x resolves relative model paths against the current directory, not the config
(trap 2), so every value that starts with ``models/`` becomes ``PREFIX/models/...``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYANNOTE_METRICS_ENABLED": "false",
}
VALUE = re.compile(r'^(\s*[A-Za-z_][\w.-]*:\s*)("models/[^"]*"|models/\S*)\s*$')


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


def env_file(prefix: Path) -> str:
    lines = ["# Source this before running pyannote: it keeps every library off the network."]
    lines += [f"export {k}={v}" for k, v in OFFLINE_ENV.items()]
    lines.append(f"export PYANNOTE_BUNDLE_CONFIG={shell_quote(str(prefix / 'config.yaml'))}")
    return "\n".join(lines) + "\n"


def shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 configure.py PREFIX", file=sys.stderr)
        return 2
    prefix = Path(argv[0]).resolve()
    config = (prefix / "models" / "config.yaml").read_text()
    write(prefix / "config.yaml", absolute_config(config, prefix))
    write(prefix / "pyannote.env", env_file(prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
