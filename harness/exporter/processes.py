"""Queue processes (--queue-processes): each io_uring queue in a process.

Queue threads share one GIL, so two ring threads never run Python at once,
and they hand the GIL over on every request (README, "Where the time goes").
With this option the exporter forks one process per queue after FUSE_INIT.
A child registers its ring queues' entries in its own io_uring and serves
READ, WRITE, FLUSH and FSYNC itself.  Everything else, and every request
while any fault rule is set, it forwards to the exporter: there a
QueueProcess runs it through fault injection and the handler and sends the
reply back, which the child commits.  So the attributes, resizes and fault
rules live in one process, and hold/release, stalls and interrupts work as
with threads.  What a child reads of them, the image size and whether any
rule is set, is in a page shared with it.

The link between them is a socketpair with one pickled tuple per message:

  child -> exporter   ("started",), ("request", token, opcode, unique,
                      nodeid, uid, gid, pid, arg, data), ("stats", dict),
                      ("ended", dict)
  exporter -> child   ("reply", token, unique, result, data), ("stats",),
                      ("stop",)

A token is a ring entry's index, or -1 for a request read from /dev/fuse.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import pickle
import queue
import select
import signal
import socket
import struct
import sys
import threading
from typing import Any, NoReturn

from ..kernel import abi
from ..kernel.abi import Op
from ..kernel.libc import die_with_parent
from .faults import Deferred, FaultInjector
from .protocol import Reply, Request
from .transport import DEFERRED, ConnectionGone, Queue, _Deferred
from .uring_transport import RingHalted, RingQueue

# What a child serves itself: data, with no state but the image size.
LOCAL_OPS = frozenset({Op.READ, Op.WRITE, Op.FLUSH, Op.FSYNC})
_DEV = -1  # token of a request that came on /dev/fuse
STATS_TIMEOUT = 2.0
REAP_TIMEOUT = 2.0
_LEN = struct.Struct("<I")


class SharedState:
    """One page shared with the queue processes, written by the exporter
    only: how many fault rules are set, and the image size."""

    def __init__(self, size: int) -> None:
        self._mem = mmap.mmap(-1, mmap.PAGESIZE)  # MAP_SHARED: survives fork
        self.rules = ctypes.c_int64.from_buffer(self._mem, 0)
        self.size = ctypes.c_int64.from_buffer(self._mem, 8)
        self.size.value = size

    def set_rules(self, n: int) -> None:
        self.rules.value = n


class Link:
    """One end of the socketpair: whole messages, sent from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, msg: tuple[Any, ...]) -> None:
        data = pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.sock.sendall(_LEN.pack(len(data)) + data)

    def recv(self) -> tuple[Any, ...] | None:
        """The next message; None at EOF (the other end is gone)."""
        head = self._recv_exact(_LEN.size)
        if head is None:
            return None
        body = self._recv_exact(_LEN.unpack(head)[0])
        return None if body is None else pickle.loads(body)

    def _recv_exact(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)


def pair() -> tuple[Link, Link]:
    """(the exporter's end, the child's end)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Link(a), Link(b)


# -- the child --------------------------------------------------------------


class ChildRingQueue(RingQueue):
    """A RingQueue in a process of its own: serves data requests, forwards
    the rest to the exporter and commits the replies that come back."""

    def __init__(self, *args: Any, link: Link, shared: SharedState, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.link = link
        self.shared = shared
        self._replies: collections.deque[tuple[int, int, int | None]] = collections.deque()

    def dispatch(self, req: Request, out: memoryview, token: Any = None) -> Reply | _Deferred:
        self.requests += 1
        op = req.opcode
        if op < 64:
            self.per_op[op] += 1
        shared = self.shared
        if not shared.rules.value and op in LOCAL_OPS:
            size = shared.size.value
            # A write past the end may grow the image: the exporter's job.
            if op != Op.WRITE or sum(abi.WRITE_IN.unpack_from(req.arg)[1:3]) <= size:
                self.handler.backend.size = size
                return self.handler.handle(req, out)
        self.link.send(
            ("request", _DEV if token is None else token.index, op, req.unique, req.nodeid,
             req.uid, req.gid, req.pid, bytes(req.arg), bytes(req.data))
        )  # fmt: skip
        return DEFERRED

    def _loop(self) -> None:
        self.link.send(("started",))  # every entry is registered
        super()._loop()

    def run_ready(self) -> None:
        super().run_ready()
        while self._replies:
            token, unique, result = self._replies.popleft()
            if token == _DEV:
                if result is not None:
                    assert self._channel is not None
                    self._channel.reply(unique, result)
                continue
            e = self.entries[token]
            assert e is not None
            self._commit(e, unique, result or 0)  # an entry always gets its commit

    def listen(self) -> None:
        """The child's second thread: messages from the exporter.  It sleeps
        in recv(), so it takes the GIL only when the exporter writes."""
        while True:
            msg = self.link.recv()
            if msg is None or msg[0] == "stop":
                self.stopping.set()
                self.wake()
                return
            if msg[0] == "reply":
                _, token, unique, result, data = msg
                if data:
                    # The entry is ours (not in the kernel) until it is committed.
                    e = self.entries[token]
                    assert e is not None
                    e.payload[: len(data)] = data
                self._replies.append((token, unique, result))
                self.wake()
            elif msg[0] == "stats":
                self.link.send(("stats", self.report()))

    def report(self) -> dict[str, Any]:
        return {"stats": self.stats(), "dev-per-op": dict(self.dev_per_op)}


def run_child(q: ChildRingQueue, parent: int, fds: list[int], links: list[Link]) -> NoReturn:
    """The forked child: serve q until told to stop or unmounted, then exit.
    fds and links are the other queues' and the exporter's: closed here."""
    die_with_parent(signal.SIGKILL, parent)  # also when the exporter is SIGKILLed
    # The exporter handles signals and stops its children in order.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    for fd in fds:
        os.close(fd)
    for link in links:
        link.sock.close()
    threading.Thread(target=q.listen, name=f"queue{q.index}-link", daemon=True).start()
    ended: dict[str, Any] = {"error": None, "conn-gone": False}
    try:
        q.serve()
    except ConnectionGone:
        ended["conn-gone"] = True
    except RingHalted as e:
        ended["error"] = str(e)
    except Exception as e:  # one line for the user, never a traceback
        ended["error"] = f"{type(e).__name__}: {e}"
    ended["enotconn"] = q.ended_enotconn
    ended["held"] = q.held()
    ended.update(q.report())
    status = 0
    try:
        q.link.send(("ended", ended))
    except OSError:
        status = 1  # the exporter is gone
    sys.stderr.flush()
    os._exit(status)


# -- the exporter's side ----------------------------------------------------


class QueueProcess(Queue):
    """Stands for a queue process in the exporter: its serve() reads the
    link and runs what the child forwards; while fault rules are set a
    second thread runs them, in order, so that a stall blocks that thread
    (as it blocks a queue thread) and not the link.  stats() asks the child."""

    kind = "io-uring"

    def __init__(
        self,
        child: ChildRingQueue,
        pid: int,
        link: Link,
        faults: FaultInjector,
        conn_gone: threading.Event,
    ) -> None:
        super().__init__(child.index, child.handler, faults, child.stopping)
        self.pid = pid
        self.link = link
        self.shared = child.shared
        self.qids = child.qids
        self.depth = child.depth
        self.payload_size = child.payload_size
        self.conn_gone = conn_gone
        self.dev_per_op: dict[str, int] = {}
        self.ended_enotconn = 0
        self._held = 0
        self._report: dict[str, Any] = {"stats": super().stats(), "dev-per-op": {}}
        self._report_ready = threading.Event()
        self._stats_lock = threading.Lock()
        self._stop_sent = False
        self._ended: dict[str, Any] | None = None
        self._work: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()

    # -- serving --------------------------------------------------------------

    def serve(self) -> None:
        worker = threading.Thread(target=self._run_forwarded, name=f"queue{self.index}-fwd")
        worker.daemon = True
        worker.start()
        try:
            while (msg := self.link.recv()) is not None:
                kind = msg[0]
                if kind == "request":
                    if self.faults.rules or not self._work.empty():
                        self._work.put(msg)  # a stall must not block this thread
                    else:
                        self._run(msg)
                elif kind == "started":
                    self.started.set()
                elif kind == "stats":
                    self._take_report(msg[1])
                    self._report_ready.set()
                elif kind == "ended":
                    self._ended = msg[1]
                    self._take_report(msg[1])
        finally:
            self._work.put(None)
            self._reap()
        ended = self._ended
        if ended is None:
            raise RingHalted(f"queue process {self.pid} ended without a word")
        self.ended_enotconn, self._held = ended["enotconn"], ended["held"]
        if ended["error"]:
            raise RingHalted(ended["error"])
        if ended["conn-gone"]:
            self.conn_gone.set()
            raise ConnectionGone

    def _run_forwarded(self) -> None:
        while (msg := self._work.get()) is not None:
            self._run(msg)

    def _run(self, msg: tuple[Any, ...]) -> None:
        _, token, opcode, unique, nodeid, uid, gid, pid, arg, data = msg
        req = Request(opcode, unique, nodeid, uid, gid, pid, arg, data)
        out = memoryview(bytearray(self.payload_size))
        result = self.apply(req, out, (token, out))
        if result is not DEFERRED:
            self.reply(unique, result, (token, out))  # type: ignore[arg-type]

    def reply(self, unique: int, result: int | None, token: Any) -> None:
        child_token, out = token
        # Whatever the handler did to the size, the children see it first.
        self.shared.size.value = self.handler.backend.size
        data = bytes(out[:result]) if result is not None and result > 0 else b""
        try:
            self.link.send(("reply", child_token, unique, result, data))
        except OSError:
            pass  # the child is gone; serve() reports it

    def out_buffer(self, token: Any) -> memoryview:
        out: memoryview = token[1]
        return out

    def post(self, d: Deferred) -> None:
        """A released request: answer it now, from the releasing thread
        (the child, not this process, owns the ring)."""
        self.finish(d)

    def finish(self, d: Deferred) -> None:
        out = self.out_buffer(d.token)
        result = d.result if d.result is not None else self.handler.handle(d.req, out)
        self.reply(d.req.unique, result, d.token)  # None too: the child commits the entry

    # -- control ----------------------------------------------------------

    def wake(self) -> None:
        """The exporter stops: tell the child, once."""
        if self.stopping.is_set() and not self._stop_sent:
            self._stop_sent = True
            try:
                self.link.send(("stop",))
            except OSError:
                pass

    def stats(self) -> dict[str, Any]:
        """The child's own figures (asked for now, or its last), with this
        side's stall."""
        if self._ended is None:
            with self._stats_lock:
                self._report_ready.clear()
                try:
                    self.link.send(("stats",))
                    self._report_ready.wait(STATS_TIMEOUT)
                except OSError:
                    pass
        s = dict(self._report["stats"])
        s["stalled"] = self.stalled
        s["process"] = self.pid
        return s

    def held(self) -> int:
        return self._held

    def _take_report(self, report: dict[str, Any]) -> None:
        self._report = {"stats": report["stats"], "dev-per-op": report["dev-per-op"]}
        self.dev_per_op = report["dev-per-op"]

    def _reap(self) -> None:
        """Wait for the child (bounded), then SIGKILL it; never leave it."""
        fd = os.pidfd_open(self.pid)
        try:
            if not select.select([fd], [], [], REAP_TIMEOUT)[0]:
                print(f"export: queue process {self.pid} did not exit; killed", file=sys.stderr)
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)
        os.waitpid(self.pid, 0)
