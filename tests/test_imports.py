"""The project's modules (multidiff/*, domains/**) form an import graph without cycles, and the layers point one way.

Every import statement counts: top level, inside functions (lazy imports), under ``if TYPE_CHECKING``. A lazy import
only postpones a cycle to run time (whoever imports first sees a half-initialised module), and the code base has
none today, so none is allowed. ``from pkg import name`` counts as importing ``pkg`` (its ``__init__`` runs) and, when
``pkg.name`` is a module, that module too. Domains reached at run time through the registry's entry points are not
import statements and are not edges here; that the core never imports a domain is checked separately.
(tests/molecules/test_mol_imports.py keeps the molecules package's finer layering.)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("multidiff", "domains")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file for every .py under the project's packages (a package is its ``__init__``)."""
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The project module that importing ``name`` executes last (``a.b.C`` -> ``a.b`` when C is not a module)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def module_imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules that the module ``name`` (file ``path``) imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..x import y
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            candidates = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for cand in candidates:
            target = _resolve(cand, mods)
            if target is not None and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = project_modules(root)
    return {name: module_imports(name, path, mods) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path: list[str] = [start]
        stack = [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


# --- the checker itself ------------------------------------------------------------------------------------------


def test_find_cycle_sees_cycles_and_only_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": {"d"}, "d": {"b"}}) == ["b", "c", "d", "b"]


def test_module_imports_counts_lazy_relative_and_from_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "multidiff"
    (pkg / "sub").mkdir(parents=True)
    for rel in ("__init__.py", "a.py", "b.py", "c.py", "d.py", "sub/__init__.py", "sub/e.py"):
        (pkg / rel).write_text("")
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "__init__.py").write_text("")
    (pkg / "sub" / "e.py").write_text(
        "import os\nfrom typing import TYPE_CHECKING\nfrom ..a import X\nfrom .. import b\n"
        "if TYPE_CHECKING:\n    from multidiff.c import Y\n"
        "def f():\n    import multidiff.d\n    from . import e\n")
    mods = project_modules(tmp_path)
    assert set(mods) == {"multidiff", "multidiff.a", "multidiff.b", "multidiff.c", "multidiff.d", "multidiff.sub",
                         "multidiff.sub.e", "domains"}
    got = module_imports("multidiff.sub.e", mods["multidiff.sub.e"], mods)
    assert got == {"multidiff", "multidiff.a", "multidiff.b", "multidiff.c", "multidiff.d", "multidiff.sub"}


def test_a_cycle_through_a_lazy_import_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "multidiff"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n")
    (pkg / "b.py").write_text("def g():\n    from multidiff import a\n")
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "__init__.py").write_text("")
    assert find_cycle(import_graph(tmp_path)) == ["multidiff.a", "multidiff.b", "multidiff.a"]


# --- the project ---------------------------------------------------------------------------------------------------


def test_project_modules_have_no_import_cycle() -> None:
    graph = import_graph()
    assert {"multidiff.diffusion", "multidiff.pipeline", "multidiff.cli", "domains.audio.domain",
            "domains.molecules.domain"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle among the project's modules: {' -> '.join(cycle)}"


def test_the_core_never_imports_a_domain() -> None:
    """DESIGN.md: multidiff/ imports torch/einops, never a domain; domains are found through the registry."""
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.startswith("domains")) for m, deps in graph.items()
                 if m.startswith("multidiff")}
    assert not {m: d for m, d in offenders.items() if d}, offenders


# Domain code that reaches back up into the run-level layers to rebuild itself: a registry lookup of a domain
# (``get_domain`` / ``available_domains``) or an import of the pipeline, CLI, server or batch jobs. #13 asks for none
# (implementing ``registry.Domain`` is fine; a domain reads its own checkpoints with ``registry.read_run(ckpt, self)``).
UPWARD_MODULES = {"multidiff.pipeline", "multidiff.cli", "multidiff.serve", "multidiff.jobs"}
UPWARD_NAMES = {"multidiff.registry.get_domain", "multidiff.registry.available_domains"}


def upward_imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Run-level modules and registry lookups that the domain module ``name`` imports anywhere."""
    found = module_imports(name, path, mods) & UPWARD_MODULES
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "multidiff.registry" and not node.level:
            found |= {f"multidiff.registry.{a.name}" for a in node.names} & UPWARD_NAMES
        elif isinstance(node, ast.ImportFrom) and node.module == "multidiff" and not node.level:
            found |= {f"multidiff.{a.name}" for a in node.names} & UPWARD_MODULES
    return found


def test_domains_do_not_call_back_up_into_the_registry_or_pipeline() -> None:
    mods = project_modules()
    new: dict[str, list[str]] = {}
    for name, path in mods.items():
        if name.startswith("domains"):
            extra = upward_imports(name, path, mods)
            if extra:
                new[name] = sorted(extra)
    assert not new, f"domain modules reaching back up into multidiff's run-level layers (#13): {new}"
