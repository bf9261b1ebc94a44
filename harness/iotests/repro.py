"""Bisect-ready reproduction: one instance as a self-contained script.

tools/check --repro INSTANCE [--kernel K] writes results/repro/<name>.sh,
which runs just that instance (on the host, or in a VM booted with K) and
exits as `git bisect run` expects:

    0    it matches its golden file
    1    it does not (a fail, an xfail or an xpass)
    125  it cannot run here: a missing requirement, a VM that did not boot

    python -m harness.iotests.repro RESULTS INSTANCE   (the script's verdict)
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from ..cli import run_tool
from .context import Instance
from .fingerprint import git_revision
from .lifecycle import REPO

GOOD, BAD, SKIP = 0, 1, 125


def verdict(results: Path, instance: str) -> tuple[int, str]:
    """(exit status, why) from a run's report.json."""
    vm = results / "vm.json"
    if vm.exists() and not json.loads(vm.read_text()).get("booted"):
        return SKIP, "the VM did not boot"
    try:
        doc = json.loads((results / "report.json").read_text())
    except (OSError, ValueError):
        return SKIP, "the run wrote no report (it did not get to run the instance)"
    found = [r for r in doc["results"] if r["id"] == instance]
    if not found:
        return SKIP, f"{instance} was not run"
    r = found[0]
    first = (r.get("reason") or "").split("\n", 1)[0]
    if r["status"] == "pass":
        return GOOD, "matches its golden file"
    if r["status"] == "not run":
        return SKIP, f"not run: {first}"
    return BAD, f"{r['status']}: {first}"


def write_script(
    inst: Instance, target: str, qsd: str | None, kernel: str | None, accel: str
) -> Path:
    """inst carries its target's tag (its id as reports show it); tools/check
    selects by the untagged id plus --target."""
    name = inst.id.replace("[", "-").replace("]", "").replace(",", "-").replace("=", "_")
    if kernel:
        name += "-kernel-" + "".join(c if c.isalnum() or c in ".+-" else "_" for c in kernel)
    path = REPO / "results" / "repro" / f"{name}.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "-file" if inst.mode == "file" else "-fuse"
    args = [mode, "--target", target]
    if qsd:
        args += ["--qsd", str(Path(qsd).resolve())]
    if kernel:
        args += ["--kernel", kernel, "--accel", accel]
    uring = "1" if inst.transport == "uring" else "0"
    where = f" on kernel {kernel}" if kernel else " on this host's kernel"
    path.write_text(
        f"""#!/usr/bin/env bash
# Reproduce {inst.id}{where}.
# Exit status as `git bisect run` wants it: 0 when the instance matches its
# golden file, 1 when it does not, 125 when it cannot run (a requirement is
# missing, the VM did not boot).
# Written by tools/check --repro on {time.strftime("%Y-%m-%d %H:%M")} from
# {REPO} at {git_revision()}.
set -u
repo={shlex.quote(str(REPO))}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
FUSE_OVER_IO_URING={uring} "$repo/tools/check" {" ".join(map(shlex.quote, args))} \\
    --results "$out" {shlex.quote(inst.on("").id)} || true
"$repo/.venv/bin/python" -m harness.iotests.repro "$out" {shlex.quote(inst.id)}
"""
    )
    path.chmod(0o755)
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m harness.iotests.repro RESULTS INSTANCE", file=sys.stderr)
        return SKIP
    code, why = verdict(Path(argv[0]), argv[1])
    print(f"repro: {argv[1]}: {why} (exit {code})")
    return code


if __name__ == "__main__":
    run_tool(lambda: main(sys.argv[1:]))
