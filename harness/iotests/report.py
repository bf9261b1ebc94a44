"""Run results on disk: one JSON file per run and a JUnit XML file for CI."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .runner import Result

STATUSES = ("pass", "fail", "not run", "xfail", "xpass")


def _result_dict(r: Result) -> dict[str, Any]:
    return {
        "id": r.instance.id,
        "case": r.instance.case_id,
        "mode": r.instance.mode,
        "transport": r.instance.transport,
        "target": r.instance.target or "reference",
        "params": dict(r.instance.params),
        "status": r.status,
        "known": r.known,  # xfail/xpass: "difference" or "defect"
        "reason": r.reason,
        "start": r.start,
        "end": r.end,
        "elapsed": round(r.elapsed, 3),
        "golden": r.golden,
        "bad": r.bad,
        "diff": r.diff,
        "output": r.output,  # the filtered transcript: runs can be compared
    }


def summary(results: list[Result]) -> dict[str, int]:
    """Counts per status; known defects counted apart from differences."""
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    for kind in ("difference", "defect"):
        counts[f"xfail-{kind}"] = sum(r.status == "xfail" and r.known == kind for r in results)
    return counts


def write_json(
    path: Path, fingerprint: dict[str, Any], argv: list[str], results: list[Result]
) -> None:
    doc = {
        "argv": argv,
        "fingerprint": fingerprint,
        "summary": summary(results),
        "results": [_result_dict(r) for r in results],
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def write_junit(path: Path, fingerprint: dict[str, Any], results: list[Result]) -> None:
    suite = ET.Element(
        "testsuite",
        name="fuse-iotests",
        tests=str(len(results)),
        failures=str(sum(r.status in ("fail", "xpass") for r in results)),
        skipped=str(sum(r.status in ("not run", "xfail") for r in results)),
        # Not a JUnit attribute, but kept by the usual readers: CI shows defects apart.
        **{"known-defects": str(summary(results)["xfail-defect"])},
        time=f"{sum(r.elapsed for r in results):.3f}",
    )
    props = ET.SubElement(suite, "properties")
    for k, v in fingerprint.items():
        ET.SubElement(
            props, "property", name=k, value=json.dumps(v) if not isinstance(v, str) else v
        )
    for r in results:
        tc = ET.SubElement(
            suite,
            "testcase",
            classname=r.instance.case_id,
            name=r.instance.id,
            time=f"{r.elapsed:.3f}",
        )
        first = r.reason.splitlines()[0] if r.reason else r.status
        if r.status in ("fail", "xpass"):
            el = ET.SubElement(tc, "failure", message=first)
            el.text = "\n".join(x for x in (r.reason, r.diff) if x)
        elif r.status == "xfail":  # a known difference or defect: shown, not failed
            el = ET.SubElement(tc, "skipped", message=f"xfail ({r.known}): {first}")
            el.text = "\n".join(x for x in (r.reason, r.diff) if x)
        elif r.status == "not run":
            ET.SubElement(tc, "skipped", message=r.reason)
    ET.indent(suite)
    ET.ElementTree(suite).write(path, encoding="unicode", xml_declaration=True)
