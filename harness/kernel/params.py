"""Kernel state the harness reads and, as root, changes.

enable_uring is a kernel-global parameter: whoever changes it holds the
exclusive side of a cross-process lock, and every io_uring user holds the
shared side, so pytest-xdist workers and parallel check runs do not trip
over each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"
IO_URING_DISABLED = "/proc/sys/kernel/io_uring_disabled"
LOCK_PATH = "/run/lock/fuse-iotests-kernel.lock"
NO_URING = f"{ENABLE_URING} missing: kernel without FUSE-over-io_uring (needs 6.14+)"


def uring_in_kernel() -> bool:
    """Whether this kernel has FUSE-over-io_uring at all (on or off)."""
    return os.path.exists(ENABLE_URING)


def read_param(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def write_param(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@contextlib.contextmanager
def kernel_lock(exclusive: bool) -> Iterator[None]:
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def ensure_uring() -> str | None:
    """Make FUSE-over-io_uring usable; return why not, or None when it is.

    Sets enable_uring=Y when it is N and we may write it (root).  Callers
    hold kernel_lock(exclusive=False) around their use of it.
    """
    value = read_param(ENABLE_URING)
    if value is None:
        return NO_URING
    if read_param(IO_URING_DISABLED) not in (None, "0"):
        return f"io_uring is disabled ({IO_URING_DISABLED}={read_param(IO_URING_DISABLED)})"
    if value == "Y":
        return None
    try:
        with kernel_lock(exclusive=True):
            write_param(ENABLE_URING, "Y")
    except OSError as e:
        return f"enable_uring is {value} and cannot be set: {e.strerror}"
    return None


@contextlib.contextmanager
def enable_uring_set_to(value: str) -> Iterator[None]:
    """Hold the exclusive lock with enable_uring at value; restore it after."""
    with kernel_lock(exclusive=True):
        before = read_param(ENABLE_URING)
        if before is None:
            raise OSError(f"{ENABLE_URING} missing")
        write_param(ENABLE_URING, value)
        try:
            yield
        finally:
            write_param(ENABLE_URING, before)


def read_enable_uring() -> str | None:
    """enable_uring as it stands outside any serial case (which may hold N)."""
    with kernel_lock(exclusive=False):
        return read_param(ENABLE_URING)


def restore_enable_uring(initial: str | None) -> None:
    """Put back enable_uring=N if this run found it so and turned it on."""
    if initial != "N":
        return
    with kernel_lock(exclusive=True):
        if read_param(ENABLE_URING) == "Y":
            write_param(ENABLE_URING, "N")
