"""The sans-IO request layer on its own: bytes in, reply bytes out."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from harness.exporter.backend import ImageBackend, NullBackend
from harness.exporter.faults import FaultError, FaultInjector
from harness.exporter.protocol import (
    BASE_FLAGS,
    ExportConfig,
    ExportHandler,
    ProtocolError,
    parse_classic,
)
from harness.kernel import abi
from harness.kernel.abi import Op
from harness.options import parse_size

KERNEL_FLAGS = 0x73FFFFFB
KERNEL_FLAGS2 = 0x7FD


def request(opcode: int, arg: bytes, data: bytes = b"", unique: int = 7) -> memoryview:
    body = arg + data
    hdr = abi.IN_HEADER.pack(40 + len(body), opcode, unique, abi.ROOT_ID, 0, 0, 123, 0, 0)
    return memoryview(hdr + body)


def init_arg(major: int = 7, minor: int = 45, flags: int = KERNEL_FLAGS, flags2: int = 0) -> bytes:
    return abi.INIT_IN.pack(major, minor, 131072, flags, flags2, *(0,) * 11)


@pytest.fixture
def handler(tmp_path: Path) -> ExportHandler:
    img = tmp_path / "img"
    img.write_bytes(bytes(range(256)) * 16)  # 4 KiB
    return ExportHandler(ImageBackend(str(img), writable=True), ExportConfig(writable=True))


def handle(handler: ExportHandler, buf: memoryview) -> tuple[int | None, bytes]:
    out = memoryview(bytearray(handler.config.payload_size))
    result = handler.handle(parse_classic(buf), out)
    return result, bytes(out[: result if result and result > 0 else 0])


def test_init_intersects_flags_and_carries_flags2(handler: ExportHandler) -> None:
    handler.config.supported_flags = BASE_FLAGS | abi.OVER_IO_URING
    _, reply = handle(handler, request(Op.INIT, init_arg(flags2=KERNEL_FLAGS2)))
    fields = abi.INIT_OUT.unpack(reply)
    major, minor, _, flags, _, _, max_write, _, max_pages, _, flags2 = fields[:11]
    offered = KERNEL_FLAGS | KERNEL_FLAGS2 << 32
    assert (major, minor) == (7, 45)
    assert flags | flags2 << 32 == offered & (BASE_FLAGS | abi.OVER_IO_URING)
    assert flags2 << 32 == abi.OVER_IO_URING
    assert (max_write, max_pages) == (128 * 1024, 32)
    assert handler.negotiation.io_uring


def test_init_without_ext_cannot_negotiate_flags2(handler: ExportHandler) -> None:
    handler.config.supported_flags = BASE_FLAGS | abi.OVER_IO_URING
    flags = KERNEL_FLAGS & ~abi.INIT_EXT
    _, reply = handle(handler, request(Op.INIT, init_arg(flags=flags, flags2=KERNEL_FLAGS2)))
    assert abi.INIT_OUT.unpack(reply)[10] == 0
    assert not handler.negotiation.io_uring


def test_init_minor_is_the_smaller(handler: ExportHandler) -> None:
    handle(handler, request(Op.INIT, init_arg(minor=40)))
    assert handler.negotiation.minor == 40
    handle(handler, request(Op.INIT, init_arg(minor=99)))
    assert handler.negotiation.minor == abi.OUR_MINOR


def test_init_needs_major_7(handler: ExportHandler) -> None:
    with pytest.raises(ProtocolError, match=r"unsupported FUSE protocol 8\.0"):
        handle(handler, request(Op.INIT, init_arg(major=8, minor=0)))


def test_write_split_and_short_at_eof(handler: ExportHandler) -> None:
    arg = abi.WRITE_IN.pack(0, 4096 - 10, 20, 0, 0, 0, 0)
    _, reply = handle(handler, request(Op.WRITE, arg, b"x" * 20))
    assert abi.WRITE_OUT.unpack(reply) == (10, 0)
    arg = abi.WRITE_IN.pack(0, 4096, 20, 0, 0, 0, 0)
    assert abi.WRITE_OUT.unpack(handle(handler, request(Op.WRITE, arg, b"x" * 20))[1])[0] == 0


def test_read_is_clamped_at_eof(handler: ExportHandler) -> None:
    n, data = handle(handler, request(Op.READ, abi.READ_IN.pack(0, 4000, 4096, 0, 0, 0, 0)))
    assert n == 96 and data == bytes(range(256))[4000 % 256 :]
    assert handle(handler, request(Op.READ, abi.READ_IN.pack(0, 8192, 10, 0, 0, 0, 0)))[0] == 0


def test_setattr_ignores_fh_and_lock_owner(handler: ExportHandler) -> None:
    valid = abi.FATTR_SIZE | abi.FATTR_FH | abi.FATTR_LOCKOWNER  # what ftruncate sends
    arg = abi.SETATTR_IN.pack(valid, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    n, reply = handle(handler, request(Op.SETATTR, arg))
    assert n == abi.ATTR_OUT.size
    assert abi.ATTR_OUT.unpack(reply)[4] == 100  # attr.size


def test_read_only_export_refuses_writes_itself(tmp_path: Path) -> None:
    """The mount is "ro", so the VFS refuses first; the handler still does."""
    img = tmp_path / "img"
    img.write_bytes(bytes(4096))
    ro = ExportHandler(ImageBackend(str(img), writable=False), ExportConfig(writable=False))
    write = abi.WRITE_IN.pack(0, 0, 20, 0, 0, 0, 0)
    assert handle(ro, request(Op.WRITE, write, b"x" * 20))[0] == -errno.EACCES
    size = abi.SETATTR_IN.pack(abi.FATTR_SIZE, 0, 0, 100, *(0,) * 12)
    assert handle(ro, request(Op.SETATTR, size))[0] == -errno.EACCES
    grow = abi.FALLOCATE_IN.pack(0, 4096, 4096, 0, 0)
    assert handle(ro, request(Op.FALLOCATE, grow))[0] == -errno.EACCES
    assert img.read_bytes() == bytes(4096)


def test_no_reply_and_unknown_opcodes(handler: ExportHandler) -> None:
    assert handle(handler, request(Op.FORGET, b"\0" * 8))[0] is None
    assert handle(handler, request(Op.INTERRUPT, b"\0" * 8))[0] is None
    assert handle(handler, request(Op.LOOKUP, b"x\0"))[0] == -errno.ENOENT
    assert handle(handler, request(Op.STATX, b"\0" * 24))[0] == -errno.ENOSYS
    assert handle(handler, request(99, b""))[0] == -errno.ENOSYS


def test_destroy_calls_back(handler: ExportHandler) -> None:
    called = []
    handler.on_destroy = lambda: called.append(True)
    assert handle(handler, request(Op.DESTROY, b""))[0] == 0
    assert called == [True]


def test_request_offset() -> None:
    req = parse_classic(request(Op.READ, abi.READ_IN.pack(0, 65536, 4096, 0, 0, 0, 0)))
    assert req.offset == 65536
    assert parse_classic(request(Op.GETATTR, b"\0" * 16)).offset is None


def test_null_backend_and_sizes() -> None:
    b = NullBackend(parse_size("1M"))
    buf = bytearray(b"\xff" * 16)
    assert b.pread_into(memoryview(buf), 0) == 16 and buf == bytes(16)
    assert [parse_size(s) for s in ("4096", "64k", "1M", "2G")] == [4096, 65536, 1 << 20, 2 << 30]
    with pytest.raises(ValueError, match="Invalid size '1x'"):
        parse_size("1x")


def test_fault_rules_match_and_count() -> None:
    faults = FaultInjector()
    rule = faults.add("fail", "read", offset=4096, errno_="ENOSPC", count=2)
    hit = parse_classic(request(Op.READ, abi.READ_IN.pack(0, 4096, 512, 0, 0, 0, 0)))
    miss = parse_classic(request(Op.READ, abi.READ_IN.pack(0, 0, 512, 0, 0, 0, 0)))
    assert faults.match(miss) is None
    assert faults.match(hit) is rule and faults.match(hit) is rule
    assert faults.match(hit) is None  # count used up
    assert rule.errno == errno.ENOSPC and rule.hits == 2
    with pytest.raises(FaultError, match="unknown action 'explode'"):
        faults.add("explode", "read")
    assert faults.release() == 0 and faults.rules == []
