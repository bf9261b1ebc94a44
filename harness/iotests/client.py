"""A one-shot FUSE client: one real syscall, one line of output.

    python -m harness.iotests.client [--cpu K] OP PATH ARGS...

Used where the test process itself must not block: a request held by fault
injection, or I/O pinned to a CPU.  It prints "ok VALUE" or "error ERRNAME"
and exits 0 either way; only bad usage exits non-zero.

`idle` is the open client of a teardown: it opens PATH, prints "open" and
keeps the file open, with no request in flight, until its stdin closes;
then it reads 4 KiB at offset 0 and closes, and prints what both returned.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from ..kernel.errnos import errno_name
from ..kernel.libc import fallocate
from ..patterns import pattern_bytes
from .cleanup import run_all
from .timeouts import scaled

SEEK = {"data": os.SEEK_DATA, "hole": os.SEEK_HOLE}
KILL_WAIT = 10.0  # a killed client exits at once; scaled
OPS = ("pread", "pwrite", "fsync", "truncate", "fallocate", "lseek", "stat", "idle")
IDLE_READ = 4096


def _outcome(call: Callable[[], object]) -> str:
    try:
        return f"ok {call()}".rstrip()
    except OSError as e:
        return f"error {errno_name(e.errno or 0)}"


def idle(path: str) -> str:
    """Open, stay idle until stdin ends, then one read and the close."""
    fd = os.open(path, os.O_RDONLY)
    print("open", flush=True)
    sys.stdin.read()
    read = _outcome(lambda: len(os.pread(fd, IDLE_READ, 0)))
    # close(2) sends FLUSH, which a dead connection may fail: it is reported
    return f"read {read}, close {_outcome(lambda: os.close(fd) or '')}"


def run(op: str, path: str, args: list[int]) -> str:
    if op == "stat":
        st = os.stat(path)
        return f"size={st.st_size} mode={st.st_mode:o}"
    flags = os.O_RDONLY if op in ("pread", "lseek") else os.O_RDWR
    fd = os.open(path, flags)
    try:
        if op == "pread":
            offset, length = args
            data = os.pread(fd, length, offset)
            return f"{len(data)}"
        if op == "pwrite":
            offset, length, *pat = args
            return f"{os.pwrite(fd, pattern_bytes(pat[0] if pat else 0xAB, length), offset)}"
        if op == "fsync":
            os.fsync(fd)
            return "0"
        if op == "truncate":
            os.ftruncate(fd, args[0])
            return "0"
        if op == "fallocate":
            mode, offset, length = args
            fallocate(fd, mode, offset, length)
            return "0"
        if op == "lseek":
            offset, whence = args
            return f"{os.lseek(fd, offset, whence)}"
        raise ValueError(f"unknown op {op}")
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="client")
    p.add_argument("--cpu", type=int, help="pin to this CPU first")
    p.add_argument("op", choices=OPS)
    p.add_argument("path")
    p.add_argument("args", nargs="*", type=lambda s: SEEK.get(s) if s in SEEK else int(s, 0))
    ns = p.parse_args(argv)
    if ns.cpu is not None:
        os.sched_setaffinity(0, {ns.cpu})
    try:
        done = idle(ns.path) if ns.op == "idle" else f"ok {run(ns.op, ns.path, ns.args)}"
        print(done, flush=True)
    except OSError as e:
        print(f"error {errno_name(e.errno or 0)}", flush=True)
    return 0


def start_client(
    op: str, path: Path, *args: int | str, cpu: int | None = None, stdin: int = subprocess.DEVNULL
) -> subprocess.Popen[str]:
    """`python -m harness.iotests.client [--cpu CPU] OP PATH ARGS...`, output piped."""
    from . import runs  # not needed by the child itself
    from .lifecycle import REPO, child_env

    argv = [sys.executable, "-m", "harness.iotests.client"]
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    argv += [op, str(path), *map(str, args)]
    return runs.spawn(
        argv,
        cwd=REPO,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(),
    )


class ClientPool:
    """Background one-shot clients (python -m harness.iotests.client)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.closed = False
        self._lock = threading.Lock()  # a cleanup sees every client spawned

    def spawn(
        self,
        op: str,
        path: Path,
        *args: int | str,
        cpu: int | None = None,
        stdin: int = subprocess.DEVNULL,
    ) -> subprocess.Popen[str]:
        with self._lock:
            if self.closed:
                raise RuntimeError("client pool already cleaned up")
            p = start_client(op, path, *args, cpu=cpu, stdin=stdin)
            self.procs.append(p)
            return p

    @staticmethod
    def go_on(p: subprocess.Popen[str]) -> None:
        """Let an idle client go on: its stdin ends."""
        if p.stdin is not None:
            p.stdin.close()
            p.stdin = None  # communicate() would flush it

    @staticmethod
    def result(p: subprocess.Popen[str], timeout: float | None = None) -> str:
        out, _ = p.communicate(timeout=timeout or scaled(KILL_WAIT))
        return out.strip()

    def run(self, op: str, path: Path, *args: int | str, cpu: int | None = None) -> str:
        return self.result(self.spawn(op, path, *args, cpu=cpu))

    def cleanup(self) -> list[str]:
        """Kill the clients still running; raise if one would not go (the
        run's cgroup is the backstop)."""
        with self._lock:
            self.closed = True
        outcome = run_all((f"client {p.pid}", lambda p=p: _kill(p)) for p in self.procs)
        if outcome.failed:
            raise RuntimeError("; ".join(outcome.failed))
        return outcome.removed


def _kill(p: subprocess.Popen[str]) -> list[str]:
    if p.poll() is not None:
        return []
    p.kill()
    try:
        p.wait(scaled(KILL_WAIT))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"client {p.pid} did not exit after SIGKILL") from None
    return [f"client pid {p.pid}"]


if __name__ == "__main__":
    sys.exit(main())
