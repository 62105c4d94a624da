"""The package's shape: imports among ``ember`` modules run one way, and no source file is too long to read.

Imports are read with ``ast`` (nothing is executed), at module level and inside functions alike: a
function-level import is still a dependency, and a cycle through one is still a cycle (docs/design.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "ember"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    """``ember/quant/__init__.py`` -> ``ember.quant``; ``ember/cli.py`` -> ``ember.cli``."""
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def ember_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is an ember module (``ember.quant.int4.X`` -> ``ember.quant.int4``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ember modules that ``module`` imports anywhere in its source (top level or inside functions).

    ``from ember.x import y`` counts as importing ``ember.x.y`` when that is a submodule, else ``ember.x``.
    Importing a submodule also runs its parent packages' ``__init__``; those edges are not counted, since a
    package's ``__init__`` importing its own submodules is how packages are built, not a cycle to break.
    """
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            if not base_name.startswith("ember"):
                continue
            for alias in node.names:
                target = _resolve(f"{base_name}.{alias.name}", modules)
                if target:
                    found.add(target)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the ember modules it imports."""
    modules = ember_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_graph_sees_function_level_and_relative_imports(tmp_path):
    """The walker counts an import inside a function and a relative import (else the cycle test proves nothing)."""
    pkg = tmp_path / "ember"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import f\n")
    (pkg / "a.py").write_text("def g():\n    from ember.sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from ..a import g\n")
    global PACKAGE_DIR
    saved, PACKAGE_DIR = PACKAGE_DIR, pkg
    try:
        graph = import_graph()
    finally:
        PACKAGE_DIR = saved
    assert graph["ember.a"] == {"ember.sub.b"}
    assert graph["ember.sub.b"] == {"ember.a"}
    assert cycles(graph) == [["ember.a", "ember.sub.b"]]


def test_no_import_cycles():
    """Imports among ember modules form no cycle, counting imports inside functions."""
    found = cycles(import_graph())
    assert not found, "import cycles among ember modules (break each; see docs/design.md):\n" + "\n".join(
        "  {" + ", ".join(c) + "}" for c in found)


def test_no_long_source_files():
    """No Python file in the package is over MAX_LINES lines: split it by concern."""
    long = sorted((len(p.read_text().splitlines()), str(p.relative_to(PACKAGE_DIR.parent)))
                  for p in PACKAGE_DIR.rglob("*.py"))
    over = [f"  {name}: {n} lines" for n, name in long if n > MAX_LINES]
    assert not over, f"files over {MAX_LINES} lines (split them by concern):\n" + "\n".join(over)
