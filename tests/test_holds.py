"""Block-layer holds: the NBD server a QSD export reads its image through,
driven by a minimal NBD client over a real Unix socket."""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.iotests.holds import Holds, nbd
from harness.iotests.holds.server import HoldError, HoldServer
from harness.iotests.waiting import wait_until

SIZE = 64 * 1024


class Client:
    """Just enough of an NBD client: NBD_OPT_GO, then requests by cookie."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        assert self.recv(18) == nbd.GREETING
        self.sock.sendall(struct.pack(">I", nbd.CLIENT_NO_ZEROES))
        # An option the server does not know first: it must say so and go on.
        self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, 8, 0))
        assert struct.unpack(">QIII", self.recv(20))[2] == nbd.REP_ERR_UNSUP
        name = b""
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, len(data)) + data)
        _, _, kind, length = struct.unpack(">QIII", self.recv(20))
        assert kind == nbd.REP_INFO
        _, self.size, self.flags = struct.unpack(">HQH", self.recv(length))
        _, _, kind, length = struct.unpack(">QIII", self.recv(20))
        assert (kind, length) == (nbd.REP_ACK, 0)

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, "server hung up"
            buf += chunk
        return buf

    def send(self, command: int, cookie: int, offset: int, length: int, data: bytes = b"") -> None:
        head = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, command, cookie, offset, length)
        self.sock.sendall(head + data)

    def reply(self, length: int = 0) -> tuple[int, int, bytes]:
        """(cookie, error, data): data follows only a successful read."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        return cookie, error, self.recv(length) if length and not error else b""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[HoldServer, Client, Path]]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * (SIZE // 256))
    server = HoldServer(image, tmp_path / "nbd.sock")
    client = Client(server.path)
    yield server, client, image
    client.sock.close()
    server.close()
    assert not server.path.exists()


def test_negotiation_and_plain_io(served: tuple[HoldServer, Client, Path]) -> None:
    server, client, image = served
    assert client.size == SIZE and client.flags & nbd.SEND_FLUSH
    client.send(nbd.CMD_WRITE, 1, 4096, 4, b"abcd")
    assert client.reply() == (1, 0, b"")
    client.send(nbd.CMD_READ, 2, 4094, 8)
    assert client.reply(8) == (2, 0, bytes([254, 255]) + b"abcd" + bytes([4, 5]))
    client.send(nbd.CMD_FLUSH, 3, 0, 0)
    assert client.reply() == (3, 0, b"")
    assert image.read_bytes()[4096:4100] == b"abcd"
    assert server.served == {"WRITE": 1, "READ": 1, "FLUSH": 1}


def test_a_held_read_waits_while_others_pass(served: tuple[HoldServer, Client, Path]) -> None:
    server, client, _ = served
    rule = server.inject("hold", "READ")["id"]
    client.send(nbd.CMD_READ, 7, 0, 4)
    wait_until(lambda: server.held(rule) == 1, 5, "the read to be held")
    client.send(nbd.CMD_WRITE, 8, 0, 1, b"z")  # a write passes the held read
    assert client.reply() == (8, 0, b"")
    assert server.release(rule) == 1
    assert client.reply(4) == (7, 0, b"z" + bytes([1, 2, 3]))
    assert server.held() == 0 and server.rules() == []


def test_fail_counts_and_errnos(served: tuple[HoldServer, Client, Path]) -> None:
    server, client, _ = served
    server.inject("fail", "FSYNC", errno="ENOSPC", count=2)
    for cookie in (1, 2, 3):
        client.send(nbd.CMD_FLUSH, cookie, 0, 0)
    got = [client.reply() for _ in range(3)]
    assert got == [(1, errno.ENOSPC, b""), (2, errno.ENOSPC, b""), (3, 0, b"")]
    server.inject("fail", "WRITE", errno="EROFS", offset=512)  # no NBD errno: EINVAL
    client.send(nbd.CMD_WRITE, 4, 0, 1, b"a")  # another offset: not matched
    client.send(nbd.CMD_WRITE, 5, 512, 1, b"b")
    assert [client.reply(), client.reply()] == [(4, 0, b""), (5, errno.EINVAL, b"")]


def test_delay_answers_after_the_delay(served: tuple[HoldServer, Client, Path]) -> None:
    server, client, _ = served
    server.inject("delay", "READ", delay_ms=200)
    start = time.monotonic()
    client.send(nbd.CMD_READ, 1, 0, 1)
    assert client.reply(1) == (1, 0, b"\x00")
    assert time.monotonic() - start >= 0.2


def test_rules_it_cannot_express_are_refused(served: tuple[HoldServer, Client, Path]) -> None:
    server, _, _ = served
    with pytest.raises(HoldError, match="cannot hold GETATTR"):
        server.inject("hold", "GETATTR")
    with pytest.raises(HoldError, match="stall"):
        server.inject("stall", "READ")


def test_closing_drops_held_requests_and_the_connection(
    served: tuple[HoldServer, Client, Path],
) -> None:
    server, client, _ = served
    rule = server.inject("hold", "WRITE")["id"]
    client.send(nbd.CMD_WRITE, 1, 0, 1, b"q")
    wait_until(lambda: server.held(rule) == 1, 5, "the write to be held")
    server.close()
    assert client.sock.recv(16) == b""  # hung up, nothing answered


def test_a_target_declares_which_opcodes_it_can_hold() -> None:
    anywhere = Holds("exporter")
    assert anywhere.problem("reference-0.1", {"GETATTR"}) is None
    block = Holds("block layer", frozenset({"READ", "WRITE"}))
    assert block.problem("qsd-11.1.3", {"READ"}) is None
    assert block.problem("qsd-11.1.3", {"READ", "GETATTR"}) == (
        "target qsd-11.1.3 cannot hold GETATTR requests (block layer holds only)"
    )
