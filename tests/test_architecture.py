"""The module import graph of graphopt has no cycles.

Walks graphopt/, passes/, search/ and targets/ with `ast` and builds the graph of imports between
project modules. Counted: every `import` / `from ... import` statement that runs, at module level
or inside a function (a function-level import is how heavy or circular imports are deferred, and
a deferred cycle is still a cycle in the design). Not counted: imports under `if TYPE_CHECKING:`
(they never run; they only name types for annotations) and the implicit import of a package's
`__init__` when one of its submodules is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
# source folder -> installed package name (pyproject's package-dir mapping)
PACKAGES = {"graphopt": "graphopt", "passes": "graphopt.passes", "search": "graphopt.search",
            "targets": "graphopt.targets"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [pkg, *path.relative_to(ROOT / folder).with_suffix("").parts]
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import statements that run (module or function level), skipping `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> nx.DiGraph:
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        is_pkg = path.stem == "__init__"
        package = name if is_pkg else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from pkg import submodule` imports the submodule; `from mod import name` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import graphopt.targets.x86` -> that module
                    t = t.rpartition(".")[0]
                if t and t != name and t in mods:
                    g.add_edge(name, t, line=node.lineno)
    return g


def test_the_graph_sees_project_imports():
    """The walker finds known edges of each kind (else an empty graph would pass the cycle test)."""
    g = import_graph()
    assert len(g) >= 50
    assert g.has_edge("graphopt.cli", "graphopt.registry")  # function level, relative
    assert g.has_edge("graphopt.api", "graphopt.driver")  # module level, relative
    assert g.has_edge("graphopt.targets.llvm_cpu", "graphopt.targets.tvm_common")  # another package
    assert g.number_of_edges() >= 100


def test_no_import_cycles():
    g = import_graph()
    cycles = sorted(list(nx.simple_cycles(g)), key=len)
    shown = [" -> ".join(c + [c[0]]) for c in cycles[:20]]
    assert not cycles, f"{len(cycles)} import cycle(s) among graphopt modules:\n" + "\n".join(shown)
