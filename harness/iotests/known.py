"""Known differences: reviewed expectations that an instance differs from
its golden file on some target or kernel.

The golden files stay the specification (upstream QEMU semantics).  A file
golden/known/<name>.yaml says when it applies and which instances differ:

    # one line: what this file is about
    when: {target: qsd, version: "7.2.*"}      # and/or kernel: "<7.3"
    differences:
      - instances: ["eof-dd[*-growable=off]"]  # globs on ids without the target
        reason: WRITE at EOF fails with EIO, not ENOSPC
        upstream: changed in QEMU 8.x (308.out says "No space left on device")

A file may also list `defects:`, bugs of the target rather than deliberate
differences, each with the evidence and the first bad patch or kernel:

      - instances: ["export-del[uring]"]
        transports: [uring]                   # legacy and/or uring
        iothreads: "1"                        # the queue counts it was seen with
        reason: block-export-del never unmounts an io_uring export
        signature: "to be unmounted"          # a regex the failure must show
        evidence: the daemon's threads all idle in ppoll ...
        first-bad: 0002-export-fuse-process-FUSE-over-io_uring-requests.patch
        repro: tools/qsd bisect 'export-del[qsd-uring]' --repro FILE

A defect covers a failure only when the failure's report, diff or transcript
matches its signature, so a new way of failing on the same instance is not hidden; a
hang (a bounded wait or the case timeout) counts, leftovers never do.

A listed instance that fails reports xfail (reason and diff in the report);
one that now matches reports xpass and fails the run, so a fixed or newly
broken target is noticed either way.  An entry marked `intermittent: true`
(the difference depends on timing inside the target) reports pass when the
instance matches.  `version` and `kernel` take a glob
("7.2.*") or comparisons ("<7.3", ">=6.16,<7.0"); `cpus` is all-online or
some-offline, as the run found the machine's possible CPUs.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..kernel.cpus import Topology
from .context import Instance
from .spec import SpecError, _Loader, line_of

WHEN_KEYS = {"target", "version", "kernel", "cpus"}
# when: {cpus: ...}: the CPUs as the run found them (a VM booted with maxcpus=).
CPU_STATES = {"all-online", "some-offline"}
ENTRY_KEYS = {"instances", "reason", "upstream", "intermittent"}
DEFECT_KEYS = {"instances", "transports", "iothreads", "reason", "signature", "evidence",
               "first-bad", "repro", "intermittent"}  # fmt: skip
DEFECT_REQUIRED = DEFECT_KEYS - {"intermittent"}
TRANSPORTS = {"legacy", "uring"}
_CMP = re.compile(r"^\s*(<=|>=|<|>|==|!=)\s*([0-9][0-9.]*)\s*$")


def id_glob(pattern: str) -> re.Pattern[str]:
    """An instance-id glob: * and ? are wildcards, brackets are literal
    (ids are 'case[params]', so fnmatch's [classes] would never match)."""
    return re.compile(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", "."))


def version_tuple(text: str) -> tuple[int, ...]:
    """'6.18.44-fc-v1098' -> (6, 18, 44)"""
    m = re.match(r"[0-9]+(?:\.[0-9]+)*", text)
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def version_matches(version: str, constraint: str) -> bool:
    """A glob ('7.2.*') or comma-separated comparisons ('>=6.16,<7.0')."""
    if not any(op in constraint for op in "<>=!"):
        return fnmatch.fnmatchcase(version, constraint)
    have = version_tuple(version)
    for part in constraint.split(","):
        m = _CMP.match(part)
        if m is None:
            raise ValueError(f"bad version constraint '{part.strip()}'")
        op, want = m.group(1), version_tuple(m.group(2))
        n = len(want)  # '7.3' compares the first two fields: 7.3.4 == 7.3
        ok = {
            "<": have[:n] < want,
            "<=": have[:n] <= want,
            ">": have[:n] > want,
            ">=": have[:n] >= want,
            "==": have[:n] == want,
            "!=": have[:n] != want,
        }[op]
        if not ok:
            return False
    return True


@dataclass(frozen=True)
class Known:
    path: Path
    line: int
    patterns: tuple[str, ...]
    reason: str
    upstream: str
    when: dict[str, str]
    intermittent: bool = False
    kind: str = "difference"  # or "defect"
    # Defects only (see the module doc):
    signature: str = ""
    evidence: str = ""
    first_bad: str = ""
    transports: tuple[str, ...] = ()
    iothreads: str = ""
    repro: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}:{self.line}"

    def describe(self) -> str:
        if self.kind == "defect":
            return (f"known defect, {self.where}: {self.reason} "
                    f"(first bad: {self.first_bad})")  # fmt: skip
        up = f" ({self.upstream})" if self.upstream else ""
        return f"known difference, {self.where}: {self.reason}{up}"

    def covers(self, failure: str) -> bool:
        """Whether a failure's report and diff are this entry's: any diff for
        a difference, one that matches the signature for a defect."""
        return self.kind != "defect" or re.search(self.signature, failure) is not None


@dataclass(frozen=True)
class Environment:
    """What a when: clause is matched against."""

    target: str
    version: str
    kernel: str = os.uname().release
    cpus: str = field(
        default_factory=lambda: "some-offline" if Topology.read().offline else "all-online"
    )

    def matches(self, when: dict[str, str]) -> bool:
        if "target" in when and when["target"] != self.target:
            return False
        if "cpus" in when and when["cpus"] != self.cpus:
            return False
        if "version" in when and not version_matches(self.version, when["version"]):
            return False
        return "kernel" not in when or version_matches(self.kernel, when["kernel"])


class KnownDifferences:
    def __init__(self, entries: list[Known]) -> None:
        self.entries = entries

    def match(self, inst: Instance, env: Environment) -> list[Known]:
        """The entries that list this instance here (an instance may differ for
        more than one reason)."""
        plain = inst.on("").id
        return [
            e
            for e in self.entries
            if env.matches(e.when) and any(id_glob(p).fullmatch(plain) for p in e.patterns)
        ]


def load(directory: Path) -> KnownDifferences:
    """Every golden/known/*.yaml; SpecError 'FILE:LINE: message' on bad input."""
    entries: list[Known] = []
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        entries += _load_file(path)
    return KnownDifferences(entries)


def _load_file(path: Path) -> list[Known]:
    def fail(line: int, msg: str) -> SpecError:
        return SpecError(f"{path}:{line}: {msg}")

    try:
        data: Any = yaml.load(path.read_text(), Loader=_Loader)
    except SpecError as e:
        raise SpecError(f"{path}:{e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise fail(mark.line + 1 if mark else 1, f"YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict) or set(data) - {"when", "differences", "defects"}:
        raise fail(
            1, "a known-differences file is a mapping with 'when', 'differences' and/or 'defects'"
        )
    when = _when(data.get("when"), fail, line_of(data, "when"))
    if "differences" not in data and "defects" not in data:
        raise fail(1, "a known-differences file lists differences, defects or both")
    out = []
    for key in ("differences", "defects"):
        if key in data:
            items = data[key]
            if not isinstance(items, list) or not items:
                raise fail(line_of(data, key), f"{key} must be a non-empty list")
            parse = _difference if key == "differences" else _defect
            out += [parse(item, path, when, fail, line_of(items)) for item in items]
    return out


def _patterns(item: dict[str, Any], fail: Any, ln: int) -> tuple[str, ...]:
    pats = item.get("instances")
    pats = [pats] if isinstance(pats, str) else pats
    if not pats or not all(isinstance(p, str) and "[" in p for p in pats):
        raise fail(ln, "instances: one or more instance ids or globs, e.g. 'eof-dd[*]'")
    return tuple(pats)


def _intermittent(item: dict[str, Any], fail: Any, ln: int) -> bool:
    intermittent = item.get("intermittent", False)
    if not isinstance(intermittent, bool):
        raise fail(ln, "intermittent: true or false")
    return intermittent


def _defect(item: Any, path: Path, when: dict[str, str], fail: Any, default: int) -> Known:
    ln = line_of(item, default=default)
    if not isinstance(item, dict) or set(item) - DEFECT_KEYS or DEFECT_REQUIRED - set(item):
        keys = ", ".join(sorted(DEFECT_REQUIRED))
        raise fail(ln, f"a defect has {keys} (and may have intermittent)")
    transports = item["transports"]
    transports = [transports] if isinstance(transports, str) else transports
    if not isinstance(transports, list) or not transports or set(transports) - TRANSPORTS:
        raise fail(ln, "transports: a list of legacy and/or uring")
    try:
        re.compile(str(item["signature"]))
    except re.error as e:
        raise fail(ln, f"signature: not a regular expression: {e}") from None
    return Known(
        path, ln, _patterns(item, fail, ln), str(item["reason"]), "", when,
        _intermittent(item, fail, ln), kind="defect", signature=str(item["signature"]),
        evidence=str(item["evidence"]), first_bad=str(item["first-bad"]),
        transports=tuple(transports), iothreads=str(item["iothreads"]),
        repro=str(item["repro"]),
    )  # fmt: skip


def _difference(item: Any, path: Path, when: dict[str, str], fail: Any, default: int) -> Known:
    ln = line_of(item, default=default)
    if not isinstance(item, dict) or set(item) - ENTRY_KEYS or "reason" not in item:
        keys = ", ".join(sorted(ENTRY_KEYS))
        raise fail(ln, f"an entry has instances and reason (keys: {keys})")
    upstream = str(item.get("upstream", ""))
    return Known(path, ln, _patterns(item, fail, ln), str(item["reason"]), upstream, when,
                 _intermittent(item, fail, ln))  # fmt: skip


def _when(when: Any, fail: Any, line: int) -> dict[str, str]:
    if not isinstance(when, dict) or not when or set(when) - WHEN_KEYS:
        raise fail(line, f"when: a mapping of {', '.join(sorted(WHEN_KEYS))}")
    out = {k: str(v) for k, v in when.items()}
    for k in ("version", "kernel"):
        if k in out:
            try:
                version_matches("0", out[k])
            except ValueError as e:
                raise fail(line, f"when.{k}: {e}") from None
    if out.get("cpus", "all-online") not in CPU_STATES:
        raise fail(line, f"when.cpus: one of {', '.join(sorted(CPU_STATES))}")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "&#124;").replace("\n", " ")


def defects_markdown(known: KnownDifferences) -> str:
    """Every listed defect as a Markdown table, one line each, for the README
    (kept in sync by a test)."""
    rows = [
        "| when | instances | transports | iothreads | what goes wrong | first bad | repro |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in (e for e in known.entries if e.kind == "defect"):
        when = ", ".join(f"{k} {v}" for k, v in e.when.items())
        pats = " ".join(f"`{p}`" for p in e.patterns)
        cells = [when, pats, ", ".join(e.transports), e.iothreads, e.reason, e.first_bad]
        rows.append("| " + " | ".join(map(_cell, cells)) + f" | `{_cell(e.repro)}` |")
    return "\n".join(rows)


def markdown(known: KnownDifferences) -> str:
    """Every difference as a Markdown table, for docs/targets.md (kept in sync by a test)."""
    rows = ["| when | instances | reason | upstream |", "|---|---|---|---|"]
    for e in (e for e in known.entries if e.kind == "difference"):
        when = ", ".join(f"{k} {v}" for k, v in e.when.items())
        pats = " ".join(f"`{p}`" for p in e.patterns)
        cells = [when, pats, e.reason, e.upstream]
        if e.intermittent:
            cells[2] += " (intermittent)"
        rows.append("| " + " | ".join(c.replace("|", "&#124;") for c in cells) + " |")
    return "\n".join(rows)
