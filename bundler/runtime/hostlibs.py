"""Does this host have what the bundle's wheels need from it? Checked before installing.

    python3 runtime/hostlibs.py manifest.json [--json]

Reads ``host_requirements`` from the bundle's manifest (written at build time from the
wheels' ELF ``DT_NEEDED`` entries) and asks this host's dynamic loader for each required
library, the way Python will load it later (``dlopen`` through ctypes: ``LD_LIBRARY_PATH``,
the ld.so cache and the default folders), and compares glibc with the newest the wheels'
platform tags ask for. Prints nothing and exits 0 when all is there; else prints one line
naming each missing library and the Debian/Ubuntu and RHEL packages that provide it, and
exits 1. Exit 2: the manifest cannot be read. Runs with the host's python3, standard
library only; the bundle's installer (``runtime/install.py``, run by ``install.sh`` and
``pyannote-bundle verify`` alike) calls ``check``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def glibc_version() -> tuple[int, int] | None:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return None
    name, _, version = text.partition(" ")
    if name != "glibc":
        return None
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def loadable(soname: str) -> bool:
    import ctypes

    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def problems(requirements: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """(what is wrong, each one line; the optional libraries this host lacks)."""
    found: list[str] = []
    floor = requirements.get("glibc")
    if floor:
        have = glibc_version()
        want = tuple(int(x) for x in str(floor).split(".")[:2])
        if have is None:
            found.append(f"the wheels need glibc {floor} or newer; this host's C library "
                         f"is not glibc")
        elif have < want:
            found.append(f"the wheels need glibc {floor} or newer; this host has "
                         f"{have[0]}.{have[1]} (a newer distribution release is needed)")
    try:
        import ctypes  # noqa: F401
    except ImportError:
        found.append("this python has no ctypes, which torch needs (Debian/Ubuntu: "
                     "libpython3.X-stdlib; RHEL: python3-libs)")
        return found, []
    missing_optional = []
    for lib in requirements.get("libraries", []):
        if loadable(lib["soname"]):
            continue
        if not lib.get("required", True):
            missing_optional.append(lib)
            continue
        packages = "; ".join(f"{family}: {lib[key]}" for family, key in
                             (("Debian/Ubuntu", "debian"), ("RHEL", "rhel")) if lib.get(key))
        found.append(f"{lib['soname']} (needed by {', '.join(lib.get('needed_by', []))}; "
                     f"install {packages or 'the package that provides it'})")
    return found, missing_optional


def check(requirements: dict[str, Any]) -> dict[str, Any]:
    """The whole answer: ``ok``, the one-line ``message`` when not, ``problems``, the
    ``glibc`` floor, the required libraries ``checked`` and the ``optional_missing``."""
    found, missing_optional = problems(requirements)
    required = [lib["soname"] for lib in requirements.get("libraries", [])
                if lib.get("required", True)]
    message = "this host lacks what the bundled wheels need: " + "; ".join(found)
    return {"ok": not found, "message": message if found else None, "problems": found,
            "glibc": requirements.get("glibc"), "checked": required,
            "optional_missing": [lib["soname"] for lib in missing_optional]}


def main(argv: list[str]) -> int:
    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        with open(args[0], encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"cannot read {args[0]}: {exc}", file=sys.stderr)
        return 2
    result = check(manifest.get("host_requirements") or {})
    if as_json:
        print(json.dumps(result))
    elif not result["ok"]:
        print(result["message"])
    return 0 if result["ok"] else 1

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
