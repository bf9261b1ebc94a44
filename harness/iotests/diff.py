"""--diff-targets: the same instances on two targets, transcript against transcript.

Both transcripts are filtered as for the golden comparison, so what differs
is behaviour, not paths or timing.  An instance that differs is accepted
only where a known-differences entry lists it for one of the two targets.
"""

from __future__ import annotations

import difflib
from typing import TextIO

from .runner import Result
from .targets import Target


def diff_targets(a: list[Result], b: list[Result], targets: list[Target], out: TextIO) -> int:
    """Print same/different per instance; 1 when anything unlisted differs."""
    ta, tb = targets
    by_id = {r.instance.on("").id: r for r in b}
    out.write(f"\n=== {ta.label} vs {tb.label} ===\n")
    unexplained = []
    width = max((len(r.instance.on("").id) for r in a), default=10) + 1
    for ra in a:
        plain = ra.instance.on("").id
        rb = by_id[plain]
        skipped = [(t, r) for t, r in ((ta, ra), (tb, rb)) if r.status == "not run"]
        if skipped:
            why = "; ".join(f"not run on {t.label}: {r.reason}" for t, r in skipped)
            out.write(f"{plain:<{width}} -- {why}\n")
            continue
        if ra.output == rb.output:
            out.write(f"{plain:<{width}} same\n")
            continue
        listed = "xfail" in (ra.status, rb.status) or "xpass" in (ra.status, rb.status)
        out.write(f"{plain:<{width}} different{' (known)' if listed else ''}\n")
        diff = difflib.unified_diff(
            ra.output.splitlines(keepends=True),
            rb.output.splitlines(keepends=True),
            f"{plain} on {ta.label}",
            f"{plain} on {tb.label}",
        )
        out.writelines(diff)
        if not listed:
            unexplained.append(plain)
    if unexplained:
        out.write(f"Differ, not listed as known: {' '.join(unexplained)}\n")
        return 1
    out.write("No unlisted differences\n")
    return 0
