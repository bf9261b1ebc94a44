"""Exporter demo: export a scratch image, write, read back, unmount, verify.

Run through tools/demo.  It uses qemu-io as the FUSE client, so what it
shows is what a QEMU developer would type.  Exit status 0 means every step
gave the expected result.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..cli import run_tool
from ..kernel.params import ensure_uring
from ..options import Settings
from ..patterns import pattern_bytes
from .lifecycle import TRACKER
from .targets import resolve

STEPS = [
    "write -P 0x5a 0 64k",
    "write -P 0xa5 1M 4k",
    "read -P 0x5a 0 64k",
    "read -P 0xa5 1M 4k",
    "read -P 0 64k 4k",
]


def qemu_io(path: Path, *commands: str) -> str:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    res = subprocess.run([*argv, str(path)], capture_output=True, text=True, check=False)
    if res.returncode != 0 or "error" in res.stdout.lower() or "fail" in res.stdout.lower():
        raise SystemExit(f"demo: qemu-io failed:\n{res.stdout}{res.stderr}")
    return res.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo", description=__doc__)
    p.add_argument("--io-uring", choices=("on", "off", "auto"), default="off")
    opts = p.parse_args(argv)
    if opts.io_uring != "off" and (reason := ensure_uring()):
        print(f"demo: io_uring not run: {reason}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="fuse-iotests-demo-") as tmp:
        work = Path(tmp)
        image, mp = work / "disk.img", work / "disk.fuse"
        with open(image, "wb") as f:
            f.truncate(4 << 20)
        mp.touch()
        settings = Settings().with_({"writable": True, "io-uring": opts.io_uring})
        exp = resolve("reference").exporter(work, mp, image, settings)
        try:
            exp.start()
            neg = exp.query()["negotiation"]
            print(
                f"exported {image.name} on {mp.name}: FUSE 7.{neg['minor']}, "
                f"transport {exp.query()['transport']}, max_write {neg['max-write']}"
            )
            for step, line in zip(STEPS, qemu_io(mp, *STEPS).splitlines()[::2], strict=True):
                print(f"  qemu-io -c '{step}': {line}")
            status = exp.stop()
            print(f"exporter exited with status {status}; mounted: {exp.is_mounted()}")
            if status != 0 or exp.is_mounted():
                return 1
            data = image.read_bytes()
            ok = (
                data[: 64 << 10] == pattern_bytes(0x5A, 64 << 10)
                and data[1 << 20 : (1 << 20) + 4096] == pattern_bytes(0xA5, 4096)
                and os.path.getsize(image) == 4 << 20
            )
            print("image holds the written bytes" if ok else "image content is WRONG")
            return 0 if ok else 1
        finally:
            TRACKER.cleanup_all()


if __name__ == "__main__":
    run_tool(main)
