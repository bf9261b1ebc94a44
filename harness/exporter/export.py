"""The reference FUSE block exporter: one image as one regular-file mount.

    python -m harness.exporter --image IMG --mountpoint MP [--writable] ...

Lifecycle: validate everything, open the image, bind the control socket,
mount, answer FUSE_INIT, start the queue threads, write the pidfile.  On
SIGTERM/SIGINT, block-export-del, quit, FUSE_DESTROY or an unmount by
someone else it stops the queues (each closes its own fd), unmounts what it
mounted and exits 0.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import fcntl
import json
import os
import resource
import select
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .. import __version__
from ..cli import OneLineParser
from ..kernel import abi
from ..kernel.mount import MS_NOATIME, MS_NODEV, MS_NOSUID, MS_RDONLY, find_mount, mount, umount
from ..kernel.ring import IORING_MAX_ENTRIES
from ..layout import possible_cpus, ring_entries_of
from ..options import BY_KEY, FSTYPE, OPTIONS, Settings
from .backend import Backend, ImageBackend, NullBackend
from .faults import FaultError, FaultInjector
from .processes import ChildRingQueue, Link, QueueProcess, SharedState, pair, run_child
from .protocol import (
    BASE_FLAGS,
    ExportConfig,
    ExportHandler,
    ProtocolError,
    parse_classic,
)
from .qmp_server import QmpError, QmpServer, check_args
from .sharing import RingSharing
from .transport import ConnectionGone, DevFuseQueue, Queue
from .uring_transport import RingHalted, RingQueue, entry_size, ring_entries

INIT_TIMEOUT = 10.0
# Queue threads beyond the CPUs only idle; each takes a few fds (its /dev/fuse
# clone, an eventfd, a ring), on top of the program's own.
MAX_QUEUES = 256
FDS_PER_QUEUE = 3
FDS_BASE = 32
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class ExportError(Exception):
    """Bad input or a failed start: one line for the user, exit status 1."""


@dataclass
class ExportOptions:
    mountpoint: str
    image: str | None = None
    settings: Settings = field(default_factory=Settings)
    pidfile: str | None = None
    qmp: str | None = None
    export_id: str = "e0"
    node_name: str = "n0"

    def __getattr__(self, name: str) -> Any:
        """o.ring_depth is the option table's 'ring-depth'."""
        key = name.replace("_", "-")
        if key in BY_KEY:
            return self.settings[key]
        raise AttributeError(name)


class Export:
    def __init__(self, opts: ExportOptions) -> None:
        self.opts = opts
        self.mountpoint = os.path.realpath(opts.mountpoint)
        self.stopping = threading.Event()
        self.conn_gone = threading.Event()  # shared by the ring queues
        self.stop_reason = ""
        self.status = 0
        self.faults = FaultInjector()
        self.backend: Backend | None = None
        self.handler: ExportHandler | None = None
        self.qmp: QmpServer | None = None
        self.queues: list[Queue] = []
        self.threads: list[threading.Thread] = []
        self.session_fd = -1
        self.mount_id: int | None = None
        self.allow_other = False
        self.ring_queues = 0
        self.sharing: RingSharing | None = None
        self.shared: SharedState | None = None  # with queue processes
        # Wakes the main thread: written by request_stop() from any thread and
        # by the signal handler, which must not touch threading locks (the
        # main thread may hold the very lock it would take: a self-deadlock).
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.signalled: str | None = None

    # -- start-up ---------------------------------------------------------

    def start(self) -> None:
        """Bring the export up; on failure undo everything and raise."""
        try:
            self._validate_options()
            # The image first, as QSD opens its --blockdev before the export.
            self.backend = self._open_backend()
            self._validate_paths()
            if self.opts.qmp:
                self.qmp = QmpServer(
                    self.opts.qmp, self._qmp_commands(), f"fuse-iotests {__version__}"
                )
            self._mount()
            self._negotiate()
            self._start_queues()
            if self.qmp:
                self.qmp.start()
            if self.opts.pidfile:
                _write_pidfile(self.opts.pidfile)
        except BaseException:
            self._teardown()
            raise

    def _validate_options(self) -> None:
        o = self.opts
        if (o.image is None) == (o.null_size is None):
            raise ExportError("exactly one of --image and --null-size is required")
        if o.queues < 1:
            raise ExportError(f"--queues must be at least 1, not {o.queues}")
        if o.queues > MAX_QUEUES:
            raise ExportError(f"--queues {o.queues}: at most {MAX_QUEUES} queue threads")
        need = FDS_PER_QUEUE * o.queues + FDS_BASE
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if need > nofile:
            raise ExportError(
                f"--queues {o.queues} needs about {need} file descriptors; "
                f"the limit (RLIMIT_NOFILE) is {nofile}"
            )
        if o.ring_depth < 1:
            raise ExportError(f"--ring-depth must be at least 1, not {o.ring_depth}")
        if o.max_write % 4096 or not 4096 <= o.max_write <= 1 << 20:
            raise ExportError("--max-write must be a multiple of 4 KiB between 4 KiB and 1 MiB")
        if o.growable and not o.writable:
            raise ExportError("--growable requires --writable")
        if o.queue_processes and o.io_uring == "off":
            raise ExportError("--queue-processes needs --io-uring on or auto")
        if o.queue_processes and o.share_ring_queues:
            # An entry handed over lives in one process's memory.
            raise ExportError("--queue-processes and --share-ring-queues exclude each other")
        if o.io_uring != "off":
            self._validate_rings()

    def _validate_rings(self) -> None:
        """What the rings will take, checked before anything is mounted.
        RLIMIT_MEMLOCK is no limit here: since Linux 5.12 ring memory is
        charged to the memory cgroup (an export runs with memlock=0), and the
        payload buffers are plain anonymous memory, so MemAvailable is."""
        o = self.opts
        ring_queues = possible_cpus()
        shares = [
            ring_entries_of(i, o.queues, ring_queues, o.ring_depth, o.share_ring_queues)
            for i in range(o.queues)
        ]
        qids, depth = max(shares, key=lambda share: len(share[0]) * share[1])
        holds = "own"
        if o.share_ring_queues:  # a thread's ring may come to hold every thread's entries
            depth, holds = depth * o.queues, "hold (shared) up to"
        if ring_entries(len(qids) * depth) > IORING_MAX_ENTRIES:
            raise ExportError(
                f"--ring-depth {o.ring_depth}: a queue thread would {holds} {len(qids)} ring "
                f"queue(s) x {depth} entries, more than io_uring's {IORING_MAX_ENTRIES}"
            )
        entry = entry_size(ExportConfig(max_write=o.max_write).payload_size)
        total = sum(len(share[0]) * share[1] for share in shares)
        need = total * entry
        avail = _mem_available()
        if avail is not None and need > avail // 2:
            raise ExportError(
                f"--ring-depth {o.ring_depth}: the ring buffers would take {need >> 20} MiB "
                f"({total} ring entries x {entry} bytes); "
                f"half of the memory available is {avail >> 21} MiB"
            )

    def _validate_paths(self) -> None:
        o = self.opts
        mp = o.mountpoint
        # The mount table first: stat() on a FUSE mount asks its server.
        entry = find_mount(self.mountpoint)
        if entry is not None and entry.is_fuse:
            raise ExportError(f"There already is a FUSE export on '{mp}'")
        try:
            st = os.stat(mp)
        except OSError as e:
            raise ExportError(f"Failed to stat '{mp}': {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ExportError(f"'{mp}' is not a regular file")
        if o.pidfile:
            d = os.path.dirname(os.path.abspath(o.pidfile))
            if not os.path.isdir(d) or not os.access(d, os.W_OK):
                raise ExportError(f"Cannot write pidfile '{o.pidfile}': no writable directory")

    def _open_backend(self) -> Backend:
        o = self.opts
        if o.null_size is not None:
            return NullBackend(o.null_size)
        assert o.image is not None
        try:
            return ImageBackend(o.image, o.writable)
        except OSError as e:
            raise ExportError(f"Could not open '{o.image}': {e.strerror}") from None

    def _mount(self) -> None:
        o = self.opts
        self.session_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        base = [
            f"fd={self.session_fd}",
            "rootmode=100000",
            f"user_id={os.getuid()}",
            f"group_id={os.getgid()}",
            "default_permissions",
        ]
        source = o.image or "null-co"
        # As upstream fuse.c: "ro" for a read-only export, so the VFS refuses
        # a write open (and chmod) with EROFS before any request is sent.
        flags = MS_NOSUID | MS_NODEV | MS_NOATIME | (0 if o.writable else MS_RDONLY)
        attempts = {"on": [True], "off": [False], "auto": [True, False]}[o.allow_other]
        for i, allow_other in enumerate(attempts):
            data = ",".join(base + (["allow_other"] if allow_other else []))
            try:
                mount(source, self.mountpoint, FSTYPE, flags, data)
            except OSError as e:
                if i + 1 < len(attempts):
                    continue  # auto: fall back silently, as QEMU does
                raise ExportError(f"Failed to mount '{o.mountpoint}': {e.strerror}") from None
            self.allow_other = allow_other
            break
        entry = find_mount(self.mountpoint)
        if entry is None or entry.fstype != FSTYPE:
            # Without its id we could not tell our mount from another later.
            umount(self.mountpoint, lazy=True)
            raise ExportError(f"Mounted '{o.mountpoint}' but cannot find it in the mount table")
        self.mount_id = entry.mount_id

    def _negotiate(self) -> None:
        """Answer FUSE_INIT, which always arrives on the session fd."""
        o = self.opts
        assert self.backend is not None
        supported = BASE_FLAGS
        if o.io_uring != "off":
            supported |= abi.OVER_IO_URING
        config = ExportConfig(
            writable=o.writable,
            growable=o.growable,
            allow_other=self.allow_other,
            max_write=o.max_write,
            supported_flags=supported,
        )
        self.handler = handler = ExportHandler(self.backend, config)
        handler.on_destroy = lambda: self.request_stop("FUSE_DESTROY")
        buf = bytearray(8192 + config.payload_size)
        poller = select.poll()
        poller.register(self.session_fd, select.POLLIN)
        if not poller.poll(INIT_TIMEOUT * 1000):
            raise ExportError(f"No FUSE_INIT from the kernel within {INIT_TIMEOUT:.0f} s")
        n = os.readv(self.session_fd, (buf,))
        req = parse_classic(memoryview(buf)[:n])
        if req.opcode != abi.Op.INIT:
            raise ExportError(f"Expected FUSE_INIT, got {abi.op_name(req.opcode)}")
        out = memoryview(bytearray(abi.INIT_OUT.size))
        try:
            length = handler.handle(req, out)
        except ProtocolError as e:
            raise ExportError(f"FUSE_INIT failed: {e}") from None
        assert length is not None and length >= 0
        hdr = abi.OUT_HEADER.pack(16 + length, 0, req.unique)
        os.writev(self.session_fd, (hdr, out[:length]))
        neg = handler.negotiation
        if o.io_uring == "on" and not neg.io_uring:
            raise ExportError("System doesn't support FUSE-over-io_uring")
        if o.io_uring == "auto" and not neg.io_uring:
            print(
                "warning: FUSE-over-io_uring not offered by the kernel; using /dev/fuse",
                file=sys.stderr,
            )

    def _start_queues(self) -> None:
        handler = self.handler
        assert handler is not None
        o = self.opts
        uring = handler.negotiation.io_uring
        if uring:
            self.ring_queues = possible_cpus()
            if o.share_ring_queues:
                self.sharing = RingSharing(o.queues, self.ring_queues)
            if o.queue_processes:
                assert self.backend is not None
                self.shared = SharedState()
                self.backend.keep_size_in(self.shared.size)
                self.faults.on_change = self.shared.set_rules
        links: list[Link] = []  # the exporter's ends, one per queue process
        for i in range(o.queues):
            fd = self.session_fd if i == 0 else _clone_fd(self.session_fd)
            q: Queue
            if uring:
                qids, depth = ring_entries_of(
                    i, o.queues, self.ring_queues, o.ring_depth, o.share_ring_queues
                )
                extra: dict[str, Any] = {}
                if self.shared is not None:
                    ours, theirs = pair()
                    links.append(ours)
                    extra = {"link": theirs, "shared": self.shared}
                q = (ChildRingQueue if extra else RingQueue)(
                    i,
                    fd,
                    qids,
                    depth,
                    handler,
                    self.faults,
                    self.stopping,
                    poll_dev=i == 0,
                    conn_gone=self.conn_gone,
                    sharing=self.sharing,
                    **extra,
                )
            else:
                q = DevFuseQueue(i, fd, handler, self.faults, self.stopping)
            self.queues.append(q)
        rings = [q for q in self.queues if isinstance(q, RingQueue)]
        for r in rings:
            r.peers = rings
        # From here on queue 0 owns the session fd and closes it.
        self.session_fd = -1
        # Only now, with the INIT reply written, may rings REGISTER.
        if links:
            self._fork_queues(links)
        for q in self.queues:
            t = threading.Thread(target=self._serve, args=(q,), name=f"queue{q.index}", daemon=True)
            self.threads.append(t)
            t.start()
        deadline = time.monotonic() + READY_TIMEOUT
        for q in self.queues:
            while not q.started.wait(0.01):
                if self.stopping.is_set():
                    raise ExportError(f"Queue {q.index} failed to start: {self.stop_reason}")
                if time.monotonic() > deadline:
                    raise ExportError(f"Queue {q.index} not ready within {READY_TIMEOUT:.0f} s")

    def _fork_queues(self, links: list[Link]) -> None:
        """--queue-processes: a child per queue serves its rings; in its
        place stays a QueueProcess.  Forked before any thread of ours runs."""
        children = [q for q in self.queues if isinstance(q, ChildRingQueue)]
        parent = os.getpid()
        ours_fds = [self._wake_r, self._wake_w, *(self.qmp.fds() if self.qmp else [])]
        for i, (q, ours) in enumerate(zip(children, links, strict=True)):
            pid = os.fork()
            if pid == 0:  # what is the exporter's or later children's goes
                later = children[i + 1 :]
                fds = ours_fds + [fd for c in later for fd in (c.fd, c.wake_fd)]
                run_child(q, parent, fds, [c.link for c in later] + links)
            os.close(q.fd)
            q.close_wake_fd()
            q.link.sock.close()
            qp = QueueProcess(q, pid, ours, self.faults, self.conn_gone)
            self.queues[q.index] = qp
            ours_fds.append(qp.wake_fd)

    def _serve(self, q: Queue) -> None:
        try:
            q.serve()
        except ConnectionGone:
            self.request_stop("unmounted")
        except RingHalted as e:
            print(f"export: queue {q.index}: {e}", file=sys.stderr)
            self.request_stop(str(e), status=1)
        except Exception as e:  # one line for the user, never a thread traceback
            what = f"queue {q.index}: {type(e).__name__}: {e}"
            print(f"export: {what}", file=sys.stderr)
            self.request_stop(what, status=1)

    # -- running ----------------------------------------------------------

    def request_stop(self, reason: str, status: int = 0) -> None:
        if not self.stopping.is_set():
            self.stop_reason = reason
            self.status = status
            self.stopping.set()
        self._poke()

    def on_signal(self, signum: int, _frame: object) -> None:
        """The signal handler: record and poke, no locks."""
        self.signalled = signal.Signals(signum).name
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full: the main thread is awake anyway

    def wait(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        while not self.stopping.is_set():
            if self.signalled is not None:
                self.request_stop(self.signalled)
                break
            poller.poll()
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def run(self) -> int:
        self.wait()
        self._teardown()
        return self.status

    # -- teardown ---------------------------------------------------------

    def _teardown(self) -> None:
        self.stopping.set()
        self.faults.shutdown()
        if self.sharing is not None:
            self.sharing.registered.abort()  # threads that wait for one that never came
        for q in self.queues:  # all at once: queue processes stop side by side
            q.wake()
        deadline = time.monotonic() + STOP_TIMEOUT
        for q, t in zip(self.queues, self.threads, strict=False):
            # Wake it again and again: a ring queue collecting its entries
            # after an unmount checks its own deadline on each wakeup.
            while t.is_alive() and time.monotonic() < deadline:
                q.wake()
                t.join(0.1)
            if t.is_alive():
                print(f"error: {t.name} did not stop within {STOP_TIMEOUT:.0f} s", file=sys.stderr)
                faulthandler.dump_traceback(sys.stderr)
                self.status = 1
        for q in self.queues:
            q.close_wake_fd()
            if isinstance(q, QueueProcess) and q.lost:
                self.status = 1  # also when it went while we stopped
                continue
            if isinstance(q, RingQueue | QueueProcess) and self.conn_gone.is_set():
                n, total = q.ended_enotconn, q.held()
                print(
                    f"export: unmounted; queue {q.index}: "
                    + ("all" if n == total else f"{n} of {total}")
                    + " ring entries ended with ENOTCONN",
                    file=sys.stderr,
                )
        if self.session_fd >= 0:
            os.close(self.session_fd)
            self.session_fd = -1
        self._unmount()
        if self.backend is not None:
            self.backend.close()
        if self.qmp is not None:
            self.qmp.emit("BLOCK_EXPORT_DELETED", {"id": self.opts.export_id})
            self.qmp.stop()
        if self.opts.pidfile and self.mount_id is not None:
            try:
                os.unlink(self.opts.pidfile)
            except FileNotFoundError:
                pass

    def _unmount(self) -> None:
        """Unmount our own mount only, lazily: a client may still hold it open."""
        if self.mount_id is None:
            return
        entry = find_mount(self.mountpoint)
        if entry is None or entry.mount_id != self.mount_id:
            return
        try:
            umount(self.mountpoint, lazy=True)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                print(
                    f"error: failed to unmount '{self.mountpoint}': {e.strerror}", file=sys.stderr
                )
                self.status = 1

    # -- control socket ---------------------------------------------------

    def info(self) -> dict[str, Any]:
        o = self.opts
        h = self.handler
        return {
            "type": "fuse",
            "id": o.export_id,
            "node-name": o.node_name,
            "shutting-down": self.stopping.is_set(),
            "mountpoint": self.mountpoint,
            "writable": o.writable,
            "growable": o.growable,
            "allow-other": self.allow_other,
            "transport": "io-uring" if self.ring_queues else "dev-fuse",
            "negotiation": h.negotiation.as_dict() if h else None,
            "payload-size": h.config.payload_size if h else None,
            "size": self.backend.size if self.backend else None,
            "queues": [q.stats() for q in self.queues],
            "faults": self.faults.query(),
            **self._ring_info(),
        }

    def _ring_info(self) -> dict[str, Any]:
        rings = [q for q in self.queues if isinstance(q, RingQueue | QueueProcess)]
        if not rings:
            return {}
        layout = sorted(
            ({"qid": qid, "depth": q.depth, "queue": q.index} for q in rings for qid in q.qids),
            key=lambda r: r["qid"],
        )
        dev_ops: dict[str, int] = {}
        # A QueueProcess's dev_per_op is the child's, as of its last stats():
        # info() asks for those first.
        for q in rings:
            for name, n in list(q.dev_per_op.items()):  # queue 0 adds keys
                dev_ops[name] = dev_ops.get(name, 0) + n
        return {
            "possible-cpus": self.ring_queues,
            "ring-layout": layout,
            "dev-requests-after-init": {"total": sum(dev_ops.values()), "opcodes": dev_ops},
            **self._sharing_info(),
        }

    def _sharing_info(self) -> dict[str, Any]:
        if self.sharing is None:
            return {}
        return {"ring-owners": list(self.sharing.owner), "ring-moves": self.sharing.version}

    def _qmp_commands(self) -> dict[str, Any]:
        def query_block_exports(args: dict[str, Any]) -> list[dict[str, Any]]:
            check_args(args)
            return [self.info()]

        def block_export_del(args: dict[str, Any]) -> dict[str, Any]:
            check_args(args, required=("id",), optional=("mode",))
            if args.get("id") != self.opts.export_id:
                raise QmpError(f"Export '{args.get('id')}' is not found")
            if args.get("mode", "safe") not in ("safe", "hard"):
                raise QmpError(f"Parameter 'mode' does not accept value '{args['mode']}'")
            # As QEMU's export.c: a request in flight (here: parked by a
            # fault rule) holds a reference, which only mode "hard" overrides.
            if args.get("mode", "safe") == "safe" and self.faults.parked:
                raise QmpError(f"export '{args['id']}' still in use")
            self.request_stop("block-export-del")
            return {}

        def quit_(args: dict[str, Any]) -> dict[str, Any]:
            check_args(args)
            self.request_stop("quit")
            return {}

        def inject_fault(args: dict[str, Any]) -> dict[str, Any]:
            try:
                if args.get("action") == "release":
                    return {"released": self.faults.release(args.get("id"))}
                rule = self.faults.add(
                    args["action"],
                    args["opcode"],
                    offset=args.get("offset"),
                    errno_=args.get("errno"),
                    delay_ms=args.get("delay-ms"),
                    count=args.get("count"),
                )
            except FaultError as e:
                raise QmpError(str(e)) from None
            return rule.as_dict(0)

        return {
            "query-block-exports": query_block_exports,
            "block-export-del": block_export_del,
            "quit": quit_,
            "x-inject-fault": inject_fault,
        }


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _clone_fd(session_fd: int) -> int:
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, abi.FUSE_DEV_IOC_CLONE, session_fd.to_bytes(4, "little"))
    except OSError:
        os.close(fd)
        raise
    return fd


def _write_pidfile(path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


# -- command line -----------------------------------------------------------


def parse_args(argv: list[str] | None) -> ExportOptions:
    p = OneLineParser(prog="export", description="Export one image as a regular-file FUSE mount.")
    p.add_argument("--image", metavar="IMG", help="raw image file to export (or --null-size)")
    p.add_argument("--mountpoint", metavar="MP", required=True, help="an existing regular file")
    for o in OPTIONS:  # the export options: one table (harness/options.py)
        if o.switch:
            p.add_argument(o.flag, action="store_true", help=o.doc)
        else:
            p.add_argument(o.flag, type=_table_type(o.key), default=o.default, metavar=o.metavar,
                           help=o.doc)  # fmt: skip
    p.add_argument("--pidfile", metavar="F")
    p.add_argument("--qmp", metavar="SOCKET", help="QMP control socket (UNIX) to create")
    p.add_argument("--id", default="e0", dest="export_id")
    p.add_argument("--version", action="version", version=f"fuse-iotests exporter {__version__}")
    ns = vars(p.parse_args(argv))
    values = {o.key: ns.pop(o.key.replace("-", "_")) for o in OPTIONS}
    explicit = {k for k, v in values.items() if v != BY_KEY[k].default}
    return ExportOptions(**ns, settings=Settings(values, frozenset(explicit)))


def _table_type(key: str) -> Any:
    """argparse type: the table's converter; its message, in one line."""

    def conv(text: str) -> Any:
        try:
            return BY_KEY[key].convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    conv.__name__ = key
    return conv


def serve_spare(stdin: BinaryIO) -> int:
    """Say "ready" on stdout, then run main() with the argv that arrives on
    stdin as one JSON line, {"argv": [...], "stderr": PATH}; stdout and
    stderr go to PATH.  EOF before that: nobody needed this spare."""
    try:  # unbuffered: nothing may be left to flush into PATH at exit
        os.write(1, b"ready\n")
    except BrokenPipeError:
        pass  # taken before it was ready: nobody waits for the word
    line = stdin.readline()
    if not line:
        return 0
    msg = json.loads(line)
    fd = os.open(msg["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return main(msg["argv"])


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    export = Export(opts)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, export.on_signal)
    try:
        export.start()
    except ExportError as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"export: {e.strerror}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    status = export.run()
    # Stopped already: a late SIGTERM must not turn exit status 0 into -15.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    return status
