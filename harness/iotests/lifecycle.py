"""Exporter processes, whichever target they belong to, and cleaning up after them.

ExporterProcess is generic process control: start a command, wait until it
is ready, talk QMP to it, stop it, and remove what is left.  A target
(harness.iotests.targets) says which command, how to configure the export
once the process runs, and which fs type its mounts have.

Every exporter started here is registered in TRACKER.  Cleanup stops the
process (SIGTERM, then SIGKILL) and removes its mount if it is still there,
but only a mount whose id we saw appear, or (if it died first) a new mount
of the target's own fs type that was not there when it started: we never
unmount or kill anything we did not create.  QSD's mounts have the generic
type "fuse", so "new on our mountpoint since we started" is what makes one ours.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..kernel.mount import find_mount, umount_or_detach
from ..options import FSTYPE, Settings
from . import evidence, runs
from .cleanup import Outcome, run_all
from .evidence import hang_report
from .runs import RUN
from .timeouts import scaled
from .waiting import fd_links, is_descendant, kernel_stacks, wait_until

# Outside a case's budget (cleanup, the harness's own tests); all scaled.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
QMP_TIMEOUT = 20.0  # a command on the control socket
REPO = Path(__file__).resolve().parent.parent.parent
T = TypeVar("T")


def child_env() -> dict[str, str]:
    """Environment for harness.* child processes run from any directory."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


class ExportFailed(RuntimeError):
    """The export did not come up: bad options, a refused mountpoint.  str() is
    the exporter's own one-line message, the same text on every target."""


class ExporterProcess:
    """One exporter process.  Subclasses (in the targets) give command() and,
    where the export is set up over QMP after start, configure()."""

    fstype = FSTYPE
    # Whether a hang report walks the threads with gdb (a native daemon with
    # debug info; the reference exporter's stacks are Python's).
    backtraces = False
    # The case holds, fails or delays requests: set before start() for a
    # target whose holds need setting up with the export (QSD's NBD node).
    wants_holds = False
    settings: Settings  # what it was started with (set by the subclasses)

    def __init__(self, workdir: Path, mountpoint: Path) -> None:
        self.workdir = workdir
        self.mountpoint = mountpoint
        self.pidfile = workdir / "export.pid"
        self.qmp_path = workdir / "qmp.sock"
        self.stderr_path = workdir / "export.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.mount_id: int | None = None
        self._qmp: Any = None
        self._qmp_lock = threading.Lock()
        # Asked for FUSE-over-io_uring (io-uring on): checked once it is up.
        self.wants_ring = False
        self._cleaned = False
        # spawn() and cleanup() exclude each other: a cleanup from another
        # thread (Ctrl-C, a timeout) must see the process spawn() started.
        self._spawning = threading.Lock()
        # A mount already on the mountpoint is never ours to remove.
        self._mount_before: int | None = None
        self._signalled: set[int] = set()  # what the case sent (signal steps)
        self._crash_reported = False

    def command(self) -> list[str]:
        raise NotImplementedError

    def configure(self) -> None:
        """Set the export up once the process is ready (QSD: over QMP)."""

    def start_failure(self) -> str:
        """The one-line reason when the process exited during start-up."""
        return (self.stderr().strip().splitlines() or ["<no output>"])[-1]

    # -- starting ---------------------------------------------------------

    def spawn(self) -> None:
        """Start the process; do not wait for it."""
        with self._spawning:
            if self._cleaned:
                raise RuntimeError("exporter already cleaned up; not starting it")
            before = find_mount(str(self.mountpoint))
            self._mount_before = before.mount_id if before is not None else None
            TRACKER.add(self)
            RUN.add_mountpoint(self.mountpoint)
            self.proc = self.popen()

    def popen(self) -> subprocess.Popen[bytes]:
        """Start the process of command(); a target may start it otherwise."""
        with open(self.stderr_path, "wb") as err:
            return runs.spawn(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=child_env(),
                **self.cores(),
            )

    def cores(self) -> dict[str, Any]:
        """spawn()'s arguments for a native daemon: a crash leaves its core
        in the workdir, for crash() to read the backtraces from."""
        if self.backtraces:
            return {"cwd": self.workdir, "core_dump": True}
        return {"cwd": REPO}

    def wait_ready(self, timeout: float | None = None) -> None:
        """Spawn and wait for the pidfile; ExportFailed if it exits first."""
        self.spawn()
        wait_until(
            lambda: self.pidfile.exists() or self.returncode() is not None,
            timeout or scaled(START_TIMEOUT),
            "the exporter's pidfile",
            self.report,
        )
        if self.returncode() is not None:
            raise ExportFailed(self.start_failure())

    def start(self, timeout: float | None = None) -> ExporterProcess:
        """Start, configure, and wait until the export is mounted."""
        self.wait_ready(timeout)
        try:
            self.configure()
            self.connect_qmp()  # connected from the start: no event is missed
        except BaseException as e:
            try:  # a daemon that refused the export must not linger
                self.cleanup()
            except Exception as ce:  # keep the start-up error; note the cleanup's
                e.add_note(f"and cleaning up after it failed: {ce}")
            raise
        entry = find_mount(str(self.mountpoint))
        if entry is None or not entry.is_fuse or entry.mount_id == self._mount_before:
            raise RuntimeError(f"export started but no new FUSE mount on {self.mountpoint}")
        self.mount_id = entry.mount_id
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def pids(self) -> list[int]:
        """The exporter and its child processes (queue processes), for
        whoever counts what the export costs."""
        pids = [self.pid]
        with contextlib.suppress(OSError):  # it just exited
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{tid}/children") as f:
                    pids += [int(p) for p in f.read().split()]
        return pids

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def report(self) -> str:
        """What a timed-out wait shows: the stderr tail and, while it lives,
        its threads' stacks (and backtraces) and its clients' state."""
        tail = "\n".join(self.stderr().splitlines()[-20:])
        out = [f"exporter {self.workdir.name} stderr (tail):\n{tail}" if tail.strip() else ""]
        if self.proc is not None and self.returncode() is None:
            if self.backtraces:
                out.append(hang_report(self.pids(), str(self.mountpoint)))
            else:
                out.append(f"kernel stacks of exporter {self.pid}:\n{kernel_stacks(self.pid)}")
        return "\n".join(o for o in out if o)

    # -- control socket ---------------------------------------------------

    # The legacy client runs an event loop of its own: one caller at a time
    # (a close from a cleanup thread while the case thread is in a command
    # would leave a coroutine never awaited), hence _qmp_lock around each use.

    def _client(self) -> Any:
        if self._cleaned:  # a case thread woken by the cleanup must not reconnect
            raise RuntimeError("exporter cleaned up: no QMP")
        if self._qmp is None:
            from qemu.qmp.legacy import QEMUMonitorProtocol

            q = QEMUMonitorProtocol(str(self.qmp_path))
            q.settimeout(scaled(QMP_TIMEOUT))
            q.connect()
            self._qmp = q
        return self._qmp

    def connect_qmp(self) -> None:
        with self._qmp_lock:
            self._client()

    def cmd_raw(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole response: {"return": ...} or {"error": ...}."""
        with self._qmp_lock:
            return dict(self._client().cmd_raw(name, args))

    def cmd(self, name: str, **args: Any) -> Any:
        with self._qmp_lock:
            return self._client().cmd(name, **args)

    def pull_event(self, wait: bool | float = False) -> dict[str, Any] | None:
        with self._qmp_lock:
            event: dict[str, Any] | None = self._client().pull_event(wait=wait)
            return event

    def query(self) -> dict[str, Any]:
        exports: list[dict[str, Any]] = self.cmd("query-block-exports")
        return exports[0]

    def inject(self, action: str, **args: Any) -> dict[str, Any]:
        args = {k.replace("_", "-"): v for k, v in args.items()}
        return dict(self.cmd("x-inject-fault", action=action, **args))

    def release(self, rule_id: str | None = None) -> int:
        args = {"id": rule_id} if rule_id else {}
        return int(self.cmd("x-inject-fault", action="release", **args)["released"])

    def wait_held(self, rule_id: str, count: int = 1, timeout: float | None = None) -> None:
        """Wait until rule_id holds exactly count requests."""

        def held() -> bool:
            rules = {r["id"]: r for r in self.query()["faults"]}
            return rules.get(rule_id, {}).get("held", 0) == count

        what = f"{count} request(s) held by {rule_id}"
        wait_until(held, timeout or scaled(STOP_TIMEOUT), what, self.report)

    def settle(self, fn: Callable[[], T], log: Callable[[str], None]) -> T:
        """fn() (a stop, or a wait for one).  A target whose held requests
        keep it from stopping releases them first, once it has shown that it
        waits for them, and logs so (holds/blocklayer.py)."""
        del log
        return fn()

    def close_qmp(self) -> None:
        """Close the client, once no command is in progress: a cleanup stops
        the process first, which ends a command waiting for it."""
        if not self._qmp_lock.acquire(timeout=scaled(STOP_TIMEOUT)):
            raise RuntimeError("the QMP client is still busy in another thread")
        try:
            if self._qmp is not None:
                q, self._qmp = self._qmp, None
                with contextlib.suppress(Exception):  # EOFError: the server hung up first
                    q.close()
        finally:
            self._qmp_lock.release()

    # -- stopping ---------------------------------------------------------

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self._signalled.add(sig)
        self.proc.send_signal(sig)

    def crash(self) -> str:
        """'' unless the process died of a signal nobody sent it (an
        assertion's SIGABRT, a SIGSEGV): then what a finding needs."""
        code = self.returncode()
        if code is None or code >= 0 or -code in self._signalled:
            return ""
        name = signal.Signals(-code).name
        tail = "\n".join(self.stderr().splitlines()[-20:])
        found = f"the target crashed: pid {self.pid} was killed by {name}\n{tail}".rstrip()
        core = evidence.core_file(self.workdir) if self.backtraces else None
        if core is None:
            return found
        # The backtraces are the evidence; the core is too big to keep.
        stacks = evidence.core_backtraces(core, self.command()[0])
        core.unlink()
        return f"{found}\nbacktraces from its core:\n{stacks}"

    def wait_exit(self, timeout: float | None = None) -> int:
        code = wait_until(
            lambda: (self.returncode(),) if self.returncode() is not None else None,
            timeout or scaled(STOP_TIMEOUT),
            f"exporter {self.pid} to exit",
            self.report,
        )[0]
        self.close_qmp()
        return int(code)

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM and wait for the exit status."""
        if self.returncode() is None:
            self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def is_mounted(self) -> bool:
        entry = find_mount(str(self.mountpoint))
        return entry is not None and entry.mount_id == self.mount_id

    def wait_unmounted(self, timeout: float | None = None) -> None:
        wait_until(
            lambda: not self.is_mounted(),
            timeout or scaled(STOP_TIMEOUT),
            f"{self.mountpoint} to be unmounted",
            self.report,
        )

    def cleanup(self, kill: bool = False) -> list[str]:
        """Remove whatever is left; return what had to be removed.  Each part
        runs even if another failed; a failure is raised at the end, and the
        exporter leaves TRACKER only once nothing of it is left.  kill: it
        may be hung (its case failed), so no graceful stop: SIGKILL at once,
        which is also what lets its stuck clients finish."""
        with self._spawning:  # a spawn in progress finishes first
            self._cleaned = True
        # Before the kill (our SIGKILL is no crash), and reported once.
        crashed = "" if self._crash_reported else self.crash()
        self._crash_reported = True
        outcome = run_all(
            [
                ("stop the process", lambda: self._kill(kill)),
                ("close QMP", self.close_qmp),
                ("remove the mount", self._unmount),
            ]
        )
        if outcome.failed:
            raise RuntimeError("; ".join([crashed, *outcome.failed]).lstrip("; "))
        TRACKER.discard(self)
        if crashed:  # removed, and reported as the finding it is
            raise RuntimeError(crashed)
        return outcome.removed

    def _kill(self, kill: bool) -> list[str]:
        if self.proc is None or self.returncode() is not None:
            return []
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(scaled(STOP_TIMEOUT))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                self.proc.wait(scaled(STOP_TIMEOUT))
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"UNKILLABLE pid {self.pid}:\n{kernel_stacks(self.pid)}"
                ) from None
        return [f"exporter pid {self.pid}"]

    def _unmount(self) -> list[str]:
        if self.mount_id is None and self.proc is not None:
            # Died before we saw the mount: ours only if it is our fstype and
            # new (not, say, the live export a refused second one ran into).
            entry = find_mount(str(self.mountpoint))
            if (
                entry is not None
                and entry.fstype == self.fstype
                and entry.mount_id != self._mount_before
            ):
                self.mount_id = entry.mount_id
        if self.mount_id is None or not self.is_mounted():
            return []
        umount_or_detach(str(self.mountpoint))
        return [f"mount {self.mountpoint}"]


class Tracker:
    """Every exporter this process started, for cleanup on any exit path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: list[ExporterProcess] = []
        self.created_mountpoints: list[str] = []
        # (what, fn) run by every cleanup_all(); fn returns what it removed.
        self.extra_cleanups: list[tuple[str, Callable[[], list[str]]]] = []

    def add(self, e: ExporterProcess) -> None:
        with self._lock:
            self._live.append(e)
            self.created_mountpoints.append(str(e.mountpoint))

    def discard(self, e: ExporterProcess) -> None:
        with self._lock:
            if e in self._live:
                self._live.remove(e)

    def cleanup_all(self) -> Outcome:
        """Clean up every exporter still registered, then what the targets
        keep beside them (warm spares); one failure stops none."""
        with self._lock:
            live = list(self._live)
        steps = [(f"exporter {e.workdir.name}", e.cleanup) for e in live]
        return run_all([*steps, *self.extra_cleanups])

    def leftovers(self) -> list[str]:
        """FUSE mounts on our mountpoints, and our children holding /dev/fuse."""
        found = []
        for mp in self.created_mountpoints:
            entry = find_mount(mp)
            if entry is not None and entry.is_fuse:
                found.append(f"FUSE mount on {mp}")
        for pid in _dev_fuse_holders():
            if is_descendant(pid, os.getpid()):
                found.append(f"pid {pid} holds /dev/fuse")
        return found


def _dev_fuse_holders() -> list[int]:
    return [int(p) for p in filter(str.isdigit, os.listdir("/proc")) if "/dev/fuse" in fd_links(p)]


TRACKER = Tracker()


def _cleanup_at_exit() -> None:
    for line in TRACKER.cleanup_all().failed:
        print(f"cleanup at exit: {line}", file=sys.stderr)


atexit.register(_cleanup_at_exit)

__all__ = [
    "TRACKER",
    "ExportFailed",
    "ExporterProcess",
]
