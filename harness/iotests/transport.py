"""Which transport a live FUSE export really serves on, seen from outside.

A server asked for FUSE-over-io_uring may quietly serve over /dev/fuse
instead (libfuse falls back when the ring cannot start and says so only at
INFO level).  What tells the two apart, for any server, is where the reply
bytes go: over /dev/fuse each reply is a write(2) of the server process,
counted in /proc/PID/io `wchar`; over the ring the kernel copies it out of
the ring buffer on COMMIT_AND_FETCH, which counts nowhere.  So the check
sends PROBES attribute requests the server must answer (statx with
AT_STATX_FORCE_SYNC: no attribute cache, no image I/O) and looks at how
many bytes the exporter's processes wrote meanwhile (the INIT reply, 80
bytes, may be among them).  A GETATTR reply is
120 bytes, so PROBES of them over /dev/fuse write several KiB, while a ring
server writes at most a few eventfd words.  It costs PROBES round trips.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .waiting import fd_links

PROBES = 32
# Bytes the probes' replies write over /dev/fuse, at least (out header 16 +
# attr_out 104 per reply), and the share of it that still counts as
# "served over /dev/fuse": well above a ring server's eventfd noise.
REPLY_BYTES = 120
THRESHOLD = PROBES * REPLY_BYTES // 2

AT_STATX_FORCE_SYNC = 0x2000
STATX_BASIC_STATS = 0x7FF
STATX_SIZE = 256  # struct statx

_libc = ctypes.CDLL(None, use_errno=True)


def _statx_sync(path: Path) -> None:
    buf = ctypes.create_string_buffer(STATX_SIZE)
    if _libc.statx(-100, os.fsencode(path), AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, buf) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"statx {path}: {os.strerror(e)}")


def written(pids: Iterable[int]) -> int:
    """Bytes the processes wrote so far (/proc/PID/io wchar, every thread)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("wchar:"))
        except (OSError, StopIteration):  # it exited meanwhile
            continue
    return total


def uring_fds(pids: Iterable[int]) -> int:
    """io_uring instances the processes hold."""
    return sum(fd_links(pid).count("anon_inode:[io_uring]") for pid in pids)


class TransportError(RuntimeError):
    """An export asked for io_uring serves over /dev/fuse; str() says so."""


@dataclass
class FirstAnswer:
    """One attribute request, sent from a thread of its own: a server that
    never answers (the kernel never started its ring, say) leaves that
    thread asleep in FUSE until the server dies, and the caller waits for
    `answered` with a bound instead."""

    answered: threading.Event
    thread: threading.Thread

    @classmethod
    def send(cls, mountpoint: Path) -> FirstAnswer:
        answered = threading.Event()

        def probe() -> None:
            with contextlib.suppress(OSError):  # a failed mount answers too
                _statx_sync(mountpoint)
            answered.set()

        t = threading.Thread(target=probe, daemon=True, name=f"first request to {mountpoint}")
        t.start()
        return cls(answered, t)

    def where(self) -> str:
        """Where the request sleeps: its thread's kernel stack."""
        try:
            return Path(f"/proc/self/task/{self.thread.native_id}/stack").read_text().rstrip()
        except OSError as e:
            return f"<{e.strerror}>"


def check(pids: list[int], mountpoint: Path) -> None:
    """Raise TransportError unless the export really serves on the ring."""
    reason = served_over_dev_fuse(pids, mountpoint)
    if reason is not None:
        raise TransportError(reason)


def served_over_dev_fuse(pids: list[int], mountpoint: Path) -> str | None:
    """Why the export at mountpoint, served by pids, is not on the ring, or
    None when its replies do not go through /dev/fuse."""
    before = written(pids)
    try:
        for _ in range(PROBES):
            _statx_sync(mountpoint)
    except OSError:
        # A mount that serves nothing (an export that halted at INIT):
        # no transport to tell, and the case's own steps will show it.
        return None
    wrote = written(pids) - before
    # Counted after the probes: the first waits for the INIT reply, and a
    # server may set its rings up while it answers INIT (libfuse does).
    if not uring_fds(pids):
        return "asked for FUSE-over-io_uring but serves over /dev/fuse (no io_uring fd)"
    if wrote >= THRESHOLD:
        return (
            f"asked for FUSE-over-io_uring but serves over /dev/fuse ({PROBES} GETATTR "
            f"replies: the exporter wrote {wrote} bytes)"
        )
    return None
