"""Shared ring queues: which queue thread serves each CPU's requests.

With --share-ring-queues every queue thread registers entries on every ring
queue.  The kernel hands a request to the available entry that came back
last (fuse_uring_ent_avail() puts it first in ent_avail_queue), so whoever
registered or committed last on a ring queue serves it.  And an entry can
change threads: COMMIT_AND_FETCH makes the committing command the entry's
(fuse_uring_commit_fetch() sets ent->cmd), so when another thread's ring
commits a reply, the entry's next request completes on that ring.  A
thread moves a ring queue by handing each entry that brings one of its
requests, reply written, to the new owner to commit.

Two loads want different owners (tools/bench --profile, 2 vCPUs):

- one synchronous client (a request at a time, hopping between CPUs as the
  scheduler likes) is served best by each CPU's home thread, pinned next to
  it (affinity.py): a same-CPU switch per request, no cross-CPU wakeup;
- concurrent requests (several clients, or a deep queue) are served best
  by one thread, the leader: two busy Python threads hand the GIL back and
  forth, with a futex wake and a switch each time.

So the home threads register last and start with their CPUs' requests; a
thread that sees concurrent load moves its ring queues to the leader (the
leader pulls them all), and a synchronous client alone at the leader for a
while sends them home.  After any move every thread judges its load afresh.
Sans-IO: the queue threads report what they see and move the entries;
this decides.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..layout import owner_of

LEADER = 0


@dataclass
class RingSharing:
    """The owners of an export's ring queues, shared by its queue threads."""

    queues: int
    ring_queues: int
    owner: list[int] = field(init=False)  # per ring queue: the thread that serves it
    # Passed by every thread once it has registered its entries on other
    # threads' home ring queues: home entries go last (uring_transport.py).
    registered: threading.Barrier = field(init=False)
    version: int = 0  # owner changes so far
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.owner = [self.home(qid) for qid in range(self.ring_queues)]
        self.registered = threading.Barrier(self.queues)

    def home(self, qid: int) -> int:
        """The thread that serves ring queue qid at start-up (QEMU's k mod N)."""
        return owner_of(qid, self.queues)

    def rebalance(self, me: int, alone: bool, concurrent: bool) -> list[int]:
        """Thread `me`'s FollowClient classified its load: the ring queues
        whose owner changes now.  Concurrent load gathers every ring queue
        at the leader (it pulls them, the others push theirs); a synchronous
        client alone at the leader sends them home."""
        with self._lock:
            if concurrent:
                moves = [
                    (qid, LEADER)
                    for qid, owner in enumerate(self.owner)
                    if owner != LEADER and me in (owner, LEADER)
                ]
            elif alone and me == LEADER:
                moves = [
                    (qid, self.home(qid))
                    for qid, owner in enumerate(self.owner)
                    if owner == LEADER != self.home(qid)
                ]
            else:
                return []
            for qid, to in moves:
                self.owner[qid] = to
            self.version += len(moves)
            return [qid for qid, _ in moves]
