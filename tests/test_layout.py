"""The layout of the code, read with ``ast`` (no import, no torch work): no import cycle inside
``pyro_viking`` nor inside ``benchmarks``, no function-level import of a ``pyro_viking`` module
inside ``pyro_viking`` (the house rule: no import inside a function to dodge a circle), every
module of ``pyro_viking`` at most 400 lines, and ``AutoViking`` and ``BayesianNetwork`` small
classes (≤ 200 lines, docstring ≤ 40 lines).

The import graph has one node per module (``pkg/__init__.py`` is ``pkg``) and an edge for every
import of a module of the same tree, wherever it stands (module level or inside a function):
``import a.b`` and ``from a.b import name`` point to ``a.b``, ``from a import b`` to the
submodule ``a.b`` when there is one. The parent packages that an import runs first are not
edges (a package that imports its own submodules is no circle). Scripts (``benchmarks/``) may
also import their siblings by bare name (``from methods import …`` in ``benchmarks/uq/run.py``
is ``benchmarks.uq.methods``).
Imports under ``if TYPE_CHECKING:`` do not run and are left out.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

pytestmark = pytest.mark.dtype_independent

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 200
MAX_CLASS_DOCSTRING_LINES = 40
SMALL_CLASSES = ("AutoViking", "BayesianNetwork")


@dataclass
class Module:
    name: str  # dotted, from the repository root: "pyro_viking.linalg.solvers"
    path: Path
    tree: ast.Module
    lines: int
    is_package: bool
    #: (imported module, line, inside a function) for every import of a module of the tree
    imports: List[Tuple[str, int, bool]] = field(default_factory=list)


def _module_name(path: Path, repo: Path) -> Tuple[str, bool]:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def parse_tree(top: Path, repo: Path, bare_siblings: bool = False) -> Dict[str, Module]:
    """Every ``*.py`` under ``top`` as a :class:`Module`, its imports resolved within the tree.

    ``bare_siblings``: the modules are scripts, whose own folder is on ``sys.path``, so a bare
    ``import x`` / ``from x import …`` is the sibling ``x.py`` when there is one.
    """
    modules = {}
    for path in sorted(top.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name, is_package = _module_name(path, repo)
        modules[name] = Module(name, path, ast.parse(source, filename=str(path)),
                               len(source.splitlines()), is_package)
    # folders without __init__.py are (namespace) packages too: ``from benchmarks import x``
    folders = {".".join(m.path.parent.relative_to(repo).parts) for m in modules.values()}
    known = set(modules) | folders
    for module in modules.values():
        module.imports = list(_resolved_imports(module, known, bare_siblings))
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(node: ast.AST, in_function: bool = False) -> Iterator[Tuple[ast.stmt, bool]]:
    """The import statements in ``node``, each with whether it stands inside a function."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, in_function
        return
    children = node.orelse if _is_type_checking(node) else ast.iter_child_nodes(node)
    inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for child in children:
        yield from _import_nodes(child, inside)


def _package_of(module: Module) -> str:
    return module.name if module.is_package else module.name.rpartition(".")[0]


def _resolve(name: str, module: Module, known: Set[str], bare_siblings: bool) -> Optional[str]:
    """The longest prefix of the absolute dotted ``name`` that is a module of the tree (for
    scripts, first as a sibling of ``module``); ``None`` outside the tree."""
    parts = name.split(".")
    for base in ([f"{_package_of(module)}."] if bare_siblings else []) + [""]:
        for end in range(len(parts), 0, -1):
            if base + ".".join(parts[:end]) in known:
                return base + ".".join(parts[:end])
    return None


def _resolved_imports(module: Module, known: Set[str],
                      bare_siblings: bool) -> Iterator[Tuple[str, int, bool]]:
    for node, in_function in _import_nodes(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, module, known, bare_siblings)
                if target is not None:
                    yield target, node.lineno, in_function
            continue
        if node.level:  # relative: the importing module's package, then up level - 1
            parts = _package_of(module).split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module
                                                                 else []))
            base = base if base in known else None
        else:
            base = _resolve(node.module, module, known, bare_siblings)
        if base is None:
            continue
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            yield (submodule if submodule in known else base), node.lineno, in_function


def import_cycles(modules: Dict[str, Module]) -> List[List[str]]:
    """One shortest cycle ``[a, b, …, a]`` per strongly connected component (Tarjan) that has
    more than one module or a module importing itself."""
    graph = {name: sorted({t for t, _, _ in m.imports if t in modules})
             for name, m in modules.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        start = component[0]
        if len(component) > 1 or start in graph[start]:
            cycles.append(_shortest_cycle(graph, start, set(component)))
    return sorted(cycles)


def _shortest_cycle(graph: Dict[str, List[str]], start: str, inside: Set[str]) -> List[str]:
    """Breadth-first from ``start`` back to ``start`` through the modules ``inside``."""
    previous: Dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in graph[v]:
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [start] + path[::-1][1:] + [start] if v != start else [start, start]
            if w in inside and w not in previous:
                previous[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def _cycle_message(cycles: List[List[str]]) -> str:
    return "import cycles:\n" + "\n".join("  " + " -> ".join(cycle) for cycle in cycles)


@pytest.fixture(scope="module")
def package() -> Dict[str, Module]:
    return parse_tree(REPO / "pyro_viking", REPO)


@pytest.fixture(scope="module")
def benchmarks() -> Dict[str, Module]:
    return parse_tree(REPO / "benchmarks", REPO, bare_siblings=True)


def test_no_import_cycle_inside_pyro_viking(package):
    cycles = import_cycles(package)
    assert not cycles, _cycle_message(cycles)


def test_no_import_cycle_inside_benchmarks(benchmarks):
    cycles = import_cycles(benchmarks)
    assert not cycles, _cycle_message(cycles)


def test_no_function_level_import_of_pyro_viking_inside_pyro_viking(package):
    found = [f"{m.path.relative_to(REPO)}:{line} imports {target} inside a function"
             for m in package.values() for target, line, in_function in m.imports
             if in_function]
    assert not found, "\n".join(found)


def test_every_pyro_viking_module_is_at_most_400_lines(package):
    long = [f"{m.path.relative_to(REPO)}: {m.lines} lines (> {MAX_MODULE_LINES})"
            for m in package.values() if m.lines > MAX_MODULE_LINES]
    assert not long, "\n".join(long)


@pytest.mark.parametrize("name", SMALL_CLASSES)
def test_class_and_its_docstring_are_small(package, name):
    found = [(m, node) for m in package.values() for node in ast.walk(m.tree)
             if isinstance(node, ast.ClassDef) and node.name == name]
    assert len(found) == 1, f"class {name}: {len(found)} definitions in pyro_viking/"
    module, node = found[0]
    where = f"class {name} ({module.path.relative_to(REPO)}:{node.lineno})"
    lines = node.end_lineno - node.lineno + 1
    assert lines <= MAX_CLASS_LINES, f"{where}: {lines} lines (> {MAX_CLASS_LINES})"
    first = node.body[0]
    assert ast.get_docstring(node) is not None, f"{where}: no docstring"
    doc_lines = first.end_lineno - first.lineno + 1
    assert doc_lines <= MAX_CLASS_DOCSTRING_LINES, \
        f"{where}: docstring of {doc_lines} lines (> {MAX_CLASS_DOCSTRING_LINES})"


# -- the checks themselves, on a synthetic tree ---------------------------------------------------
SYNTHETIC = {
    "pkg/__init__.py": "from pkg.a import f\n",
    "pkg/a.py": "from pkg import b\n\ndef f():\n    return b\n",  # a -> pkg.b, the submodule
    "pkg/b.py": "import os\nfrom pkg.c import g\n",
    "pkg/c.py": "import pkg.a\n\ndef g():\n    from pkg import d\n    return d\n",
    "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
    "pkg/sub/__init__.py": "from . import e\n",
    "pkg/sub/e.py": "from ..d import x\n",
    "scripts/run.py": "from methods import fit\nimport report\n",
    "scripts/methods.py": "import numpy\nfrom run import main\n",
    "scripts/report.py": "from scripts import tasks\n",
    "scripts/tasks.py": "X = 1\n",
}


def _write(root: Path) -> None:
    for relative, text in SYNTHETIC.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


def test_checks_flag_a_synthetic_cycle_and_function_level_import(tmp_path):
    """``from pkg import b`` resolves to the submodule, a cycle through three modules is found
    and named, a function-level import is flagged, a ``TYPE_CHECKING`` import is not an edge,
    relative imports resolve, and scripts' bare sibling imports make the cycle run ↔ methods."""
    _write(tmp_path)
    pkg = parse_tree(tmp_path / "pkg", tmp_path)
    imports = {name: sorted(m.imports) for name, m in pkg.items()}
    assert imports["pkg.a"] == [("pkg.b", 1, False)]
    assert imports["pkg.c"] == [("pkg.a", 1, False), ("pkg.d", 4, True)]
    assert imports["pkg.d"] == []
    assert imports["pkg.sub"] == [("pkg.sub.e", 1, False)]
    assert imports["pkg.sub.e"] == [("pkg.d", 1, False)]
    assert import_cycles(pkg) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert "pkg.a -> pkg.b -> pkg.c -> pkg.a" in _cycle_message(import_cycles(pkg))
    scripts = parse_tree(tmp_path / "scripts", tmp_path, bare_siblings=True)
    assert sorted(scripts["scripts.run"].imports) == [("scripts.methods", 1, False),
                                                       ("scripts.report", 2, False)]
    assert scripts["scripts.report"].imports == [("scripts.tasks", 1, False)]
    assert import_cycles(scripts) == [["scripts.methods", "scripts.run", "scripts.methods"]]
    (tmp_path / "pkg/c.py").write_text("def g():\n    from pkg import d\n    return d\n")
    assert import_cycles(parse_tree(tmp_path / "pkg", tmp_path)) == []
