"""Queues: the threads that move requests between the kernel and the handler.

Queue holds everything transport-independent (counters, fault injection,
deferred completions, the wake-up eventfd).  A transport subclass only reads
requests, calls dispatch(), and writes replies:

  DevFuseQueue   classic /dev/fuse: read() a request, writev() the reply
  RingQueue      FUSE-over-io_uring (uring_transport.py)
"""

from __future__ import annotations

import collections
import errno
import os
import select
import threading
from typing import Any, Final

from ..kernel import abi
from ..kernel.abi import Op
from .faults import Deferred, FaultInjector
from .protocol import ExportHandler, Reply, Request, parse_classic


class _Deferred:
    def __repr__(self) -> str:
        return "DEFERRED"


# dispatch() result: the request was parked by fault injection.
DEFERRED: Final = _Deferred()


# /dev/fuse after the connection ended: ENODEV, or ECONNABORTED once it was
# aborted (fuse_dev_do_read; seen on 6.18 after umount -l, then SIGTERM).
CONNECTION_GONE = frozenset({errno.ENODEV, errno.ECONNABORTED})


class ConnectionGone(Exception):
    """The kernel ended the connection (unmount or abort)."""


class Queue:
    """One serving thread with its counters and its wake-up eventfd."""

    kind = "base"

    def __init__(
        self,
        index: int,
        handler: ExportHandler,
        faults: FaultInjector,
        stopping: threading.Event,
    ) -> None:
        self.index = index
        self.handler = handler
        self.faults = faults
        self.stopping = stopping
        self.requests = 0
        self.per_op = [0] * 64
        self.stalled = False
        # Set once the queue can take requests (for io_uring: every ring
        # entry registered); the exporter writes its pidfile only then.
        self.started = threading.Event()
        self._ready: collections.deque[Deferred] = collections.deque()
        self._wake_lock = threading.Lock()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # -- cross-thread -----------------------------------------------------

    def post(self, d: Deferred) -> None:
        """Hand a released request back to this queue's thread."""
        self._ready.append(d)
        self.wake()

    def wake(self) -> None:
        with self._wake_lock:
            if self.wake_fd >= 0:
                os.eventfd_write(self.wake_fd, 1)

    def close_wake_fd(self) -> None:
        """Called by the owner after the thread has been joined."""
        with self._wake_lock:
            if self.wake_fd >= 0:
                os.close(self.wake_fd)
                self.wake_fd = -1

    # -- queue thread -----------------------------------------------------

    def serve(self) -> None:
        raise NotImplementedError

    def reply(self, unique: int, result: int, token: Any) -> None:
        raise NotImplementedError

    def out_buffer(self, token: Any) -> memoryview:
        raise NotImplementedError

    def dispatch(self, req: Request, out: memoryview, token: Any = None) -> Reply | _Deferred:
        """Count one request, then run it through fault injection and the handler."""
        self.requests += 1
        if req.opcode < 64:  # not CUSE_INIT (4096)
            self.per_op[req.opcode] += 1
        return self.apply(req, out, token)

    def apply(self, req: Request, out: memoryview, token: Any = None) -> Reply | _Deferred:
        """Fault injection, then the handler."""
        if self.faults.rules:
            rule = self.faults.match(req)
            if rule is not None:
                if rule.action == "fail":
                    return -rule.errno
                if rule.action == "stall":
                    self.stalled = True
                    self.faults.stall(rule)
                    self.stalled = False
                    return self.handler.handle(req, out)
                # Without a token (a ring entry) the buffers are reused by
                # the next read, so the parked request needs its own copy.
                parked = req.detached() if token is None else req
                self.faults.park(Deferred(self, parked, token, rule))
                return DEFERRED
        if req.opcode == Op.INTERRUPT and self.faults.rules:
            # Not parked (yet): it may be between a queue's read and its
            # park(); EAGAIN makes the kernel send the INTERRUPT again.
            if not self.faults.interrupt(abi.INTERRUPT_IN.unpack_from(req.arg)[0]):
                return -errno.EAGAIN
            return None
        return self.handler.handle(req, out)

    def run_ready(self) -> None:
        """Finish requests released by fault injection."""
        while self._ready:
            self.finish(self._ready.popleft())

    def finish(self, d: Deferred) -> None:
        """Answer a released request (the handler runs now, unless it failed)."""
        out = self.out_buffer(d.token)
        result = d.result if d.result is not None else self.handler.handle(d.req, out)
        self.answer(d.req.unique, result, d.token)

    def answer(self, unique: int, result: Reply, token: Any) -> None:
        """A request's result: a reply, unless there is none to send."""
        if result is not None:
            self.reply(unique, result, token)

    def drain_channel(self, channel: DevFuseChannel, tally: dict[str, int] | None = None) -> None:
        """Serve every request waiting on a /dev/fuse fd; tally them by name."""
        out = channel.out
        while not self.stopping.is_set():
            req = channel.read()
            if req is None:
                return
            if tally is not None:
                name = abi.op_name(req.opcode)
                tally[name] = tally.get(name, 0) + 1
            result = self.dispatch(req, out)
            if result is not None and result is not DEFERRED:
                channel.reply(req.unique, result)  # type: ignore[arg-type]

    def drain_wake_fd(self) -> None:
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass

    def stats(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "transport": self.kind,
            "requests": self.requests,
            "stalled": self.stalled,
            "opcodes": {abi.op_name(op): n for op, n in enumerate(self.per_op) if n},
        }


class DevFuseChannel:
    """Reads requests from one /dev/fuse fd and writes replies to it.

    Used by DevFuseQueue for everything, and by a RingQueue for what still
    arrives on /dev/fuse after FUSE_INIT (FUSE_INTERRUPT, FORGET).
    """

    def __init__(self, fd: int, payload_size: int) -> None:
        self.fd = fd
        # The kernel refuses reads into a buffer that cannot hold a maximal
        # WRITE: in_header + write_in + max_write.
        self._buf = bytearray(abi.IN_HEADER.size + abi.WRITE_IN.size + payload_size)
        self._view = memoryview(self._buf)
        self.out = memoryview(bytearray(payload_size))
        self._hdr = bytearray(abi.OUT_HEADER.size)
        os.set_blocking(fd, False)

    def read(self) -> Request | None:
        """The next request, or None when there is none (non-blocking)."""
        while True:
            try:
                n = os.readv(self.fd, (self._buf,))
            except BlockingIOError:
                return None
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # interrupted before we read it
                    continue
                if e.errno in CONNECTION_GONE:
                    raise ConnectionGone from None
                raise
            return parse_classic(self._view[:n])

    def reply(self, unique: int, result: int) -> None:
        hdr = self._hdr
        try:
            if result < 0:
                abi.OUT_HEADER.pack_into(hdr, 0, 16, result, unique)
                os.write(self.fd, hdr)
            else:
                abi.OUT_HEADER.pack_into(hdr, 0, 16 + result, 0, unique)
                os.writev(self.fd, (hdr, self.out[:result]))
        except OSError as e:
            # ENOENT: the request was interrupted or aborted meanwhile.
            if e.errno in CONNECTION_GONE:
                raise ConnectionGone from None
            if e.errno != errno.ENOENT:
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DevFuseQueue(Queue):
    """Classic transport: one /dev/fuse fd (the session's, or a clone)."""

    kind = "dev-fuse"

    def __init__(
        self,
        index: int,
        fd: int,
        handler: ExportHandler,
        faults: FaultInjector,
        stopping: threading.Event,
    ) -> None:
        super().__init__(index, handler, faults, stopping)
        self.channel = DevFuseChannel(fd, handler.config.payload_size)

    def out_buffer(self, token: Any) -> memoryview:
        return self.channel.out

    def reply(self, unique: int, result: int, token: Any) -> None:
        self.channel.reply(unique, result)

    def serve(self) -> None:
        try:
            self._loop()
        finally:
            # This thread owns the fd: nobody else closes it or uses it.
            self.channel.close()

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.channel.fd, select.POLLIN)
        poller.register(self.wake_fd, select.POLLIN)
        self.started.set()
        while not self.stopping.is_set():
            for fd, events in poller.poll():
                if fd == self.wake_fd:
                    self.drain_wake_fd()
                    self.run_ready()
                elif events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    raise ConnectionGone
                else:
                    self.drain_channel(self.channel)
