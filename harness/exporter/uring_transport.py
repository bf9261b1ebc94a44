"""FUSE-over-io_uring: a queue thread that serves its ring queues.

Each queue thread owns one io_uring and registers, from its own thread, the
entries of the ring queues (qids) it owns, or with shared ring queues
(sharing.py) entries on every ring queue.  An entry is a 288-byte
fuse_uring_req_header plus a payload buffer.  A request arrives as the CQE
of the entry's REGISTER or COMMIT_AND_FETCH; the reply is written into the
same entry (out header in in_out, all arguments in the payload) and goes
back with COMMIT_AND_FETCH, which also fetches the next request.

Every wakeup submits all prepared commits in one io_uring_enter and handles
every available CQE.  FUSE_INTERRUPT and FORGET still come on /dev/fuse, so
the queue that holds the session fd polls it on the same ring.  Shared, an
entry can change threads: the COMMIT_AND_FETCH of another thread's ring
takes it over.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import mmap
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..kernel import abi
from ..kernel.errnos import errno_name
from ..kernel.ring import (
    IORING_OP_URING_CMD,
    IORING_SETUP_DEFER_TASKRUN,
    IORING_SETUP_SINGLE_ISSUER,
    Ring,
    uring_cmd_sqe,
)
from ..layout import possible_cpu_ids
from .affinity import FollowClient
from .faults import FaultInjector
from .polling import AdaptivePoll
from .protocol import ExportHandler, Request
from .sharing import RingSharing
from .transport import DEFERRED, ConnectionGone, DevFuseChannel, Queue

# user_data of the two polls; entries use their index.
_WAKE = 1 << 62
_DEV = _WAKE + 1
REGISTER_RETRIES = 100
COLLECT_TIMEOUT = 2.0
# Shared ring queues: how long a thread waits for the others to register
# their entries before it registers those of its home ring queues.
REGISTER_ORDER_TIMEOUT = 5.0  # below the exporter's READY_TIMEOUT
# A whole FUSE uring command SQE in one pack: the hot path.
_CMD_SQE = uring_cmd_sqe(abi.URING_CMD_REQ)
_COMMIT = abi.FUSE_IO_URING_CMD_COMMIT_AND_FETCH
_OUT_HEADER_SIZE = abi.OUT_HEADER.size


class RingHalted(Exception):
    """The ring failed in a way the seed treats as fatal."""


@dataclass(eq=False)
class Entry:
    index: int
    qid: int
    header: memoryview  # 288 bytes
    payload: memoryview
    iov_addr: int
    # The command last sent for it, to resubmit after EINTR/EAGAIN.
    last_cmd: int = abi.FUSE_IO_URING_CMD_REGISTER
    commit_id: int = 0
    retries: int = 0
    in_kernel: bool = False  # submitted, its CQE not seen yet


def entry_size(payload_size: int) -> int:
    """Bytes per ring entry: the request header, then the payload, 64-aligned."""
    stride = abi.URING_HEADER_SIZE + payload_size
    return stride + -stride % 64


def ring_entries(entries: int) -> int:
    """SQ size for a queue thread's ring entries, its POLL_ADDs and a spare."""
    return 1 << max(2, (entries + 2 - 1).bit_length())


class RingQueue(Queue):
    kind = "io-uring"

    def __init__(
        self,
        index: int,
        fd: int,
        qids: list[int],
        depth: int,
        handler: ExportHandler,
        faults: FaultInjector,
        stopping: threading.Event,
        poll_dev: bool,
        conn_gone: threading.Event,
        sharing: RingSharing | None = None,
    ) -> None:
        super().__init__(index, handler, faults, stopping)
        self.fd = fd
        self.qids = qids
        self.depth = depth
        self.poll_dev = poll_dev
        self.payload_size = handler.config.payload_size
        self.dev_per_op: dict[str, int] = {}
        # Shared by all queues, set by whichever sees the connection go
        # first: then every queue collects its entries' -ENOTCONN (bounded)
        # before it stops, so the exporter can report them all.
        self.conn_gone = conn_gone
        self._collect_deadline: float | None = None
        self.ended_enotconn = 0
        # Indexed by user_data; a slot is None once its entry went to
        # another thread (shared ring queues), and is reused.
        self.entries: list[Entry | None] = []
        self._free_slots: list[int] = []
        self.served = dict.fromkeys(qids, 0)  # requests per ring queue
        self.ring: Ring | None = None
        self._channel: DevFuseChannel | None = None
        self.affinity = FollowClient(possible_cpu_ids(), os.sched_getaffinity(0))
        self.poll = AdaptivePoll()
        # Shared ring queues: the other threads, the entries they hand over.
        self.sharing = sharing
        self.peers: list[RingQueue] = []
        self._handed: collections.deque[Entry] = collections.deque()
        self.adopted = 0

    # -- set-up (in the queue thread) -------------------------------------

    def _allocate(self) -> None:
        n = len(self.qids) * self.depth
        header = abi.URING_HEADER_SIZE
        stride = entry_size(self.payload_size)
        self._mem = mmap.mmap(-1, max(1, n * stride))
        self._iovs = bytearray(max(1, n) * abi.URING_IOVEC2.size)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        iov_base = ctypes.addressof(ctypes.c_char.from_buffer(self._iovs))
        view = memoryview(self._mem)
        for i in range(n):
            off = i * stride
            abi.URING_IOVEC2.pack_into(
                self._iovs, i * 16 * 2, base + off, header, base + off + header, self.payload_size
            )
            self.entries.append(
                Entry(
                    i,
                    self.qids[i // self.depth],
                    view[off : off + header],
                    view[off + header : off + header + self.payload_size],
                    iov_base + i * 32,
                )
            )

    def _submit_cmd(self, e: Entry, cmd: int) -> None:
        assert self.ring is not None
        e.last_cmd = cmd
        e.in_kernel = True
        addr, length = (e.iov_addr, 2) if cmd == abi.FUSE_IO_URING_CMD_REGISTER else (0, 0)
        _CMD_SQE.pack_into(
            self.ring.sqes, self.ring.claim_sqe(),
            IORING_OP_URING_CMD, 0, 0, self.fd, cmd, 0, addr, length, 0, e.index,
            0, e.commit_id, e.qid,
        )  # fmt: skip

    def _commit(self, e: Entry, unique: int, result: int) -> None:
        """Write the reply into entry e and queue its COMMIT_AND_FETCH."""
        n = result if result > 0 else 0
        abi.URING_REPLY.pack_into(
            e.header, 0, _OUT_HEADER_SIZE + n, result if result < 0 else 0, unique,
            0, e.commit_id, n, 0, 0,
        )  # fmt: skip
        if self.sharing is not None:
            owner = self.sharing.owner[e.qid]
            # Its ring queue went to another thread: so does the entry,
            # unless that thread is held by a stall and would hold the reply.
            if owner != self.index and not self.peers[owner].stalled:
                self.entries[e.index] = None
                self._free_slots.append(e.index)
                self.peers[owner].adopt(e)
                return
        self._submit_cmd(e, _COMMIT)

    # -- serving ------------------------------------------------------------

    def serve(self) -> None:
        try:
            self._allocate()
            # Shared, the ring may come to hold every thread's entries: an
            # entry goes where its ring queue goes (sharing.py).
            size = len(self.entries) * (len(self.peers) if self.sharing else 1)
            # Task work (each request's completion) runs only when this
            # thread asks for completions, not as an interrupt of whatever it
            # is doing: the kernel's recommended mode for one issuer thread.
            self.ring = Ring(
                ring_entries(size),
                setup_flags=IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
            )
            self._register()
            self.ring.prep_poll_add(self.wake_fd, select.POLLIN, _WAKE)
            if self.poll_dev:
                self._channel = DevFuseChannel(self.fd, self.payload_size)
                self.ring.prep_poll_add(self.fd, select.POLLIN, _DEV)
            # REGISTER runs inline in io_uring_enter: once submitted, every
            # entry waits in the kernel.
            self.ring.submit()
            self.started.set()
            self._loop()
        finally:
            # Closing the ring cancels the pending commands (the kernel
            # completes them with -ENOTCONN, unseen); then our fd goes.
            if self.sharing is not None:
                self.sharing.registered.abort()  # a thread that failed frees the others
            if self.ring is not None:
                self.ring.close()
            os.close(self.fd)
            self.fd = -1

    def _register(self) -> None:
        """REGISTER every entry.  Shared, the entries of a thread's home ring
        queues go last, after every thread registered the others: the kernel
        hands a request to the entry that was registered or committed last,
        so each CPU's requests go to its home thread first."""
        assert self.ring is not None
        sharing = self.sharing
        entries = [e for e in self.entries if e is not None]
        if sharing is None:
            first, last = entries, []
        else:
            last = [e for e in entries if sharing.home(e.qid) == self.index]
            first = [e for e in entries if sharing.home(e.qid) != self.index]
        for e in first:
            self._submit_cmd(e, abi.FUSE_IO_URING_CMD_REGISTER)
        if sharing is not None:
            self.ring.submit()
            try:
                sharing.registered.wait(REGISTER_ORDER_TIMEOUT)
            except threading.BrokenBarrierError:
                raise RingHalted("another queue thread did not register its entries") from None
        for e in last:
            self._submit_cmd(e, abi.FUSE_IO_URING_CMD_REGISTER)

    def adopt(self, e: Entry) -> None:
        """From another thread: commit entry e (its reply is written) from
        this thread's ring, which makes the entry ours."""
        self._handed.append(e)
        self.wake()

    def _commit_handed(self) -> None:
        while self._handed:
            e = self._handed.popleft()
            if self._free_slots:
                e.index = self._free_slots.pop()
                self.entries[e.index] = e
            else:
                e.index = len(self.entries)
                self.entries.append(e)
            self.adopted += 1
            self._submit_cmd(e, _COMMIT)

    def _loop(self) -> None:
        ring = self.ring
        assert ring is not None
        entries, affinity, sharing = self.entries, self.affinity, self.sharing
        version = 0  # of the ring queue owners, when this thread last looked
        asked: tuple[bool, bool] | None = None  # the load rebalance last saw
        while not self.stopping.is_set() or self._collecting():
            if affinity.synchronous:
                self._poll_then_wait(ring)
            else:
                ring.submit_and_wait(1)
            requests, qid, pid, first = 0, 0, 0, 0
            for user_data, res, _ in ring.reap():
                if user_data < _WAKE:
                    e = entries[user_data]
                    assert e is not None
                    pid = self._entry_done(e, res)
                    if not requests:
                        first = pid
                    requests, qid = requests + 1, e.qid
                elif user_data == _WAKE:
                    self.drain_wake_fd()
                    self.run_ready()
                    self._commit_handed()
                    ring.prep_poll_add(self.wake_fd, select.POLLIN, _WAKE)
                else:
                    self._dev_ready(res)
                if self.stopping.is_set() and not self._collecting():
                    return
            affinity.observe(requests, qid, pid, first)
            if sharing is not None and requests:
                if sharing.version != version:
                    # Ring queues moved (here or elsewhere): what this
                    # thread saw before says nothing about its load now.
                    version, asked = sharing.version, None
                    affinity.forget_load()
                load = (affinity.alone, affinity.concurrent)
                if load != asked:
                    asked = load
                    sharing.rebalance(self.index, *load)

    def _poll_then_wait(self, ring: Ring) -> None:
        """Wait for a CQE, serving a synchronous client: poll the ring for
        the adaptive window first (polling.py), then sleep."""
        poll = self.poll
        start = time.monotonic_ns()
        if poll.window_ns:
            deadline = start + poll.window_ns
            while True:
                # Submits the commits; with DEFER_TASKRUN it also runs the
                # task work that turns an arrived request into a CQE.
                ring.submit_and_wait(0)
                if ring.cq_ready():
                    poll.caught += 1
                    return
                if time.monotonic_ns() >= deadline:
                    break
        ring.submit_and_wait(1)
        poll.slept(time.monotonic_ns() - start)

    def _collecting(self) -> bool:
        """Unmounted: the kernel completes every entry with -ENOTCONN at once
        (about 1 ms on 6.18); COLLECT_TIMEOUT bounds it all the same."""
        if not self.conn_gone.is_set():
            return False
        if self._collect_deadline is None:
            self._collect_deadline = time.monotonic() + COLLECT_TIMEOUT
        if time.monotonic() > self._collect_deadline:
            return False
        return any(e is not None and e.in_kernel for e in self.entries)

    def _entry_done(self, e: Entry, res: int) -> int:
        """Serve the request that completed entry e; its task's pid (0: none)."""
        e.in_kernel = False
        if res < 0:
            self._entry_failed(e, -res)
            return 0
        e.retries = 0
        hdr = e.header
        (_, opcode, unique, nodeid, uid, gid, pid, _, _,
         _, commit_id, payload_sz, _, _) = abi.URING_REQUEST.unpack_from(hdr)  # fmt: skip
        if commit_id == 0:
            raise RingHalted(f"request on qid {e.qid} has commit_id 0")
        e.commit_id = commit_id
        self.served[e.qid] += 1
        # Views of the entry's own buffers: no copy, valid until the commit.
        op_in = hdr[abi.URING_OP_IN_OFFSET : abi.URING_ENT_IN_OUT_OFFSET]
        req = Request(opcode, unique, nodeid, uid, gid, pid, op_in, e.payload[:payload_sz])
        result = self.dispatch(req, e.payload, e)
        if result is DEFERRED:
            return pid  # the entry stays ours until the request is released
        # A ring request always gets a commit, also one that wants no reply.
        self._commit(e, unique, result or 0)  # type: ignore[arg-type]
        return pid

    def _entry_failed(self, e: Entry, err: int) -> None:
        if err == errno.ENOTCONN:
            self.ended_enotconn += 1
            self.conn_gone.set()
            if not self._collecting():
                raise ConnectionGone
            return
        if err in (errno.EINTR, errno.EAGAIN) and e.retries < REGISTER_RETRIES:
            e.retries += 1
            self._submit_cmd(e, e.last_cmd)
            return
        name = abi.URING_CMD_NAMES[e.last_cmd]
        raise RingHalted(f"{name} on qid {e.qid} failed: {errno_name(err)}: {os.strerror(err)}")

    def reply(self, unique: int, result: int, token: Any) -> None:
        if token is None:  # it came on /dev/fuse
            assert self._channel is not None
            self._channel.reply(unique, result)
            return
        self._commit(token, unique, result)

    def out_buffer(self, token: Any) -> memoryview:
        if token is None:
            assert self._channel is not None
            return self._channel.out
        e: Entry = token
        return e.payload

    def _dev_ready(self, res: int) -> None:
        """/dev/fuse after INIT: only INTERRUPT and FORGET are expected."""
        assert self.ring is not None and self._channel is not None
        if res < 0 or res & (select.POLLERR | select.POLLHUP):
            self.conn_gone.set()
            if not self._collecting():
                raise ConnectionGone
            return
        self.drain_channel(self._channel, self.dev_per_op)
        self.ring.prep_poll_add(self.fd, select.POLLIN, _DEV)

    def held(self) -> int:
        """Entries this thread serves now."""
        return sum(e is not None for e in self.entries)

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["ring-queues"] = [{"qid": q, "requests": n} for q, n in self.served.items()]
        if self.sharing is not None:
            s["entries-held"] = self.held()
            s["entries-adopted"] = self.adopted
        s["affinity-changes"] = self.affinity.changes
        s["poll"] = self.poll.as_dict()
        return s
