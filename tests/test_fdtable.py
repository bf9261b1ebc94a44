"""Target I/O that no fork of another thread inherits (harness/kernel/fdtable.py).

Guards our finding from 20 runs of `tools/check --target qsd-series -g race
-j 2` under load: once, race-umount-idle's umount, right after a read step
had closed the target, failed with EBUSY.  The other case thread had forked
while the read's fd was open, and its child held the mount until its exec.
Both tests fork while the target is open and umount after the close, so the
race happens every time instead of once in twenty runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from harness.iotests.fixtures import Exports, errno_of
from harness.kernel.fdtable import in_private_table
from harness.kernel.mount import umount


@contextmanager
def forked_child() -> Iterator[None]:
    """A child of this thread that holds its copy of the fd table until the
    block ends, as a child between fork and exec does."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        yield
    finally:
        os.close(w)  # EOF: the child exits
        os.waitpid(pid, 0)


def open_fork_close(target: str, run: Callable[[Callable[[], None]], object]) -> str:
    """Open the target in run(...), fork from this thread while it is open,
    close it, then umount: errno_of's word for the umount."""
    opened, closed = threading.Event(), threading.Event()
    forked = threading.Event()

    def io() -> None:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        os.pread(fd, 512, 0)
        opened.set()
        assert forked.wait(10), "the main thread did not fork"
        os.close(fd)
        closed.set()

    t = threading.Thread(target=run, args=(io,), daemon=True)
    t.start()
    assert opened.wait(10), "the target was not opened"
    with forked_child():
        forked.set()
        assert closed.wait(10), "the target was not closed"
        result = errno_of(lambda: umount(target))
    t.join(10)
    return result


def test_fork_inherits_target_fd(exports: Exports) -> None:
    """The race itself: a file opened in the shared table keeps the mount
    busy in a child forked meanwhile, after its opener closed it."""
    exp = exports.start()
    assert open_fork_close(str(exp.mountpoint), lambda io: io()) == "EBUSY"


def test_private_table_is_not_inherited(exports: Exports) -> None:
    """in_private_table: the child forked meanwhile does not hold the file,
    so the umount after the close succeeds and the export ends."""
    exp = exports.start()
    assert open_fork_close(str(exp.mountpoint), in_private_table) == "ok"
    assert not exp.is_mounted()


def test_private_table_returns_and_raises() -> None:
    assert in_private_table(lambda: 42) == 42
    with pytest.raises(FileNotFoundError):
        in_private_table(lambda: os.open("/nonexistent/fuse-iotests", os.O_RDONLY))
