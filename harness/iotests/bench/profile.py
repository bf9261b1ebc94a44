"""Where an exporter's time goes, per I/O: syscalls by name (futex calls are
mostly GIL hand-offs in our exporter), context switches and migrations,
counted in the kernel by `perf stat` attached to the exporter while one
fio run goes on.  Counting, not sampling: the run is barely slowed."""

from __future__ import annotations

import shutil
import signal
import subprocess
from dataclasses import dataclass

from .. import runs
from ..lifecycle import ExporterProcess
from .fio import BenchError, Cell, run_cell

EVENTS = {
    "syscalls": "raw_syscalls:sys_enter",
    "futex": "syscalls:sys_enter_futex",
    "io_uring_enter": "syscalls:sys_enter_io_uring_enter",
    "read": "syscalls:sys_enter_read",
    "readv": "syscalls:sys_enter_readv",
    "write": "syscalls:sys_enter_write",
    "writev": "syscalls:sys_enter_writev",
    "poll": "syscalls:sys_enter_poll",
    "ppoll": "syscalls:sys_enter_ppoll",
    "switches": "context-switches",
    "migrations": "cpu-migrations",
}
BOUND = 30.0  # seconds for perf to print its counts after SIGINT


@dataclass(frozen=True)
class Profile:
    per_io: dict[str, float]  # event name -> count per I/O
    ios: int


def problem() -> str | None:
    """Why --profile cannot run here, or None."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: linux-perf)"
    try:
        res = subprocess.run(
            ["perf", "stat", "-x,", "-e", EVENTS["futex"], "--", "true"],
            capture_output=True,
            text=True,
            timeout=BOUND,
        )
    except subprocess.TimeoutExpired:
        return f"perf stat did not finish within {BOUND:.0f}s"
    if res.returncode != 0 or "<not supported>" in res.stderr:
        return f"perf cannot count syscall tracepoints: {res.stderr.strip().splitlines()[-1:]}"
    return None


def parse_counts(text: str) -> dict[str, float]:
    """perf stat -x, lines: value,unit,event,... ('<not counted>' is 0)."""
    names = {v: k for k, v in EVENTS.items()}
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) < 3 or parts[2] not in names:
            continue
        try:
            out[names[parts[2]]] = float(parts[0])
        except ValueError:
            out[names[parts[2]]] = 0.0
    return out


def measure(cell: Cell, exp: ExporterProcess, runtime: float) -> Profile:
    argv = ["perf", "stat", "-x,", "-p", ",".join(map(str, exp.pids()))]
    for e in EVENTS.values():
        argv += ["-e", e]
    perf = runs.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        sample = run_cell(cell, exp.mountpoint, runtime)
    finally:
        perf.send_signal(signal.SIGINT)
        try:
            _, err = perf.communicate(timeout=BOUND)
        except subprocess.TimeoutExpired:
            perf.kill()
            perf.communicate()
            raise BenchError(f"perf stat did not stop within {BOUND:.0f}s") from None
    counts = parse_counts(err)
    if not counts:
        raise BenchError(f"perf stat printed no counts: {err.strip()[-200:]}")
    ios = sample.ios_spanned(runtime)  # perf counts from attach to SIGINT
    return Profile({k: v / ios for k, v in counts.items()}, sample.ios)
