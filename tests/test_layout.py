"""The house's floors, read from the code with ``ast``: every import of a project module points down (or sideways
on its own floor), no two modules import each other in a circle, and no function body imports a project module
(an import inside a function is how a circle hides).

``FLOORS`` is the layout of ``README.md`` ("Layout"), from the bottom: a room imports only from its own floor and
the ones below. A new top-level module or room must be placed here, or this test fails naming it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "selfsup3d": ROOT / "selfsup3d",
    "selfsup3d.datamodules": ROOT / "datamodules",
    "selfsup3d.callbacks": ROOT / "callbacks",
}

FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("errors and downloads", ("selfsup3d.errors", "selfsup3d.hub", "selfsup3d.checkpoint_io")),
    ("geometry", ("selfsup3d.geometry",)),
    ("layers and losses", ("selfsup3d.layers", "selfsup3d.losses")),
    ("data", ("selfsup3d.datamodules",)),
    ("encoders and heads", ("selfsup3d.encoders", "selfsup3d.heads")),
    ("metrics", ("selfsup3d.metrics",)),
    ("probes", ("selfsup3d.eval",)),
    ("run machinery", ("selfsup3d.objectives.run",)),
    ("objectives", ("selfsup3d.objectives",)),
    ("callbacks and strategies", ("selfsup3d.callbacks", "selfsup3d.distributed")),
    ("commands", ("selfsup3d.cli",)),
]
"""From the bottom; a module's floor is that of the longest room name it starts with."""


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    in_function: bool


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(module: str, path: Path) -> Iterator[Import]:
    """Every import statement of the module (and ``importlib.import_module("...")`` with a literal name)."""

    def visit(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, child.lineno, inside)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, path, child)
                names = [f"{target}.{a.name}" for a in child.names if f"{target}.{a.name}" in MODULES]
                for name in names or [target]:
                    yield Import(module, name, child.lineno, inside)
            elif (
                isinstance(child, ast.Call)
                and getattr(child.func, "attr", getattr(child.func, "id", "")) == "import_module"
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
            ):
                yield Import(module, child.args[0].value, child.lineno, inside)
            yield from visit(child, inside)

    yield from visit(ast.parse(path.read_text(), str(path)), False)


def _project(name: str) -> str | None:
    """The project module an import names (the longest known prefix), or ``None`` for a third-party one."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def floor_of(module: str) -> int:
    best, floor = -1, -1
    for index, (_, rooms) in enumerate(FLOORS):
        for room in rooms:
            if (module == room or module.startswith(room + ".")) and len(room) > best:
                best, floor = len(room), index
    return floor


def _project_imports() -> list[Import]:
    out = []
    for module, path in MODULES.items():
        for imp in _imports(module, path):
            target = _project(imp.target)
            if target is not None and target != module:
                out.append(Import(module, target, imp.line, imp.in_function))
    return out


IMPORTS = _project_imports()


def _where(imp: Import) -> str:
    return f"{MODULES[imp.source].relative_to(ROOT)}:{imp.line}"


def test_every_module_has_a_floor():
    unplaced = sorted(m for m in MODULES if m != "selfsup3d" and floor_of(m) < 0)
    assert not unplaced, f"place these modules on a floor of FLOORS: {unplaced}"


def test_imports_point_down():
    up = [
        f"{_where(imp)}: {imp.source} ({FLOORS[floor_of(imp.source)][0]}) imports {imp.target} "
        f"({FLOORS[floor_of(imp.target)][0]})"
        for imp in IMPORTS
        if floor_of(imp.source) >= 0 and floor_of(imp.target) > floor_of(imp.source)
    ]
    assert not up, "imports that point up:\n" + "\n".join(up)


def test_no_project_import_inside_a_function():
    hidden = [f"{_where(imp)}: {imp.source} imports {imp.target} in a function" for imp in IMPORTS if imp.in_function]
    assert not hidden, "import project modules at the top of the file:\n" + "\n".join(hidden)


def _graph() -> dict[str, set[str]]:
    """Who imports whom when a module is imported: the module, and the packages above it (their ``__init__``
    runs first) unless the importer is inside them."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        parts = imp.target.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[:n])
            if name in MODULES and name != imp.source and not imp.source.startswith(name + "."):
                graph[imp.source].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_no_import_circle():
    cycles = _cycles(_graph())
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# ---------------------------------------------------------------- the checks themselves catch what they should
def test_the_checks_find_an_upward_import_a_circle_and_a_hidden_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import selfsup3d.cli\n\ndef f():\n    from selfsup3d.objectives import base\n")
    found = list(_imports("selfsup3d.geometry.cameras", path))
    assert [(i.target, i.in_function) for i in found] == [("selfsup3d.cli", False), ("selfsup3d.objectives.base", True)]
    assert floor_of("selfsup3d.cli") > floor_of("selfsup3d.geometry.cameras")
    assert floor_of("selfsup3d.objectives.run.recipe") < floor_of("selfsup3d.objectives.base")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("room", [name for _, rooms in FLOORS for name in rooms])
def test_every_room_exists(room):
    assert room in MODULES, f"FLOORS names {room}, which is no module of the project"
