"""The docs a newcomer reads first say what is true: the README's two commands are the ones
that work and stay short, every link between the docs lands on a file and a heading that
exist, and the reference's exit codes and ``--json`` commands are the CLI's own."""

from __future__ import annotations

import re
from pathlib import Path

import click

from bundler.cli import cli
from bundler.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "reference.md"
DOCS = [README, ROOT / "CONTRIBUTING.md", ROOT / "SECURITY.md",
        *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # no '#' lines of code
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_the_readme_is_short_and_its_two_commands_are_the_real_ones() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    lines = [ln.strip() for ln in text.splitlines() if ln.startswith("    ")]
    assert ("python3 -m venv .venv && .venv/bin/pip install . && "
            ".venv/bin/pyannote-bundle demo") in lines
    assert "bash .ci/run" in lines
    assert (ROOT / ".ci" / "run").is_file()


def test_the_readme_warns_of_every_package_ci_installs_as_root() -> None:
    """.ci/run apt-installs packages as root: the README says so and names each one."""
    script = (ROOT / ".ci" / "run").read_text()
    packages = {word for line in re.findall(r"^\s*apt_install (.+)$", script, re.M)
                for word in line.split() if not word.startswith(("-", '"'))}
    assert {"slurm-wlm", "munge", "podman"} <= packages
    text = " ".join(README.read_text().split())
    assert "runs as root" in text and "apt-get" in text
    missing = sorted(p for p in packages if p not in text)
    assert not missing, f"the README's warning leaves out {missing}"


def test_every_link_between_the_docs_lands_on_a_file_and_heading() -> None:
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not ours to check offline
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_reference_lists_every_exit_code_the_tool_has() -> None:
    table = REFERENCE.read_text().split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    listed = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert listed == set(EXIT_CODES)
    summary = README.read_text().split("Exit codes:", 1)[1].split("\n\n", 1)[0]
    assert {int(n) for n in re.findall(r"\b(\d+)\b", summary)} == set(EXIT_CODES)


def test_the_reference_gives_the_json_fields_of_every_command_with_json() -> None:
    with_json = {name for name, cmd in cli.commands.items()  # type: ignore[attr-defined]
                 if any(isinstance(p, click.Option) and "--json" in p.opts
                        for p in cmd.params)}
    assert {"verify", "inspect", "demo", "rebuild", "image", "apply"} <= with_json
    section = REFERENCE.read_text().split("\n## `--json` fields\n", 1)[1]
    documented = set(re.findall(r"^- \*\*`(\w+)`\*\*", section, re.M))
    assert documented == with_json
