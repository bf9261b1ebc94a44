"""tools/check --kernel K / --kernels K1,K2: one VM run per kernel, then a matrix.

Each kernel's results land in their own directory (report.json with the
guest's fingerprint, every instance's transcript, vm.json); with several
kernels a matrix instance x kernel -> status follows, and the exit status
is 0 only when every run passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..lifecycle import REPO
from .kernels import KernelError, resolve
from .run import run_check

# tools/check options that select the VM, not the run inside it (value-taking).
HOST_ONLY = {"--kernel", "--kernels", "--accel", "--results", "--timeout-scale"}


def guest_args(argv: list[str]) -> list[str]:
    """The check arguments without the host-only options."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in HOST_ONLY:
            skip = True
        elif a.split("=", 1)[0] in HOST_ONLY:
            continue
        else:
            out.append(a)
    return out


def check_on_kernels(
    kernels: list[str],
    argv: list[str],
    accel: str,
    timeout_scale: float | None,
    results: Path | None,
) -> int:
    try:  # a bad --kernel is one line before anything is installed or booted
        resolved = [resolve(k) for k in kernels]
    except KernelError as e:
        print(f"check: {e}", file=sys.stderr)
        return 1
    setup = subprocess.run([str(REPO / "tools" / "setup-vm")], stdout=sys.stderr)
    if setup.returncode != 0:  # idempotent: quick when done
        print("check: tools/setup-vm failed", file=sys.stderr)
        return 1
    labels = [k.label for k in resolved]
    twice = sorted({lb for lb in labels if labels.count(lb) > 1})
    if twice:  # each kernel's results have a directory of that name
        print(f"check: --kernels names {', '.join(twice)} twice", file=sys.stderr)
        return 1
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = results or REPO / "results" / f"{stamp}-{os.getpid()}"
    # The mode and the harness's own settings go in; host paths (the state
    # directory) stay out.
    env = {
        k: v
        for k, v in os.environ.items()
        if k == "FUSE_OVER_IO_URING"
        or (
            k.startswith("FUSE_IOTESTS_")
            and k not in ("FUSE_IOTESTS_STATE_DIR", "FUSE_IOTESTS_TIMEOUT_SCALE")
        )
    }
    codes = {}
    for k in resolved:
        where = base if len(resolved) == 1 else base / f"kernel-{k.label}"
        rec = run_check(k, guest_args(argv), where, accel, timeout_scale, env)
        codes[k.label] = rec.exit_code if rec.booted else None
    if len(resolved) > 1:
        print_matrix(base, [k.label for k in resolved])
    return 0 if all(c == 0 for c in codes.values()) else 1


def print_matrix(base: Path, labels: list[str]) -> None:
    """instance x kernel -> status, from each run's report.json."""
    status: dict[str, dict[str, str]] = {}
    for label in labels:
        report = base / f"kernel-{label}" / "report.json"
        if not report.exists():
            continue
        for r in json.loads(report.read_text())["results"]:
            status.setdefault(r["id"], {})[label] = r["status"]
    width = max([len(i) for i in status] + [8])
    cols = [max(len(lb), 7) for lb in labels]
    print()
    print(
        f"{'instance':<{width}}  "
        + "  ".join(f"{lb:<{w}}" for lb, w in zip(labels, cols, strict=True))
    )
    for inst in sorted(status):
        row = [status[inst].get(lb, "-") for lb in labels]
        print(f"{inst:<{width}}  " + "  ".join(f"{s:<{w}}" for s, w in zip(row, cols, strict=True)))
