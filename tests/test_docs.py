"""The documentation: a short README, pages in docs/, tables generated from
the code and kept current, and links that lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

from harness.iotests import readme
from harness.iotests.lifecycle import REPO

README_LINES = 200  # the "about 200": a map, not the manual
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE = re.compile(r"`[^`\n]*`")


def pages() -> list[Path]:
    return [*readme.pages(), REPO / "cases" / "README.md", REPO / "golden" / "README.md"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces
    made hyphens; link text stays, link targets go."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in HEADING.findall(FENCE.sub("", text)):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """Every relative link of page that leads to no file, or to no heading."""
    text = CODE.sub("", FENCE.sub("", page.read_text()))
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:: not ours to check here
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif fragment and fragment not in anchors(dest.read_text()):
            bad.append(f"{target}: no heading #{fragment} in {dest.name}")
    return bad


def test_every_relative_link_resolves() -> None:
    bad = {str(p.relative_to(REPO)): broken_links(p) for p in pages()}
    assert not {p: b for p, b in bad.items() if b}


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## Running cases: `tools/check`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\n[ok](other.md#running-cases-toolscheck) [ok](#top) [web](https://x.y/z)\n"
        "[gone](missing.md) [no heading](other.md#nowhere) `[in code](missing.md)`\n"
        "```\n[in a block](missing.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nowhere: no heading #nowhere in other.md",
    ]


def test_generated_tables_are_current_and_each_in_one_page() -> None:
    """The reference tables are generated from the code (harness.iotests.readme)."""
    assert {name: len(ps) for name, ps in readme.placement().items()} == {
        name: 1 for name in readme.SECTIONS
    }
    stale = [str(p) for p in readme.pages() if readme.render(p.read_text()) != p.read_text()]
    assert not stale, "stale: python -m harness.iotests.readme --write"
    text = "".join(p.read_text() for p in readme.pages())
    assert "| `hold` |" in text and "| `queues` |" in text and "| `faults` |" in text


def test_readme_is_a_map_not_the_manual() -> None:
    lines = readme.README.read_text().count("\n")
    assert lines <= README_LINES, f"README.md has {lines} lines: move the detail into docs/"
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme.README.read_text())}
    unlinked = [p.name for p in sorted(readme.DOCS.glob("*.md")) if p.name not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"
