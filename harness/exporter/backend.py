"""Block backends behind the export: a raw image file, or null-co.

Backends raise OSError with the errno the FUSE client should see.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading

from ..kernel import abi
from ..kernel.libc import fallocate


class Backend:
    """Interface and shared size bookkeeping.

    The size is cached because every READ and WRITE clamps against it; only
    resizes take the lock, so concurrent growing writes cannot shrink it.
    It is kept in a C int64 that queue processes can share (keep_size_in).
    """

    def __init__(self, size: int) -> None:
        self._size = ctypes.c_int64(size)
        self.resize_lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size.value

    @size.setter
    def size(self, value: int) -> None:
        self._size.value = value

    def keep_size_in(self, slot: ctypes.c_int64) -> None:
        """From now on the size lives in slot (in memory shared with queue
        processes, which read it and never resize)."""
        slot.value = self._size.value
        self._size = slot

    def pread_into(self, buf: memoryview, offset: int) -> int:
        raise NotImplementedError

    def pwrite(self, data: memoryview, offset: int) -> int:
        raise NotImplementedError

    def truncate(self, size: int) -> None:
        self.size = size

    def grow_to(self, size: int) -> None:
        """Grow (never shrink) to at least size."""
        with self.resize_lock:
            if size > self.size:
                self.truncate(size)

    def preallocate(self, offset: int, length: int) -> None:
        """fallocate mode 0 at or past EOF: allocate and grow."""
        self.grow_to(offset + length)

    def discard(self, offset: int, length: int) -> None:
        pass

    def write_zeroes(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def seek(self, offset: int, whence: int) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def allocated_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


class ImageBackend(Backend):
    """A raw image file (a regular file or a block device)."""

    def __init__(self, path: str, writable: bool) -> None:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                size = os.lseek(fd, 0, os.SEEK_END)
            else:
                raise OSError(errno.EINVAL, "not a regular file or block device")
        except BaseException:
            os.close(fd)
            raise
        super().__init__(size)
        self.fd = fd
        self.path = path

    def pread_into(self, buf: memoryview, offset: int) -> int:
        return os.preadv(self.fd, (buf,), offset)

    def pwrite(self, data: memoryview, offset: int) -> int:
        return os.pwrite(self.fd, data, offset)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size

    def preallocate(self, offset: int, length: int) -> None:
        with self.resize_lock:
            end = offset + length
            if end > self.size:
                fallocate(self.fd, 0, offset, length)
                self.size = os.fstat(self.fd).st_size

    def discard(self, offset: int, length: int) -> None:
        # A punched range must read back as zeroes (QEMU >= 8.0 writes
        # zeroes with MAY_UNMAP), so fall back to writing them.
        try:
            fallocate(self.fd, abi.FALLOC_FL_PUNCH_HOLE | abi.FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        try:
            fallocate(self.fd, abi.FALLOC_FL_ZERO_RANGE | abi.FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        zeroes = bytes(min(length, 1 << 20))
        while length:
            n = os.pwrite(self.fd, zeroes[: min(length, len(zeroes))], offset)
            offset += n
            length -= n

    def seek(self, offset: int, whence: int) -> int:
        return os.lseek(self.fd, offset, whence)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NullBackend(Backend):
    """QEMU's null-co: reads return zeroes, writes are discarded."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._zeroes = b""

    def pread_into(self, buf: memoryview, offset: int) -> int:
        n = len(buf)
        if len(self._zeroes) < n:
            self._zeroes = bytes(n)
        buf[:] = self._zeroes[:n]
        return n

    def pwrite(self, data: memoryview, offset: int) -> int:
        return len(data)

    def write_zeroes(self, offset: int, length: int) -> None:
        pass

    def seek(self, offset: int, whence: int) -> int:
        if offset >= self.size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        return offset if whence == os.SEEK_DATA else self.size
