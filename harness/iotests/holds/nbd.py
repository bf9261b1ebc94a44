"""The NBD protocol, sans I/O: what a minimal server reads and writes.

Fixed newstyle negotiation with NBD_OPT_GO (and NBD_OPT_EXPORT_NAME for old
clients), simple replies only: every other option is answered
NBD_REP_ERR_UNSUP, which QEMU's client takes as "not offered" and goes on
(nbd/client.c).  Simple replies may come in any order, matched by cookie,
so one held request does not hold the others.  See the NBD protocol,
doc/proto.md in the NBD project.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
INFO_EXPORT = 0

# Transmission flags: what the export offers.
HAS_FLAGS = 1 << 0
SEND_FLUSH = 1 << 2
SEND_FUA = 1 << 3
SEND_TRIM = 1 << 5
SEND_WRITE_ZEROES = 1 << 6
EXPORT_FLAGS = HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_WRITE_ZEROES = 6
COMMANDS = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
}

# The errnos NBD can carry; others travel as EINVAL, as the protocol says.
WIRE_ERRNOS = {
    errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
    errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN,
}  # fmt: skip

GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")


class ProtocolError(Exception):
    """The client broke the protocol; the connection ends."""


def option_reply(option: int, kind: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", REPLY_MAGIC, option, kind, len(data)) + data


def go_replies(size: int) -> bytes:
    """NBD_OPT_GO's answer: the export's size and flags, then ACK."""
    info = struct.pack(">HQH", INFO_EXPORT, size, EXPORT_FLAGS)
    return option_reply(OPT_GO, REP_INFO, info) + option_reply(OPT_GO, REP_ACK)


def export_name_reply(size: int, client_flags: int) -> bytes:
    pad = b"" if client_flags & CLIENT_NO_ZEROES else bytes(124)
    return struct.pack(">QH", size, EXPORT_FLAGS) + pad


def parse_option_header(data: bytes) -> tuple[int, int]:
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    return option, length


@dataclass(frozen=True)
class Request:
    command: int
    flags: int
    cookie: int
    offset: int
    length: int

    @property
    def name(self) -> str:
        return COMMANDS.get(self.command, str(self.command))

    @property
    def payload(self) -> int:
        """How many data bytes follow the header."""
        return self.length if self.command == CMD_WRITE else 0


def parse_request(data: bytes) -> Request:
    magic, flags, command, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(command, flags, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    wire = error if error in WIRE_ERRNOS or error == 0 else errno.EINVAL
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, wire, cookie) + data
