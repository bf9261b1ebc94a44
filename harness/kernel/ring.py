"""Minimal io_uring ring: raw syscalls via ctypes, rings via mmap, SQEs via struct.

Deliberately free of FUSE knowledge: callers bring their own ``struct.Struct``
for the 80-byte command area of IORING_OP_URING_CMD.

Layouts below were checked against include/uapi/linux/io_uring.h (offsetof
of a compiled probe): io_uring_params is 120 bytes with sq_off at 40 and
cq_off at 80; SQE opcode@0 flags@1 ioprio@2 fd@4 off/cmd_op@8 addr@16 len@24
op_flags/poll32_events@28 user_data@32 cmd@48; CQE is 16 bytes.

Only little-endian 64-bit Linux is supported (x86_64, aarch64): the SQE
unions (cmd_op inside ``off``, poll32_events) are written in native order,
which matches the kernel only on little-endian machines.

Concurrency: a Ring is single-threaded; prepare, submit and reap from one
thread.  Keep the number of requests in flight <= ``cq_entries`` (the kernel
sizes the CQ at 2x ``sq_entries``).  Beyond that the kernel parks CQEs on an
overflow list (IORING_FEAT_NODROP) and io_uring_enter may fail with EBUSY.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from collections.abc import Iterator
from types import TracebackType
from typing import Self

__all__ = [
    "IORING_ENTER_GETEVENTS",
    "IORING_FEAT_NODROP",
    "IORING_FEAT_SINGLE_MMAP",
    "IORING_OP_NOP",
    "IORING_OP_POLL_ADD",
    "IORING_OP_URING_CMD",
    "IORING_SETUP_DEFER_TASKRUN",
    "IORING_SETUP_SINGLE_ISSUER",
    "IORING_SETUP_SQE128",
    "URING_CMD_AREA",
    "URING_CMD_OFFSET",
    "Ring",
    "uring_cmd_sqe",
]

# asm-generic numbers; x86_64 adopted the same ones for io_uring.
_SYSCALLS: dict[str, tuple[int, int]] = {
    "x86_64": (425, 426),
    "aarch64": (425, 426),
}

IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_SINGLE_ISSUER = 1 << 12  # 6.0
IORING_SETUP_DEFER_TASKRUN = 1 << 13  # 6.1; needs SINGLE_ISSUER
IORING_MAX_ENTRIES = 32768  # the kernel's bound on SQ entries (io_uring_setup: EINVAL)
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1
IORING_ENTER_GETEVENTS = 1 << 0
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

IORING_OP_NOP = 0
IORING_OP_POLL_ADD = 6
IORING_OP_URING_CMD = 46

URING_CMD_OFFSET = 48  # sqe->cmd
URING_CMD_AREA = 80  # bytes of sqe->cmd available with IORING_SETUP_SQE128

_PARAMS_SIZE = 120
_U32 = struct.Struct("=I")
# io_uring_params head: sq_entries, cq_entries, flags, sq_thread_cpu,
# sq_thread_idle, features, wq_fd, resv[3]  (40 bytes)
_PARAMS_HEAD = struct.Struct("=10I")
# io_sqring_offsets: head, tail, ring_mask, ring_entries, flags, dropped,
# array, resv1, user_addr  (40 bytes, at 40)
_SQ_OFF = struct.Struct("=8IQ")
# io_cqring_offsets: head, tail, ring_mask, ring_entries, overflow, cqes,
# flags, resv1, user_addr  (40 bytes, at 80)
_CQ_OFF = struct.Struct("=8IQ")
_CQE = struct.Struct("=QiI")  # user_data, res, flags
_MASK32 = 0xFFFFFFFF


# opcode, flags, ioprio, fd, cmd_op (low half of ``off``), off high half,
# addr, len, op_flags, user_data: the first 40 bytes of an SQE.
_SQE_HEAD = "BBHiIIQIIQ"


def _sqe_struct(sqe_size: int) -> struct.Struct:
    # Trailing pad bytes are zero-filled by pack_into, so one call rewrites
    # the whole (reused) slot.
    return struct.Struct(f"={_SQE_HEAD}{sqe_size - 40}x")


def uring_cmd_sqe(cmd: struct.Struct, sqe_size: int = 128) -> struct.Struct:
    """One Struct for a whole IORING_OP_URING_CMD SQE with ``cmd`` at sqe+48.

    Its values are the ten of the SQE head (opcode, flags, ioprio, fd,
    cmd_op, off high half, addr, len, op_flags, user_data) followed by
    ``cmd``'s own.  For a hot path: ``packer.pack_into(ring.sqes,
    ring.claim_sqe(), ...)`` is one call where prep_uring_cmd() makes three.
    """
    room = sqe_size - URING_CMD_OFFSET
    if not cmd.format.startswith("=") or cmd.size > room:
        raise ValueError(f"cmd must be '='-packed and at most {room} bytes")
    return struct.Struct(f"={_SQE_HEAD}8x{cmd.format[1:]}{room - cmd.size}x")


_libc = ctypes.CDLL(None, use_errno=True)
# A private function pointer (item access is uncached), so argtypes set here
# cannot clash with other modules that also use libc.syscall.
_syscall = _libc["syscall"]
_syscall.restype = ctypes.c_long
# All c_long: syscall(2) pulls every variadic argument as a long.
_syscall.argtypes = [ctypes.c_long] * 7


def _nrs() -> tuple[int, int]:
    try:
        return _SYSCALLS[platform.machine()]
    except KeyError:
        raise OSError(errno.ENOSYS, f"io_uring: unsupported arch {platform.machine()}") from None


_NR_SETUP, _NR_ENTER = _nrs()

# io_uring_enter is on every request's path, and converting seven argtypes
# costs about as much as the syscall itself (0.75 us here).  Its arguments
# are small non-negative ints, which ctypes passes as C ints that libffi
# sign-extends to the 64-bit registers syscall(2) reads: no argtypes needed.
_enter_syscall = _libc["syscall"]
_enter_syscall.restype = ctypes.c_long


class Ring:
    """An io_uring instance with SQ, CQ and SQE array mapped into Python.

    ``prep_*`` methods write one SQE and never fail for lack of space: when
    the SQ is full they first submit the pending SQEs (io_uring_enter without
    waiting).  Nothing reaches the kernel otherwise until ``submit()`` or
    ``submit_and_wait()``.
    """

    fd: int
    sq_entries: int
    cq_entries: int
    features: int
    sqe_size: int
    # Ring indices as free-running u32 counters (compare modulo 2**32).
    _sq_tail: int
    _sq_head: int
    _cq_head: int
    _sq_mask: int
    _cq_mask: int
    _sqe_shift: int

    def __init__(self, entries: int, *, sqe128: bool = True, setup_flags: int = 0) -> None:
        """``setup_flags`` are added to IORING_SETUP_SQE128 (e.g. DEFER_TASKRUN)."""
        if entries < 1:
            raise ValueError("entries must be >= 1")
        self.fd = -1
        self._maps: list[mmap.mmap] = []

        params = ctypes.create_string_buffer(_PARAMS_SIZE)
        flags = (IORING_SETUP_SQE128 if sqe128 else 0) | setup_flags
        _PARAMS_HEAD.pack_into(params, 0, 0, 0, flags, 0, 0, 0, 0, 0, 0, 0)
        fd = _syscall(_NR_SETUP, entries, ctypes.addressof(params), 0, 0, 0, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
        self.fd = fd
        try:
            self._setup(params.raw, sqe128)
        except BaseException:
            self.close()
            raise

    def _setup(self, params: bytes, sqe128: bool) -> None:
        head = _PARAMS_HEAD.unpack_from(params, 0)
        self.sq_entries, self.cq_entries = head[0], head[1]
        self.features = head[5]
        sq_head, sq_tail, sq_mask, _, _, _, sq_array, _, _ = _SQ_OFF.unpack_from(params, 40)
        cq_head, cq_tail, cq_mask, _, _, cqes, _, _, _ = _CQ_OFF.unpack_from(params, 80)

        # The kernel already creates io_uring fds O_CLOEXEC; enforce it anyway
        # (one-off) so an exec'd child can never inherit the ring.
        os.set_inheritable(self.fd, False)

        sq_size = sq_array + self.sq_entries * 4
        cq_size = cqes + self.cq_entries * _CQE.size
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        mflags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        if self.features & IORING_FEAT_SINGLE_MMAP:
            # SQ and CQ rings share one mapping since 5.4.
            sq_mm = mmap.mmap(
                self.fd, max(sq_size, cq_size), mflags, prot, offset=IORING_OFF_SQ_RING
            )
            self._maps.append(sq_mm)
            cq_mm = sq_mm
        else:
            sq_mm = mmap.mmap(self.fd, sq_size, mflags, prot, offset=IORING_OFF_SQ_RING)
            self._maps.append(sq_mm)
            cq_mm = mmap.mmap(self.fd, cq_size, mflags, prot, offset=IORING_OFF_CQ_RING)
            self._maps.append(cq_mm)
        self.sqe_size = 128 if sqe128 else 64
        sqes = mmap.mmap(
            self.fd,
            self.sq_entries * self.sqe_size,
            mflags,
            prot,
            offset=IORING_OFF_SQES,
        )
        self._maps.append(sqes)

        self._sq_mm, self._cq_mm = sq_mm, cq_mm
        self.sqes = sqes  # the SQE array; claim_sqe() gives a slot's offset
        self._sq_head_off, self._sq_tail_off = sq_head, sq_tail
        self._cq_head_off, self._cq_tail_off, self._cqes_off = cq_head, cq_tail, cqes
        self._sq_mask = _U32.unpack_from(sq_mm, sq_mask)[0]
        self._cq_mask = _U32.unpack_from(cq_mm, cq_mask)[0]

        # Identity-map the SQ indirection array once: slot i always holds
        # SQE i, and SQEs are filled in tail order.  Kept (rather than
        # IORING_SETUP_NO_SQARRAY) so the module also works before 6.6.
        for i in range(self.sq_entries):
            _U32.pack_into(sq_mm, sq_array + 4 * i, i)

        # Local copies: we are the only writer of SQ tail and CQ head.
        self._sq_tail = _U32.unpack_from(sq_mm, sq_tail)[0]
        self._sq_head = _U32.unpack_from(sq_mm, sq_head)[0]
        self._cq_head = _U32.unpack_from(cq_mm, cq_head)[0]
        self._sqe_shift = self.sqe_size.bit_length() - 1
        self._pack = _sqe_struct(self.sqe_size).pack_into
        self._cmd_room = self.sqe_size - URING_CMD_OFFSET

    # -- SQE preparation -------------------------------------------------

    def claim_sqe(self) -> int:
        """Claim the next SQE slot; return its byte offset in ``sqes``.

        The caller fills the whole slot (see uring_cmd_sqe()) before the
        next submit.
        """
        tail = self._sq_tail
        if (tail - self._sq_head) & _MASK32 >= self.sq_entries:
            # Full: hand the pending SQEs to the kernel so callers never fail.
            self.submit()
            if (tail - self._sq_head) & _MASK32 >= self.sq_entries:
                raise OSError(errno.EBUSY, "io_uring SQ full, kernel consumed nothing")
        self._sq_tail = (tail + 1) & _MASK32
        return (tail & self._sq_mask) << self._sqe_shift

    def prep_nop(self, user_data: int) -> None:
        off = self.claim_sqe()
        self._pack(self.sqes, off, IORING_OP_NOP, 0, 0, -1, 0, 0, 0, 0, 0, user_data)

    def prep_poll_add(self, fd: int, events: int, user_data: int) -> None:
        """One-shot poll; the CQE res is the ready event mask (or -errno)."""
        off = self.claim_sqe()
        self._pack(self.sqes, off, IORING_OP_POLL_ADD, 0, 0, fd, 0, 0, 0, 0, events, user_data)

    def prep_uring_cmd(
        self,
        fd: int,
        cmd_op: int,
        user_data: int,
        addr: int = 0,
        length: int = 0,
        cmd: struct.Struct | None = None,
        *cmd_values: int,
    ) -> None:
        """IORING_OP_URING_CMD; ``cmd`` is packed with ``cmd_values`` at sqe+48.

        ``cmd_op`` goes in the low half of ``off``; ``addr``/``length`` are
        passed through for commands that use them (e.g. an iovec array).
        """
        if cmd is not None and cmd.size > self._cmd_room:
            raise ValueError(f"cmd is {cmd.size} bytes, room is {self._cmd_room}")
        off = self.claim_sqe()
        sqes = self.sqes
        op = IORING_OP_URING_CMD
        self._pack(sqes, off, op, 0, 0, fd, cmd_op, 0, addr, length, 0, user_data)
        if cmd is not None:
            cmd.pack_into(sqes, off + URING_CMD_OFFSET, *cmd_values)

    # -- submission / completion -----------------------------------------

    def _enter(self, min_complete: int, flags: int) -> int:
        """io_uring_enter for every prepared SQE; returns how many were consumed."""
        # Plain store of the tail is a release on x86 (TSO: stores are not
        # reordered with earlier stores), and the syscall is a full barrier
        # anyway since nothing (no SQPOLL) reads the tail outside it.
        _U32.pack_into(self._sq_mm, self._sq_tail_off, self._sq_tail)
        _U32.pack_into(self._cq_mm, self._cq_head_off, self._cq_head)
        while True:
            to_submit = (self._sq_tail - self._sq_head) & _MASK32
            ret: int = _enter_syscall(_NR_ENTER, self.fd, to_submit, min_complete, flags, 0, 0)
            if ret >= 0:
                self._sq_head = _U32.unpack_from(self._sq_mm, self._sq_head_off)[0]
                return ret
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
            # Nothing was consumed on EINTR; recompute and retry.
            self._sq_head = _U32.unpack_from(self._sq_mm, self._sq_head_off)[0]

    def submit(self) -> int:
        """Submit all prepared SQEs without waiting; returns the number submitted."""
        if self._sq_tail == self._sq_head:
            return 0
        return self._enter(0, 0)

    def submit_and_wait(self, min_complete: int = 1) -> int:
        """Submit everything prepared and wait until >= min_complete CQEs are ready.

        One io_uring_enter in the normal case.  ``min_complete=0`` is a
        zero-wait enter that still flushes overflowed CQEs and task work.
        Returns the number of SQEs submitted.
        """
        if min_complete > self.cq_entries:
            raise ValueError("min_complete exceeds cq_entries")
        submitted = self._enter(min_complete, IORING_ENTER_GETEVENTS)
        # A signal can cut the wait short after SQEs were consumed (the
        # kernel then reports the submit count, not EINTR): wait again.
        while self.cq_ready() < min_complete:
            submitted += self._enter(min_complete, IORING_ENTER_GETEVENTS)
        return submitted

    def cq_ready(self) -> int:
        """Number of CQEs currently in the CQ ring (no syscall)."""
        tail: int = _U32.unpack_from(self._cq_mm, self._cq_tail_off)[0]
        return (tail - self._cq_head) & _MASK32

    def _ready_cqes(self) -> tuple[bytes, int]:
        """A copy of the CQEs ready now (no syscall), and the tail it ends at."""
        mm = self._cq_mm
        # Acquire load of the tail: on x86 (TSO) loads are not reordered with
        # later loads, so the CQEs read below are at least as new as the
        # tail.  (aarch64 relies on the preceding io_uring_enter barrier.)
        tail: int = _U32.unpack_from(mm, self._cq_tail_off)[0]
        head = self._cq_head
        n = (tail - head) & _MASK32
        if not n:
            return b"", tail
        # One slice (two if they wrap), decoded with iter_unpack: much
        # cheaper than an unpack_from per entry.
        first = head & self._cq_mask
        base = self._cqes_off
        end = first + n
        if end <= self.cq_entries:
            return mm[base + (first << 4) : base + (end << 4)], tail
        data = mm[base + (first << 4) : base + (self.cq_entries << 4)]
        return data + mm[base : base + ((end - self.cq_entries) << 4)], tail

    def completions(self) -> Iterator[tuple[int, int, int]]:
        """Yield ``(user_data, res, flags)`` for each CQE available now.

        An entry counts as consumed once yielded.  The shared CQ head is
        stored once when the iteration ends (also on ``break``) and before
        any io_uring_enter, so calling submit()/submit_and_wait() inside the
        loop is fine.  Do not nest two completions() iterations.
        """
        data, _ = self._ready_cqes()
        if not data:
            return
        head = self._cq_head
        try:
            for entry in _CQE.iter_unpack(data):
                # Consumed as soon as it is handed out; the attribute keeps
                # cq_ready() and a nested submit_and_wait() accurate.
                head = (head + 1) & _MASK32
                self._cq_head = head
                yield entry
        finally:
            self._publish_cq_head()

    def reap(self) -> list[tuple[int, int, int]]:
        """Every CQE available now as ``(user_data, res, flags)``, consumed.

        The hot-path form of completions(): one list, and the CQ head is
        published at once (the entries are copies, so the kernel may reuse
        their slots while the caller works through the list).
        """
        data, tail = self._ready_cqes()
        if not data:
            return []
        self._cq_head = tail
        _U32.pack_into(self._cq_mm, self._cq_head_off, tail)
        return list(_CQE.iter_unpack(data))

    def _publish_cq_head(self) -> None:
        # Release store: the CQE loads before it are not reordered after it
        # (x86 never reorders loads with later stores).  Only the kernel's
        # view of free CQ space depends on it, so lazy publishing is safe.
        if not self._maps:
            return  # closed while a completions() iterator was suspended
        _U32.pack_into(self._cq_mm, self._cq_head_off, self._cq_head)

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Unmap and close the ring; safe to call more than once."""
        maps, self._maps = getattr(self, "_maps", []), []
        for m in maps:
            m.close()
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort against leaked ring fds (each pins kernel memory).
        self.close()
