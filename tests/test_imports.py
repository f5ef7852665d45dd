"""The package's own modules (and the benchmarks') import one another without a cycle.

Pure ``ast``: no module of the package is imported. Every ``import`` counts, those inside functions
too (a cycle that only a deferred import keeps from failing is still a cycle). An edge goes to the
module named, or to ``pkg.name`` where ``from pkg import name`` names a submodule; ``from pkg import
name`` of anything else is an edge to ``pkg/__init__.py``. The implicit import of a module's parent
packages is not an edge (a package that imports its own submodules is not a cycle).

    python tests/test_imports.py    # prints the graph's cycles, if any
"""
import ast
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = "fairseq_reweight"
ROOT = Path(__file__).resolve().parent.parent


def module_files(root: Path = ROOT, package: str = PACKAGE) -> Dict[str, Path]:
    """{dotted module name: file} of every module of the package (``pkg`` for ``pkg/__init__.py``)."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imports_of(name: str, path: Path, modules: Set[str]) -> Set[str]:
    """The package's modules that module ``name`` (at ``path``) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # ``import a.b.c`` of a name that is not a module (or outside the package): its longest module prefix
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> Dict[str, Set[str]]:
    files = module_files(root, package)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (a list of modules, first repeated last) per strongly connected component that has one."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def connect(node: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:  # a shortest cycle through the component's first member, for the message
        members, start = set(component), component[0]
        paths = {start: [start]}
        frontier = [start]
        while frontier:
            node = frontier.pop(0)
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    cycles.append(paths[node] + [start])
                    frontier = []
                    break
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    frontier.append(nxt)
    return cycles


def test_graph_sees_the_package():
    graph = import_graph()
    assert "fairseq_reweight.cli.influence" in graph and "fairseq_reweight.core.errors" in graph
    # both kinds of import are seen: a top-level one and one inside a function
    assert "fairseq_reweight.cli.common" in graph["fairseq_reweight.cli.influence"]
    assert "fairseq_reweight.nmt" in graph["fairseq_reweight"]


def test_find_cycles_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("package", [PACKAGE, "benchmarks"])
def test_no_import_cycle(package):
    graph = import_graph(package=package)
    assert len(graph) > 3  # the package's modules were found
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles among {package}'s modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


if __name__ == "__main__":
    found = find_cycles(import_graph())
    print("\n".join(" -> ".join(c) for c in found) or "no import cycle")
    sys.exit(1 if found else 0)
