"""Where a ring queue thread runs: next to its client, or anywhere.

The kernel routes a FUSE-over-io_uring request to the ring queue of the CPU
its task runs on.  libfuse pins each ring thread to that CPU, which is right
for a C server: the reply costs little next to a cross-CPU wakeup.  A Python
server spends several microseconds per request, so one pinning does not fit
every load (measured with tools/bench --profile on 2 vCPUs):

- one request at a time from one CPU (a synchronous client): running on the
  client's CPU turns two cross-CPU wakeups per request into two switches on
  one CPU, 2-3x the IOPS;
- requests in batches (a deep queue) or from several clients: pinned, the
  server competes with its clients for one CPU while another idles; free
  to move, the scheduler runs it beside them instead.

So the thread follows its load.  The decision uses what each wakeup brings
(how many requests, from which task on which CPU) and has hysteresis, so it
changes affinity rarely: sched_setaffinity() is a syscall that may migrate.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

# Exponentially weighted batch size: above BATCHED the thread roams, below
# SINGLE (and one client) it pins; in between nothing changes.
WEIGHT = 0.1
BATCHED = 3.0
SINGLE = 1.5
SAME_SOURCE = 32  # lower flapped between two clients that take turns
MIXED = 0.5  # weighted share of wakeups whose task differs from the last one's
ALONE = 256  # wakeups in a row from one task: no other client is there (sharing.py)


@dataclass
class FollowClient:
    """Affinity policy of one ring queue thread (used from that thread only)."""

    cpu_of_qid: list[int]  # possible CPU id of each ring queue
    allowed: set[int]  # what the process may use; "roaming" means all of it
    apply: Callable[[set[int]], None] = field(default=lambda cpus: os.sched_setaffinity(0, cpus))
    batch: float = 1.0
    mixed: float = 0.0
    pinned_to: int | None = None
    changes: int = 0
    _last: tuple[int, int] = (-1, -1)  # (qid, pid) of the last request
    _same: int = 0  # wakeups in a row whose last request came from _last
    _same_pid: int = 0  # wakeups in a row from _last's task, on any CPU
    _alone: int = 0  # the same, counted since the load was last forgotten

    @property
    def synchronous(self) -> bool:
        """One task sends one request at a time (wherever it runs): the
        thread should poll before it sleeps (polling.py)."""
        return self.batch < SINGLE and self._same_pid >= SAME_SOURCE

    @property
    def alone(self) -> bool:
        """Synchronous for long enough that no other client is about."""
        return self.batch < SINGLE and self._alone >= ALONE

    @property
    def concurrent(self) -> bool:
        """Requests in batches, or from tasks that take turns."""
        return self.batch > BATCHED or self.mixed > MIXED

    def forget_load(self) -> None:
        """Ring queues changed threads (sharing.py): judge whether the load
        is concurrent or one client alone afresh.  Pinning and polling keep
        their evidence: the client did not change."""
        self.batch, self.mixed, self._alone = 1.0, 0.0, 0

    def observe(self, requests: int, qid: int, pid: int, first_pid: int | None = None) -> None:
        """One wakeup brought `requests` requests; the first one came from
        task `first_pid` (default: `pid`), the last one from task `pid` on
        the CPU of ring queue `qid`."""
        if requests <= 0:
            return
        self.batch += WEIGHT * (requests - self.batch)
        last_qid, last_pid = self._last
        first = pid if first_pid is None else first_pid
        self.mixed += WEIGHT * ((first != last_pid or pid != first) - self.mixed)
        self._same_pid = self._same_pid + 1 if pid == last_pid else 0
        self._alone = self._alone + 1 if pid == last_pid else 0
        self._same = self._same + 1 if qid == last_qid and pid == last_pid else 0
        self._last = (qid, pid)
        # Wakeups in a row from one task on one CPU: a synchronous client,
        # followed once it has stayed on another CPU as long (a client that
        # hops between CPUs would otherwise re-pin the thread at every hop).
        # Several clients, even on one CPU, keep the thread roaming: pinned
        # beside them it would compete with them for that CPU while another
        # idles.
        cpu = self.cpu_of_qid[qid]
        if self.batch < SINGLE and self._same >= SAME_SOURCE and cpu in self.allowed:
            if self.pinned_to != cpu:
                self._set({cpu})
                self.pinned_to = cpu
        elif self.pinned_to is not None and (self.batch > BATCHED or not self.synchronous):
            self._set(self.allowed)
            self.pinned_to = None

    def _set(self, cpus: set[int]) -> None:
        self.changes += 1
        try:
            self.apply(cpus)
        except OSError:
            # A CPU went offline meanwhile: stay where we are.
            pass
