"""Stopping the export: signals, QMP, external unmounts, crashes; faults.

Races are made deterministic by holding a request with fault injection and
acting only once the exporter reports it held.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.iotests.targets import resolve
from harness.kernel.mount import find_mount, umount

SIZE = 1 << 20
# Closing the last /dev/fuse fd aborts the connection; on 6.18 a request
# still in flight then fails with ENOTCONN.
ABORTED = "error ENOTCONN"


def held_request(exp, client, op: str):  # type: ignore[no-untyped-def]
    """Start a client whose READ or WRITE at 64 KiB is held by the exporter."""
    opcode = {"pread": "read", "pwrite": "write"}[op]
    rule = exp.inject("hold", opcode=opcode, offset=65536)
    proc = client.spawn(op, exp.mountpoint, 65536, 4096)
    exp.wait_held(rule["id"])
    assert proc.poll() is None
    return proc


@pytest.mark.parametrize("op", ["pread", "pwrite"])
def test_sigterm_with_request_in_flight(exports, client, transport, op):
    exp = exports.start(writable=True)
    proc = held_request(exp, client, op)
    exp.signal(signal.SIGTERM)
    assert exp.wait_exit() == 0
    assert client.result(proc) == ABORTED
    assert not exp.is_mounted()
    assert not exp.pidfile.exists()


@pytest.mark.parametrize("command", ["block-export-del", "quit"])
def test_qmp_stop_with_request_in_flight(exports, client, transport, command):
    exp = exports.start(writable=True)
    proc = held_request(exp, client, "pread")
    if command == "block-export-del":
        from qemu.qmp import ExecuteError

        # As QEMU: the request in flight keeps it "in use" unless mode=hard.
        with pytest.raises(ExecuteError, match="export 'e0' still in use"):
            exp.cmd(command, id="e0")
        assert exp.cmd(command, id="e0", mode="hard") == {}
    else:
        assert exp.cmd(command) == {}
    assert exp.wait_exit() == 0
    assert client.result(proc) == ABORTED
    assert not exp.is_mounted()


def test_block_export_del_unknown_id(exports, transport):
    from qemu.qmp import ExecuteError

    exp = exports.start()
    with pytest.raises(ExecuteError, match="Export 'nope' is not found"):
        exp.cmd("block-export-del", id="nope")
    assert exp.returncode() is None


def test_external_umount_when_idle(exports, transport):
    exp = exports.start()
    umount(str(exp.mountpoint))
    assert exp.wait_exit() == 0
    assert find_mount(str(exp.mountpoint)) is None


def test_external_lazy_umount_with_request_in_flight(exports, client, transport):
    exp = exports.start(writable=True)
    proc = held_request(exp, client, "pread")
    subprocess.run(["umount", "-l", str(exp.mountpoint)], check=True)
    assert not exp.is_mounted()
    # Detached but alive: the held request still completes once released,
    # and the client's close drops the last reference: the export ends.
    assert exp.release() == 1
    assert client.result(proc) == "ok 4096"
    assert exp.wait_exit() == 0


def test_external_lazy_umount_then_sigterm(exports, client, transport):
    exp = exports.start(writable=True)
    proc = held_request(exp, client, "pwrite")
    subprocess.run(["umount", "-l", str(exp.mountpoint)], check=True)
    assert not exp.is_mounted()
    exp.signal(signal.SIGTERM)
    assert exp.wait_exit() == 0
    assert client.result(proc) == ABORTED
    assert find_mount(str(exp.mountpoint)) is None


def test_kill9_leaves_a_stale_mount_that_cleanup_removes(exports, client, transport):
    exp = exports.start(writable=True)
    proc = held_request(exp, client, "pread")
    exp.signal(signal.SIGKILL)
    assert exp.wait_exit() == -signal.SIGKILL
    assert client.result(proc) == ABORTED
    assert exp.is_mounted()  # nobody unmounted it
    assert client.run("stat", exp.mountpoint) == "error ENOTCONN"
    assert exp.cleanup() == [f"mount {exp.mountpoint}"]
    assert not exp.is_mounted()


def test_a_signal_nobody_sent_is_a_crash_that_cleanup_reports(exports, transport):
    exp = exports.start(writable=True)
    os.kill(exp.pid, signal.SIGABRT)  # as an assertion in the exporter would
    assert exp.wait_exit() == -signal.SIGABRT
    with pytest.raises(
        RuntimeError, match=rf"the target crashed: pid {exp.pid} was killed by SIGABRT"
    ):
        exp.cleanup()
    assert not exp.is_mounted()  # removed all the same
    # A signal the case sent itself is no crash.
    exp = exports.start(writable=True)
    exp.signal(signal.SIGKILL)
    assert exp.wait_exit() == -signal.SIGKILL
    assert exp.crash() == "" and exp.cleanup() == [f"mount {exp.mountpoint}"]


def test_a_native_daemon_crash_is_reported_with_the_backtraces_of_its_core(exports):
    """QSD (Debian's) killed by a SIGSEGV nobody sent: the report has its
    stderr and every thread's backtrace from the core, which is then removed."""
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern != "core":
        pytest.skip(f"not run: core_pattern is {pattern!r}, not the default 'core'")
    exp = exports.start(target=resolve("qsd"))
    os.kill(exp.pid, signal.SIGSEGV)  # as a bad pointer in the daemon would
    assert exp.wait_exit() == -signal.SIGSEGV
    report = exp.crash()
    assert report.startswith(f"the target crashed: pid {exp.pid} was killed by SIGSEGV")
    stacks = report.split("backtraces from its core:\n")[1].splitlines()
    assert stacks[0] == "Program terminated with signal SIGSEGV, Segmentation fault.", report
    assert stacks[1] == "the thread that crashed:" and stacks[2].startswith("#0 "), report
    assert any(line.startswith("Thread 1 ") for line in stacks), report
    assert not (exp.workdir / "core").exists()
    with pytest.raises(RuntimeError, match="the target crashed"):
        exp.cleanup()


def test_fail_and_delay_faults(exports, client, transport):
    exp = exports.start(writable=True)
    rule = exp.inject("fail", opcode="read", offset=8192, errno="EIO")
    assert client.run("pread", exp.mountpoint, 8192, 4096) == "error EIO"
    assert client.run("pread", exp.mountpoint, 8192, 4096) == "ok 4096"  # count defaults to 1
    faults = exp.query()["faults"]
    assert faults == [{**rule, "hits": 1, "remaining": 0}]
    exp.release(rule["id"])
    rule = exp.inject("delay", opcode="write", offset=0, delay_ms=200)
    fd = os.open(exp.mountpoint, os.O_WRONLY)
    try:
        start = time.monotonic()
        assert os.pwrite(fd, b"x" * 4096, 0) == 4096
        assert time.monotonic() - start >= 0.2
    finally:
        os.close(fd)
    assert exp.query()["faults"][0]["hits"] == 1


def test_held_request_is_released(exports, client, transport):
    exp = exports.start(writable=True)
    proc = held_request(exp, client, "pwrite")
    assert exp.release() == 1
    assert client.result(proc) == "ok 4096"
    assert exp.query()["faults"] == []


def test_interrupt_finishes_a_held_request(exports, client, transport):
    exp = exports.start(writable=True)
    proc = held_request(exp, client, "pread")
    rule_id = exp.query()["faults"][0]["id"]
    proc.kill()  # the kernel sends FUSE_INTERRUPT; we answer EINTR
    proc.wait(10)
    exp.wait_held(rule_id, count=0)
    assert exp.query()["queues"][0]["opcodes"]["INTERRUPT"] == 1
    assert exp.stop() == 0


def test_harness_fds_do_not_grow_over_cycles(exports, transport):
    """The harness side of race-cycles: starting, querying and stopping
    exporters must not leak fds in the test process (QMP sockets, pipes)."""
    image = exports.image()
    counts = []
    for i in range(10):
        exp = exports.start(image, exports.mountpoint(f"c{i}.fuse"), writable=True)
        assert exp.query()["size"] == 1 << 20
        assert exp.stop() == 0
        exp.cleanup()
        gc.collect()
        counts.append(len(os.listdir("/proc/self/fd")))
    # The first cycle may create lasting lazily-made fds (an event loop).
    assert counts[-1] <= counts[1], counts


def test_cleanup_while_another_thread_is_in_qmp(exports):  # type: ignore[no-untyped-def]
    """Regression: closing the QMP client from a cleanup thread while the
    case thread waited in it left 'coroutine wait_for was never awaited'.
    The case thread is in pull_event (holding the client) before cleanup
    starts; cleanup stops the exporter first, then closes the client once
    that call has returned."""
    import threading
    import warnings

    exp = exports.start(writable=True)
    inside = threading.Event()
    outcome: list[object] = []

    def case_thread() -> None:
        with exp._qmp_lock:  # the position pull_event holds it in
            inside.set()
            try:
                outcome.append(exp._client().pull_event(wait=2.0))
            except Exception as e:  # the exporter went away under it
                outcome.append(type(e).__name__)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = threading.Thread(target=case_thread)
        t.start()
        assert inside.wait(10)
        removed = exp.cleanup()
        t.join(10)
        gc.collect()  # a coroutine never awaited is reported when collected
    assert not t.is_alive() and len(outcome) == 1
    assert f"exporter pid {exp.pid}" in removed
    assert exp._qmp is None
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
