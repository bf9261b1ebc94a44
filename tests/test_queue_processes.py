"""--queue-processes (harness/exporter/processes.py): each io_uring queue in a
process of its own.  Data requests are served in the children; what they
forward (state, and every request while a fault rule is set) the exporter
serves, so attributes, resizes and fault injection behave as with threads.
`tools/check --target reference-processes` runs every case this way."""

from __future__ import annotations

import os
import signal

import pytest

from harness.iotests import runs
from harness.iotests.timeouts import scaled
from harness.iotests.waiting import wait_until
from harness.kernel.mount import umount
from harness.layout import possible_cpus
from harness.patterns import offset_pattern, pattern_bytes

pytestmark = pytest.mark.uring
CPUS = possible_cpus()
ABORTED = "error ENOTCONN"


@pytest.fixture
def exp(exports, uring_kernel):  # type: ignore[no-untyped-def]
    return exports.start(io_uring="on", queues=2, queue_processes=True, writable=True)


def children(exp) -> list[int]:  # type: ignore[no-untyped-def]
    return [q["process"] for q in exp.query()["queues"]]


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if runs.alive(p)]


def held_read(exp, client, cpu: int | None = None):  # type: ignore[no-untyped-def]
    rule = exp.inject("hold", opcode="read", offset=65536)
    proc = client.spawn("pread", exp.mountpoint, 65536, 4096, cpu=cpu)
    exp.wait_held(rule["id"])
    assert proc.poll() is None
    return rule, proc


def test_children_serve_each_cpus_ring_queue(exp, client):
    pids = children(exp)
    assert len(set(pids)) == 2 and all(parent_of(p) == exp.pid for p in pids)
    fd = os.open(exp.mountpoint, os.O_RDWR)
    allowed = os.sched_getaffinity(0)
    try:
        for cpu in range(CPUS):
            os.sched_setaffinity(0, {cpu})
            data = pattern_bytes(0x40 + cpu, 4096)
            assert os.pwrite(fd, data, cpu * 4096) == 4096
            assert os.pread(fd, 4096, cpu * 4096) == data
    finally:
        os.sched_setaffinity(0, allowed)
        os.close(fd)
    info = exp.query()
    for cpu in range(CPUS):  # ring queue k is queue k mod 2's, as with threads
        rings = {r["qid"]: r["requests"] for r in info["queues"][cpu % 2]["ring-queues"]}
        assert rings[cpu] >= 2
    writes = sum(q["opcodes"].get("WRITE", 0) for q in info["queues"])
    assert writes == CPUS
    assert info["dev-requests-after-init"]["total"] == 0


def test_state_lives_in_the_exporter(exports, client, uring_kernel):
    """A resize done by the exporter is the size the children clamp to."""
    exp = exports.start(io_uring="on", queues=2, queue_processes=True, writable=True,
                        growable=True)  # fmt: skip
    mp = exp.mountpoint
    assert client.run("truncate", mp, 2 << 20) == "ok 0"
    assert client.run("stat", mp) == "ok size=2097152 mode=100600"
    for cpu in range(CPUS):  # every child reads the new end
        assert client.run("pread", mp, (2 << 20) - 4096, 8192, cpu=cpu) == "ok 4096"
    assert client.run("pwrite", mp, 3 << 20, 4096, 0x77) == "ok 4096"  # grows
    assert exp.query()["size"] == (3 << 20) + 4096
    with open(mp, "rb") as f:
        f.seek(3 << 20)
        assert f.read() == pattern_bytes(0x77, 4096)
    os.chmod(mp, 0o400)
    assert client.run("stat", mp) == f"ok size={(3 << 20) + 4096} mode=100400"


def test_fail_delay_hold_and_release(exp, client):
    rule = exp.inject("fail", opcode="read", offset=8192, errno="EIO")
    assert client.run("pread", exp.mountpoint, 8192, 4096) == "error EIO"
    assert client.run("pread", exp.mountpoint, 8192, 4096) == "ok 4096"
    assert exp.query()["faults"] == [{**rule, "hits": 1, "remaining": 0}]
    exp.release(rule["id"])
    exp.inject("delay", opcode="write", offset=0, delay_ms=100)
    assert client.run("pwrite", exp.mountpoint, 0, 4096, 0x31) == "ok 4096"
    assert exp.query()["faults"][0]["hits"] == 1  # the exporter delayed it
    exp.release()
    rule, proc = held_read(exp, client)
    # Held in the exporter: the children go on serving.
    assert client.run("pread", exp.mountpoint, 0, 4096) == "ok 4096"
    assert exp.release() == 1
    assert client.result(proc) == "ok 4096"
    with open(exp.mountpoint, "rb") as f:
        assert f.read(4096) == pattern_bytes(0x31, 4096)
        f.seek(65536)
        assert f.read(4096) == offset_pattern(65536, 4096)


def test_interrupt_finishes_a_held_request(exp, client):
    rule, proc = held_read(exp, client)
    proc.kill()  # FUSE_INTERRUPT on /dev/fuse, to child 0, forwarded
    proc.wait(10)
    exp.wait_held(rule["id"], count=0)
    assert exp.query()["queues"][0]["opcodes"]["INTERRUPT"] == 1
    assert exp.stop() == 0


def test_stall_blocks_each_queue(exp, client):
    """A stall blocks the queue that forwarded the request, as it blocks a
    queue thread: one READ from each CPU stalls both queues."""
    if CPUS < 2:
        pytest.skip("not run: needs 2 possible CPUs")
    rule = exp.inject("stall", opcode="read")
    procs = []
    for cpu in (0, 1):
        procs.append(client.spawn("pread", exp.mountpoint, cpu * 4096, 4096, cpu=cpu))
        want = cpu + 1
        wait_until(
            lambda want=want: exp.query()["faults"][0]["stalled"] == want,
            scaled(10), f"{want} stalled queues", exp.report,
        )  # fmt: skip
    assert [q["stalled"] for q in exp.query()["queues"]] == [True, True]
    assert exp.release(rule["id"]) == 2
    assert [client.result(p) for p in procs] == ["ok 4096"] * 2


def test_sigterm_with_request_in_flight_ends_the_children(exp, client):
    pids = children(exp)
    _, proc = held_read(exp, client)
    exp.signal(signal.SIGTERM)
    assert exp.wait_exit() == 0
    assert client.result(proc) == ABORTED
    assert not exp.is_mounted()
    assert alive(pids) == []  # reaped by the exporter before it exited


def test_external_umount_reports_every_queue(exp):
    umount(str(exp.mountpoint))
    assert exp.wait_exit() == 0
    lines = [ln for ln in exp.stderr().splitlines() if "ENOTCONN" in ln]
    assert lines == [
        f"export: unmounted; queue {i}: all ring entries ended with ENOTCONN" for i in (0, 1)
    ]


def test_kill9_takes_the_children_along(exp, client):
    pids = children(exp)
    _, proc = held_read(exp, client)
    exp.signal(signal.SIGKILL)
    assert exp.wait_exit() == -signal.SIGKILL
    # PR_SET_PDEATHSIG: the kernel kills them; that is asynchronous.
    wait_until(lambda: alive(pids) == [], scaled(10), "queue processes gone",
               lambda: f"alive: {alive(pids)}")  # fmt: skip
    assert client.result(proc) == ABORTED
    assert exp.cleanup() == [f"mount {exp.mountpoint}"]


def test_a_child_that_dies_stops_the_export(exp, client):
    pid = children(exp)[1]
    os.kill(pid, signal.SIGKILL)
    assert exp.wait_exit() == 1
    assert f"queue process {pid} ended without a word" in exp.stderr()
    assert not exp.is_mounted()
