"""tools/compare: what changed between two runs (two kernels, two targets, two days).

    tools/compare RUN_A RUN_B [--json FILE]

RUN is a results directory or its report.json.  Prints the fingerprint
differences (kernel, FUSE minor, offered INIT flags, enable_uring, the VM
it ran in), every instance whose status changed, and the diff of every
transcript that changed: "it passes on 6.16 and fails on 7.3, here is the
difference".  Exits 0 when every instance has the same status and
transcript (the fingerprints may differ: that is the point of comparing
two kernels), 1 when one does not, 2 on bad input (one line).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..cli import OneLineParser, run_tool


class BadRun(ValueError):
    pass


@dataclass
class Run:
    name: str
    fingerprint: dict[str, Any]
    results: dict[str, dict[str, Any]]  # instance id -> result
    vm: dict[str, Any] = field(default_factory=dict)


def load(arg: str) -> Run:
    path = Path(arg)
    report = path / "report.json" if path.is_dir() else path
    try:
        doc = json.loads(report.read_text())
        results = {r["id"]: r for r in doc["results"]}
        fp = dict(doc["fingerprint"])
    except FileNotFoundError:
        raise BadRun(f"{arg}: no report.json (a results directory or a report.json)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise BadRun(f"{report}: not a tools/check report ({type(e).__name__}: {e})") from None
    vm_file = report.parent / "vm.json"
    try:
        vm = json.loads(vm_file.read_text()) if vm_file.exists() else {}
    except ValueError as e:
        raise BadRun(f"{vm_file}: not a VM record ({e})") from None
    return Run(str(report.parent), fp, results, vm)


def _flat(fp: dict[str, Any], vm: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as comparable key -> value pairs."""
    out: dict[str, Any] = {}
    for k, v in fp.items():
        if k == "fuse" and isinstance(v, dict):
            out["fuse protocol"] = v.get("protocol", v.get("error"))
            out["fuse offered"] = v.get("offered", [])
        elif k == "targets":
            for t in v:
                out[f"target {t.get('name')}"] = (
                    f"{t.get('version')} {' '.join(t.get('capabilities', []))}"
                )
        elif k == "cpus" and isinstance(v, dict):
            out.update({f"cpus {kind}": ids for kind, ids in v.items()})
        elif k not in ("exporter", "possible_cpus", "possible_cpu_list"):
            out[k] = v
    if vm:
        cpus = f", {vm['cpus']}" if vm.get("cpus") else ""
        out["vm"] = f"{vm.get('kernel')} ({vm.get('accel')}{cpus})"
    else:
        out["vm"] = "none (the host)"
    return out


@dataclass
class Comparison:
    a: str
    b: str
    fingerprint: dict[str, list[Any]] = field(default_factory=dict)  # key -> [a, b]
    status_changes: list[dict[str, str]] = field(default_factory=list)
    transcripts: dict[str, str] = field(default_factory=dict)  # id -> unified diff
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not (self.status_changes or self.transcripts or self.only_in_a or self.only_in_b)


def compare(a: Run, b: Run) -> Comparison:
    c = Comparison(a.name, b.name)
    fa, fb = _flat(a.fingerprint, a.vm), _flat(b.fingerprint, b.vm)
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k) != fb.get(k):
            c.fingerprint[k] = [fa.get(k), fb.get(k)]
    c.only_in_a = sorted(set(a.results) - set(b.results))
    c.only_in_b = sorted(set(b.results) - set(a.results))
    for iid in [i for i in a.results if i in b.results]:
        ra, rb = a.results[iid], b.results[iid]
        if ra["status"] != rb["status"]:
            c.status_changes.append(
                {
                    "id": iid,
                    "a": ra["status"],
                    "b": rb["status"],
                    "reason_b": (rb.get("reason") or "").split("\n", 1)[0],
                    "reason_a": (ra.get("reason") or "").split("\n", 1)[0],
                }
            )
        oa, ob = ra.get("output") or "", rb.get("output") or ""
        if oa and ob and oa != ob:
            diff = difflib.unified_diff(
                oa.splitlines(keepends=True),
                ob.splitlines(keepends=True),
                f"A/{iid}",
                f"B/{iid}",
            )
            c.transcripts[iid] = "".join(diff)
    return c


def _show(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def print_text(c: Comparison, out: Any = None) -> None:
    out = out or sys.stdout
    print(f"A: {c.a}\nB: {c.b}\n", file=out)
    print("Fingerprint differences:" if c.fingerprint else "Fingerprints: the same", file=out)
    for k, (va, vb) in c.fingerprint.items():
        if isinstance(va, list) and isinstance(vb, list):
            gone, new = sorted(set(va) - set(vb)), sorted(set(vb) - set(va))
            what = " ".join([*(f"-{x}" for x in gone), *(f"+{x}" for x in new)]) or "(order)"
            print(f"  {k}: {what}", file=out)
        else:
            print(f"  {k}: {_show(va)} -> {_show(vb)}", file=out)
    print(file=out)
    if c.status_changes:
        print("Status changes:", file=out)
        for s in c.status_changes:
            why = f"  ({s['reason_b']})" if s["reason_b"] and s["b"] != "pass" else ""
            print(f"  {s['id']}: {s['a']} -> {s['b']}{why}", file=out)
        print(file=out)
    for name, ids in (("Only in A", c.only_in_a), ("Only in B", c.only_in_b)):
        if ids:
            print(f"{name}: {' '.join(ids)}\n", file=out)
    if c.transcripts:
        print("Transcript differences:", file=out)
        for diff in c.transcripts.values():
            out.write(diff if diff.endswith("\n") else diff + "\n")
        print(file=out)
    n = len(c.status_changes)
    print(
        "Same results and transcripts"
        if c.same
        else f"{n} status change(s), {len(c.transcripts)} transcript(s) differ",
        file=out,
    )


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="compare", description=__doc__.split("\n\n")[0])
    p.add_argument("a", metavar="RUN_A")
    p.add_argument("b", metavar="RUN_B")
    p.add_argument("--json", metavar="FILE", help="also write the comparison as JSON")
    try:
        ns: argparse.Namespace = p.parse_args(argv)
    except SystemExit as e:  # bad usage is 2 here: 1 means "different"
        return 2 if e.code else 0
    try:
        c = compare(load(ns.a), load(ns.b))
    except BadRun as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print_text(c)
    if ns.json:
        Path(ns.json).write_text(json.dumps(asdict(c), indent=2) + "\n")
    return 0 if c.same else 1


if __name__ == "__main__":
    run_tool(main)
