"""The package's layout rules, read from the source (nothing is imported): no import circle
(every import statement counts, also one inside a function), model/ never imports system/, no
module of the package is over 500 lines, and no test module imports another."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lotcrs_plugin"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports (``from a.b import c`` is a.b.c when that is a
    module, else a.b)."""

    def known(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lotcrs_plugin"):
            found.update(known(f"{node.module}.{a.name}") for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(known(a.name) for a in node.names if a.name.startswith("lotcrs_plugin"))
    return found - {"", "lotcrs_plugin"}


def test_no_import_circle_and_model_never_imports_system():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    upward = sorted((m, d) for m, ds in graph.items() for d in ds
                    if m.startswith("lotcrs_plugin.model") and d.startswith("lotcrs_plugin.system"))
    assert not upward, f"model/ imports system/: {upward}"
    # a circle is a path from a module back to itself
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_pipeline_modules_stay_small():
    modules = _modules().values()
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in modules}
    assert len(sizes) >= 100
    assert {k: n for k, n in sizes.items() if n > 500} == {}


def test_no_test_module_imports_another():
    tests = {p.stem for p in Path(__file__).parent.glob("test_*.py")} | {"conftest"}
    offenders = []
    for path in Path(__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in tests]
    assert offenders == []
