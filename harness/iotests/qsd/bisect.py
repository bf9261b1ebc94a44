"""tools/qsd bisect: which patch of a stack made an instance fail as it does.

The instance runs on the build of the whole stack first; how it fails there
is its signature (signature.py): the filtered transcript for a mismatch,
the normalised first line of the report for a hang or a crash.  Then the
prefixes are bisected as `git bisect run` would, each build cached:

    bad   the instance fails with the same signature
    good  it passes, or fails some other way (the base may differ from the
          golden file for reasons of its own: plain 10.2.2 answers EIO
          where the golden file has ENOSPC)
    skip  it cannot be tested at that prefix: the build fails, the instance
          is "not run" there (the option does not exist yet), or the
          build cannot serve a plain read and write on that transport

Verdicts go to stderr as they come; the last line of stdout names the first
bad patch (or the base, when the bare source already fails so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..context import Instance
from ..lifecycle import REPO
from ..repro import write_script
from ..signature import BAD, GOOD, SKIP, Signature, judge
from ..spec import load_all
from .build import BuildError, PatchStack, build, say

# A case every build that serves at all passes on either transport: the
# "can this prefix be tested" probe.
SMOKE_CASE = "rw-patterns"
CHECK_BOUND = 900.0  # one instance, bounded inside by its own timeout
WORDS = {GOOD: "good", BAD: "bad", SKIP: "skip"}


@dataclass(frozen=True)
class Step:
    upto: int
    verdict: int
    why: str


def find_instance(given: str) -> Instance:
    """The instance an id names, with or without the qsd tag."""
    specs, errors = load_all(REPO / "cases")
    if errors:
        raise BuildError(errors[0])
    for spec in specs:
        for inst in spec.instances():
            if inst.mode == "fuse" and given in (inst.id, inst.on("qsd").id):
                return inst.on("qsd")
    raise BuildError(f"no -fuse instance {given!r} (tools/check -n lists them)")


def run_instance(daemon: Path, inst: Instance, out: Path) -> dict[str, object] | None:
    """Run one instance on a daemon; its report.json entry, or None."""
    env = {**os.environ, "FUSE_OVER_IO_URING": "1" if inst.transport == "uring" else "0"}
    argv = [sys.executable, "-m", "harness.iotests.check", "-fuse", "--target", "qsd",
            "--qsd", str(daemon), "--results", str(out), inst.on("").id]  # fmt: skip
    try:
        subprocess.run(argv, cwd=REPO, env=env, capture_output=True, timeout=CHECK_BOUND)
    except subprocess.TimeoutExpired:
        return None
    try:
        doc = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    found = [r for r in doc["results"] if r["id"] == inst.id]
    return found[0] if found else None


class Bisection:
    def __init__(self, inst: Instance, source: str, stack: PatchStack, scratch: Path) -> None:
        self.inst = inst
        self.source = source
        self.stack = stack
        self.scratch = scratch
        self.signature: Signature | None = None

    def run(self, upto: int, inst: Instance, tag: str) -> tuple[dict[str, object] | None, str]:
        try:
            daemon = build(self.source, [str(p.path) for p in self.stack.patches], upto).daemon
        except BuildError as e:
            return None, f"does not build: {str(e).splitlines()[0]}"
        out = self.scratch / f"{tag}-{upto}"
        result = run_instance(daemon, inst, out)
        return result, "" if result else "the run wrote no result"

    def test(self, upto: int) -> Step:
        assert self.signature is not None
        result, why = self.run(upto, self.inst, "case")
        if result is None:
            return Step(upto, SKIP, why)
        verdict, why = judge(result, self.signature)
        if verdict == GOOD and result["status"] != "pass":
            # Failing some other way may mean "cannot serve at all here".
            smoke = self._smoke(upto)
            if smoke:
                return Step(upto, SKIP, smoke)
        return Step(upto, verdict, why)

    def _smoke(self, upto: int) -> str:
        """Why this build cannot be tested on the instance's transport, or ''."""
        specs, _ = load_all(REPO / "cases")
        smoke = next(
            i.on("qsd")
            for s in specs
            if s.id == SMOKE_CASE
            for i in s.instances()
            if i.mode == "fuse" and i.transport == self.inst.transport
        )
        result, why = self.run(upto, smoke, "smoke")
        if result is None:
            return f"{SMOKE_CASE} did not run: {why}"
        if result["status"] != "pass":
            first = str(result.get("reason") or "").split("\n", 1)[0]
            return f"cannot serve on {self.inst.transport}: {smoke.id} {result['status']}: {first}"
        return ""


def bisect(given: str, source: str, patches: list[str], repro: str | None) -> int:
    inst = find_instance(given)
    stack = PatchStack.from_args(patches)
    n = len(stack.patches)
    with tempfile.TemporaryDirectory(prefix="fuse-iotests-bisect.") as tmp:
        b = Bisection(inst, source, stack, Path(tmp))
        say(f"{inst.id}: running on the whole stack ({n} patches)")
        result, why = b.run(n, inst, "tip")
        if result is None:
            raise BuildError(f"cannot run {inst.id} on the whole stack: {why}")
        if result["status"] in ("pass", "not run"):
            first = str(result.get("reason") or "").split("\n", 1)[0]
            raise BuildError(f"{inst.id} does not fail on the whole stack ({result['status']}"
                             f"{': ' + first if first else ''}): nothing to bisect")  # fmt: skip
        b.signature = Signature.of(result)
        say(f"signature: {b.signature.describe()}")
        steps = {n: Step(n, BAD, "the whole stack (the signature's own run)")}
        base = b.test(0)
        steps[0] = base
        say(f"  upto 0 (the bare source): {WORDS[base.verdict]}: {base.why}")
        if base.verdict == BAD:
            first_bad: int | None = 0
        else:
            first_bad = _search(b, steps, n)
    names = [p.name for p in stack.patches]
    print("\n".join(_table(steps, names)), file=sys.stderr)
    if first_bad is None:
        good = max((k for k, s in steps.items() if s.verdict == GOOD), default=0)
        bad = min(k for k, s in steps.items() if s.verdict == BAD and k > good)
        cands = [names[k] for k in range(good, bad)]
        print(f"{inst.id}: the first bad patch is one of (untestable between): {' '.join(cands)}")
        return 0
    if repro:
        inputs = (source, patches, first_bad)
        path = write_script(inst, "qsd", None, None, "auto", build_from=inputs,
                            signature=b.signature, dest=Path(repro))  # fmt: skip
        say(f"repro script: {path}")
    if first_bad == 0:
        print(f"{inst.id}: fails this way on the bare source already (no patch applied)")
    else:
        print(f"{inst.id}: first bad patch {first_bad}/{n}: {names[first_bad - 1]}")
    return 0


def _search(b: Bisection, steps: dict[int, Step], n: int) -> int | None:
    """The smallest k with prefix k bad, given 0 is not bad and n is; None
    when skips hide it.  Untested prefixes nearest the middle go first."""
    while True:
        # The bare source bounds the search even when it was a skip.
        good = max((k for k, s in steps.items() if s.verdict == GOOD), default=0)
        bad = min(k for k, s in steps.items() if s.verdict == BAD and k > good)
        open_ = [k for k in range(good + 1, bad) if k not in steps]
        if not open_:
            return bad if bad == good + 1 else None  # all between are skips
        mid = (good + bad) / 2
        k = min(open_, key=lambda x: (abs(x - mid), x))
        steps[k] = b.test(k)
        say(f"  upto {k} ({k} patches): {WORDS[steps[k].verdict]}: {steps[k].why}")


def _table(steps: dict[int, Step], names: list[str]) -> list[str]:
    lines = []
    for k in sorted(steps):
        what = "the bare source" if k == 0 else names[k - 1]
        lines.append(f"  {k:2d}  {WORDS[steps[k].verdict]:4s}  {what}: {steps[k].why}")
    return lines
