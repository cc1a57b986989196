"""The import contract: layers import only downwards, and no module imports itself in a circle.

Layers, lowest first (see docs/development.md):

* leaf: ``memprof.errors``, ``memprof.units``, ``memprof.results``, ``memprof.zoo``, ``memprof._version``
* ``memprof.engine.*``: loading, workload, tracing, measuring, fitting
* ``memprof.commands.*`` (orchestration, returns results) and ``memprof.render.*`` (tables, charts,
  JSON): peers that never import each other
* ``memprof.cli.*`` and ``memprof.__main__`` (typer only), and ``memprof`` itself (the public Python API)

Every import counts, at module level or inside a function: a circle hidden in a function
body is still a circle.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "memprof"
LEAF = {"memprof.errors", "memprof.units", "memprof.results", "memprof.zoo", "memprof._version"}
RANK = {"leaf": 0, "engine": 1, "commands": 2, "render": 2, "cli": 3, "api": 3}
#: which layers each layer may import
ALLOWED = {
    "leaf": {"leaf"},
    "engine": {"leaf", "engine"},
    "commands": {"leaf", "engine", "commands"},
    "render": {"leaf", "render"},
    "cli": {"leaf", "engine", "commands", "render", "cli"},
    "api": {"leaf", "engine", "commands", "api"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(name: str) -> str:
    if name in LEAF:
        return "leaf"
    parts = name.split(".")
    if name in ("memprof", "memprof.api"):
        return "api"
    if name == "memprof.__main__":  # python -m memprof: the command line
        return "cli"
    if len(parts) >= 2 and parts[1] in ("engine", "commands", "render", "cli"):
        return parts[1]
    raise AssertionError(f"{name} belongs to no layer: add it to a package or to LEAF in {__file__}")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every memprof module ``name`` imports, anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the module pkg.sub; ``from pkg import name`` imports pkg
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for target in targets:
            # the longest known module the target names (``from . import nvml`` names a module)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("memprof") and target != name:
                found.add(target)
    return found


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_only_go_down(name):
    g = graph()
    mine = layer(name)
    bad = sorted(t for t in g[name] if layer(t) not in ALLOWED[mine])
    assert not bad, f"{name} ({mine}) imports {bad} from layers above or beside it"


def test_no_circles():
    g = graph()
    # package __init__ files are entered whenever a submodule is: treat "pkg -> pkg.sub" as no edge
    edges = {a: {b for b in bs if not (a.startswith(b + ".") or b.startswith(a + "."))} for a, bs in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_contract_catches_an_upward_import(tmp_path):
    """The checker itself: a render module importing the engine is reported."""
    src = tmp_path / "x.py"
    src.write_text("from ..engine import trace\n")
    known = {"memprof.engine.trace", "memprof.engine", "memprof.render.x"}
    found = imports_of("memprof.render.x", src, known)
    assert found == {"memprof.engine.trace"}
    assert layer("memprof.engine.trace") not in ALLOWED["render"]
