"""The package layout is the architecture: which part may import which.

harness.kernel (ABI, ring, mount, parameters) imports nothing else of ours;
the reference exporter (harness.exporter) and the runner (harness.iotests)
both build on it and on the shared top-level modules, and never on each
other: the runner drives exporters as processes.  Within a part the
modules are layered too: nothing imports in a circle.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "harness"
FORBIDDEN = {
    "kernel": ("harness.exporter", "harness.iotests", "harness.options", "harness.layout"),
    "exporter": ("harness.iotests",),
    "iotests": ("harness.exporter",),
    "": ("harness.exporter", "harness.iotests"),  # shared top-level modules
}


def imports_of(path: Path) -> set[str]:
    package = ".".join(path.relative_to(HARNESS.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("harness")}


def part_of(path: Path) -> str:
    rel = path.relative_to(HARNESS).parts
    return rel[0] if len(rel) > 1 else ""


@pytest.mark.parametrize("path", sorted(HARNESS.rglob("*.py")), ids=lambda p: str(p.name))
def test_imports_respect_the_layout(path: Path) -> None:
    bad = sorted(m for m in imports_of(path) if m.startswith(FORBIDDEN[part_of(path)]))
    assert not bad, f"{path.relative_to(HARNESS.parent)} imports {bad}"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """Module -> the modules of root it imports -> the line of the first.

    Every import counts: at module level, in a function, or only for type
    checking.  `from pkg import name` is an edge to pkg.name if that is a
    module, else to pkg.
    """
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([mod] if mod else []))
                targets = [
                    f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names
                ]
            for t in targets:
                if t in files:
                    edges.setdefault(t, node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str]:
    """One import circle as [a, b, ..., a], or [] if there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(m: str) -> list[str]:
        if m in path:
            return [*path[path.index(m) :], m]
        if m in done:
            return []
        path.append(m)
        for n in sorted(graph[m]):
            if cycle := visit(n):
                return cycle
        path.pop()
        done.add(m)
        return []

    for m in sorted(graph):
        if cycle := visit(m):
            return cycle
    return []


def test_nothing_imports_in_a_circle() -> None:
    graph = import_graph(HARNESS)
    cycle = find_cycle(graph)
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in itertools.pairwise(cycle)]
    assert not cycle, "import circle:\n  " + "\n  ".join(steps)


def test_the_circle_finder_sees_a_type_only_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import B\n")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import A\nB = 1\n"
    )
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b": 1}
    assert graph["pkg.sub"] == {"pkg.sub.b": 1}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("B = 1\n")
    assert find_cycle(import_graph(pkg)) == []


def test_the_checker_sees_relative_imports() -> None:
    assert "harness.kernel.abi" in imports_of(HARNESS / "exporter" / "protocol.py")
    assert "harness.options" in imports_of(HARNESS / "iotests" / "steps" / "vocabulary.py")
