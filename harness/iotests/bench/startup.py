"""Start-up and teardown latency of an export, as the test suite pays it.

start: the harness's start() is called -> the first 4 KiB read through the
       mount returns data (before the mount, the mountpoint is an empty file
       and a read returns nothing).  Our exporter starts from a warm spare
       that has finished importing, as in the suite, or cold (a new
       interpreter: the "cold" rows);
stop:  the stop request (SIGTERM, as every case's teardown sends it) ->
       the FUSE mount is gone from the mount table.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

from ...kernel.mount import find_mount
from ..targets.reference import SPARES
from ..timeouts import scaled
from ..waiting import wait_until
from .peers import Peer

READ_SIZE = 4096
BOUND = 10.0  # seconds for one start or one stop, scaled (QSD 11.1 can miss a SIGTERM)


@dataclass(frozen=True)
class Latency:
    start_ms: float
    stop_ms: float


def _first_read(mountpoint: Path) -> bool:
    fd = os.open(mountpoint, os.O_RDONLY)
    try:
        return len(os.pread(fd, READ_SIZE, 0)) == READ_SIZE
    finally:
        os.close(fd)


def measure(peer: Peer, root: Path, cold: bool = False) -> Latency:
    """One start and one stop of `peer`'s export, in a fresh directory."""
    workdir = Path(tempfile.mkdtemp(prefix="startup-", dir=root))
    mountpoint = workdir / "null.fuse"
    mountpoint.touch()
    exp = peer.target.exporter(workdir, mountpoint, None, peer.settings)
    if peer.target.starts_warm and not cold:
        SPARES.wait_ready(scaled(BOUND))
    try:
        cold_start = patch.dict(os.environ, {"FUSE_IOTESTS_SPARE": "0"})
        with cold_start if cold else contextlib.nullcontext():
            t0 = time.monotonic()
            exp.start(scaled(BOUND))
        wait_until(lambda: _first_read(mountpoint), scaled(BOUND), "a first read", exp.report)
        t1 = time.monotonic()
        exp.signal(signal.SIGTERM)
        wait_until(lambda: not exp.is_mounted(), scaled(BOUND), f"{mountpoint} to go", exp.report)
        t2 = time.monotonic()
        exp.wait_exit(scaled(BOUND))
    finally:
        exp.cleanup()
    if find_mount(str(mountpoint)) is None:  # never remove a live mount's directory
        shutil.rmtree(workdir)
    return Latency((t1 - t0) * 1000, (t2 - t1) * 1000)
