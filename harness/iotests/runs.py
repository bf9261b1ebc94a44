"""Runs that leave nothing behind, whatever kills them.

Every process that uses the harness (a tools/check run, a pytest worker)
registers itself in STATE_DIR the first time it starts something: a JSON
file it keeps flock()ed for its whole life, listing its cgroup, the
mountpoints its exporters use, the directories it made and the CPUs it took
offline or brought online (with the state to put back).  Every process
it starts (exporters, qemu-storage-daemon, clients, dd, fio, qemu-io) goes
into that per-run cgroup (cgroup v2; without a writable one, the pids are
listed instead) and gets a parent-death signal.

A lock nobody holds is a run that died (the kernel drops a dead process's
flock, so a reused pid cannot fool it).  reap_stale() finds those and
removes what they left: it kills the cgroup (cgroup.kill) or the listed
processes, unmounts FUSE mounts on the listed mountpoints or inside the
listed directories (only ours: every one of them is a directory the run
created), puts the CPUs it changed back, deletes the directories, and says
what it removed only after checking that it is gone.  tools/check runs it
first, and `--cleanup` runs only it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..kernel import cpus
from ..kernel.libc import die_with_parent
from ..kernel.mount import mount_table, umount_or_detach
from .cleanup import run_all
from .waiting import WaitTimeout, kernel_stacks


# FUSE_IOTESTS_STATE_DIR: a private registry (the harness's own tests use one).
# Root's is under /run; another user's (who can only run the pure tests) under
# its own runtime or cache directory, never a shared path in /tmp.
def _default_state() -> Path:
    if os.geteuid() == 0:
        return Path("/run/fuse-iotests/runs")
    base = os.environ.get("XDG_RUNTIME_DIR") or str(Path.home() / ".cache")
    return Path(base) / "fuse-iotests" / "runs"


STATE_DIR = Path(os.environ.get("FUSE_IOTESTS_STATE_DIR") or _default_state())
# What a registration may ask to delete: only directories the harness makes
# (mkdtemp prefixes) or paths inside them.
OUR_DIR_PREFIX = "fuse-iotests"


def _ours(path: Path) -> bool:
    """A real directory or file (not a symlink) owned by us: a registry
    someone else could write to must not tell us what to delete."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not stat.S_ISLNK(st.st_mode)


def _may_delete(d: str) -> bool:
    return any(part.startswith(OUR_DIR_PREFIX) for part in Path(d).parts)


CGROUP_PREFIX = "fuse-iotests-run-"
REAP_TIMEOUT = 10.0


@dataclass
class RunState:
    pid: int
    started: float
    cgroup: str | None = None
    pids: list[int] = field(default_factory=list)  # without a cgroup
    mountpoints: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    # CPU -> whether it was online before the run changed it (JSON keys are str).
    cpus: dict[str, bool] = field(default_factory=dict)


def cgroup2_root() -> Path | None:
    """This process's cgroup v2 directory, if one is mounted and writable."""
    mounts = [e.mountpoint for e in mount_table() if e.fstype == "cgroup2"]
    try:
        own = next(
            line.split(":", 2)[2].strip()
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        )
    except (OSError, StopIteration):
        return None
    for m in mounts:
        path = Path(m + own)
        if (path / "cgroup.procs").exists() and os.access(path, os.W_OK):
            return path
    return None


class Run:
    """This process's registration; created on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self.state: RunState | None = None
        self.path: Path | None = None

    def _ensure(self) -> RunState:
        if self.state is not None:
            return self.state
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _ours(STATE_DIR):
            raise RuntimeError(f"run registry {STATE_DIR} is not a directory of ours")
        self.path = STATE_DIR / f"{os.getpid()}-{time.time_ns()}.json"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.state = RunState(os.getpid(), time.time(), cgroup=_make_cgroup(self.path.stem))
        self._save()
        return self.state

    def _save(self) -> None:
        assert self.state is not None
        data = json.dumps(asdict(self.state), indent=1).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def adopt(self, pid: int) -> None:
        """Put a child we started into the run's cgroup (or list it)."""
        with self._lock:
            state = self._ensure()
            if state.cgroup is not None:
                try:
                    Path(state.cgroup, "cgroup.procs").write_text(str(pid))
                    return
                except OSError:
                    pass  # it exited already, or the cgroup went away: list it
            state.pids.append(pid)
            self._save()

    def add_mountpoint(self, path: Path | str) -> None:
        self._add("mountpoints", str(path))

    def add_dir(self, path: Path | str) -> None:
        self._add("dirs", str(path))

    def changing_cpu(self, cpu: int, was_online: bool) -> None:
        """Before taking CPU `cpu` offline or online: what to put back."""
        with self._lock:
            state = self._ensure()
            state.cpus.setdefault(str(cpu), was_online)
            self._save()

    def restored_cpu(self, cpu: int) -> None:
        """CPU `cpu` is as the run found it again."""
        with self._lock:
            if self.state is not None and self.state.cpus.pop(str(cpu), None) is not None:
                self._save()

    def _add(self, what: str, value: str) -> None:
        with self._lock:
            items: list[str] = getattr(self._ensure(), what)
            if value not in items:
                items.append(value)
                self._save()

    def leftovers(self) -> list[str]:
        """What of this run is still there: processes, FUSE mounts."""
        with self._lock:
            return [] if self.state is None else _leftovers(self.state)

    def finish(self) -> None:
        """At exit, after our own cleanup: drop the registration if nothing
        of ours is left; otherwise keep it for the next run to reap."""
        with self._lock:
            if self.state is None or self.path is None:
                return
            for cpu, was in _cpus_changed(self.state):  # what an instance left changed
                with contextlib.suppress(OSError):
                    cpus.set_online(cpu, was)
            if _leftovers(self.state):
                return
            if self.state.cgroup:
                # EBUSY until the kernel has let go of our killed children:
                # wait (bounded); if it is still there, the next run reaps it.
                try:
                    _wait(lambda: _rmdir(self.state.cgroup if self.state else None), "our cgroup")
                except TimeoutError:
                    return
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self.state = None


RUN = Run()
atexit.register(RUN.finish)  # registered before TRACKER's cleanup, so runs after it


def _make_cgroup(name: str) -> str | None:
    root = cgroup2_root()
    if root is None:
        return None
    path = root / f"{CGROUP_PREFIX}{name}"
    try:
        path.mkdir()
    except OSError:
        return None
    return str(path)


def spawn(argv: list[str], core_dump: bool = False, **kw: Any) -> subprocess.Popen[Any]:
    """Popen a child of this run: adopted, and dying with its parent thread.
    core_dump: a crash leaves a core where the kernel's core_pattern says
    (its cwd, on a machine that keeps the default "core")."""
    parent = os.getpid()

    def child() -> None:
        die_with_parent(parent=parent)
        if core_dump:
            hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
            resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))

    proc: subprocess.Popen[Any] = subprocess.Popen(argv, preexec_fn=child, **kw)
    RUN.adopt(proc.pid)
    return proc


class ToolTimeout(WaitTimeout):
    """An external tool overran its bound; str() is the bounded-wait report."""


def run(
    argv: list[str],
    timeout: float,
    diagnose: Callable[[], str] | None = None,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """subprocess.run for an external tool (dd, fio, qemu-io, ...), adopted.
    An overrun kills it with every process it forked (its own process group:
    fio's jobs hold the output pipe too) and raises ToolTimeout with what
    they were doing."""
    with spawn(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    ) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            group = _group(p.pid)
            stacks = "\n".join(kernel_stacks(pid) for pid in group)
            kill_group(p.pid)
            try:
                out, err = p.communicate(timeout=REAP_TIMEOUT)
            except subprocess.TimeoutExpired:  # a child that left the group
                p.kill()
                out, err = "", ""
            tail = "\n".join((out + err).splitlines()[-10:])
            report = [
                f"timed out after {timeout:.1f}s waiting for {argv[0]} to exit "
                f"(killed): {' '.join(argv)}",
                f"{argv[0]} output (tail):\n{tail}" if tail else f"{argv[0]}: no output",
                f"kernel stacks of {argv[0]} (process group {p.pid}):\n{stacks}",
                diagnose() if diagnose is not None else "",
            ]
            raise ToolTimeout("\n".join(r for r in report if r)) from None
        return subprocess.CompletedProcess(argv, p.returncode, out, err)


def kill_group(pgid: int) -> None:
    """SIGKILL a process group of ours: a tool and what it forked, or a VM
    (vng, virtme-run and QEMU), even when its leader has exited."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _group(pgid: int) -> list[int]:
    """The processes of a process group."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            pids.append(int(pid))
    return sorted(pids)


# -- finding and removing what dead runs left ---------------------------------


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and "Z" not in _state_of(pid)


def _state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _cgroup_pids(cgroup: str) -> list[int]:
    try:
        return [int(x) for x in Path(cgroup, "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _our_mounts(state: RunState) -> list[str]:
    """FUSE mounts on the run's mountpoints or inside its directories."""
    dirs = [d.rstrip("/") + "/" for d in state.dirs]
    return sorted(
        {
            e.mountpoint
            for e in mount_table()
            if e.is_fuse
            and (e.mountpoint in state.mountpoints or e.mountpoint.startswith(tuple(dirs)))
        },
        key=len,
        reverse=True,  # the deepest first
    )


def _leftovers(state: RunState) -> list[str]:
    left = []
    if state.cgroup:
        left += [f"process {p}" for p in _cgroup_pids(state.cgroup)]
    left += [f"process {p}" for p in state.pids if alive(p)]
    left += [f"FUSE mount {m}" for m in _our_mounts(state)]
    left += [_cpu_change(c, was) for c, was in _cpus_changed(state)]
    return left


def _cpu_change(cpu: int, was_online: bool) -> str:
    return f"the {'offline' if was_online else 'online'} state of CPU {cpu}"


def _cpus_changed(state: RunState) -> list[tuple[int, bool]]:
    """The CPUs the run changed that are not back as it found them."""
    now = cpus.Topology.read().online
    return [(int(c), was) for c, was in sorted(state.cpus.items()) if (int(c) in now) != was]


def _rmdir(path: str | None) -> bool:
    """True once path is gone."""
    if path is None:
        return True
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + REAP_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


def _reap(state: RunState) -> tuple[list[str], list[str]]:
    """Remove what one dead run left; (removed, still there).  Each part runs
    whatever the others did (cleanup.run_all); what is left is looked at,
    not assumed."""
    procs = _cgroup_pids(state.cgroup) if state.cgroup else []
    procs += [p for p in state.pids if alive(p)]

    def kill() -> list[str]:
        if state.cgroup and procs:
            Path(state.cgroup, "cgroup.kill").write_text("1")
        for p in state.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        _wait(lambda: not any(alive(p) for p in procs), "killed processes to exit")
        return [f"process {p}" for p in procs]

    def unmount(mp: str) -> list[str]:
        try:
            umount_or_detach(mp)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):
                return []  # gone already
            raise
        return [f"FUSE mount {mp}"]

    def rmdir_cgroup() -> None:
        # EBUSY until the kernel has let go of the killed processes.
        _wait(lambda: _rmdir(state.cgroup), "the cgroup to empty")

    def remove_dir(d: str) -> list[str]:
        if not _may_delete(d):
            raise RuntimeError(f"{d} is not a directory the harness makes; left alone")
        if not os.path.isdir(d) or any(
            m.startswith(d.rstrip("/") + "/") for m in _our_mounts(state)
        ):
            return []
        shutil.rmtree(d)
        return [f"directory {d}"]

    def put_back(cpu: int, online: bool) -> list[str]:
        cpus.set_online(cpu, online)
        return [_cpu_change(cpu, online)]

    actions: list[tuple[str, Callable[[], Any]]] = [("kill the processes", kill)]
    actions += [(f"unmount {mp}", lambda mp=mp: unmount(mp)) for mp in _our_mounts(state)]
    actions += [
        (f"put CPU {c} back", lambda c=c, was=was: put_back(c, was))
        for c, was in _cpus_changed(state)
    ]
    if state.cgroup:
        actions.append((f"remove cgroup {state.cgroup}", rmdir_cgroup))
    actions += [(f"remove {d}", lambda d=d: remove_dir(d)) for d in state.dirs]
    outcome = run_all(actions)
    left = _leftovers(state)
    left += [f"directory {d}" for d in state.dirs if os.path.exists(d)]
    if state.cgroup and os.path.isdir(state.cgroup):
        left.append(f"cgroup {state.cgroup}")
    removed = [r for r in outcome.removed if r not in left]
    return removed, left + [f"({f})" for f in outcome.failed]


def _stale_states() -> Iterator[tuple[Path, RunState]]:
    """Each registration whose owner died, locked while the caller reaps it."""
    registry = sorted(STATE_DIR.glob("*.json")) if _ours(STATE_DIR) else []
    for path in (p for p in registry if _ours(p)):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:  # held by its owner while it lives
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            try:
                state = RunState(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                path.unlink(missing_ok=True)  # not ours to understand, nothing to reap
                continue
            yield path, state
        finally:
            os.close(fd)


def _orphan_cgroups() -> list[str]:
    """Empty cgroups of runs whose registration is gone (a run that finished
    while the kernel still held its cgroup): removed, one line each."""
    root = cgroup2_root()
    if root is None:
        return []
    live = {p.stem for p in STATE_DIR.glob("*.json")} if _ours(STATE_DIR) else set()
    lines = []
    for c in sorted(root.glob(f"{CGROUP_PREFIX}*")):
        # The registration is written before its cgroup is made: no race.
        # A run registered elsewhere (another FUSE_IOTESTS_STATE_DIR) has
        # an empty cgroup until it adopts its first child: its pid, which
        # names the cgroup, still runs.
        name = c.name.removeprefix(CGROUP_PREFIX)
        if name in live or _pid_runs(name.partition("-")[0]) or _cgroup_pids(str(c)):
            continue
        if _rmdir(str(c)):
            lines.append(f"cleanup: removed the empty cgroup {c} of a finished run")
    return lines


def _pid_runs(pid: str) -> bool:
    """Whether a process with this pid exists (a reused pid only delays a sweep)."""
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")


def reap_stale() -> list[str]:
    """Clean up after every run whose owner died; one line per thing."""
    lines = _orphan_cgroups()
    for path, state in _stale_states():  # our own is locked: never listed
        removed, left = _reap(state)
        when = time.strftime("%H:%M:%S", time.localtime(state.started))
        who = f"run of pid {state.pid} ({when})"
        lines += [f"cleanup: removed {r}, left by the dead {who}" for r in removed]
        lines += [f"cleanup: could NOT remove {x}, left by the dead {who}" for x in left]
        if not left:
            path.unlink(missing_ok=True)
    return lines
