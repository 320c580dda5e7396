"""The layout stays readable: no package module over ~500 lines, no import cycle between our modules
(function-level imports included: a cycle hidden inside a function is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 550  # "a few hundred lines": ~500, with a margin for a docstring


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for the package and its passes (installed as sparseforge_compile.passes)."""
    found = {}
    for base, prefix in ((ROOT / "sparseforge_compile", "sparseforge_compile"), (ROOT / "passes", "sparseforge_compile.passes")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = f
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file (relative imports resolved)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # the deepest module of ours the name is in
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for target in _imports(name, path, set(modules)):
            # a package's __init__ re-exporting its own modules is not a cycle with them
            if not (path.name == "__init__.py" and target.startswith(name + ".")):
                graph.add_edge(name, target)
    return graph


def test_no_import_cycles():
    graph = import_graph()
    # a submodule importing a sibling through its package's __init__ goes via the package node
    cycles = [c for c in nx.simple_cycles(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_the_graph_sees_function_level_and_relative_imports():
    """pipeline.py imports the pass stages inside functions, by a relative import: the graph must hold it."""
    graph = import_graph()
    assert graph.has_edge("sparseforge_compile.pipeline", "sparseforge_compile.passes.pipelines")
    assert graph.has_edge("sparseforge_compile.passes.harden", "sparseforge_compile.graph_origin")


def test_no_package_module_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


def test_every_subpackage_ships():
    """pyproject lists packages by hand (passes/ ships as sparseforge_compile.passes): a new subpackage
    missing from the list would import from a checkout but not from an installed wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert found == listed, f"add to (or drop from) pyproject's packages: {sorted(found ^ listed)}"
