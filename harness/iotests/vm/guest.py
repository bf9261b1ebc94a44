"""Inside the VM: measure the slowdown, then run tools/check as the user asked.

    python -m harness.iotests.vm.guest --host-import SECONDS [--timeout-scale F] -- ARGS

The first line it prints is the boot marker the host times the boot by.
Without --timeout-scale, the scale is the measured slowdown: how much
longer importing the runner takes here than it took on the host (TCG is
25-50x slower), at least 1.

It imports the runner only after printing the marker, so that the boot
time does not include that import.
"""

from __future__ import annotations

import argparse
import os
import sys

from .boot import MARKER, import_time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vm-guest")
    p.add_argument("--host-import", type=float, required=True)
    p.add_argument("--timeout-scale", type=float)
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    print(f"{MARKER} {uptime:.1f} {os.uname().release}", flush=True)
    if ns.timeout_scale is None:
        slowdown = import_time() / max(ns.host_import, 1e-3)
        scale, how = max(1.0, round(slowdown, 1)), f"measured: {slowdown:.1f}x slower than the host"
    else:
        scale, how = ns.timeout_scale, "given"
    print(f"VM: timeout scale {scale:g} ({how})", flush=True)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    from ..check import main as check_main

    return check_main([*args, "--timeout-scale", str(scale)])


if __name__ == "__main__":
    sys.exit(main())
