"""Real-kernel tests for harness.uring.Ring (no mocks)."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.kernel.ring import (
    IORING_FEAT_NODROP,
    IORING_FEAT_SINGLE_MMAP,
    IORING_OP_URING_CMD,
    URING_CMD_AREA,
    URING_CMD_OFFSET,
    Ring,
    uring_cmd_sqe,
)

SOCKET_URING_OP_SIOCINQ = 0  # enum io_uring_socket_op


def _io_uring_unavailable() -> str | None:
    knob = Path("/proc/sys/kernel/io_uring_disabled")
    if knob.exists() and knob.read_text().strip() == "2":
        return "io_uring disabled (kernel.io_uring_disabled=2)"
    try:
        Ring(1).close()
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM):
            return f"io_uring unavailable: {e}"
        raise
    return None


_SKIP = _io_uring_unavailable()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


@pytest.fixture
def ring() -> Iterator[Ring]:
    with Ring(8) as r:
        yield r


def test_ring_geometry_and_fd(ring: Ring) -> None:
    assert ring.sq_entries == 8
    assert ring.cq_entries == 2 * ring.sq_entries  # kernel default CQ sizing
    assert ring.features & IORING_FEAT_SINGLE_MMAP
    assert ring.features & IORING_FEAT_NODROP
    assert ring.sqe_size == 128
    assert fcntl.fcntl(ring.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert not os.get_inheritable(ring.fd)


def test_nop_round_trip(ring: Ring) -> None:
    ud = 0xDEADBEEF_CAFEF00D  # full 64 bits must survive
    ring.prep_nop(ud)
    assert ring.submit_and_wait(1) == 1
    assert list(ring.completions()) == [(ud, 0, 0)]
    assert list(ring.completions()) == []
    assert ring.cq_ready() == 0


def test_batch_of_nops_one_enter() -> None:
    with Ring(64) as r:
        for i in range(64):
            r.prep_nop(1000 + i)
        assert r.submit_and_wait(64) == 64
        assert r.cq_ready() == 64
        got = list(r.completions())
    assert sorted(ud for ud, _, _ in got) == list(range(1000, 1064))
    assert all(res == 0 for _, res, _ in got)


def test_poll_add_eventfd() -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with Ring(4) as r:
            r.prep_poll_add(efd, select.POLLIN, 77)
            assert r.submit() == 1
            # Zero-wait enter: flushes task work, must not produce a CQE yet.
            r.submit_and_wait(0)
            assert r.cq_ready() == 0
            assert list(r.completions()) == []

            os.eventfd_write(efd, 1)
            r.submit_and_wait(1)
            [(ud, res, _flags)] = list(r.completions())
    finally:
        os.close(efd)
    assert ud == 77
    assert res > 0
    assert res & select.POLLIN


@pytest.mark.parametrize("presubmit", [False, True])
def test_wait_resumes_after_signal(presubmit: bool) -> None:
    # A signal lands while io_uring_enter is blocked.  The kernel reports
    # either the submit count (SQEs went in with this enter) or -EINTR
    # (nothing to submit); both must end in a real wait, not an early return.
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    hits: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda signum, _frame: hits.append(signum))
    writer = threading.Timer(0.3, os.eventfd_write, (efd, 1))
    try:
        with Ring(2) as r:
            r.prep_poll_add(efd, select.POLLIN, 1)
            if presubmit:
                assert r.submit() == 1
            writer.start()
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            r.submit_and_wait(1)
            [(ud, res, _)] = list(r.completions())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        writer.join()
        os.close(efd)
    assert hits == [signal.SIGALRM]
    assert (ud, res & select.POLLIN) == (1, select.POLLIN)


def test_more_sqes_than_sq_entries_auto_flush() -> None:
    with Ring(4) as r:
        n = r.cq_entries  # 8: twice the SQ, still within CQ capacity
        for i in range(n):
            r.prep_nop(i)  # 5th prep finds the SQ full and submits 4
        # Only the SQEs prepared after the auto-flush remain to submit.
        assert r.submit_and_wait(n) == n - r.sq_entries
        assert [ud for ud, _, _ in r.completions()] == list(range(n))


def test_cq_overflow_is_not_lost() -> None:
    # Breaks the documented in-flight <= cq_entries rule on purpose: with
    # FEAT_NODROP the kernel parks extra CQEs and a later enter flushes them.
    with Ring(4) as r:
        total = r.cq_entries + 4
        for i in range(total):
            r.prep_nop(i)
        r.submit_and_wait(r.cq_entries)
        first = [ud for ud, _, _ in r.completions()]
        r.submit_and_wait(total - len(first))
        rest = [ud for ud, _, _ in r.completions()]
    assert sorted(first + rest) == list(range(total))


def test_many_round_trips_wrap_ring_indices(ring: Ring) -> None:
    # Batches of 7 on a 16-entry CQ make reaps straddle the end of the ring.
    seen = 0
    for batch in range(600):
        for j in range(7):
            ring.prep_nop(batch * 7 + j)
        ring.submit_and_wait(7)
        for ud, res, _ in ring.completions():
            assert (ud, res) == (seen, 0)
            seen += 1
    assert seen == 4200


def test_resubmit_from_inside_completion_loop() -> None:
    # Server pattern: every completion immediately re-arms a request, with
    # in-flight held at sq_entries (< cq_entries), so nothing overflows.
    with Ring(4) as r:
        issued = 0
        for _ in range(r.sq_entries):
            r.prep_nop(issued)
            issued += 1
        done: list[int] = []
        while len(done) < 1000:
            r.submit_and_wait(1)
            for ud, res, _ in r.completions():
                assert res == 0
                done.append(ud)
                r.prep_nop(issued)
                issued += 1
                r.submit()  # enter while the iterator is suspended
        r.submit_and_wait(issued - len(done))
        done.extend(ud for ud, _, _ in r.completions())
    assert done == list(range(issued))


def test_completions_break_early_keeps_rest(ring: Ring) -> None:
    for i in range(4):
        ring.prep_nop(i)
    ring.submit_and_wait(4)
    for ud, _, _ in ring.completions():
        assert ud == 0
        break
    assert ring.cq_ready() == 3
    assert [ud for ud, _, _ in ring.completions()] == [1, 2, 3]


def test_uring_cmd_on_unsupporting_fd_fails_with_errno(ring: Ring) -> None:
    rfd, wfd = os.pipe()
    try:
        cmd = struct.Struct("=10Q")  # fills the whole 80-byte area
        ring.prep_uring_cmd(rfd, 1, 5, 0, 0, cmd, *range(10))
        ring.submit_and_wait(1)
        [(ud, res, _)] = list(ring.completions())
    finally:
        os.close(rfd)
        os.close(wfd)
    print(f"URING_CMD on a pipe -> {res} ({os.strerror(-res)})")
    assert ud == 5
    assert res < 0
    # EINVAL would mean the opcode or SQE itself was rejected.
    assert res == -errno.EOPNOTSUPP


def test_uring_cmd_reaches_a_supporting_driver(ring: Ring) -> None:
    # /dev/null implements a no-op ->uring_cmd (since 5.19) returning 0.
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        ring.prep_uring_cmd(fd, 0, 9)
        ring.submit_and_wait(1)
        [(ud, res, _)] = list(ring.completions())
    finally:
        os.close(fd)
    assert ud == 9
    if res == -errno.EOPNOTSUPP:
        pytest.skip("kernel /dev/null lacks uring_cmd")
    assert res == 0


def test_uring_cmd_op_lands_in_sqe(ring: Ring) -> None:
    # Socket uring_cmd SIOCINQ returns the queued byte count, proving that
    # cmd_op (sqe offset 8) and fd reach the kernel intact.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.sendto(b"hello!", s.getsockname())
        ring.prep_uring_cmd(s.fileno(), SOCKET_URING_OP_SIOCINQ, 3)
        ring.submit_and_wait(1)
        assert list(ring.completions()) == [(3, 6, 0)]


def test_sqe_bytes_layout_and_slot_zeroing() -> None:
    # White-box: read the mapped SQE array to pin offsets to the uapi layout
    # (the kernel cannot echo cmd-area bytes back to us).
    rfd, wfd = os.pipe()
    with Ring(1) as r:
        sqes = r.sqes
        cmd = struct.Struct("=10Q")
        r.prep_uring_cmd(rfd, 0x1234, 0xABCD, 0x1122334455667788, 99, cmd, *range(1, 11))
        slot = bytes(sqes[0:128])
        assert slot[0] == IORING_OP_URING_CMD
        assert struct.unpack_from("=i", slot, 4)[0] == rfd
        assert struct.unpack_from("=I", slot, 8)[0] == 0x1234
        assert struct.unpack_from("=Q", slot, 16)[0] == 0x1122334455667788
        assert struct.unpack_from("=I", slot, 24)[0] == 99
        assert struct.unpack_from("=Q", slot, 32)[0] == 0xABCD
        assert cmd.unpack_from(slot, URING_CMD_OFFSET) == tuple(range(1, 11))
        assert URING_CMD_OFFSET + URING_CMD_AREA == 128
        r.submit_and_wait(1)
        assert list(r.completions()) == [(0xABCD, -errno.EOPNOTSUPP, 0)]
        os.close(rfd)
        os.close(wfd)

        r.prep_nop(1)  # reuses slot 0: every stale byte must be cleared
        slot = bytes(sqes[0:128])
        assert slot[0] == 0
        assert struct.unpack_from("=i", slot, 4)[0] == -1
        assert struct.unpack_from("=Q", slot, 32)[0] == 1
        assert slot[8:32] == bytes(24)
        assert slot[40:] == bytes(88)
        r.submit_and_wait(1)
        assert list(r.completions()) == [(1, 0, 0)]


def test_uring_cmd_sqe_packs_what_prep_uring_cmd_does() -> None:
    # The hot path's one-call SQE must be byte-for-byte the three-call one.
    cmd = struct.Struct("=QQH6x")
    packer = uring_cmd_sqe(cmd)
    assert packer.size == 128
    with Ring(2) as r:
        r.prep_uring_cmd(7, 2, 0xABCD, 0x1122, 2, cmd, 5, 0x99, 3)
        packer.pack_into(r.sqes, r.claim_sqe(), IORING_OP_URING_CMD, 0, 0, 7, 2, 0, 0x1122, 2, 0,
                         0xABCD, 5, 0x99, 3)  # fmt: skip
        assert bytes(r.sqes[0:128]) == bytes(r.sqes[128:256])
    for bad in (struct.Struct("11Q"), struct.Struct("=11Q")):
        with pytest.raises(ValueError):
            uring_cmd_sqe(bad)


def test_uring_cmd_sqe_reaches_the_kernel(ring: Ring) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.sendto(b"hi", s.getsockname())
        packer = uring_cmd_sqe(struct.Struct("=Q"))
        packer.pack_into(ring.sqes, ring.claim_sqe(), IORING_OP_URING_CMD, 0, 0, s.fileno(),
                         SOCKET_URING_OP_SIOCINQ, 0, 0, 0, 0, 4, 0)  # fmt: skip
        ring.submit_and_wait(1)
        assert ring.reap() == [(4, 2, 0)]


def test_reap_takes_everything_across_the_wrap(ring: Ring) -> None:
    # Batches of 7 on a 16-entry CQ: reaps straddle the end of the ring, and
    # each leaves the CQ empty (the head is published at once).
    for batch in range(50):
        for j in range(7):
            ring.prep_nop(batch * 7 + j)
        ring.submit_and_wait(7)
        assert [ud for ud, _, _ in ring.reap()] == list(range(batch * 7, batch * 7 + 7))
        assert ring.cq_ready() == 0
        assert ring.reap() == []


def test_sqe64_ring_nop_and_cmd_size_guard() -> None:
    with Ring(4, sqe128=False) as r:
        assert r.sqe_size == 64
        r.prep_nop(11)
        r.submit_and_wait(1)
        assert list(r.completions()) == [(11, 0, 0)]
        with pytest.raises(ValueError):
            r.prep_uring_cmd(0, 0, 0, 0, 0, struct.Struct("=10Q"), *range(10))


def test_close_is_idempotent() -> None:
    r = Ring(2)
    fd = r.fd
    r.close()
    r.close()
    assert r.closed
    with pytest.raises(OSError) as ei:
        os.fstat(fd)
    assert ei.value.errno == errno.EBADF
