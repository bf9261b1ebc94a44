"""What the kernel shows about an exporter process, whichever target it is.

- /proc/PID/fdinfo of each io_uring fd: submitted (SqHead) and completed
  (CqTail) entries and pending polls (PollList), so the commands still in
  flight.  A FUSE-over-io_uring server keeps one URING_CMD in flight per
  registered ring entry, so at rest these are its ring entries.
- /proc/PID/task/*/syscall: the threads waiting in io_uring_enter(2) on a
  ring fd, i.e. which thread polls which ring, and their names.
- /sys/fs/fuse/connections/N/waiting: requests the kernel has queued or sent
  to the server and not yet had answered (fusectl, read only).

No exporter introspection is needed, so the same facts come from the
reference exporter, QSD or any other daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..kernel.mount import find_mount

IO_URING_ENTER = 426  # x86_64
FUSECTL = Path("/sys/fs/fuse/connections")


@dataclass(frozen=True)
class Ring:
    """One io_uring instance of the process, from its fdinfo."""

    pid: int
    fd: int
    submitted: int  # SqHead
    completed: int  # CqTail
    polls: int  # entries in PollList
    pollers: tuple[str, ...] = ()  # names of threads waiting on it

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.fd)

    @property
    def in_flight(self) -> int:
        """Commands submitted and not completed, other than polls: a FUSE
        server's ring entries waiting for requests (at rest)."""
        return self.submitted - self.completed - self.polls


@dataclass(frozen=True)
class Snapshot:
    rings: tuple[Ring, ...] = field(default_factory=tuple)

    @property
    def fuse_rings(self) -> tuple[Ring, ...]:
        """The rings that hold commands beyond polls: FUSE ring entries."""
        return tuple(r for r in self.rings if r.in_flight > 0)


@dataclass
class Looks:
    """What a case saw at its last look, and the names it gave rings: in
    the order they first served a request, since fds are numbered in the
    order threads happened to create their rings."""

    last: Snapshot | None = None
    names: dict[tuple[int, int], int] = field(default_factory=dict)  # Ring.key -> 1, 2, ...

    def name(self, key: tuple[int, int]) -> int:
        return self.names.setdefault(key, len(self.names) + 1)


def _fdinfo(pid: int, fd: int) -> dict[str, str]:
    out: dict[str, str] = {}
    polls = 0
    section = ""
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if not line.startswith((" ", "\t")) and ":" in line:
            key, _, value = line.partition(":")
            section, out[key] = key, value.strip()
        elif section == "PollList" and line.strip().startswith("op="):
            polls += 1
    out["polls"] = str(polls)
    return out


def _waiters(pid: int) -> dict[int, list[str]]:
    """ring fd -> names of the threads blocked in io_uring_enter on it."""
    found: dict[int, list[str]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"{base}/syscall").read_text().split()
            if int(fields[0]) == IO_URING_ENTER:
                name = Path(f"{base}/comm").read_text().strip()
                found.setdefault(int(fields[1], 16), []).append(f"{name} ({tid})")
    return found


_libc = ctypes.CDLL(None, use_errno=True)
SYS_KCMP, KCMP_FILE = 312, 0  # x86_64


def _same_file(pid: int, fd1: int, fd2: int) -> bool:
    """kcmp(2): two fds of a process are one open file (dup'ed)."""
    return int(_libc.syscall(SYS_KCMP, pid, pid, KCMP_FILE, fd1, fd2)) == 0


def rings(pids: list[int]) -> Snapshot:
    """Every io_uring instance of these processes (an exporter and its queue
    processes), with what its fdinfo says and who waits on it."""
    return Snapshot(tuple(r for pid in pids for r in _rings(pid)))


def _rings(pid: int) -> list[Ring]:
    """Each io_uring of one process once, however often its fd was duplicated."""
    waiters = _waiters(pid)
    groups: list[list[int]] = []  # fds of one open file each
    for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        fd = int(name)
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[io_uring]":
                continue
            group = next((g for g in groups if _same_file(pid, g[0], fd)), None)
            if group is None:
                groups.append([fd])
            else:
                group.append(fd)
    out = []
    for fds in groups:
        with contextlib.suppress(OSError, KeyError):
            info = _fdinfo(pid, fds[0])
            pollers = sorted(w for fd in fds for w in waiters.get(fd, []))
            out.append(
                Ring(
                    pid,
                    fds[0],
                    int(info["SqHead"]),
                    int(info["CqTail"]),
                    int(info["polls"]),
                    tuple(pollers),
                )
            )
    return out


def threads(pid: int) -> dict[int, str]:
    """tid -> name of every thread of the process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            out[int(tid)] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    return out


def cpu_times(pid: int) -> dict[int, int]:
    """tid -> utime + stime in ticks: which thread did the work between two looks."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


def waiting(mountpoint: str) -> int | None:
    """The fusectl `waiting` count of the FUSE connection mounted there.

    fusectl shows every connection of the kernel wherever it is mounted, so
    where it is not mounted already it is mounted in a mount namespace of
    its own, which leaves the machine's mounts as they were."""
    entry = find_mount(mountpoint)
    if entry is None:
        return None
    path = FUSECTL / entry.fusectl_name / "waiting"
    if path.exists():
        return int(path.read_text())
    script = f"mount -t fusectl fusectl {FUSECTL} && cat {path}"
    res = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=10
    )
    return int(res.stdout) if res.returncode == 0 and res.stdout.strip().isdigit() else None
