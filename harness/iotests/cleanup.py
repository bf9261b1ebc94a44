"""One cleanup helper for every registry: run each action, whatever the others do.

The registries (an instance's deferred cleanups, the exporters this process
started, background clients, what dead runs left) all clean up through
run_all(): every action runs even when an earlier one raised, and the
outcome says what was removed and what could not be, one line each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# An action returns what it removed (lines), or None when it has nothing to say.
Action = Callable[[], Any]


@dataclass
class Outcome:
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "WHAT: Error: message"

    @property
    def ok(self) -> bool:
        return not self.failed


def run_all(actions: Iterable[tuple[str, Action]]) -> Outcome:
    """Run every (what, action); a failure is recorded, never raised."""
    out = Outcome()
    for what, action in actions:
        try:
            removed = action()
        except Exception as e:
            out.failed.append(f"{what}: {type(e).__name__}: {e}")
            continue
        if isinstance(removed, list | tuple):
            out.removed += [str(r) for r in removed]
    return out
