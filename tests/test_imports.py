"""The shape of the package, read from its source: who imports whom inside ``bundler/``.

No circle (imports inside functions count: a circle hidden in a function is still one), and
``bundler/runtime/`` imports nothing of the tool: it is shipped into bundles and runs where
the tool is not installed. The tool may import the runtime (one source for both sides).
``bundler/demo/`` (the loopback Hub, public model copies, the checkpoint maker, the demo
pipeline) is support for the demo and the tests: only the CLI's ``demo`` command reaches it,
and the product's core, the runtime included, imports nothing of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bundler

PACKAGE = Path(bundler.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of ``bundler`` -> the modules of ``bundler`` it imports, anywhere in it."""
    paths = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        deps: set[str] = set()
        # What a relative import starts from, and what a bare name means inside the runtime:
        # its programs run as files and may name a sibling alone (``import recordings``).
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        siblings = package if package.startswith("bundler.runtime") else None
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # `from . import recordings`, `from .audio import decode`
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    module = f"{base}.{node.module}" if node.module else base
                elif node.module:
                    module = node.module
                else:
                    continue
                for alias in node.names:  # `from bundler import layout` names a module
                    full = f"{module}.{alias.name}"
                    deps.add(full if full in paths else module)
            elif isinstance(node, ast.Import | ast.Call):
                # `__import__("_bootstrap")`: how a program run as a file finds its siblings.
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.args[0].value] if isinstance(node.func, ast.Name)
                         and node.func.id == "__import__" and node.args
                         and isinstance(node.args[0], ast.Constant) else [])
                for imported in names:
                    deps.add(imported)
                    if siblings:
                        deps.add(f"{siblings}.{imported}")
        graph[name] = {d for d in deps if d in paths and d not in (name, "bundler")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as the list of its modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_graph_is_read_from_the_source() -> None:
    graph = import_graph()
    # Known edges, so that a parser that saw nothing could not pass the tests below.
    assert "bundler.bundlefile" in graph["bundler.integrity"]
    assert "bundler.runtime.apply" in graph["bundler.delta"]
    assert "bundler.runtime.recordings" in graph["bundler.runtime.diarize"]
    assert "bundler.runtime.audio" in graph["bundler.runtime.recordings"]  # from .audio import
    assert "bundler.runtime.engines" in graph["bundler.runtime.export"]  # from .engines import
    assert "bundler.runtime._bootstrap" in graph["bundler.runtime.transcribe"]  # __import__
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_through_others() -> None:
    assert _cycle(import_graph()) is None


def test_the_runtime_imports_nothing_of_the_tool() -> None:
    outside = {(name, dep) for name, deps in import_graph().items()
               if name.startswith("bundler.runtime") for dep in deps
               if not dep.startswith("bundler.runtime")}
    assert outside == set()


# The CLI is the one door into the demo package: its `demo` command.
ADAPTERS = {"bundler.cli", "bundler.__main__"}


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_the_core_imports_nothing_of_the_demo_package() -> None:
    graph = import_graph()
    demo = {name for name in graph if name == "bundler.demo" or name.startswith("bundler.demo.")}
    # What lives there, so that a package that moved or emptied cannot pass unseen.
    assert {"bundler.demo.hub", "bundler.demo.public_models", "bundler.demo.checkpoints",
            "bundler.demo.make_checkpoints", "bundler.demo.pipeline"} <= demo
    assert "bundler.demo.hub" in _reach(graph, "bundler.cli")
    core = set(graph) - demo - ADAPTERS
    assert {"bundler.build", "bundler.verify", "bundler.runtime.install"} <= core
    reached = {(name, dep) for name in core for dep in _reach(graph, name) & (demo | ADAPTERS)}
    assert reached == set()


def test_the_cli_reaches_the_pipelines_only_through_commands() -> None:
    """Click functions parse, call one function of ``bundler/commands/`` and render: the
    modules whose work a command assembles are imported there, not by the CLI."""
    graph = import_graph()
    commands = {"bundler.commands.build", "bundler.commands.verify", "bundler.commands.rebuild",
                "bundler.commands.inspect", "bundler.commands.image", "bundler.commands.lock"}
    assert commands <= graph["bundler.cli"]
    worked = {"bundler.build", "bundler.verify", "bundler.image", "bundler.lock",
              "bundler.inspection", "bundler.models", "bundler.wheels", "bundler.pack"}
    assert graph["bundler.cli"] & worked == set()
    assert all(not dep.startswith("bundler.demo") for c in commands for dep in graph[c])


def test_the_oci_library_imports_nothing_of_the_image_pipeline() -> None:
    """``bundler/oci/`` is a library the ``image`` pipeline uses: it imports no module of
    the pipeline (``image``, its ``sandbox``), only the tool's small shared modules."""
    graph = import_graph()
    oci = {name for name in graph if name.startswith("bundler.oci.")}
    assert {"bundler.oci.archive", "bundler.oci.reader", "bundler.oci.rootfs",
            "bundler.oci.base"} <= oci
    assert "bundler.oci.archive" in graph["bundler.image"]
    outside = {(name, dep) for name in oci for dep in graph[name]
               if not dep.startswith("bundler.oci")
               and dep not in ("bundler.errors", "bundler.hashing", "bundler.subproc")}
    assert outside == set()
