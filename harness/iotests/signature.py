"""How an instance fails, as something another run can be compared with.

Bisecting on "differs from the golden file" would stop at the first build
that differs for any reason; bisecting on the failure's own signature finds
where *this* failure came from.  A signature is:

    mismatch   the filtered transcript (already free of paths, times, pids)
    error      the report's first line, paths and numbers blanked: a bounded wait
               that gave up on the same step for the same thing, the same
               crash, the same harness-side error
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GOOD, BAD, SKIP = 0, 1, 125

_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")
_PATH = re.compile(r"/[^\s:'\"]+")  # an instance's directories have random names


def _first_line(reason: str) -> str:
    """The report's first line that is not a known-entry note, with paths
    and numbers blanked."""
    lines = [ln for ln in reason.splitlines() if not ln.startswith("known ")]
    return _NUMBER.sub("N", _PATH.sub("PATH", lines[0])) if lines else ""


@dataclass(frozen=True)
class Signature:
    kind: str  # "mismatch" or "error"
    text: str

    @classmethod
    def of(cls, result: dict[str, Any]) -> Signature:
        """From a report.json result that failed (fail or xfail)."""
        if result.get("bad"):
            return cls("mismatch", str(result.get("output", "")))
        return cls("error", _first_line(str(result.get("reason", ""))))

    def describe(self) -> str:
        if self.kind == "mismatch":
            return f"the transcript of this failure ({len(self.text.splitlines())} lines)"
        return f"the error {self.text!r}"

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Signature:
        return cls(**json.loads(path.read_text()))


def judge(result: dict[str, Any], sig: Signature) -> tuple[int, str]:
    """(GOOD, BAD or SKIP, why) of one run against a failure's signature."""
    status = result["status"]
    first = str(result.get("reason") or "").split("\n", 1)[0]
    if status == "not run":
        return SKIP, f"not run: {first}"
    if status == "pass":
        return GOOD, "passes"
    if status not in ("fail", "xfail"):
        return GOOD, f"{status}: {first}"
    if Signature.of(result) == sig:
        return BAD, f"fails the same way: {first}"
    return GOOD, f"fails another way: {first}"
