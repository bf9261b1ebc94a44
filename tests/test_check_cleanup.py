"""Timeouts and Ctrl-C in tools/check: reports, and nothing left behind."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.iotests.lifecycle import REPO, ExporterProcess, child_env
from harness.iotests.waiting import wait_until
from harness.kernel.mount import mount_table, umount

STUCK = """\
# Guards: nothing; a test fixture that blocks on a held READ.
id: {case}
description: a foreground read that never completes
groups: [quick]
timeout: {timeout}
steps:
  - hold: {{name: h, op: read}}
  - echo: "about to block"
  - read: {{offset: 0, length: 4k}}
"""


SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(platform.machine())


def _processes_with(*needles: bytes) -> list[int]:
    """Processes whose command line contains every needle."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if all(n in cmdline for n in needles):
            pids.append(int(pid))
    return pids


def _exporters_of(case: str) -> list[int]:
    """Exporter processes still serving this case's instances."""
    return _processes_with(b"harness.exporter", f"/{case}-legacy.".encode())


def _suite(tmp_path: Path, case: str | list[str], timeout: int) -> list[str]:
    (tmp_path / "cases").mkdir()
    for c in [case] if isinstance(case, str) else case:
        (tmp_path / "cases" / f"{c}.yaml").write_text(STUCK.format(case=c, timeout=timeout))
    return [
        sys.executable, "-m", "harness.iotests.check", "--cases", str(tmp_path / "cases"),
        "--golden", str(tmp_path / "golden"), "--results", str(tmp_path / "res"),
    ]  # fmt: skip


def _mounts_of(case: str) -> list[str]:
    """Mounts of this case's instances only: tests may run in parallel."""
    return [
        e.mountpoint
        for e in mount_table()
        if e.fstype == "fuse.fuse-iotests" and f"/{case}-legacy." in e.mountpoint
    ]


@pytest.mark.usefixtures("fuse_root")
def test_timeout_reports_stderr_and_stacks_then_cleans_up(tmp_path: Path) -> None:
    res = subprocess.run(
        _suite(tmp_path, "stuck-timeout", 2),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert res.returncode == 1
    out = res.stdout
    assert "stuck-timeout[legacy]" in out and " fail " in out
    assert "timed out after 2s" in out
    assert "about to block" in out  # the transcript so far
    assert "stderr (tail):" not in out  # the exporter said nothing: no empty header
    assert "kernel stacks of exporter" in out
    stack = out.split("case thread, kernel stack:", 1)[1]
    assert "request_wait_answer" in stack  # blocked in the FUSE request path
    assert _mounts_of("stuck-timeout") == []


TOOL_STUCK = """\
# Guards: nothing; a test fixture: dd blocks on a held READ.
id: {case}
description: an external tool that never finishes
groups: [quick]
timeout: 6
steps:
  - hold: {{name: h, op: read}}
  - dd: if=$TARGET of=/dev/null bs=4k count=1 iflag=direct
"""


@pytest.mark.usefixtures("fuse_root")
def test_an_overrunning_tool_is_a_bounded_wait_report(tmp_path: Path) -> None:
    """dd bounded by what is left of the case's budget: killed and reported
    with its kernel stack before the runner's own timeout, not a harness error."""
    argv = _suite(tmp_path, [], 0)
    (tmp_path / "cases" / "tool-stuck.yaml").write_text(TOOL_STUCK.format(case="tool-stuck"))
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    out = res.stdout
    # The bound is what the 6 s budget has left after the exporter started,
    # less its 1.2 s margin: under load, anything from 1 s to 4.8 s.
    found = re.search(r"bounded wait: step 'dd' \(line 8\): timed out after ([0-9.]+)s", out)
    assert found and 1.0 <= float(found.group(1)) <= 4.8, out
    assert "harness error" not in out and "timed out after 6s" not in out
    stack = out.split("kernel stacks of dd", 1)[1]
    assert "request_wait_answer" in stack
    assert _mounts_of("tool-stuck") == []


@pytest.mark.usefixtures("fuse_root")
def test_timeout_scale_multiplies_the_case_timeout(tmp_path: Path) -> None:
    argv = _suite(tmp_path, "stuck-scaled", 2)
    res = subprocess.run(
        [*argv, "--timeout-scale", "1.5"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 1
    assert "TIMEOUTS     -- case timeouts x1.5 (--timeout-scale)" in res.stdout
    assert "timed out after 3s" in res.stdout
    bad = subprocess.run([*argv, "--timeout-scale", "0"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1
    assert "--timeout-scale: timeout scale '0' must be above 0" in bad.stderr


def _interrupt(
    argv: list[str],
    sig: int,
    mounts: Callable[[], list[str]],
    ready: Callable[[], bool],
    daemons: Callable[[], list[int]] = list,
    to: Callable[[int], int] | None = None,
) -> tuple[int, str, tuple[list[str], list[int]]]:
    """Run check until ready(), then send sig (to the thread to(pid) picks,
    or to the process); (exit status, stderr, and the mounts and daemons
    still there right after it exited)."""
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        # As from a terminal: pytest-xdist workers run with SIGINT ignored,
        # and a process that starts with it ignored keeps ignoring it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_until(ready, 20, "the instances to be mounted")
        if to is None:
            proc.send_signal(sig)
        else:
            _tgkill(proc.pid, to(proc.pid), sig)
        _, err = proc.communicate(timeout=30)
        left = (mounts(), daemons())  # before the safety net below
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # Ours (the case names are unique): killing and detaching end them.
        for pid in daemons():
            os.kill(pid, signal.SIGKILL)
        for mp in mounts():
            umount(mp, lazy=True)
    return proc.returncode, err, left


def _stuck(
    argv: list[str], cases: list[str], sig: int, to: Callable[[int], int] | None = None
) -> tuple[int, str]:
    """Interrupt once every case's instance is blocked in its FUSE read."""
    code, err, _ = _interrupt(
        argv,
        sig,
        mounts=lambda: [mp for c in cases for mp in _mounts_of(c)],
        ready=lambda: all(_mounts_of(c) for c in cases),
        to=to,
    )
    return code, err


@pytest.mark.usefixtures("fuse_root")
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_removes_exporters_and_mounts(tmp_path: Path, sig: int, status: int) -> None:
    """Ctrl-C (or a CI job's SIGTERM) while an instance is blocked in a FUSE read."""
    # Unique: the test looks for this instance's directory among all of /tmp.
    case = f"stuck-{signal.Signals(sig).name.lower()}-{os.getpid()}"
    code, err = _stuck(_suite(tmp_path, case, 60), [case], sig)
    assert code == status, err
    assert "Interrupted" in err
    assert _mounts_of(case) == []
    assert _exporters_of(case) == []
    # The interrupted instance is "not run": its directory is gone too.
    assert not list(Path(tempfile.gettempdir()).glob(f"fuse-iotests.*/{case}-legacy.*"))
    report = json.loads((tmp_path / "res" / "report.json").read_text())
    assert [(r["id"], r["status"], r["reason"]) for r in report["results"]] == [
        (f"{case}[legacy]", "not run", "interrupted")
    ]


def _tgkill(pid: int, tid: int, sig: int) -> None:
    assert SYS_TGKILL is not None
    if ctypes.CDLL(None, use_errno=True).syscall(SYS_TGKILL, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill {pid} {tid}")


def _reading_threads(pid: int) -> list[int]:
    """Threads of pid asleep in a FUSE request."""
    tids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            if "request_wait_answer" in Path(f"/proc/{pid}/task/{tid}/stack").read_text():
                tids.append(int(tid))
    return tids


@pytest.mark.usefixtures("fuse_root")
def test_a_ctrl_c_the_kernel_gives_a_thread_in_fuse_still_interrupts(tmp_path: Path) -> None:
    """A process's signal goes to any of its threads that can take it; one
    asleep in a FUSE read runs Python's C handler, and the main thread, in
    an untimed wait, never woke (once in CI: the run did not end).  Sent
    here to that thread on purpose, it ends the run as a Ctrl-C does."""
    if SYS_TGKILL is None:
        pytest.skip(f"not run: no tgkill number for {platform.machine()}")
    cases = [f"stuck-thread-{os.getpid()}-{x}" for x in "ab"]

    def reading(pid: int) -> int:
        return wait_until(lambda: _reading_threads(pid), 20, "a read in FUSE")[0]

    code, err = _stuck([*_suite(tmp_path, cases, 60), "-j", "2"], cases, signal.SIGINT, reading)
    assert code == 130, err
    assert "Interrupted" in err
    for c in cases:
        assert _mounts_of(c) == [] and _exporters_of(c) == []


@pytest.mark.usefixtures("fuse_root")
def test_interrupt_with_parallel_jobs(tmp_path: Path) -> None:
    """-j 2, both instances blocked in a FUSE read: both are stopped and removed."""
    cases = [f"stuck-jobs-{os.getpid()}-{x}" for x in "ab"]
    code, err = _stuck([*_suite(tmp_path, cases, 60), "-j", "2"], cases, signal.SIGINT)
    assert code == 130, err
    for c in cases:
        assert _mounts_of(c) == [] and _exporters_of(c) == []
    report = json.loads((tmp_path / "res" / "report.json").read_text())
    assert [(r["id"], r["status"]) for r in report["results"]] == [
        (f"{c}[legacy]", "not run") for c in cases
    ]


WAITING = """\
# Guards: nothing; a test fixture that waits (bounded) with its export mounted.
id: {case}
description: an export that stays mounted while the case waits for an event
groups: [quick]
steps:
  - qmp-event: NO_SUCH_EVENT
"""


@pytest.mark.usefixtures("fuse_root")
@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="no qemu-storage-daemon")
def test_interrupt_removes_qsd_daemons_and_mounts(tmp_path: Path) -> None:
    """Ctrl-C during a qsd run: the daemon and its plain 'fuse' mount go too."""
    case = f"waiting-qsd-{os.getpid()}"
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / f"{case}.yaml").write_text(WAITING.format(case=case))
    argv = [
        sys.executable, "-m", "harness.iotests.check", "--target", "qsd",
        "--cases", str(tmp_path / "cases"), "--golden", str(tmp_path / "golden"),
        "--results", str(tmp_path / "res"),
    ]  # fmt: skip
    marker = f"/{case}-qsd-legacy."

    def mounts() -> list[str]:
        return [e.mountpoint for e in mount_table() if e.is_fuse and marker in e.mountpoint]

    def daemons() -> list[int]:
        return _processes_with(b"qemu-storage-daemon", marker.encode())

    def qsd_mounted() -> bool:  # QSD's mounts have libfuse's plain type
        return [e.fstype for e in mount_table() if marker in e.mountpoint] == ["fuse"]

    code, err, left = _interrupt(
        argv,
        signal.SIGINT,
        mounts,
        ready=lambda: qsd_mounted() and bool(daemons()),
        daemons=daemons,
    )
    assert code == 130, err
    assert left == ([], []), err


@pytest.mark.usefixtures("fuse_root")
def test_sigkill_leftovers_are_reaped_by_cleanup(tmp_path: Path) -> None:
    """A run killed with SIGKILL while its exporter cannot react (stopped):
    the exporter and its mount survive it; `check --cleanup` removes them,
    and the directories, and says so."""
    case = f"stuck-sigkill-{os.getpid()}"
    env = {**child_env(), "FUSE_IOTESTS_STATE_DIR": str(tmp_path / "runs")}
    proc = subprocess.Popen(
        _suite(tmp_path, case, 60), cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    exporters: list[int] = []
    try:
        wait_until(lambda: _mounts_of(case), 20, "the stuck instance's mount")
        exporters = _exporters_of(case)
        assert len(exporters) == 1
        os.kill(exporters[0], signal.SIGSTOP)  # deaf to its parent-death SIGTERM
        proc.kill()
        proc.wait(10)
        assert _mounts_of(case) and _exporters_of(case) == exporters  # the leak
        (state,) = (tmp_path / "runs").glob("*.json")
        recorded = json.loads(state.read_text())
        dirs, cgroup = recorded["dirs"], recorded["cgroup"]
        res = subprocess.run(
            [sys.executable, "-m", "harness.iotests.check", "--cleanup"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert f"cleanup: removed process {exporters[0]}, left by the dead run" in res.stderr
        assert "cleanup: removed FUSE mount " in res.stderr and case in res.stderr
        assert "could NOT" not in res.stderr
        assert _mounts_of(case) == [] and _exporters_of(case) == []
        assert dirs and not any(os.path.exists(d) for d in dirs)
        assert cgroup is None or not os.path.exists(cgroup)  # killed, then removed
        assert not list((tmp_path / "runs").glob("*.json"))
        again = subprocess.run(
            [sys.executable, "-m", "harness.iotests.check", "--cleanup"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        # Cgroups are global while this registry is private: another
        # worker's run that just finished may leave an empty one meanwhile.
        lines = [x for x in again.stderr.splitlines() if "empty cgroup" not in x]
        assert lines in ([], ["cleanup: no dead run left anything"]), again.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _exporters_of(case):  # ours: the case name is unique
            os.kill(pid, signal.SIGKILL)
        for mp in _mounts_of(case):
            umount(mp, lazy=True)


class WatchedLock:
    """A lock that tells when someone had to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.contended = threading.Event()

    def __enter__(self) -> WatchedLock:
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


@pytest.mark.usefixtures("fuse_root")
def test_cleanup_during_a_spawn_removes_the_new_process(tmp_path: Path) -> None:
    """The SIGTERM leak: a cleanup from another thread (Ctrl-C, a timeout) ran
    while spawn() was between its check and Popen, found no process, and the
    exporter started afterwards outlived the run.  Held at that point, the
    cleanup must wait for the spawn and then remove what it started."""
    in_spawn, go_on = threading.Event(), threading.Event()

    class HeldSpawn(ExporterProcess):
        def command(self) -> list[str]:  # runs inside spawn(), before Popen
            in_spawn.set()
            assert go_on.wait(10)
            return ["sleep", "600"]

    exp = HeldSpawn(tmp_path, tmp_path / "mp")
    exp._spawning = lock = WatchedLock()  # type: ignore[assignment]
    checked = threading.Event()

    def spawn_and_stay() -> None:
        exp.spawn()
        # The child's parent-death signal fires when this thread ends: stay,
        # so that only the cleanup can have removed it.
        checked.wait(30)

    spawner = threading.Thread(target=spawn_and_stay)
    spawner.start()
    assert in_spawn.wait(10)
    removed: list[str] = []
    cleaner = threading.Thread(target=lambda: removed.extend(exp.cleanup()))
    cleaner.start()
    try:
        assert lock.contended.wait(10), "cleanup did not wait for the spawn in progress"
        go_on.set()
        cleaner.join(30)
        assert exp.proc is not None and exp.returncode() is not None
        assert removed == [f"exporter pid {exp.pid}"]
    finally:
        go_on.set()
        checked.set()
        spawner.join(10)
