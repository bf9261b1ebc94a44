"""The README's reference tables, generated from the code.

    python -m harness.iotests.readme [--write]

Each table sits between `<!-- generated: NAME -->` and `<!-- end: NAME -->`
in README.md.  Without --write it exits 1 and names the stale tables (a
test runs it); with --write it rewrites them in place.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

from ..cli import run_tool
from ..options import reference_table
from . import known
from .filters import filter_reference
from .lifecycle import REPO
from .runner import KNOWN_DIR
from .steps import step_reference
from .targets import CAPABILITIES

README = REPO / "README.md"


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
}


def _escape(body: str) -> str:
    return body.replace("\\", "\\\\")


def render(text: str) -> str:
    for name, make in SECTIONS.items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"readme: README.md has no '<!-- generated: {name} -->' section")
        text = pattern.sub(rf"\g<1>{_escape(make())}\n\g<2>", text)
    return text


def main(argv: list[str]) -> int:
    current = README.read_text()
    wanted = render(current)
    if "--write" in argv:
        README.write_text(wanted)
        return 0
    if wanted != current:
        print("readme: generated tables are stale: python -m harness.iotests.readme --write")
        return 1
    return 0


if __name__ == "__main__":
    run_tool(lambda: main(sys.argv[1:]))
