"""A small NBD server that holds, delays and fails requests on command.

A target that sits on a block layer (QSD) reads its image through this
server (blockdev-add driver nbd on a Unix socket), so the harness decides
when each block-layer request completes: the same hold / release / delay /
fail rules as the reference exporter's fault injection, but the request
waits inside the daemon's block layer, with everything above it (the FUSE
request, the export's in-flight count) live.  Fully deterministic: a held
request stays held until released, whatever the load.

Rules name FUSE opcodes, as cases do; COMMANDS says which NBD commands each
becomes in QEMU's block layer.  It runs in the harness's process, one thread
per connection, and ends with the exporter that uses it.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import itertools
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import nbd

# FUSE opcode -> the NBD commands QEMU's FUSE export turns it into: READ
# and WRITE pass through, FSYNC and FLUSH are blk_co_flush(), FALLOCATE is
# write-zeroes or discard (block/export/fuse.c).
COMMANDS = {
    "READ": {nbd.CMD_READ},
    "WRITE": {nbd.CMD_WRITE},
    "FSYNC": {nbd.CMD_FLUSH},
    "FLUSH": {nbd.CMD_FLUSH},
    "FALLOCATE": {nbd.CMD_WRITE_ZEROES, nbd.CMD_TRIM},
}
ACTIONS = ("hold", "fail", "delay")


class HoldError(ValueError):
    """A rule this server cannot express."""


@dataclass
class Rule:
    id: str
    action: str
    op: str  # the FUSE opcode name the case gave
    offset: int | None = None
    errno: int = errno_mod.EIO
    delay_ms: int = 0
    remaining: int | None = None  # None: every match until released
    held: list[tuple[_Connection, nbd.Request, bytes]] = field(default_factory=list)

    def matches(self, req: nbd.Request) -> bool:
        return req.command in COMMANDS[self.op] and self.offset in (None, req.offset)


class _Connection:
    """One client connection: negotiation, then requests until it ends."""

    def __init__(self, server: HoldServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._send_lock, contextlib.suppress(OSError):  # the client went away
            self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def run(self) -> None:
        with contextlib.suppress(EOFError, OSError, nbd.ProtocolError):
            if self._negotiate():
                while self._request():
                    pass
        self.server.forget(self)
        with contextlib.suppress(OSError):
            self.sock.close()

    def _negotiate(self) -> bool:
        self.sock.sendall(nbd.GREETING)
        client_flags = int.from_bytes(self.recv(4), "big")
        size = self.server.size()
        while True:
            option, length = nbd.parse_option_header(self.recv(nbd.OPTION_HEADER.size))
            self.recv(length)  # the export name and info requests: one export
            if option == nbd.OPT_GO:
                self.sock.sendall(nbd.go_replies(size))
                return True
            if option == nbd.OPT_EXPORT_NAME:
                self.sock.sendall(nbd.export_name_reply(size, client_flags))
                return True
            if option == nbd.OPT_ABORT:
                self.sock.sendall(nbd.option_reply(option, nbd.REP_ACK))
                return False
            self.sock.sendall(nbd.option_reply(option, nbd.REP_ERR_UNSUP))

    def _request(self) -> bool:
        req = nbd.parse_request(self.recv(nbd.REQUEST.size))
        data = self.recv(req.payload) if req.payload else b""
        if req.command == nbd.CMD_DISC:
            return False
        self.server.dispatch(self, req, data)
        return True


class HoldServer:
    """Serves one image over NBD on a Unix socket, under the case's rules."""

    def __init__(self, image: Path, path: Path) -> None:
        self.image = image
        self.path = path
        self._fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._ids = itertools.count(1)
        self._conns: set[_Connection] = set()
        self._timers: set[threading.Timer] = set()
        self._closed = False
        # I/O and closing the image exclude each other: a late reply must
        # never use an fd number that close() gave back.
        self._io = threading.Lock()
        self.served: dict[str, int] = {}  # NBD command name -> count
        threading.Thread(target=self._accept, name="nbd-accept", daemon=True).start()

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    # -- rules ---------------------------------------------------------------

    def inject(
        self,
        action: str,
        op: str,
        offset: int | None = None,
        errno: str = "EIO",
        delay_ms: int = 0,
        count: int | None = None,
    ) -> dict[str, Any]:
        if action not in ACTIONS:
            raise HoldError(f"action {action!r} is not one of {', '.join(ACTIONS)}")
        if op not in COMMANDS:
            raise HoldError(f"cannot {action} {op} requests in the block layer")
        remaining = count if count is not None else (None if action == "hold" else 1)
        en = getattr(errno_mod, errno)
        rule = Rule(f"n{next(self._ids)}", action, op, offset, en, delay_ms, remaining)
        with self._lock:
            self._rules.append(rule)
        return {"id": rule.id}

    def held(self, rule_id: str | None = None) -> int:
        """Requests one rule (or every rule) holds now."""
        with self._lock:
            return sum(len(r.held) for r in self._rules if rule_id in (None, r.id))

    def release(self, rule_id: str | None = None) -> int:
        """End hold rules (one, or all) and serve what they held."""
        with self._lock:
            gone = [r for r in self._rules if rule_id in (None, r.id) and r.action == "hold"]
            self._rules = [r for r in self._rules if r not in gone]
        held = [h for r in gone for h in r.held]
        for conn, req, data in held:
            self._serve(conn, req, data)
        return len(held)

    def rules(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"id": r.id, "action": r.action, "held": len(r.held)} for r in self._rules]

    # -- requests -------------------------------------------------------------

    def dispatch(self, conn: _Connection, req: nbd.Request, data: bytes) -> None:
        with self._lock:
            rule = next((r for r in self._rules if r.matches(req)), None)
            if rule is not None:
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._rules.remove(rule)
                if rule.action == "hold":
                    rule.held.append((conn, req, data))
                    return
        if rule is None:
            self._serve(conn, req, data)
        elif rule.action == "fail":
            conn.send(nbd.simple_reply(req.cookie, rule.errno))
        else:
            self._later(rule.delay_ms / 1000, lambda: self._serve(conn, req, data))

    def _later(self, seconds: float, fn: Callable[[], None]) -> None:
        timer = threading.Timer(seconds, fn)
        timer.daemon = True
        with self._lock:
            if self._closed:
                return
            self._timers.add(timer)
        timer.start()

    def _serve(self, conn: _Connection, req: nbd.Request, data: bytes) -> None:
        try:
            with self._io:
                if self._fd < 0:
                    return
                out = self._do(req, data)
        except OSError as e:
            conn.send(nbd.simple_reply(req.cookie, e.errno or errno_mod.EIO))
            return
        with self._lock:
            self.served[req.name] = self.served.get(req.name, 0) + 1
        conn.send(nbd.simple_reply(req.cookie, 0, out))

    def _do(self, req: nbd.Request, data: bytes) -> bytes:
        if req.command == nbd.CMD_READ:
            got = os.pread(self._fd, req.length, req.offset)
            return got + bytes(req.length - len(got))
        if req.command == nbd.CMD_WRITE:
            os.pwrite(self._fd, data, req.offset)
        elif req.command == nbd.CMD_WRITE_ZEROES:
            os.pwrite(self._fd, bytes(req.length), req.offset)
        elif req.command == nbd.CMD_FLUSH:
            os.fsync(self._fd)
        elif req.command != nbd.CMD_TRIM:  # discarding is advisory: nothing to do
            raise OSError(errno_mod.EINVAL, f"NBD command {req.name}")
        return b""

    # -- connections ------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:  # closed
                return
            conn = _Connection(self, sock)
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=conn.run, name="nbd-conn", daemon=True).start()

    def forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
            for r in self._rules:  # a dead client's held requests are no one's
                r.held = [h for h in r.held if h[0] is not conn]

    def close(self) -> None:
        """Stop serving: held requests are dropped with their connections."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns, timers = list(self._conns), list(self._timers)
        for t in timers:
            t.cancel()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
        with self._io:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
