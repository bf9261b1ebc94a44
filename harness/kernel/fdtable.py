"""Target I/O in a file descriptor table of its own.

A child forked by any thread of a process starts with a copy of the fd
table, O_CLOEXEC fds included: they close only at its exec.  So when one
case thread opens a FUSE target while another (tools/check -j) starts a
process, the child holds the target file, and with it the mount, until it
execs.  The first thread's close then is not the last reference: an
umount right after it fails with EBUSY, and the child's exec sends a FLUSH
of its own, which blocks the exec while the export is held.  A thread that
unshares its fd table (unshare(2) CLONE_FILES) opens files that no other
thread's fork can copy.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CLONE_FILES = 0x400

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]


# The thread each caller waits for, by the caller's ident: a report on a
# stuck case thread shows where its I/O really sleeps.
_helpers: dict[int, threading.Thread] = {}


def helper_of(owner: threading.Thread) -> threading.Thread | None:
    """The thread doing owner's private-table work right now, if any."""
    return _helpers.get(owner.ident or 0)


def in_private_table(fn: Callable[[], T]) -> T:
    """fn() run in a new thread with a private copy of this thread's fd
    table; its result or exception.  Its fds must not outlive it: a thread's
    table goes with the thread, and the fds it opened are unknown to the
    rest of the process."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            if _libc.unshare(CLONE_FILES) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_FILES): {os.strerror(err)}")
            result.append(fn())
        except BaseException as e:  # handed to the caller
            error.append(e)

    # A daemon as the case thread is: I/O on a hung target must not keep the
    # interpreter from exiting and running the cleanup that ends the target.
    owner = threading.current_thread()
    t = threading.Thread(target=run, name=f"{owner.name} (private fds)", daemon=True)
    _helpers[owner.ident or 0] = t
    try:
        t.start()
        t.join()
    finally:
        _helpers.pop(owner.ident or 0, None)
    if error:
        raise error[0]
    return result[0]
