"""Evidence from a target that hangs: what its threads and its clients are
doing at the moment a bounded wait gives up.

A hung daemon is a finding, not a harness failure.  Before the cleanup
SIGKILLs it (so that stuck clients finish), the report gets every thread's
kernel stack, a user-space backtrace of every thread through gdb where gdb
is installed (QEMU builds carry debug info), and the state of each client
process that holds a file on the mount or sleeps uninterruptibly in FUSE.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..kernel.cpus import Topology
from .observe import rings
from .waiting import fd_links, is_descendant, kernel_stacks

GDB_BOUND = 30.0  # attach, read the symbols of a debug build, walk every thread
CRASHED = "the thread that crashed:"
FRAMES = 48  # per thread


def gdb_backtraces(pid: int, bound: float = GDB_BOUND) -> str:
    """`thread apply all bt` of a live process, or one line saying why not."""
    return _all_threads(["-p", str(pid)], bound)


def core_backtraces(core: Path, program: str, bound: float = GDB_BOUND) -> str:
    """The backtrace of the thread that crashed, then `thread apply all
    bt`, from a core.  program: the ELF file that ran (its symbols); a
    launcher script (qsd-11.1's) is not, and gdb then reads the core alone."""
    with open(program, "rb") as f:
        elf = f.read(4) == b"\x7fELF"
    what = [program, str(core)] if elf else ["-c", str(core)]
    return _all_threads(what, bound, first=["-ex", f"echo {CRASHED}\\n", "-ex", "bt"])


def core_file(workdir: Path) -> Path | None:
    """The core a crashed child left in its cwd, or None: the kernel puts it
    there only while core_pattern is the default, relative "core"."""
    try:
        pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    except OSError:
        return None
    core = workdir / pattern
    return core if "/" not in pattern and "%" not in pattern and core.is_file() else None


def _all_threads(what: list[str], bound: float, first: Sequence[str] = ()) -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(no gdb installed: no user-space backtraces)"
    # Bounded: a crash by runaway recursion has thousands of frames, and its
    # innermost ones show the loop.
    argv = [gdb, "-nx", "-batch", "-ex", "set pagination off",
            "-ex", f"set backtrace limit {FRAMES}", *first,
            "-ex", "thread apply all bt", *what]  # fmt: skip
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=bound)
    except subprocess.TimeoutExpired:
        return f"(gdb did not finish within {bound:.0f} s)"
    # Only the thread headers and frames: gdb's chatter (symbol loading,
    # "[New LWP ...]") says nothing about the hang.
    keep = [
        ln
        for ln in res.stdout.splitlines()
        if ln.startswith(("Thread ", "#", "(More stack frames", "Program terminated", CRASHED))
    ]
    if CRASHED in keep:  # before it, the frame gdb printed when it read the core
        i = keep.index(CRASHED)
        keep = [ln for ln in keep[:i] if not ln.startswith("#")] + keep[i:]
    return "\n".join(keep) if keep else f"(gdb: {(res.stderr.strip().splitlines() or ['?'])[-1]})"


def _state(pid: str) -> tuple[str, str]:
    """(comm, state letter) of a process, or ('', '') when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", ""
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    return comm, stat[stat.rindex(")") + 2 :].split()[0]


def clients(mountpoint: str, exclude: set[int]) -> list[int]:
    """Processes other than the target's that hold a file on the mount, or
    that this harness started and that sleep uninterruptibly (a client
    stuck in open() holds no file yet; other users' clients are not ours
    to report)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        pid = entry.name
        holds = mountpoint in fd_links(pid)
        if holds or (_state(pid)[1] == "D" and is_descendant(int(pid), os.getpid())):
            found.append(int(pid))
    return sorted(found)


def client_states(mountpoint: str, exclude: set[int]) -> str:
    out = []
    for pid in clients(mountpoint, exclude):
        comm, state = _state(str(pid))
        try:
            stack = Path(f"/proc/{pid}/stack").read_text().rstrip()
        except OSError as e:
            stack = f"<{e.strerror}>"
        out.append(f"--- client {pid} ({comm}) state {state} ---\n{stack}")
    return "\n".join(out) if out else "(no client holds the mount or waits in FUSE)"


def hang_report(pids: list[int], mountpoint: str) -> str:
    """Everything about a target that stopped answering, for the finding."""
    parts = []
    for pid in pids:
        parts.append(f"kernel stacks of target process {pid}:\n{kernel_stacks(pid)}")
        parts.append(f"user-space backtraces of target process {pid}:\n{gdb_backtraces(pid)}")
    parts.append(f"clients of {mountpoint}:\n{client_states(mountpoint, set(pids))}")
    parts.append(f"rings and CPUs:\n{ring_summary(pids)}")
    return "\n".join(parts)


def ring_summary(pids: list[int]) -> str:
    """The FUSE ring entries the target has waiting in the kernel, beside
    the CPU topology: a ring the kernel never starts (an entry missing for
    some possible CPU's queue) leaves every request waiting."""
    try:
        fuse = rings(pids).fuse_rings
    except OSError as e:
        return f"    (could not read: {e})"
    entries = " + ".join(str(r.in_flight) for r in fuse) or "none"
    return (
        f"    {len(fuse)} ring(s) with FUSE entries in flight: {entries}\n"
        f"    CPUs: {Topology.read().describe()}"
    )
