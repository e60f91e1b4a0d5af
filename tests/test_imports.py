"""The import graph of src/dail: no module-level cycles, and the leaves stay leaves.

A cycle works only while each side imports the other lazily or in the right order, and breaks
the day someone moves an import to the top. Read from the source (AST), so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dail"


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """The dail modules `path` imports when it is imported: every import statement outside a
    function body (module level, and inside top-level if/try/with blocks and class bodies)."""
    found = set()
    stack: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue  # runs when called, not on import
        stack += ast.iter_child_nodes(node)
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level <= 1:
            # `from .x import y` inside the package is `from dail.x import y`
            module = node.module or ""
            if node.level == 1:
                module = f"dail.{module}" if module else "dail"
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:  # dail.x, dail.x.y, or `from dail import x` (x a module) -> x
            parts = name.split(".")
            if parts[0] == "dail" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    return {m: module_imports(SRC / f"{m}.py", modules) - {m} for m in sorted(modules)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"config": {"prompts"}, "prompts": {"config"}}) == ["config", "prompts", "config"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_module_imports_reads_every_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import dail.config\nfrom dail.data import DataError\nfrom dail import prompts as p\n"
                   "import os\nfrom . import nothing\nfrom .grading import grade\n"
                   "try:\n    import dail.models\nexcept ImportError:\n    pass\n"
                   "class C:\n    from dail import losses\n"
                   "def f():\n    import dail.training\n", encoding="utf-8")
    found = module_imports(src, {"config", "data", "prompts", "models", "grading", "losses", "training"})
    assert found == {"config", "data", "prompts", "models", "grading", "losses"}  # not the import inside f


def test_no_import_cycles():
    graph = import_graph()
    assert {"config", "prompts", "errors", "data"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among dail modules: " + " -> ".join(cycle)


def test_errors_and_prompts_are_leaves():
    graph = import_graph()
    assert graph["errors"] == set(), f"dail.errors must import nothing from dail, imports {sorted(graph['errors'])}"
    assert graph["prompts"] <= {"errors"}, f"dail.prompts imports {sorted(graph['prompts'])}; only dail.errors"
