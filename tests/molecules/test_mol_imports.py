"""The molecules package has no import cycle: its modules form a layered graph (constants -> features, metrics ->
io, properties, ... -> domain), counting imports inside functions too (a lazy import hides a cycle, not removes it)."""

from __future__ import annotations

import ast
from pathlib import Path

import domains.molecules

PACKAGE = "domains.molecules"
ROOT = Path(domains.molecules.__file__).resolve().parent


def package_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (top level, in functions, in ``if TYPE_CHECKING``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = PACKAGE if node.level == 1 else PACKAGE.rsplit(".", node.level - 1)[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from pkg import module` names a module
        else:
            continue
        for name in names:
            if name.startswith(PACKAGE + ".") and (ROOT / f"{name[len(PACKAGE) + 1:].split('.')[0]}.py").is_file():
                found.add(name[len(PACKAGE) + 1:].split(".")[0])
    return found


def import_graph() -> dict[str, set[str]]:
    return {p.stem: package_imports(p) - {p.stem} for p in sorted(ROOT.glob("*.py")) if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_package_imports_counts_lazy_and_from_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom domains.molecules import constants\n"
                   "def f():\n    from domains.molecules.domain import MolData\n    import domains.molecules.io\n")
    assert package_imports(src) == {"constants", "domain", "io"}


def test_molecules_modules_have_no_import_cycle() -> None:
    graph = import_graph()
    assert {"domain", "egnn", "features", "properties", "io", "data"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle among domains/molecules modules: {' -> '.join(cycle)}"
    # featurisation is a leaf that the model-input builders share (it was domain.py <-> properties.py)
    assert graph["features"] <= {"constants"}
    assert "domain" not in set().union(*(deps for name, deps in graph.items() if name != "domain"))
