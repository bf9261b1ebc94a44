"""The sans-IO FUSE request layer.

A transport parses the kernel's bytes into a Request and gives it, with a
writable reply buffer, to ExportHandler.handle().  The handler writes all
reply arguments into that buffer and returns a Reply code:

  None      no reply at all (FORGET, BATCH_FORGET, INTERRUPT)
  -errno    an error reply
  n >= 0    a success reply whose arguments are out[:n]

The handler never learns how the bytes travel.  The classic transport sends
out[:n] after an out header with writev(); the io_uring transport hands the
entry's payload buffer in as `out`, so a READ lands in place with no copy.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..kernel import abi
from ..kernel.abi import Op
from ..options import BY_KEY
from .backend import Backend

Reply = int | None

DEFAULT_MAX_WRITE: int = BY_KEY["max-write"].default
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Flags we can honour on any transport; OVER_IO_URING is added per export.
BASE_FLAGS = abi.ASYNC_READ | abi.BIG_WRITES | abi.ASYNC_DIO | abi.MAX_PAGES | abi.INIT_EXT


@dataclass(slots=True)
class Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    arg: memoryview | bytes  # the first (fixed-size) argument
    data: memoryview | bytes = b""  # what follows it: WRITE data

    @property
    def offset(self) -> int | None:
        """The file offset of READ/WRITE/FALLOCATE/LSEEK (after fh)."""
        if self.opcode in abi.OFFSET_OPS:
            return int.from_bytes(self.arg[8:16], "little")
        return None

    def detached(self) -> Request:
        """A copy that survives reuse of the transport's buffers."""
        return Request(
            self.opcode,
            self.unique,
            self.nodeid,
            self.uid,
            self.gid,
            self.pid,
            bytes(self.arg),
            bytes(self.data),
        )


def parse_classic(buf: memoryview) -> Request:
    """Split a request read from /dev/fuse: in_header, first argument, data."""
    length, opcode, unique, nodeid, uid, gid, pid, _, _ = abi.IN_HEADER.unpack_from(buf)
    if opcode == Op.WRITE:
        return Request(opcode, unique, nodeid, uid, gid, pid, buf[40:80], buf[80:length])
    return Request(opcode, unique, nodeid, uid, gid, pid, buf[40:length])


@dataclass
class Negotiation:
    """FUSE_INIT as it happened: what the kernel offered, what we replied."""

    kernel_major: int = 0
    kernel_minor: int = 0
    minor: int = 0
    offered: int = 0
    replied: int = 0
    max_readahead: int = 0
    max_write: int = 0
    max_pages: int = 0

    @property
    def io_uring(self) -> bool:
        return bool(self.replied & abi.OVER_IO_URING)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kernel-major": self.kernel_major,
            "kernel-minor": self.kernel_minor,
            "minor": self.minor,
            "offered": self.offered,
            "offered-names": abi.flag_names(self.offered),
            "replied": self.replied,
            "replied-names": abi.flag_names(self.replied),
            "max-readahead": self.max_readahead,
            "max-write": self.max_write,
            "max-pages": self.max_pages,
            "io-uring": self.io_uring,
        }


@dataclass
class ExportConfig:
    writable: bool = False
    growable: bool = False
    allow_other: bool = False
    max_write: int = DEFAULT_MAX_WRITE
    # INIT flags we are willing to negotiate (the transport adds OVER_IO_URING).
    supported_flags: int = BASE_FLAGS
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)

    @property
    def max_pages(self) -> int:
        return -(-self.max_write // PAGE_SIZE)

    @property
    def payload_size(self) -> int:
        """The largest reply or WRITE payload a request can carry."""
        return max(8192, self.max_write, self.max_pages * PAGE_SIZE)


class ProtocolError(Exception):
    """The kernel broke the protocol (e.g. INIT with a major other than 7)."""


class ExportHandler:
    """All FUSE operations of a single-file block export."""

    def __init__(self, backend: Backend, config: ExportConfig) -> None:
        self.backend = backend
        self.config = config
        self.negotiation = Negotiation()
        # Called on FUSE_DESTROY; the exporter stops serving.
        self.on_destroy: Callable[[], None] = lambda: None
        # Like QEMU: the attributes live in the export, not in the image or
        # the mountpoint; others get access only after a chmod.
        self.mode = stat.S_IFREG | stat.S_IRUSR | (stat.S_IWUSR if config.writable else 0)
        self.uid = config.uid
        self.gid = config.gid
        self.start_time = time.time_ns()
        self._dispatch = {
            Op.INIT: self._init,
            Op.GETATTR: self._getattr,
            Op.SETATTR: self._setattr,
            Op.OPEN: self._open,
            Op.READ: self._read,
            Op.WRITE: self._write,
            Op.RELEASE: self._ok,
            Op.FLUSH: self._flush,
            Op.FSYNC: self._flush,
            Op.STATFS: self._statfs,
            Op.FALLOCATE: self._fallocate,
            Op.LSEEK: self._lseek,
            Op.LOOKUP: self._enoent,
            Op.FORGET: self._no_reply,
            Op.BATCH_FORGET: self._no_reply,
            Op.INTERRUPT: self._no_reply,
            Op.DESTROY: self._destroy,
        }

    def handle(self, req: Request, out: memoryview) -> Reply:
        fn = self._dispatch.get(req.opcode)
        if fn is None:
            return -errno.ENOSYS
        try:
            return fn(req, out)
        except OSError as e:
            return -(e.errno or errno.EIO)

    # -- FUSE_INIT --------------------------------------------------------

    def _init(self, req: Request, out: memoryview) -> Reply:
        major, minor, readahead, flags, flags2, *_ = abi.INIT_IN.unpack_from(req.arg)
        neg = self.negotiation
        neg.kernel_major, neg.kernel_minor, neg.max_readahead = major, minor, readahead
        if major != abi.KERNEL_VERSION:
            # The kernel then retries with our major; we do not speak others.
            raise ProtocolError(f"unsupported FUSE protocol {major}.{minor}")
        offered = flags
        if flags & abi.INIT_EXT:
            offered |= flags2 << 32
        neg.offered = offered
        neg.replied = offered & self.config.supported_flags
        if not neg.replied & abi.INIT_EXT:
            neg.replied &= 0xFFFFFFFF
        neg.minor = min(minor, abi.OUR_MINOR)
        neg.max_write = self.config.max_write
        neg.max_pages = self.config.max_pages
        abi.INIT_OUT.pack_into(
            out,
            0,
            abi.KERNEL_VERSION,
            neg.minor,
            readahead,
            neg.replied & 0xFFFFFFFF,
            16,  # max_background
            12,  # congestion_threshold
            neg.max_write,
            1,  # time_gran
            neg.max_pages,
            0,  # map_alignment
            neg.replied >> 32,
            0,  # max_stack_depth
            0,  # request_timeout
            *(0,) * 11,
        )
        return abi.INIT_OUT.size

    # -- attributes -------------------------------------------------------

    def _pack_attr(self, out: memoryview) -> int:
        sec, nsec = divmod(self.start_time, 1_000_000_000)
        abi.ATTR_OUT.pack_into(
            out,
            0,
            1,  # attr_valid: one second, as QEMU
            0,
            0,
            abi.ROOT_ID,
            self.backend.size,
            -(-self.backend.allocated_bytes() // 512),
            sec,
            sec,
            sec,
            nsec,
            nsec,
            nsec,
            self.mode,
            1,  # nlink
            self.uid,
            self.gid,
            0,  # rdev
            512,  # blksize
            0,  # flags
        )
        return abi.ATTR_OUT.size

    def _getattr(self, req: Request, out: memoryview) -> Reply:
        return self._pack_attr(out)

    def _setattr(self, req: Request, out: memoryview) -> Reply:
        f = abi.SETATTR_IN.unpack_from(req.arg)
        valid, size, mode, uid, gid = f[0], f[3], f[11], f[13], f[14]
        # fh, lock owner and kill-suid are bookkeeping, not attributes.
        to_set = valid & ~(abi.FATTR_FH | abi.FATTR_LOCKOWNER | abi.FATTR_KILL_SUIDGID)
        supported = abi.FATTR_SIZE | abi.FATTR_MODE
        if self.config.allow_other:
            supported |= abi.FATTR_UID | abi.FATTR_GID
        if to_set & ~supported:
            return -errno.EOPNOTSUPP
        if to_set & abi.FATTR_MODE:
            # Without allow_other nobody else can open the file anyway.
            if not self.config.allow_other and mode & (stat.S_IRWXG | stat.S_IRWXO):
                return -errno.EPERM
            if not self.config.writable and mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                return -errno.EROFS
        if to_set & abi.FATTR_SIZE:
            if not self.config.writable:
                return -errno.EACCES
            with self.backend.resize_lock:
                self.backend.truncate(size)
        if to_set & abi.FATTR_MODE:
            self.mode = stat.S_IFREG | (mode & 0o7777)
        if to_set & abi.FATTR_UID:
            self.uid = uid
        if to_set & abi.FATTR_GID:
            self.gid = gid
        return self._pack_attr(out)

    # -- file operations --------------------------------------------------

    def _open(self, req: Request, out: memoryview) -> Reply:
        # Direct I/O: the page cache would hide what the block layer sees.
        flags = abi.FOPEN_DIRECT_IO | abi.FOPEN_PARALLEL_DIRECT_WRITES
        abi.OPEN_OUT.pack_into(out, 0, 0, flags, 0)
        return abi.OPEN_OUT.size

    def _read(self, req: Request, out: memoryview) -> Reply:
        _, offset, size, *_ = abi.READ_IN.unpack_from(req.arg)
        end = min(offset + size, self.backend.size, offset + len(out))
        if end <= offset:
            return 0
        return self.backend.pread_into(out[: end - offset], offset)

    def _write(self, req: Request, out: memoryview) -> Reply:
        if not self.config.writable:
            return -errno.EACCES
        _, offset, size, *_ = abi.WRITE_IN.unpack_from(req.arg)
        if size > len(req.data):
            return -errno.EINVAL
        backend = self.backend
        end = offset + size
        if end > backend.size:
            if self.config.growable:
                backend.grow_to(end)
            else:
                # Short write at EOF; a write at or past EOF gets 0, which
                # the client sees as ENOSPC (upstream QEMU since 8.0).
                size = max(0, backend.size - offset)
        written = backend.pwrite(req.data[:size], offset) if size else 0
        abi.WRITE_OUT.pack_into(out, 0, written, 0)
        return abi.WRITE_OUT.size

    def _flush(self, req: Request, out: memoryview) -> Reply:
        self.backend.flush()
        return 0

    def _statfs(self, req: Request, out: memoryview) -> Reply:
        # What libfuse answers when a file system has no statfs (QEMU's
        # case): zero counts, 512-byte blocks, 255-byte names.
        abi.STATFS_OUT.pack_into(out, 0, 0, 0, 0, 0, 0, 512, 255, 0, 0, *(0,) * 6)
        return abi.STATFS_OUT.size

    def _fallocate(self, req: Request, out: memoryview) -> Reply:
        if not self.config.writable:
            return -errno.EACCES
        _, offset, length, mode, _ = abi.FALLOCATE_IN.unpack_from(req.arg)
        backend = self.backend
        if mode == 0:
            # Only growing can be done as an allocation; QEMU has no
            # preallocation of the inside of an image.
            if offset < backend.size:
                return -errno.EOPNOTSUPP
            backend.preallocate(offset, length)
        elif mode == abi.FALLOC_FL_PUNCH_HOLE | abi.FALLOC_FL_KEEP_SIZE:
            length = min(offset + length, backend.size) - offset
            if length > 0:
                backend.discard(offset, length)
        elif mode & ~abi.FALLOC_FL_KEEP_SIZE == abi.FALLOC_FL_ZERO_RANGE:
            end = offset + length
            if end > backend.size and not mode & abi.FALLOC_FL_KEEP_SIZE:
                backend.grow_to(end)
            length = min(end, backend.size) - offset
            if length > 0:
                backend.write_zeroes(offset, length)
        else:
            return -errno.EOPNOTSUPP
        return 0

    def _lseek(self, req: Request, out: memoryview) -> Reply:
        _, offset, whence, _ = abi.LSEEK_IN.unpack_from(req.arg)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            return -errno.EINVAL
        abi.LSEEK_OUT.pack_into(out, 0, self.backend.seek(offset, whence))
        return abi.LSEEK_OUT.size

    # -- the rest ---------------------------------------------------------

    def _ok(self, req: Request, out: memoryview) -> Reply:
        return 0

    def _enoent(self, req: Request, out: memoryview) -> Reply:
        return -errno.ENOENT

    def _no_reply(self, req: Request, out: memoryview) -> Reply:
        return None

    def _destroy(self, req: Request, out: memoryview) -> Reply:
        self.on_destroy()
        return 0
