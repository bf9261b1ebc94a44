"""How long a ring queue thread polls before it sleeps: QEMU's adaptive polling.

A synchronous client (one request at a time from one task, as affinity.py
detects it) sends its next request a few tens of microseconds after our
commit completed the last one.  Sleeping through that gap costs a wakeup per
request on the way in, and on 2 vCPUs it halved the IOPS of fio at
iodepth=1 (tools/bench qd1-jobs1: 18k sleeping, 38k polling).  So, like
QEMU's iothreads (AioContext poll-max-ns, util/aio-posix.c), the thread
polls the ring for a window before it sleeps.  The window adapts to the
waits it sees: it grows while a wait was just longer than the window, and
halves after a wait longer than the maximum (QEMU's poll-shrink), down to
zero if such waits go on, where polling would only burn CPU.  Sans-IO:
the queue thread measures, this decides.
"""

from __future__ import annotations

from dataclasses import dataclass

# QEMU polls up to 32 us by default; a synchronous client's round trip
# through this Python server on the 2-vCPU guest here is about twice that.
POLL_MAX_NS = 64_000
POLL_START_NS = 4_000  # QEMU's first step when growing from zero
POLL_SHRINK = 2  # QEMU's poll-shrink (its default, 0, drops the window to 0)


@dataclass
class AdaptivePoll:
    """Poll window of one ring queue thread (used from that thread only)."""

    max_ns: int = POLL_MAX_NS
    window_ns: int = 0
    caught: int = 0  # waits that a poll ended: no sleep
    sleeps: int = 0  # waits that ended in a sleep

    def slept(self, waited_ns: int) -> None:
        """A wait (poll, then sleep) took `waited_ns` in all."""
        self.sleeps += 1
        if waited_ns > self.max_ns:
            # Halved, not dropped: a client that hops to another CPU leaves
            # one long wait here, and comes back.
            half = self.window_ns // POLL_SHRINK
            self.window_ns = half if half >= POLL_START_NS else 0
        elif waited_ns > self.window_ns:
            self.window_ns = min(max(2 * self.window_ns, POLL_START_NS), self.max_ns)

    def as_dict(self) -> dict[str, int]:
        return {"window-ns": self.window_ns, "caught": self.caught, "sleeps": self.sleeps}
