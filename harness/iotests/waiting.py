"""Bounded waits that poll a condition and report what they saw."""

from __future__ import annotations

import contextlib
import glob
import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.005


class WaitTimeout(AssertionError):
    pass


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll condition() until it returns something truthy, at most timeout s.

    On timeout, raise WaitTimeout naming what was awaited plus whatever
    diagnose() reports (an exporter's stderr tail, kernel stacks, ...).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = diagnose() if diagnose else ""
            raise WaitTimeout(
                f"timed out after {timeout:.1f}s waiting for {what}\n{detail}".rstrip()
            )
        time.sleep(POLL_INTERVAL)


def kernel_stacks(pid: int) -> str:
    """/proc/PID/task/*/stack of every thread, for reports on stuck processes."""
    lines = []
    for task in sorted(glob.glob(f"/proc/{pid}/task/*")):
        tid = os.path.basename(task)
        try:
            with open(f"{task}/comm") as f:
                comm = f.read().strip()
            with open(f"{task}/stack") as f:
                stack = f.read().rstrip()
        except OSError as e:
            stack = f"<{e.strerror}>"
            comm = "?"
        lines.append(f"--- task {tid} ({comm}) ---\n{stack}")
    return "\n".join(lines)


def is_descendant(pid: int, ancestor: int) -> bool:
    """Whether pid is ancestor or runs below it (walking /proc's ppid chain)."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def fd_links(pid: int | str) -> list[str]:
    """What the process's fds point to ('/dev/fuse', 'anon_inode:[io_uring]');
    empty when it is gone."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    links = []
    for fd in fds:
        with contextlib.suppress(OSError):  # closed meanwhile
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links
