"""The documentation's reference tables, generated from the code.

    python -m harness.iotests.readme [--write]

Each table sits between `<!-- generated: NAME -->` and `<!-- end: NAME -->`
in one page: README.md or docs/*.md.  Without --write it exits 1 and names
the stale pages (a test runs it); with --write it rewrites them in place.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from ..cli import run_tool
from ..options import reference_table
from . import known
from .filters import filter_reference
from .lifecycle import REPO
from .runner import KNOWN_DIR
from .steps import step_reference
from .targets import CAPABILITIES

README = REPO / "README.md"
DOCS = REPO / "docs"


def _capabilities() -> str:
    rows = ["| capability | what it means |", "|---|---|"]
    rows += [f"| `{k}` | {v} |" for k, v in CAPABILITIES.items()]
    return "\n".join(rows)


SECTIONS: dict[str, Callable[[], str]] = {
    "steps": lambda: (
        "| step | argument | what it does and prints | where it runs, what it needs |\n"
        "|---|---|---|---|\n" + step_reference()
    ),
    "filters": lambda: "| filter | what it does |\n|---|---|\n" + filter_reference(),
    "options": lambda: (
        "| option | default | meaning | qemu-storage-daemon |\n|---|---|---|---|\n"
        + reference_table()
    ),
    "capabilities": _capabilities,
    "known": lambda: known.markdown(known.load(KNOWN_DIR)),
    "defects": lambda: known.defects_markdown(known.load(KNOWN_DIR)),
}


def _escape(body: str) -> str:
    return body.replace("\\", "\\\\")


def _section(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)", re.DOTALL)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def placement() -> dict[str, list[Path]]:
    """The pages each generated table sits in (one each, when all is well)."""
    texts = {p: p.read_text() for p in pages()}
    return {name: [p for p, t in texts.items() if _section(name).search(t)] for name in SECTIONS}


def render(text: str) -> str:
    """The page with every generated table in it made current."""
    for name, make in SECTIONS.items():
        text = _section(name).sub(rf"\g<1>{_escape(make())}\n\g<2>", text)
    return text


def main(argv: list[str]) -> int:
    misplaced = {n: ps for n, ps in placement().items() if len(ps) != 1}
    for name, ps in misplaced.items():
        where = ", ".join(str(p.relative_to(REPO)) for p in ps) or "no page"
        print(f"readme: the '{name}' table must be in one page, not in {where}", file=sys.stderr)
    if misplaced:
        return 1
    stale = [p for p in pages() if render(p.read_text()) != p.read_text()]
    if "--write" in argv:
        for p in stale:
            p.write_text(render(p.read_text()))
        return 0
    if stale:
        names = ", ".join(str(p.relative_to(REPO)) for p in stale)
        print(
            f"readme: stale generated tables in {names}: python -m harness.iotests.readme --write"
        )
        return 1
    return 0


if __name__ == "__main__":
    run_tool(lambda: main(sys.argv[1:]))
