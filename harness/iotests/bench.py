"""The seed's fio matrix against the exporter's transports, side by side.

    tools/bench [--runtime S] [--queues N] [--no-qsd]

randrw 70/30, bs=4k, libaio, direct=1, iodepth {1,64} x numjobs {1,4}, on a
--null-size export (null-co), so the figures measure the FUSE path, not a disk.
Prints IOPS and mean latency per cell for the classic transport, io_uring,
and qemu-storage-daemon's classic export as a reference.  A benchmark, not
a test: it prints figures and never fails on a slow machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..kernel.params import ensure_uring, kernel_lock
from ..options import Settings
from .lifecycle import TRACKER
from .targets import Target, TargetError, resolve

CELLS = [(1, 1), (1, 4), (64, 1), (64, 4)]  # (iodepth, numjobs)
SIZE = "1G"


def run_fio(path: Path, iodepth: int, numjobs: int, runtime: int) -> tuple[float, float]:
    """(IOPS, mean completion latency in microseconds) of one fio cell."""
    res = subprocess.run(
        ["fio", "--name=bench", f"--filename={path}", "--rw=randrw", "--rwmixread=70",
         "--bs=4k", "--ioengine=libaio", "--direct=1", f"--iodepth={iodepth}",
         f"--numjobs={numjobs}", "--time_based", f"--runtime={runtime}", "--ramp_time=1",
         f"--size={SIZE}", "--group_reporting", "--output-format=json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = json.loads(res.stdout)["jobs"][0]
    rd, wr = job["read"], job["write"]
    iops = rd["iops"] + wr["iops"]
    lat = (rd["lat_ns"]["mean"] * rd["iops"] + wr["lat_ns"]["mean"] * wr["iops"]) / max(iops, 1)
    return iops, lat / 1000


def bench_exporter(target: Target, settings: Settings, runtime: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="fuse-iotests-bench-") as tmp:
        mp = Path(tmp) / "null.fuse"
        mp.touch()
        exp = target.exporter(Path(tmp), mp, None, settings)
        try:
            exp.start()
            cells = [run_fio(mp, d, j, runtime) for d, j in CELLS]
            exp.stop()
        finally:
            exp.cleanup()
    return [f"{iops:9.0f} {lat:8.1f}" for iops, lat in cells]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", type=int, default=5, help="seconds per cell (default 5)")
    p.add_argument("--queues", type=int, default=2, help="exporter queues (default 2)")
    p.add_argument("--no-qsd", action="store_true", help="skip qemu-storage-daemon")
    opts = p.parse_args(argv)
    if shutil.which("fio") is None:
        print("bench: fio is not installed", file=sys.stderr)
        return 1
    rows = {}
    base = Settings().with_({"null-size": SIZE, "writable": True, "queues": opts.queues})
    reference = resolve("reference")
    try:
        rows["classic"] = bench_exporter(reference, base, opts.runtime)
        reason = ensure_uring()
        if reason:
            print(f"io_uring not run: {reason}", file=sys.stderr)
        else:
            with kernel_lock(exclusive=False):
                uring = base.with_({"io-uring": "on"})
                rows["io_uring"] = bench_exporter(reference, uring, opts.runtime)
        if not opts.no_qsd:
            try:
                qsd = resolve("qsd")
            except TargetError as e:
                print(f"qsd not run: {e}", file=sys.stderr)
            else:
                single = base.with_({"queues": 1, "allow-other": "off"})
                rows[f"qsd-{qsd.version}"] = bench_exporter(qsd, single, opts.runtime)
    finally:
        TRACKER.cleanup_all()
    print(f"fio randrw 70/30 bs=4k libaio direct=1, null-co, {opts.runtime}s per cell, "
          f"queues={opts.queues}")  # fmt: skip
    header = "".join(f" | {f'qd={d} jobs={j}':>18}" for d, j in CELLS)
    print(f"{'exporter':<9}{header}")
    print(f"{'':<9}" + f" | {'IOPS':>9} {'lat(us)':>8}" * len(CELLS))
    for name, cells in rows.items():
        print(f"{name:<9}" + "".join(f" | {c}" for c in cells))
    if "io_uring" in rows:
        ratios = [
            float(u.split()[0]) / max(float(c.split()[0]), 1)
            for u, c in zip(rows["io_uring"], rows["classic"], strict=True)
        ]
        print("io_uring/classic IOPS: " + "  ".join(f"{r:.2f}" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
