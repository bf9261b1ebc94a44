"""--diff-targets: the same instances on two or more targets, transcript against transcript.

Every transcript is filtered as for the golden comparison, so what differs
is behaviour, not paths or timing.  Per instance the targets fall into
groups that print the same; each other group is diffed against the first
target's.  An instance that differs is accepted only where every target's
transcript matches the golden file or is listed as a known difference.

With three or more targets the disagreements are sorted: all differ, one
against the rest, and the kind that questions our golden file: the others
agree and the reference (the first target, when it is the reference) differs.
A fact two independent servers share is the kernel's; a fact of one server
alone is that server's.
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

from .runner import Result
from .targets import DEFAULT, Target

ACCEPTED = ("pass", "xfail", "xpass")  # matches the golden file, or listed


@dataclass(frozen=True)
class Agreement:
    """One instance's targets grouped by transcript, first target's group first."""

    groups: tuple[tuple[Target, ...], ...]

    def kind(self, reference: Target) -> str:
        """How the targets disagree, for the summary ('' when they agree)."""
        n = sum(len(g) for g in self.groups)
        if len(self.groups) == 1:
            return ""
        if n == 2:
            return "differ"
        if len(self.groups) == n:
            return "all differ"
        alone = [g[0] for g in self.groups if len(g) == 1]
        if len(self.groups) == 2 and alone:
            if alone[0] == reference and reference.name == DEFAULT:
                return "the others agree, the reference differs"
            return f"one against the rest ({alone[0].label})"
        return "split"


def group(results: list[tuple[Target, Result]]) -> Agreement:
    by_output: dict[str, list[Target]] = {}
    for t, r in results:
        by_output.setdefault(r.output, []).append(t)
    return Agreement(tuple(tuple(g) for g in by_output.values()))


def diff_targets(runs: list[list[Result]], targets: list[Target], out: TextIO) -> int:
    """Print same/different per instance and a summary; 1 when anything
    unlisted differs.  runs[i] are targets[i]'s results."""
    by_id = [{r.instance.on("").id: r for r in rs} for rs in runs]
    out.write(f"\n=== {' vs '.join(t.label for t in targets)} ===\n")
    unexplained: list[str] = []
    kinds: Counter[str] = Counter()
    questions: list[str] = []
    width = max((len(r.instance.on("").id) for r in runs[0]), default=10) + 1
    for first in runs[0]:
        plain = first.instance.on("").id
        results = [(t, ids[plain]) for t, ids in zip(targets, by_id, strict=True)]
        ran = [(t, r) for t, r in results if r.status != "not run"]
        skipped = "; ".join(
            f"not run on {t.label}: {r.reason}" for t, r in results if r.status == "not run"
        )
        if len(ran) < 2:
            out.write(f"{plain:<{width}} -- {skipped}\n")
            continue
        note = f" ({skipped})" if skipped else ""
        agreement = group(ran)
        if len(agreement.groups) == 1:
            out.write(f"{plain:<{width}} same{note}\n")
            continue
        listed = all(r.status in ACCEPTED for _, r in ran)
        out.write(f"{plain:<{width}} different{' (known)' if listed else ''}{note}\n")
        if len(ran) > 2:
            agree = " | ".join(" ".join(t.label for t in g) for g in agreement.groups)
            out.write(f"  agree: {agree}\n")
        kind = agreement.kind(targets[0])
        kinds[kind] += 1
        if kind.startswith("the others agree"):
            questions.append(plain)
        output = {t: r.output for t, r in ran}
        base = agreement.groups[0][0]
        for g in agreement.groups[1:]:
            out.writelines(
                difflib.unified_diff(
                    output[base].splitlines(keepends=True),
                    output[g[0]].splitlines(keepends=True),
                    f"{plain} on {base.label}",
                    f"{plain} on {' '.join(t.label for t in g)}",
                )
            )
        if not listed:
            unexplained.append(plain)
    if len(targets) > 2:
        sorted_kinds = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        out.write(f"Disagreements: {sorted_kinds}\n")
        if questions:
            out.write(f"Questions for the golden files: {' '.join(questions)}\n")
    if unexplained:
        out.write(f"Differ, not listed as known: {' '.join(unexplained)}\n")
        return 1
    out.write("No unlisted differences\n")
    return 0
