"""FUSE-over-io_uring specifics: CQE delivery, routing, negotiation.

Start/stop cycles are the race-cycles case (cases/race-cycles.yaml).

The behaviour tests of the classic transport run again for io_uring through
the `transport` parameter; this file covers what only io_uring has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable

import pytest

from harness.iotests.targets.reference import run_exporter
from harness.iotests.timeouts import scaled
from harness.iotests.waiting import kernel_stacks, wait_until
from harness.kernel.mount import find_mount
from harness.kernel.params import ENABLE_URING, enable_uring_set_to, read_param
from harness.layout import possible_cpus
from harness.patterns import pattern_bytes

pytestmark = pytest.mark.uring
CPUS = possible_cpus()


@pytest.fixture
def uring(uring_kernel):  # type: ignore[no-untyped-def]
    """For tests that start io_uring exports without the transport param."""


def ring_requests(info: dict) -> dict[int, int]:
    """Requests per ring queue, over every queue thread with entries on it."""
    counts: dict[int, int] = {}
    for q in info["queues"]:
        for r in q.get("ring-queues", []):
            counts[r["qid"]] = counts.get(r["qid"], 0) + r["requests"]
    return counts


def queue_ops(info: dict, op: str) -> list[int]:
    return [q["opcodes"].get(op, 0) for q in info["queues"]]


def test_every_request_after_init_arrives_through_cqes(exports, client, uring):
    exp = exports.start(io_uring="on", writable=True)
    mp = exp.mountpoint
    for args in (("pwrite", mp, 0, 4096), ("pread", mp, 0, 4096), ("fsync", mp)):
        assert client.run(*args).startswith("ok ")
    assert client.run("truncate", mp, 1 << 20) == "ok 0"
    assert client.run("stat", mp).startswith("ok size=1048576")
    info = exp.query()
    assert info["transport"] == "io-uring"
    assert info["dev-requests-after-init"] == {"total": 0, "opcodes": {}}
    assert sum(ring_requests(info).values()) == sum(q["requests"] for q in info["queues"])
    assert info["payload-size"] == max(8192, info["negotiation"]["max-write"])


@pytest.mark.parametrize("queues", [1, 2, 3])
def test_pinned_client_is_served_by_its_cpus_ring_queue(exports, client, uring, queues):
    exp = exports.start(io_uring="on", writable=True, queues=queues)
    info = exp.query()
    layout = {r["qid"]: r["queue"] for r in info["ring-layout"]}
    assert layout == {k: k % queues for k in range(CPUS)}
    assert all(r["depth"] == 64 for r in info["ring-layout"])
    for cpu in range(CPUS):
        before = exp.query()
        assert client.run("pwrite", exp.mountpoint, cpu * 4096, 4096, cpu=cpu) == "ok 4096"
        after = exp.query()
        grew = [q for q, n in ring_requests(after).items() if n > ring_requests(before)[q]]
        assert cpu in grew
        delta = zip(queue_ops(after, "WRITE"), queue_ops(before, "WRITE"), strict=True)
        writes = [a - b for a, b in delta]
        assert writes == [1 if q == cpu % queues else 0 for q in range(queues)]
    # With more queues than CPUs, the extra queues own nothing and stay idle.
    for q in exp.query()["queues"][CPUS:]:
        assert q["ring-queues"] == [] and q["requests"] == 0


@pytest.mark.parametrize("queues", [1, 2, 3])
def test_shared_ring_queues_take_every_cpus_requests(exports, client, uring, queues):
    exp = exports.start(io_uring="on", writable=True, queues=queues, share_ring_queues=True)
    info = exp.query()
    depth = max(1, 64 // queues)
    pairs = sorted((r["qid"], r["queue"], r["depth"]) for r in info["ring-layout"])
    assert pairs == [(k, q, depth) for k in range(CPUS) for q in range(queues)]
    for cpu in range(CPUS):
        before = ring_requests(exp.query())
        assert (
            client.run("pwrite", exp.mountpoint, cpu * 4096, 4096, 0x40 + cpu, cpu=cpu) == "ok 4096"
        )
        assert client.run("pread", exp.mountpoint, cpu * 4096, 4096, cpu=cpu) == "ok 4096"
        after = ring_requests(exp.query())
        # OPEN, WRITE, OPEN, READ from this CPU (a RELEASE may come from anywhere).
        assert after[cpu] - before[cpu] >= 4
    with open(exp.mountpoint, "rb") as f:
        data = f.read(CPUS * 4096)
    assert [data[k * 4096 : (k + 1) * 4096] for k in range(CPUS)] == [
        pattern_bytes(0x40 + k, 4096) for k in range(CPUS)
    ]


def served(info: dict, thread: int, qid: int) -> int:
    """Requests of ring queue qid that queue thread `thread` served."""
    rings = info["queues"][thread]["ring-queues"]
    return next(r["requests"] for r in rings if r["qid"] == qid)


def handed_over(before: dict, after: dict, thread: int) -> int:
    """Entries queue thread `thread` gave away between two queries (shared)."""
    return before["queues"][thread]["entries-held"] - after["queues"][thread]["entries-held"]


def on_cpu(cpu: int, tasks: int, work: Callable[[int], None]) -> None:
    """Run work(task) in `tasks` threads pinned to one CPU, side by side;
    raise what a thread raised, or report the threads still in I/O."""
    errors: list[BaseException] = []

    def pinned(task: int) -> None:
        try:
            os.sched_setaffinity(0, {cpu})  # this thread only
            work(task)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=pinned, args=(k,), daemon=True) for k in range(tasks)]
    for t in threads:
        t.start()
    wait_until(
        lambda: not any(t.is_alive() for t in threads),
        scaled(60),
        f"{tasks} client thread(s) on CPU {cpu}",
        lambda: kernel_stacks(os.getpid()),
    )
    if errors:
        raise errors[0]


def test_shared_ring_queues_follow_the_load(exports, uring):
    """Shared (sharing.py): a CPU's requests go to its home queue thread; two
    tasks taking turns on one CPU gather every ring queue at queue thread 0,
    whose ring takes the entries over by committing them; one task alone
    sends them home again."""
    if CPUS < 2:
        pytest.skip("not run: needs 2 possible CPUs")
    exp = exports.start(io_uring="on", writable=True, queues=2, share_ring_queues=True)
    home = [k % 2 for k in range(CPUS)]
    assert exp.query()["ring-owners"] == home
    fd = os.open(exp.mountpoint, os.O_RDWR)

    def reads(count: int) -> Callable[[int], None]:
        return lambda task: [os.pread(fd, 4096, task * 4096) for _ in range(count)]

    def writes(task: int) -> None:
        for _ in range(200):
            assert os.pwrite(fd, pattern_bytes(0x60 + task, 4096), task * 4096) == 4096
            assert os.pread(fd, 4096, task * 4096) == pattern_bytes(0x60 + task, 4096)

    def owners_after(tasks: int, work: Callable[[int], None], want: list[int]) -> bool:
        on_cpu(1, tasks, work)
        return exp.query()["ring-owners"] == want

    def state() -> str:
        return str({k: exp.query()[k] for k in ("ring-owners", "ring-moves", "queues")})

    try:
        on_cpu(1, 1, reads(50))
        info = exp.query()
        assert served(info, 1, 1) >= 50 and served(info, 0, 1) == 0
        gathered = [0] * CPUS
        at_0 = "ring queues at thread 0"
        wait_until(lambda: owners_after(2, writes, gathered), scaled(60), at_0, state)
        on_cpu(1, 2, writes)
        before = exp.query()
        assert before["queues"][0]["entries-adopted"] > 0
        on_cpu(1, 2, writes)
        after = exp.query()
        assert after["ring-owners"] == gathered
        by_0, by_1 = (served(after, t, 1) - served(before, t, 1) for t in (0, 1))
        assert by_0 + by_1 >= 2 * 400
        # An entry moves when it brings a request, and the kernel hands out
        # the entry that came back last: the old owner may still serve a
        # request on an entry it kept, and then hands that entry over.
        assert by_1 == handed_over(before, after, 1)
        assert by_0 >= 2 * 400 - before["queues"][1]["entries-held"]
        wait_until(lambda: owners_after(1, reads(300), home), scaled(60), "ring queues home", state)
        on_cpu(1, 1, reads(20))
        before = exp.query()
        on_cpu(1, 1, reads(50))
        after = exp.query()
        by_0, by_1 = (served(after, t, 1) - served(before, t, 1) for t in (0, 1))
        assert by_0 + by_1 >= 50
        assert by_0 == handed_over(before, after, 0)  # each took its entry home
        assert os.pread(fd, 8192, 0) == pattern_bytes(0x60, 4096) + pattern_bytes(0x61, 4096)
    finally:
        os.close(fd)


def test_synchronous_client_is_served_by_polling(exports, uring):
    """One thread reading a block at a time: its ring queue thread pins next
    to it (affinity.py) and polls the ring before it sleeps (polling.py)."""
    exp = exports.start(io_uring="on", null_size=1 << 20)
    allowed = os.sched_getaffinity(0)
    fd = os.open(exp.mountpoint, os.O_RDONLY)
    os.sched_setaffinity(0, {min(allowed)})

    def polls() -> list[dict[str, int]]:
        return [q["poll"] for q in exp.query()["queues"] if "poll" in q]

    def caught() -> bool:
        for _ in range(200):
            assert os.pread(fd, 4096, 8192) == bytes(4096)
        return sum(p["caught"] for p in polls()) > 0

    try:
        wait_until(caught, scaled(60), "a poll that caught a request", lambda: str(polls()))
    finally:
        os.sched_setaffinity(0, allowed)
        os.close(fd)
    assert sum(q["affinity-changes"] for q in exp.query()["queues"]) >= 1


@pytest.mark.serial
def test_kernel_without_uring(exports, tmp_path):
    if read_param(ENABLE_URING) is None:
        pytest.skip(f"not run: {ENABLE_URING} missing")
    image = exports.image()
    with enable_uring_set_to("N"):
        mp = exports.mountpoint("on.fuse")
        res = run_exporter("--image", str(image), "--mountpoint", str(mp), "--io-uring", "on")
        assert res.returncode == 1
        assert res.stderr == "export: System doesn't support FUSE-over-io_uring\n"
        assert find_mount(str(mp)) is None
        exp = exports.start(image, io_uring="auto")
        assert exp.query()["transport"] == "dev-fuse"
        assert "OVER_IO_URING" not in exp.query()["negotiation"]["offered-names"]
        assert "using /dev/fuse" in exp.stderr()
        with open(exp.mountpoint, "rb") as f:
            assert len(f.read(4096)) == 4096
        assert exp.stop() == 0
    assert read_param(ENABLE_URING) == "Y"


def test_auto_uses_uring_when_offered(exports, uring):
    exp = exports.start(io_uring="auto")
    assert exp.query()["transport"] == "io-uring"
    assert exp.stderr() == ""


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
@pytest.mark.parametrize("depth", [1, 2])
def test_io_deeper_than_the_ring(exports, uring, depth):
    exp = exports.start(io_uring="on", writable=True, ring_depth=depth)
    res = subprocess.run(
        # 32 requests in flight against `depth` ring entries, then verified.
        ["fio", "--name=deep", f"--filename={exp.mountpoint}", "--rw=randwrite", "--bs=4k",
         "--direct=1", "--ioengine=libaio", "--iodepth=32", "--size=1M", "--io_size=2M",
         "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
         "--output-format=terse"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert exp.query()["dev-requests-after-init"]["total"] == 0
    assert exp.stop() == 0
