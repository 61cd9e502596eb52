"""The package's import rules, checked on the source (every import, also under TYPE_CHECKING and
inside functions):

- the foundation (the modules directly in ``geventtcp/``) imports no subpackage;
- ``server/`` and ``client/`` never import each other;
- only ``launcher/``, ``cli/``, ``testing/`` (the test kit runs a real Server) and the entry points
  (``geventtcp/__init__``, ``gunicorn_worker``, ``docgen``) import ``server/``;
- nothing outside ``testing/`` imports it;
- no import cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "geventtcp"
SUBPACKAGES = ("server", "client", "launcher", "cli", "testing")
#: Modules that assemble the public surface from the subpackages, rather than serve under them.
ENTRY_POINTS = {"geventtcp", "geventtcp.__main__", "geventtcp.gunicorn_worker", "geventtcp.docgen"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every geventtcp module that ``name`` imports anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


def _area(module: str) -> str:
    """``foundation``, a subpackage name, or ``entry``."""
    if module in ENTRY_POINTS:
        return "entry"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in SUBPACKAGES) else "foundation"


def test_every_module_has_an_area() -> None:
    assert {_area(m) for m in MODULES} <= {"entry", "foundation", *SUBPACKAGES}
    assert sum(_area(m) == "foundation" for m in MODULES) >= 8


@pytest.mark.parametrize("module", sorted(MODULES))
def test_import_rules(module: str) -> None:
    area = _area(module)
    for imported in sorted(_imports(module)):
        target = _area(imported)
        if area == "foundation":
            assert target == "foundation", f"{module} (foundation) imports {imported} ({target})"
        if area == "server":
            assert target != "client", f"{module} imports the client ({imported})"
        if area == "client":
            assert target != "server", f"{module} imports the server ({imported})"
        if target == "server":
            assert area in ("server", "launcher", "cli", "testing", "entry"), f"{module} imports {imported}"
        if target == "testing":  # the test kit is never part of a serving process
            assert area == "testing", f"{module} imports the test kit ({imported})"


def test_no_import_cycle() -> None:
    graph = {module: _imports(module) for module in MODULES}
    # A package importing its own modules (to re-export them) is not a cycle.
    for module, imported in graph.items():
        graph[module] = {m for m in imported if not module.startswith(f"{m}.") and m not in ENTRY_POINTS}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
