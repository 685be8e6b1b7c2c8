"""The shape of graphopt: a small core, subsystems in subpackages, no import cycles.

The core is the top-level graphopt/*.py: what a newcomer reads to add a pass, target, strategy
or metric and to follow one run (docs/architecture.md). Subsystems live in the subpackages
graphopt/<name>/ (model I/O, evaluation, recovery, reporting, the run store, the parallel
search). Checked here: the core's size, every file's size, no import cycles, and that the core
loads no subsystem at import time (it imports them inside the functions that use them).

The import graph walks graphopt/ (with its subpackages), passes/, search/ and targets/ with `ast`.
Counted: every `import` / `from ... import` statement that runs, at module level or inside a
function (a function-level import is how heavy or circular imports are deferred, and a deferred
cycle is still a cycle in the design). Not counted: imports under `if TYPE_CHECKING:` (they never
run; they only name types for annotations) and the implicit import of a package's `__init__`
when one of its submodules is imported.
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
    assert g.has_edge("graphopt.recovery.recover", "graphopt.recovery.finetune")  # inside a subpackage
    assert g.has_edge("graphopt.recovery.recover_phase", "graphopt.materialize")  # subpackage -> core (..)
    assert g.number_of_edges() >= 100


def test_no_import_cycles():
    g = import_graph()
    cycles = sorted(list(nx.simple_cycles(g)), key=len)
    shown = [" -> ".join(c + [c[0]]) for c in cycles[:20]]
    assert not cycles, f"{len(cycles)} import cycle(s) among graphopt modules:\n" + "\n".join(shown)


# ------------------------------------------------------------------------- core and subsystems
CORE_MAX_LINES = 3000  # issue 17's goal: the core a newcomer reads
FILE_MAX_LINES = 500  # no file over this, anywhere in the package
# core module -> subsystem module it imports at module level, and why that cannot wait
CORE_IMPORTS_AT_LOAD = {
    ("graphopt.driver", "graphopt.parallel.pipeline"): "Search's base class (the pipelined scheduler is a mixin)",
}


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def core_files() -> list[Path]:
    return sorted((ROOT / "graphopt").glob("*.py"))


def subsystems() -> list[str]:
    """The subpackages of graphopt/ (each a folder with an __init__.py)."""
    return sorted(p.parent.name for p in (ROOT / "graphopt").glob("*/__init__.py"))


def test_the_core_is_small():
    total = sum(_lines(p) for p in core_files())
    sizes = ", ".join(f"{p.name} {_lines(p)}" for p in sorted(core_files(), key=_lines, reverse=True)[:5])
    assert total <= CORE_MAX_LINES, (
        f"the core (graphopt/*.py) has {total} lines, over {CORE_MAX_LINES} (largest: {sizes}); "
        "move a subsystem into a subpackage of graphopt/ (docs/architecture.md)")


def test_subsystems_are_packages_with_a_purpose():
    """Each subpackage says what it is for in its __init__ docstring, and holds only that."""
    names = subsystems()
    assert {"modelio", "evaluation", "recovery", "reporting", "runstore", "parallel"} <= set(names)
    for name in names:
        init = ROOT / "graphopt" / name / "__init__.py"
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"graphopt/{name}/__init__.py: no docstring saying what the package is for"
        assert len(tree.body) == 1, f"graphopt/{name}/__init__.py: code besides the docstring (no re-export shims)"


def test_no_file_over_the_limit():
    files = [p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")]
    assert len(files) >= 50
    big = sorted((f"{p.relative_to(ROOT)} ({_lines(p)} lines)" for p in files if _lines(p) > FILE_MAX_LINES))
    assert not big, f"over {FILE_MAX_LINES} lines; split along a seam (docs/architecture.md): " + ", ".join(big)


def _load_time_imports(tree: ast.AST):
    """Import statements that run when the module is imported: module level (also inside a
    module-level if / try / class body), not in functions, not under `if TYPE_CHECKING:`."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.ClassDef, ast.With)):
            for field in ("body", "orelse", "finalbody"):
                stack.extend(getattr(node, field, []))
            for h in getattr(node, "handlers", []):
                stack.extend(h.body)


def core_imports_at_load() -> set[tuple[str, str]]:
    mods = _modules()
    subs = tuple(f"graphopt.{s}" for s in subsystems())
    found = set()
    for path in core_files():
        name = "graphopt" if path.stem == "__init__" else f"graphopt.{path.stem}"
        for node in _load_time_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif node.level:
                base = "graphopt" + (f".{node.module}" if node.module else "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                targets = [node.module or ""]
            found |= {(name, t) for t in targets if t in subs or t.startswith(tuple(s + "." for s in subs))}
    return found


def test_the_core_loads_no_subsystem_at_import():
    """The core imports a subsystem inside the function that needs it, so `import graphopt.plugin`
    (or the CLI's --help) loads the core alone; the exceptions say why."""
    found = core_imports_at_load()
    assert ("graphopt.driver", "graphopt.parallel.pipeline") in found  # the walker sees the known one
    extra = sorted(found - set(CORE_IMPORTS_AT_LOAD))
    assert not extra, ("core modules import subsystems at module level (import them inside the function "
                       "that uses them, or under `if TYPE_CHECKING:` for annotations): "
                       + ", ".join(f"{a} -> {b}" for a, b in extra))


def test_every_subsystem_ships_in_the_wheel():
    """pyproject.toml lists packages by hand: a subpackage missing there imports from a checkout (an
    editable install) and is absent from a built wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing = sorted(f"graphopt.{s}" for s in subsystems() if f"graphopt.{s}" not in listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {', '.join(missing)}"
