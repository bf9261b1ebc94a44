"""Queue processes (--queue-processes): each io_uring queue in a process.

Queue threads share one GIL, so two ring threads never run Python at once,
and they hand the GIL over on every request (docs/bench.md, "Where the time goes").
With this option the exporter forks one process per queue after FUSE_INIT.
A child registers its ring queues' entries in its own io_uring and serves
READ, WRITE, FLUSH and FSYNC itself.  Everything else, and every request
while any fault rule is set, it forwards to the exporter: there a
QueueProcess runs it through fault injection and the handler and sends the
reply back, which the child commits.  So the attributes, resizes and fault
rules live in one process, and hold/release, stalls and interrupts work as
with threads.  What a child reads of them, the image size and whether any
rule is set, is in a page shared with it, which only the exporter writes.

The link between them is a socketpair with one pickled tuple per message:

  child -> exporter   ("started",), ("request", token, opcode, unique,
                      nodeid, uid, gid, pid, arg, data), ("stats", seq,
                      dict), ("ended", dict)
  exporter -> child   ("reply", token, unique, result, data), ("stats", seq),
                      ("stop", unmounted)

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
# A peer that stops reading must not block a sender for good (teardown).
SEND_TIMEOUT = 5.0
_LEN = struct.Struct("<I")
_TIMEVAL = struct.Struct("@ll")


class SharedState:
    """One page shared with the queue processes, written by the exporter
    only: how many fault rules are set, and the image size (the backend
    keeps it there, Backend.keep_size_in)."""

    def __init__(self) -> None:
        self._mem = mmap.mmap(-1, mmap.PAGESIZE)  # MAP_SHARED: survives fork
        self.rules = ctypes.c_int64.from_buffer(self._mem, 0)
        self.size = ctypes.c_int64.from_buffer(self._mem, 8)

    def set_rules(self, n: int) -> None:
        self.rules.value = n


class Link:
    """One end of the socketpair: whole messages, sent from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(int(SEND_TIMEOUT), 0))
        self._send_lock = threading.Lock()

    def send(self, msg: tuple[Any, ...]) -> None:
        """Raises OSError when the peer is gone or reads nothing for SEND_TIMEOUT."""
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
        # Replies to forwarded requests, for the ring thread to send.
        self._replies: collections.deque[tuple[int, int, int | None, bytes]] = collections.deque()

    def apply(self, req: Request, out: memoryview, token: Any = None) -> Reply | _Deferred:
        """Serve a data request here; forward the rest (counted by dispatch())."""
        op = req.opcode
        shared = self.shared
        # A write past the end may grow the image: the exporter's job.
        if (
            not shared.rules.value
            and op in LOCAL_OPS
            and (op != Op.WRITE or sum(abi.WRITE_IN.unpack_from(req.arg)[1:3]) <= shared.size.value)
        ):
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
            index, unique, result, data = self._replies.popleft()
            token = None if index == _DEV else self.entries[index]
            self.out_buffer(token)[: len(data)] = data
            # An entry always gets its commit, also for a request with no reply.
            self.answer(unique, result if token is None else result or 0, token)

    def listen(self) -> None:
        """The child's second thread: messages from the exporter.  It sleeps
        in recv(), so it takes the GIL only when the exporter writes."""
        while True:
            msg = self.link.recv()
            if msg is None or msg[0] == "stop":
                if msg is not None and msg[1]:
                    # Unmounted: collect every entry's ENOTCONN before stopping.
                    self.conn_gone.set()
                self.stopping.set()
                self.wake()
                return
            if msg[0] == "reply":
                self._replies.append(msg[1:])  # (token, unique, result, data)
                self.wake()
            elif msg[0] == "stats":
                self.link.send(("stats", msg[1], self.report()))

    def report(self) -> dict[str, Any]:
        return {"stats": self.stats(), "dev-per-op": dict(self.dev_per_op)}


def run_child(q: ChildRingQueue, parent: int, fds: list[int], links: list[Link]) -> NoReturn:
    """The forked child: serve q until told to stop or unmounted, then exit,
    whatever happens: nothing may return into the exporter's code.  fds and
    links are the exporter's and the other queues': closed here."""
    status = 1
    try:
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
        ended |= {"enotconn": q.ended_enotconn, "held": q.held(), **q.report()}
        q.link.send(("ended", ended))
        status = 0
    except BaseException as e:
        print(f"export: queue process {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        sys.stderr.flush()
        os._exit(status)


# -- the exporter's side ----------------------------------------------------


class QueueProcess(Queue):
    """Stands for a queue process in the exporter.  serve() reads the link
    and runs what the child forwards.  While fault rules are set, or earlier
    ones are still queued, a second thread runs them in order, with the
    requests that fault injection releases: a stall then blocks that thread,
    as it blocks a queue thread, and never the link.  stats() asks the child."""

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
        self.qids = child.qids
        self.depth = child.depth
        self.payload_size = child.payload_size
        self.conn_gone = conn_gone
        self.dev_per_op: dict[str, int] = {}
        self.ended_enotconn = 0
        self.lost = False  # ended without a word, or killed: exit status 1
        self._held = 0
        self._stats: dict[str, Any] = super().stats()
        self._stats_seq = 0
        self._stats_ready = threading.Event()
        self._stats_lock = threading.Lock()
        self._stop_sent = False
        self._ended: dict[str, Any] | None = None
        # Work for the second thread: forwarded messages and released requests.
        self._work: queue.SimpleQueue[tuple[Any, ...] | Deferred | None] = queue.SimpleQueue()
        self._queued = 0  # put and not finished; under _queued_lock
        self._queued_lock = threading.Lock()

    # -- serving --------------------------------------------------------------

    def serve(self) -> None:
        worker = threading.Thread(target=self._work_loop, name=f"queue{self.index}-fwd")
        worker.daemon = True
        worker.start()
        try:
            while (msg := self.link.recv()) is not None:
                kind = msg[0]
                if kind == "request":
                    self._forwarded(msg)
                elif kind == "started":
                    self.started.set()
                elif kind == "stats":
                    self._take_stats(msg[2])
                    if msg[1] == self._stats_seq:
                        self._stats_ready.set()
                elif kind == "ended":
                    self._ended = msg[1]
                    self._take_stats(msg[1])
        finally:
            self._work.put(None)
            # The worker may be in the handler (a stall released by the
            # teardown): done before the exporter closes the image.
            worker.join(REAP_TIMEOUT)
            self._reap()
        ended = self._ended
        if ended is None:
            self.lost = True
            raise RingHalted(f"queue process {self.pid} ended without a word")
        self.ended_enotconn, self._held = ended["enotconn"], ended["held"]
        if ended["error"]:
            raise RingHalted(ended["error"])
        if ended["conn-gone"]:
            self.conn_gone.set()
            raise ConnectionGone

    def _forwarded(self, msg: tuple[Any, ...]) -> None:
        """Run it here, without fault injection, if no rule is set and
        nothing waits for the second thread; else queue it there."""
        with self._queued_lock:
            inline = not self.faults.rules and not self._queued
            if not inline:
                self._queued += 1
                self._work.put(msg)
        if inline:
            self._run(msg, faults=False)

    def _work_loop(self) -> None:
        while (item := self._work.get()) is not None:
            try:
                if isinstance(item, Deferred):
                    self.finish(item)
                else:
                    self._run(item, faults=True)
            finally:
                with self._queued_lock:
                    self._queued -= 1

    def _run(self, msg: tuple[Any, ...], faults: bool) -> None:
        _, token, opcode, unique, nodeid, uid, gid, pid, arg, data = msg
        req = Request(opcode, unique, nodeid, uid, gid, pid, arg, data)
        out = memoryview(bytearray(self.payload_size))
        result = self.apply(req, out, (token, out)) if faults else self.handler.handle(req, out)
        if result is not DEFERRED:
            self.answer(unique, result, (token, out))  # type: ignore[arg-type]

    def post(self, d: Deferred) -> None:
        """A released request: answered by the second thread, after what
        is queued before it (behind a stall, as on a queue thread)."""
        with self._queued_lock:
            self._queued += 1
            self._work.put(d)

    def answer(self, unique: int, result: Reply, token: Any) -> None:
        """Every forwarded request is answered, None too: the child commits
        the entry."""
        child_token, out = token
        data = bytes(out[:result]) if result is not None and result > 0 else b""
        try:
            self.link.send(("reply", child_token, unique, result, data))
        except OSError:
            pass  # the child is gone, or stuck: serve() reports it

    def reply(self, unique: int, result: int, token: Any) -> None:
        self.answer(unique, result, token)

    def out_buffer(self, token: Any) -> memoryview:
        out: memoryview = token[1]
        return out

    # -- control ----------------------------------------------------------

    def wake(self) -> None:
        """The exporter stops: tell the child, once, and whether the export
        was unmounted (then it collects its entries' ENOTCONN first)."""
        if self.stopping.is_set() and not self._stop_sent:
            self._stop_sent = True
            try:
                self.link.send(("stop", self.conn_gone.is_set()))
            except OSError:
                pass

    def stats(self) -> dict[str, Any]:
        """The child's own figures, asked for now (or its last ones), with
        this side's stall."""
        if self._ended is None and not self._stop_sent:
            with self._stats_lock:
                self._stats_seq += 1
                self._stats_ready.clear()
                try:
                    self.link.send(("stats", self._stats_seq))
                    self._stats_ready.wait(STATS_TIMEOUT)
                except OSError:
                    pass
        return {**self._stats, "stalled": self.stalled, "process": self.pid}

    def held(self) -> int:
        return self._held

    def _take_stats(self, report: dict[str, Any]) -> None:
        self._stats = report["stats"]
        self.dev_per_op = report["dev-per-op"]

    def _reap(self) -> None:
        """Wait for the child (bounded), then SIGKILL it."""
        fd = os.pidfd_open(self.pid)
        try:
            if not select.select([fd], [], [], REAP_TIMEOUT)[0]:
                print(f"export: queue process {self.pid} did not exit; killed", file=sys.stderr)
                self.lost = True
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                if not select.select([fd], [], [], REAP_TIMEOUT)[0]:
                    print(f"export: queue process {self.pid} not gone", file=sys.stderr)
                    return  # in the kernel (D state): init reaps it after us
        finally:
            os.close(fd)
        os.waitpid(self.pid, 0)
