"""A QMP-speaking control socket, so one client drives us and QSD alike.

Only the wire format and the few commands the harness needs: greeting,
qmp_capabilities, then whatever the exporter registers.  One thread serves
every connection with a selector; a pipe wakes it up to stop.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

Command = Callable[[dict[str, Any]], Any]


class QmpError(Exception):
    """A command failed; desc goes to the client as a GenericError."""

    def __init__(self, desc: str, klass: str = "GenericError") -> None:
        super().__init__(desc)
        self.klass = klass


def check_args(
    args: dict[str, Any], required: tuple[str, ...] = (), optional: tuple[str, ...] = ()
) -> None:
    """QEMU's argument checks, with QEMU's messages."""
    for k in args:
        if k not in required and k not in optional:
            raise QmpError(f"Parameter '{k}' is unexpected")
    for k in required:
        if k not in args:
            raise QmpError(f"Parameter '{k}' is missing")


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = ""
        self.negotiated = False


class QmpServer:
    def __init__(self, path: str, commands: dict[str, Command], package: str) -> None:
        self.path = path
        self.commands = commands
        self.package = package
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
        except OSError as e:
            self._listener.close()
            raise OSError(e.errno, f"Failed to bind socket to {path}: {e.strerror or e}") from None
        self._listener.listen(4)
        self._clients: dict[int, _Client] = {}
        self._send_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="qmp", daemon=True)

    def fds(self) -> list[int]:
        """Its listening socket and wake pipe: what a forked child closes."""
        return [self._listener.fileno(), self._wake_r, self._wake_w]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close every connection and remove the socket."""
        if self._thread.is_alive():
            os.write(self._wake_w, b"x")
            self._thread.join(5)
        for c in list(self._clients.values()):
            c.sock.close()
        self._clients.clear()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def emit(self, event: str, data: dict[str, Any]) -> None:
        now = time.time()
        msg = {
            "event": event,
            "data": data,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
        }
        for c in list(self._clients.values()):
            if c.negotiated:
                self._send(c, msg)

    # -- serving thread ---------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fileobj == self._wake_r:
                    sel.close()
                    return
                if key.fileobj is self._listener:
                    sock, _ = self._listener.accept()
                    client = _Client(sock)
                    self._clients[sock.fileno()] = client
                    sel.register(sock, selectors.EVENT_READ, client)
                    self._send(client, self._greeting())
                else:
                    client = key.data
                    if not self._receive(client):
                        sel.unregister(client.sock)
                        del self._clients[client.sock.fileno()]
                        client.sock.close()

    def _greeting(self) -> dict[str, Any]:
        version = {"qemu": {"major": 0, "minor": 0, "micro": 0}, "package": self.package}
        return {"QMP": {"version": version, "capabilities": []}}

    def _receive(self, client: _Client) -> bool:
        try:
            data = client.sock.recv(65536)
        except OSError:
            return False
        if not data:
            return False
        client.buf += data.decode("utf-8", "replace")
        decoder = json.JSONDecoder()
        while client.buf.strip():
            text = client.buf.lstrip()
            try:
                msg, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                if "\n" in text:  # a complete line that is not JSON
                    client.buf = ""
                    self._send(client, _error(None, "JSON parse error"))
                return True
            client.buf = text[end:]
            self._send(client, self._execute(client, msg))
        return True

    def _execute(self, client: _Client, msg: Any) -> dict[str, Any]:
        if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
            return _error(None, "QMP input must be a JSON object with 'execute'")
        mid = msg.get("id")
        name = msg["execute"]
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            return _error(mid, "QMP input member 'arguments' must be an object")
        if name == "qmp_capabilities":
            if client.negotiated:
                return _error(
                    mid, "Capabilities negotiation is already complete", "CommandNotFound"
                )
            client.negotiated = True
            return _return(mid, {})
        if not client.negotiated:
            desc = "Expecting capabilities negotiation with 'qmp_capabilities'"
            return _error(mid, desc, "CommandNotFound")
        command = self.commands.get(name)
        if command is None:
            return _error(mid, f"The command {name} has not been found", "CommandNotFound")
        try:
            return _return(mid, command(args))
        except QmpError as e:
            return _error(mid, str(e), e.klass)
        except (KeyError, TypeError, ValueError) as e:
            return _error(mid, f"Invalid arguments for {name}: {e}")

    def _send(self, client: _Client, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\r\n").encode()
        with self._send_lock:
            try:
                client.sock.sendall(data)
            except OSError:
                pass  # the reader side notices the dead connection


def _return(mid: Any, value: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"return": value}
    if mid is not None:
        msg["id"] = mid
    return msg


def _error(mid: Any, desc: str, klass: str = "GenericError") -> dict[str, Any]:
    msg: dict[str, Any] = {"error": {"class": klass, "desc": desc}}
    if mid is not None:
        msg["id"] = mid
    return msg
