"""Bisect-ready reproduction: one instance as a self-contained script.

tools/check --repro INSTANCE [--kernel K] writes results/repro/<name>.sh,
which runs just that instance (on the host, or in a VM booted with K) and
exits as `git bisect run` expects:

    0    it matches its golden file
    1    it does not (a fail, an xfail or an xpass)
    125  it cannot run here: a missing requirement, a VM that did not boot

For a qemu-storage-daemon built by tools/qsd build (--target qsd-series,
or --qsd naming such a build) the script first builds the same source and
patch stack, so it also serves `git bisect run` in a QEMU tree (a build
that fails is 125).  Written by tools/qsd bisect, it judges against the
failure's signature instead of the golden file (signature.py): 1 only
when the instance fails the same way.

    python -m harness.iotests.repro RESULTS INSTANCE [SIGNATURE]   (the verdict)
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
from .signature import BAD, GOOD, SKIP, Signature, judge


def verdict(results: Path, instance: str, sig: Signature | None = None) -> tuple[int, str]:
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
    if sig is not None:
        return judge(r, sig)
    first = (r.get("reason") or "").split("\n", 1)[0]
    if r["status"] == "pass":
        return GOOD, "matches its golden file"
    if r["status"] == "not run":
        return SKIP, f"not run: {first}"
    return BAD, f"{r['status']}: {first}"


def write_script(
    inst: Instance,
    target: str,
    qsd: str | None,
    kernel: str | None,
    accel: str,
    build_from: tuple[str, list[str], int | None] | None = None,
    signature: Signature | None = None,
    dest: Path | None = None,
) -> Path:
    """inst carries its target's tag (its id as reports show it); tools/check
    selects by the untagged id plus --target.  build_from: (source, patch
    files, upto) of a tools/qsd build to make first and run on."""
    name = inst.id.replace("[", "-").replace("]", "").replace(",", "-").replace("=", "_")
    if kernel:
        name += "-kernel-" + "".join(c if c.isalnum() or c in ".+-" else "_" for c in kernel)
    path = dest or REPO / "results" / "repro" / f"{name}.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "-file" if inst.mode == "file" else "-fuse"
    args = [mode, "--target", target]
    build = ""
    if build_from is not None:
        source, patches, upto = build_from
        cmd = ["build", "--source", source]
        cmd += ["--patches", *(str(Path(p).resolve()) for p in patches)] if patches else []
        cmd += ["--upto", str(upto)] if upto is not None else []
        build = (f'# The daemon, built (or found in the cache) from the same inputs.\n'
                 f'qsd=$("$repo/tools/qsd" {" ".join(map(shlex.quote, cmd))} | tail -n 1)'
                 f' || exit 125\n')  # fmt: skip
        args = [mode, "--target", "qsd", "--qsd", '"$qsd"']
    elif qsd:
        args += ["--qsd", shlex.quote(str(Path(qsd).resolve()))]
    judged = ""
    if signature is not None:
        sig_path = path.with_suffix(".signature.json")
        signature.save(sig_path)
        judged = " " + shlex.quote(str(sig_path.resolve()))
    if kernel:
        args += ["--kernel", kernel, "--accel", accel]
    uring = "1" if inst.transport == "uring" else "0"
    where = f" on kernel {kernel}" if kernel else " on this host's kernel"
    expect = (
        "0 when the instance does not fail as the\n"
        "# signature beside this script says, 1 when it does"
        if signature is not None
        else "0 when the instance matches its\n# golden file, 1 when it does not"
    )
    quoted = [a if a == '"$qsd"' else shlex.quote(a) for a in args]
    writer = "tools/qsd bisect" if signature is not None else "tools/check --repro"
    path.write_text(
        f"""#!/usr/bin/env bash
# Reproduce {inst.id}{where}.
# Exit status as `git bisect run` wants it: {expect}, 125 when it cannot run (a requirement
# is missing, the VM did not boot, the daemon does not build).
# Written by {writer} on {time.strftime("%Y-%m-%d %H:%M")} from
# {REPO} at {git_revision()}.
set -u
repo={shlex.quote(str(REPO))}
{build}out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
FUSE_OVER_IO_URING={uring} "$repo/tools/check" {" ".join(quoted)} \\
    --results "$out" {shlex.quote(inst.on("").id)} || true
"$repo/.venv/bin/python" -m harness.iotests.repro "$out" {shlex.quote(inst.id)}{judged}
"""
    )
    path.chmod(0o755)
    return path


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m harness.iotests.repro RESULTS INSTANCE [SIGNATURE]",
              file=sys.stderr)  # fmt: skip
        return SKIP
    sig = Signature.load(Path(argv[2])) if len(argv) == 3 else None
    code, why = verdict(Path(argv[0]), argv[1], sig)
    print(f"repro: {argv[1]}: {why} (exit {code})")
    return code


if __name__ == "__main__":
    run_tool(lambda: main(sys.argv[1:]))
