"""The package layout is the architecture: which part may import which.

harness.kernel (ABI, ring, mount, parameters) imports nothing else of ours;
the reference exporter (harness.exporter) and the runner (harness.iotests)
both build on it and on the shared top-level modules, and never on each
other: the runner drives exporters as processes.
"""

from __future__ import annotations

import ast
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


def test_the_checker_sees_relative_imports() -> None:
    assert "harness.kernel.abi" in imports_of(HARNESS / "exporter" / "protocol.py")
    assert "harness.options" in imports_of(HARNESS / "iotests" / "steps" / "vocabulary.py")
