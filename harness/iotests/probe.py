"""A minimal in-process FUSE server for probing the kernel.

Probe mounts one regular file (rootmode=100000) and leaves every protocol
decision to its caller: when and how FUSE_INIT is answered (INIT_EXT,
OVER_IO_URING, max_write, max_pages), which rings exist (with or without
SQE128), and which REGISTER / COMMIT_AND_FETCH commands they submit with
which qid, payload size and commit_id.  serve() answers just enough requests
(LOOKUP, GETATTR, STATX -> ENOSYS, OPEN, READ, FLUSH, RELEASE) for a client
`pread` to succeed, from /dev/fuse and from ring CQEs alike.

Nothing here blocks in the kernel: /dev/fuse is read non-blocking and rings
are reaped with zero-wait io_uring_enter calls, inside bounded polls.  The
probe thread therefore holds its lock only for short syscalls, and
teardown() can run from any thread at any time: it aborts the connection
(fusectl, else by closing every ring and the /dev/fuse fd, which ends the
connection as a dying server would), kills the client children it started,
and unmounts its own mount (lazily if busy).  It never touches anything it
did not create.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import select
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..kernel import abi
from ..kernel.abi import Op
from ..kernel.errnos import errno_name
from ..kernel.mount import MS_NODEV, MS_NOSUID, find_mount, mount, umount_or_detach
from ..kernel.ring import Ring
from .client import start_client
from .timeouts import scaled
from .waiting import WaitTimeout, kernel_stacks, wait_until

if TYPE_CHECKING:
    from .steps import Session

T = TypeVar("T")

FSTYPE = "fuse.fuse-iotests-probe"
FUSECTL = Path("/sys/fs/fuse/connections")
FILE_SIZE = 1 << 20
DEFAULT_MAX_WRITE = 128 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
WAIT = 5.0  # bound for something that must happen, outside a case (scaled)
QUIET = 0.3  # bound for showing that something does NOT happen
# The kernel refuses /dev/fuse reads into buffers smaller than a maximal
# WRITE; 1 MiB is the largest max_write (max_pages_limit 256).
_READ_BUF = (1 << 20) + PAGE_SIZE


class ProbeError(Exception):
    """The kernel did something the probe did not expect, or it was torn down."""


@dataclass(frozen=True)
class KernelInit:
    """FUSE_INIT as the kernel sent it."""

    major: int
    minor: int
    flags: int  # offered: flags | flags2 << 32
    max_readahead: int

    @property
    def flag_names(self) -> list[str]:
        return abi.flag_names(self.flags)


@dataclass(frozen=True)
class Served:
    """One request the probe answered: its opcode name and where it came from."""

    op: str
    via: str  # "dev" or "qid<N>"
    error: str = ""  # errno name of an error reply, "" for success


@dataclass(eq=False)
class RingEntry:
    """One registered (or attempted) ring entry: header + payload buffers."""

    index: int
    qid: int
    header: memoryview
    payload: memoryview
    iov_addr: int
    cmd: str = ""  # the command last submitted for it
    commit_id: int = 0  # of the request it holds
    opcode: int = 0
    _keep: tuple[object, ...] = ()  # buffers the kernel points into


@dataclass(frozen=True)
class Completion:
    """A CQE of an entry's REGISTER or COMMIT_AND_FETCH."""

    entry: RingEntry
    cmd: str
    res: int

    @property
    def result(self) -> str:
        """'request' when a request arrived in the entry, else the errno name."""
        return "request" if self.res == 0 else errno_name(self.res)


class ProbeRing:
    """An io_uring plus the entries registered through it.  Use Probe.ring()."""

    def __init__(self, probe: Probe, entries: int, sqe128: bool) -> None:
        self.probe = probe
        self.sqe128 = sqe128
        self.ring = Ring(entries, sqe128=sqe128)
        self.entries: list[RingEntry] = []
        self.completions: list[Completion] = []  # reaped, not yet taken

    def register(self, qid: int, payload_size: int | None = None) -> RingEntry:
        """Submit REGISTER for a new entry; its CQE comes with its first request."""
        size = self.probe.payload_size if payload_size is None else payload_size
        hsize = abi.URING_HEADER_SIZE
        mem = mmap.mmap(-1, hsize + size)
        iovs = bytearray(abi.URING_IOVEC2.size)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        abi.URING_IOVEC2.pack_into(iovs, 0, base, hsize, base + hsize, size)
        iov_addr = ctypes.addressof(ctypes.c_char.from_buffer(iovs))
        view = memoryview(mem)
        e = RingEntry(
            len(self.entries), qid, view[:hsize], view[hsize:], iov_addr, _keep=(mem, iovs)
        )
        self.entries.append(e)
        self._submit(e, abi.FUSE_IO_URING_CMD_REGISTER, iov_addr, 2, 0)
        return e

    def commit(self, e: RingEntry, commit_id: int | None = None) -> None:
        """COMMIT_AND_FETCH the reply already in e (commit_id defaults to e's)."""
        cid = e.commit_id if commit_id is None else commit_id
        self._submit(e, abi.FUSE_IO_URING_CMD_COMMIT_AND_FETCH, 0, 0, cid)

    def _submit(self, e: RingEntry, cmd: int, addr: int, length: int, commit_id: int) -> None:
        e.cmd = abi.URING_CMD_NAMES[cmd]
        with self.probe.locked():
            fd = self.probe.dev_fd
            if self.sqe128:
                values = (0, commit_id, e.qid)
                self.ring.prep_uring_cmd(fd, cmd, e.index, addr, length, abi.URING_CMD_REQ, *values)
            else:
                # A 64-byte SQE has only 16 bytes of cmd area: no room for the
                # 24-byte fuse_uring_cmd_req, which is the point of the probe.
                self.ring.prep_uring_cmd(fd, cmd, e.index, addr, length)
            self.ring.submit()

    def reap(self) -> int:
        """Collect the CQEs available now (zero-wait; runs pending task work)."""
        with self.probe.locked():
            self.ring.submit_and_wait(0)
            for user_data, res, _ in self.ring.completions():
                e = self.entries[user_data]
                self.completions.append(Completion(e, e.cmd, res))
        return len(self.completions)

    def take(self) -> Completion | None:
        self.reap()
        return self.completions.pop(0) if self.completions else None

    def close(self) -> None:
        self.ring.close()


@dataclass
class Client:
    """A one-shot `python -m harness.client` child."""

    argv: list[str]
    proc: subprocess.Popen[str]
    output: str | None = None

    def done(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        """SIGKILL it if still running; bounded wait for its exit."""
        if not self.done():
            self.proc.send_signal(signal.SIGKILL)
        wait_until(self.done, scaled(WAIT), f"probe client {self.argv} to exit", self._stacks)
        self.result()

    def _stacks(self) -> str:
        return kernel_stacks(self.proc.pid)

    def result(self) -> str:
        """Its output line; call after done()."""
        if self.output is None:
            out, _ = self.proc.communicate(timeout=scaled(WAIT))
            self.output = out.strip()
        return self.output


class Probe:
    """One probe mount: a /dev/fuse session on a single regular file."""

    def __init__(
        self,
        workdir: Path,
        session: Session | None = None,
    ) -> None:
        self.workdir = workdir
        self.session = session
        self.mountpoint = workdir / "probe.mnt"
        self.dev_fd = -1
        self.mount_id: int | None = None
        self.conn: str | None = None  # fusectl name: the mount's kernel dev_t
        self.init: KernelInit | None = None
        self.init_unique = 0
        self.max_write = DEFAULT_MAX_WRITE  # as replied to FUSE_INIT
        self.max_pages = DEFAULT_MAX_WRITE // PAGE_SIZE
        self.payload_size = max(8192, DEFAULT_MAX_WRITE)  # what REGISTER needs
        self.rings: list[ProbeRing] = []
        self.clients: list[Client] = []
        self.served: list[Served] = []
        self.refused: list[Completion] = []  # failed CQEs met while serving
        self._lock = threading.RLock()
        self._closed = False
        self._buf = bytearray(_READ_BUF)
        if session is not None:
            session.defer(self.teardown, "probe: abort, kill clients, unmount")
            session.diagnose(self.report)

    # -- plumbing ---------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock around an fd use; raises once torn down."""
        with self._lock:
            if self._closed:
                raise ProbeError("probe torn down")
            yield

    def wait(self, condition: Callable[[], T], what: str, timeout: float | None = None) -> T:
        """Bounded: by the case's budget (capped at timeout), else by timeout or WAIT."""
        if self.session is not None:
            return self.session.wait(condition, what, cap=timeout)
        return wait_until(condition, scaled(timeout or WAIT), what, self.report)

    def stays_false(self, condition: Callable[[], object], what: str, bound: float = QUIET) -> bool:
        """True if condition() stayed false for the whole bound (a poll that must time out)."""
        try:
            wait_until(condition, bound, what)
        except WaitTimeout:
            return True
        return False

    def report(self) -> str:
        lines = [f"probe {self.mountpoint}: closed={self._closed} conn={self.conn}"]
        lines.append("served: " + " ".join(f"{s.op}@{s.via}" for s in self.served))
        for i, r in enumerate(self.rings):
            for e in r.entries:
                lines.append(f"ring{i} entry{e.index} qid={e.qid} last={e.cmd}")
        for c in self.clients:
            if not c.done():
                lines.append(f"client {c.argv} running:\n{kernel_stacks(c.proc.pid)}")
        return "\n".join(lines)

    # -- mount and FUSE_INIT ---------------------------------------------

    def mount(self) -> None:
        self.mountpoint.touch()
        with self.locked():
            self.dev_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            data = f"fd={self.dev_fd},rootmode=100000,user_id=0,group_id=0"
            mount("fuse-iotests-probe", str(self.mountpoint), FSTYPE, MS_NOSUID | MS_NODEV, data)
            entry = find_mount(str(self.mountpoint))
            if entry is None or entry.fstype != FSTYPE:
                raise ProbeError(f"mounted {self.mountpoint} but it is not in the mount table")
            self.mount_id = entry.mount_id
            self.conn = entry.fusectl_name

    def read_init(self) -> KernelInit:
        """Read FUSE_INIT from /dev/fuse (it always comes there first)."""
        raw = self.wait(self._read_dev, "FUSE_INIT on /dev/fuse")
        _, opcode, unique, *_ = abi.IN_HEADER.unpack_from(raw)
        if opcode != Op.INIT:
            raise ProbeError(f"expected INIT, got {abi.op_name(opcode)}")
        major, minor, readahead, flags, flags2, *_ = abi.INIT_IN.unpack_from(raw, 40)
        self.init = KernelInit(major, minor, flags | flags2 << 32, readahead)
        self.init_unique = unique
        return self.init

    def reply_init(
        self,
        *,
        init_ext: bool = True,
        over_io_uring: bool = True,
        max_write: int = DEFAULT_MAX_WRITE,
        max_pages: int | None = None,
    ) -> int:
        """Answer FUSE_INIT; returns the 64-bit flags written (flags2 even without INIT_EXT).

        over_io_uring sets the bit in flags2 whether or not init_ext is set,
        so a probe can show that the kernel ignores flags2 without INIT_EXT.
        """
        assert self.init is not None, "read_init() first"
        pages = -(-max_write // PAGE_SIZE) if max_pages is None else max_pages
        flags = abi.MAX_PAGES | (abi.INIT_EXT if init_ext else 0)
        flags2 = abi.OVER_IO_URING >> 32 if over_io_uring else 0
        minor = min(self.init.minor, abi.OUR_MINOR)
        body = abi.INIT_OUT.pack(
            abi.KERNEL_VERSION, minor, self.init.max_readahead, flags, 16, 12,
            max_write, 1, pages, 0, flags2, 0, 0, *(0,) * 11,
        )  # fmt: skip
        self.max_write, self.max_pages = max_write, pages
        self.payload_size = max(8192, max_write, pages * PAGE_SIZE)
        self._write_dev(self.init_unique, 0, body)
        return flags | flags2 << 32

    # -- /dev/fuse ---------------------------------------------------------

    def _read_dev(self) -> bytes | None:
        """One request from /dev/fuse, or None if there is none now."""
        with self.locked():
            try:
                n = os.readv(self.dev_fd, [self._buf])
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                if e.errno == errno.ENOENT:  # interrupted before we read it
                    return None
                raise
            return bytes(self._buf[:n])

    def _write_dev(self, unique: int, error: int, body: bytes | memoryview = b"") -> None:
        hdr = abi.OUT_HEADER.pack(16 + len(body), error, unique)
        with self.locked():
            try:
                os.writev(self.dev_fd, [hdr, body])
            except OSError as e:
                if e.errno != errno.ENOENT:  # ENOENT: interrupted meanwhile
                    raise

    def dev_readable(self) -> bool:
        with self.locked():
            p = select.poll()
            p.register(self.dev_fd, select.POLLIN)
            return bool(p.poll(0))

    # -- rings ---------------------------------------------------------------

    def ring(self, entries: int = 8, sqe128: bool = True) -> ProbeRing:
        with self.locked():
            r = ProbeRing(self, entries, sqe128)
            self.rings.append(r)
            return r

    def ring_pending(self) -> bool:
        """A CQE is waiting on some ring."""
        return any(r.reap() for r in self.rings)

    def wait_completion(self, r: ProbeRing, what: str, timeout: float | None = None) -> Completion:
        return self.wait(r.take, what, timeout)

    # -- serving -------------------------------------------------------------

    def answer(self, opcode: int, arg: memoryview | bytes, out: memoryview) -> int | None:
        """The reply to one request: None (no reply), -errno, or len(out[:n])."""
        if opcode in (Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT):
            return None
        if opcode == Op.GETATTR:
            abi.ATTR_OUT.pack_into(
                out, 0, 0, 0, 0, abi.ROOT_ID, FILE_SIZE, FILE_SIZE // 512,
                0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 512, 0,
            )  # fmt: skip
            return abi.ATTR_OUT.size
        if opcode == Op.OPEN:
            abi.OPEN_OUT.pack_into(out, 0, 0, abi.FOPEN_DIRECT_IO, 0)
            return abi.OPEN_OUT.size
        if opcode == Op.READ:
            _, offset, size, *_ = abi.READ_IN.unpack_from(arg)
            n = max(0, min(size, FILE_SIZE - offset, len(out)))
            out[:n] = bytes(n)
            return n
        if opcode in (Op.FLUSH, Op.RELEASE):
            return 0
        if opcode == Op.LOOKUP:
            return -errno.ENOENT
        return -errno.ENOSYS  # STATX, GETXATTR, ...: the kernel falls back

    def _record(self, opcode: int, via: str, result: int | None) -> None:
        err = errno_name(result) if result is not None and result < 0 else ""
        self.served.append(Served(abi.op_name(opcode), via, err))

    def serve_dev_once(self) -> bool:
        """Answer one /dev/fuse request if there is one."""
        raw = self._read_dev()
        if raw is None:
            return False
        _, opcode, unique, *_ = abi.IN_HEADER.unpack_from(raw)
        out = memoryview(bytearray(self.payload_size))
        result = self.answer(opcode, memoryview(raw)[40:], out)
        if result is not None:
            self._record(opcode, "dev", result)
            if result < 0:
                self._write_dev(unique, result)
            else:
                self._write_dev(unique, 0, out[:result])
        return True

    def load(self, c: Completion) -> int:
        """Decode the request a successful completion put in its entry; returns its opcode."""
        if c.res != 0:
            raise ProbeError(f"{c.cmd} on qid {c.entry.qid} failed: {errno_name(c.res)}")
        e = c.entry
        _, e.opcode, _, *_ = abi.IN_HEADER.unpack_from(e.header)
        _, e.commit_id, _, _, _ = abi.URING_ENT_IN_OUT.unpack_from(
            e.header, abi.URING_ENT_IN_OUT_OFFSET
        )
        return e.opcode

    def prepare_reply(self, e: RingEntry) -> None:
        """Answer the request held by e into its buffers (not committed yet)."""
        _, opcode, unique, *_ = abi.IN_HEADER.unpack_from(e.header)
        op_in = e.header[abi.URING_OP_IN_OFFSET : abi.URING_ENT_IN_OUT_OFFSET]
        result = self.answer(opcode, op_in, e.payload)
        result = 0 if result is None else result  # a ring request always gets a commit
        self._record(opcode, f"qid{e.qid}", result)
        n = max(result, 0)
        abi.OUT_HEADER.pack_into(e.header, 0, 16 + n, min(result, 0), unique)
        abi.URING_ENT_IN_OUT.pack_into(
            e.header, abi.URING_ENT_IN_OUT_OFFSET, 0, e.commit_id, n, 0, 0
        )

    def serve_ring_once(self, r: ProbeRing) -> bool:
        c = r.take()
        if c is None:
            return False
        if c.res != 0:  # a refused command: what the kernel answered, for the transcript
            self.refused.append(c)
            return True
        self.load(c)
        self.prepare_reply(c.entry)
        r.commit(c.entry)
        return True

    def serve(self, until: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        """Answer requests from /dev/fuse and every ring until until() holds."""

        def step() -> bool:
            busy = True
            while busy:
                busy = self.serve_dev_once()
                for r in self.rings:
                    busy = self.serve_ring_once(r) or busy
            return until()

        self.wait(step, what, timeout)

    def take_served(self) -> list[Served]:
        done, self.served = self.served, []
        return done

    def take_refused(self) -> list[Completion]:
        done, self.refused = self.refused, []
        return done

    def drain(self) -> list[Completion]:
        """The CQEs there now or arriving within the quiet bound."""
        out: list[Completion] = []

        def collect() -> bool:
            for r in self.rings:
                while (c := r.take()) is not None:
                    out.append(c)
            return False  # collect for the whole bound

        self.stays_false(collect, "CQEs")
        return out

    # -- clients -------------------------------------------------------------

    def client(self, op: str, *args: int, cpu: int | None = None) -> Client:
        """Start `python -m harness.client OP MOUNTPOINT ARGS` (pinned to cpu)."""
        with self.locked():
            proc = start_client(op, self.mountpoint, *args, cpu=cpu)
            c = Client([op, *map(str, args)], proc)
            self.clients.append(c)
            return c

    # -- teardown ------------------------------------------------------------

    def abort(self) -> bool:
        """Abort the connection through fusectl; False if fusectl is not mounted."""
        if self.conn is None:
            return False
        try:
            with open(FUSECTL / self.conn / "abort", "w") as f:
                f.write("1")
        except FileNotFoundError:
            return False
        return True

    def teardown(self) -> None:
        """Undo everything the probe created; safe from any thread, idempotent.

        Every step is tried even if an earlier one failed; the failures are
        raised together at the end.
        """
        problems: list[str] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:
                problems.append(f"{what}: {type(e).__name__}: {e}")

        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Abort first: a client waiting for a request we hold cannot be
            # killed, and umount waits for the ring queues to stop.  Without
            # fusectl, closing the rings and the last /dev/fuse fd aborts the
            # connection as a dying server does.
            attempt("abort", self.abort)
            for r in self.rings:
                attempt("close ring", r.close)
            if self.dev_fd >= 0:
                attempt("close /dev/fuse", lambda: os.close(self.dev_fd))
                self.dev_fd = -1
        for c in self.clients:
            attempt("client", c.kill)
        attempt("unmount", self._unmount)
        if problems:
            raise ProbeError("; ".join(problems))

    def _unmount(self) -> None:
        """Unmount our own mount (by mount id), lazily if a client still holds it."""
        if self.mount_id is None or self._unmounted():
            return
        umount_or_detach(str(self.mountpoint))
        wait_until(self._unmounted, scaled(WAIT), f"{self.mountpoint} unmounted", self.report)

    def _unmounted(self) -> bool:
        entry = find_mount(str(self.mountpoint))
        return entry is None or entry.mount_id != self.mount_id


def read_kernel_init(workdir: Path) -> KernelInit:
    """Mount a probe, read the kernel's FUSE_INIT, tear everything down."""
    p = Probe(workdir)
    try:
        p.mount()
        return p.read_init()
    finally:
        p.teardown()
