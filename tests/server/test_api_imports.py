"""The API's modules import each other one way: no cycle, not even one hidden in a function
body, and nothing below the API (engine, models, layers) imports it."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import radixserve

PACKAGE = Path(radixserve.__file__).parent
API = PACKAGE / "api"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every radixserve module `path` imports, wherever in the file the import stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("radixserve.")}


def _graph(root: Path) -> dict[str, set[str]]:
    files = {_module(p): p for p in root.rglob("*.py")}
    return {name: _imports(path) & set(files) - {name} for name, path in files.items()}


def test_api_modules_have_no_import_cycle() -> None:
    graph = _graph(API)
    assert "radixserve.api.state" in graph and len(graph) >= 5
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_routers_do_not_import_the_app() -> None:
    graph = _graph(API)
    importers = sorted(m for m, deps in graph.items() if "radixserve.api.app" in deps)
    assert importers == []


def test_nothing_below_the_api_imports_it() -> None:
    for layer in ("engine", "models", "layers"):
        for path in (PACKAGE / layer).rglob("*.py"):
            up = {m for m in _imports(path) if m.startswith("radixserve.api")}
            assert not up, f"{path.name} imports {sorted(up)}"


def test_the_check_sees_a_cycle(tmp_path: Path) -> None:
    """The graph check itself: a cycle through a function-level import is caught."""
    pkg = tmp_path / "radixserve" / "api"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from radixserve.api.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from radixserve.api import a\n")
    graph = {
        f"radixserve.api.{p.stem}": {m for m in _imports(p) if m.startswith("radixserve.api.")}
        for p in pkg.glob("*.py")
    }
    assert graph["radixserve.api.b"] == {"radixserve.api.a"}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError:
        return
    raise AssertionError("the cycle a -> b -> a was not found")
