"""tools/check --kernel K / --kernels K1,K2: one VM run per kernel, then a matrix.

Each kernel's results land in their own directory (report.json with the
guest's fingerprint, every instance's transcript, vm.json); with several
kernels a matrix instance x kernel -> status follows, and the exit status
is 0 only when every run passed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from ..lifecycle import REPO
from .kernels import KernelError, resolve
from .run import VmCpus, run_check

# tools/check options that select the VM, not the run inside it (value-taking).
HOST_ONLY = {
    "--kernel", "--kernels", "--accel", "--results", "--timeout-scale", "--cpus", "--max-cpus",
}  # fmt: skip
# 7.3@2/4: kernel 7.3 with 2 online CPUs of 4 possible; 7.3@4: 4 of 4.
_VARIANT = re.compile(r"(?P<kernel>.+)@(?P<cpus>[0-9]+(/[0-9]+)?)")


def split_variant(item: str, default: VmCpus | None) -> tuple[str, VmCpus | None]:
    """'7.3@2/4' -> ('7.3', 2 of 4); '7.3' -> ('7.3', default).  ValueError
    for a topology that cannot be."""
    m = _VARIANT.fullmatch(item)
    if m is None:
        return item, default
    try:
        return m["kernel"], VmCpus.parse(m["cpus"])
    except ValueError as e:
        raise ValueError(f"{item}: {e}") from None


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
    cpus: VmCpus | None = None,
) -> int:
    try:  # a bad --kernel is one line before anything is installed or booted
        variants = [split_variant(k, cpus) for k in kernels]
        resolved = [resolve(k) for k, _ in variants]
    except (KernelError, ValueError) as e:
        print(f"check: {e}", file=sys.stderr)
        return 1
    setup = subprocess.run([str(REPO / "tools" / "setup-vm")], stdout=sys.stderr)
    if setup.returncode != 0:  # idempotent: quick when done
        print("check: tools/setup-vm failed", file=sys.stderr)
        return 1
    # A topology other than the default is part of the label: 7.3@2/4.
    labels = [
        k.label if c is None else f"{k.label}@{c.spelling}"
        for k, (_, c) in zip(resolved, variants, strict=True)
    ]
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
    for k, (_, c), label in zip(resolved, variants, labels, strict=True):
        where = base if len(resolved) == 1 else base / f"kernel-{_dir_name(label)}"
        rec = run_check(k, guest_args(argv), where, accel, timeout_scale, env, cpus=c)
        codes[label] = rec.exit_code if rec.booted else None
    if len(resolved) > 1:
        print_matrix(base, labels)
    return 0 if all(c == 0 for c in codes.values()) else 1


def print_matrix(base: Path, labels: list[str]) -> None:
    """instance x kernel -> status, from each run's report.json."""
    status: dict[str, dict[str, str]] = {}
    for label in labels:
        report = base / f"kernel-{_dir_name(label)}" / "report.json"
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


def _dir_name(label: str) -> str:
    """7.3.4@2/4 -> 7.3.4@2of4: a label as a directory name."""
    return label.replace("/", "of")
