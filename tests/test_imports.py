"""The import graph of netslim's own modules: no cycles, so every module imports on its own.

Read from the source (ast), so the test costs milliseconds: one graph of the imports run
when a module is imported (must be acyclic), and one that adds the imports inside functions
(a cycle there is a design smell: the engine never reaches back to checkpoint or the CLI).
"""
from __future__ import annotations

import ast
from pathlib import Path

import netslim

PACKAGE = Path(netslim.__file__).parent

# Cycles through imports inside functions that are there by design: netslim.prune(...,
# target_latency=F) searches the percent by calling prune again (latency_target.py).
ALLOWED_LAZY_CYCLES = {frozenset({"netslim.engine.prune", "netslim.latency_target"})}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, top_level_only: bool) -> set[str]:
    """netslim modules `path` imports (relative imports resolved); at import time only, or all."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("netslim"):
                for alias in node.names:  # `from . import x` may name a module
                    sub = f"{base}.{alias.name}"
                    out.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("netslim"))
    return out - {name}


def graph(top_level_only: bool) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p, top_level_only) for p in PACKAGE.rglob("*.py")}


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    g = graph(top_level_only=True)
    assert "netslim.engine.slim" in g["netslim.checkpoint"]
    assert "netslim.engine.trace" in g["netslim.engine.analysis"]


def test_no_import_cycle_at_import_time():
    g = graph(top_level_only=True)
    # a package imports its submodules' names; the package itself is no part of a cycle
    assert cycles({k: {v for v in vs if v != "netslim"} for k, vs in g.items()}) == []


def test_no_import_cycle_through_the_engine():
    found = [c for c in cycles(graph(top_level_only=False))
             if frozenset(c) not in ALLOWED_LAZY_CYCLES
             and any(m.startswith("netslim.engine") or m == "netslim.checkpoint" for m in c)]
    assert found == []
