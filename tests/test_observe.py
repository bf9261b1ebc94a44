"""The kernel's view of an export (harness.iotests.observe), checked against
what the reference exporter reports about itself."""

from __future__ import annotations

import pytest

from harness.iotests import observe
from harness.iotests.waiting import wait_until
from harness.layout import possible_cpus

CPUS = possible_cpus()


@pytest.fixture
def uring(uring_kernel):  # type: ignore[no-untyped-def]
    return None


@pytest.mark.parametrize("queues", [1, 2])
def test_rings_entries_and_routing_match_the_exporters_own_layout(exports, client, uring, queues):  # type: ignore[no-untyped-def]
    exp = exports.start(io_uring="on", writable=True, queues=queues, ring_depth=4)
    info = exp.query()
    owners = {r["queue"] for r in info["ring-layout"]}
    snap = observe.rings(exp.pids())
    assert len(snap.fuse_rings) == len(owners)
    assert sum(r.in_flight for r in snap.fuse_rings) == 4 * CPUS
    assert all(r.pollers for r in snap.fuse_rings)  # a queue thread waits on each
    served = []
    for cpu in range(CPUS):
        before = observe.rings(exp.pids())
        assert client.run("pwrite", exp.mountpoint, 0, 4096, cpu=cpu) == "ok 4096"
        wait_until(lambda: observe.waiting(str(exp.mountpoint)) == 0, 10, "no request waiting")
        after = {r.key: r.completed for r in observe.rings(exp.pids()).rings}
        grew = [r.key for r in before.fuse_rings if after[r.key] > r.completed]
        assert len(grew) == 1
        served.append(grew[0])
    assert len(set(served)) == min(queues, CPUS)


def test_waiting_counts_a_held_request(exports, client):  # type: ignore[no-untyped-def]
    exp = exports.start(writable=True)
    mp = str(exp.mountpoint)
    assert observe.waiting(mp) == 0
    assert observe.rings(exp.pids()).fuse_rings == ()  # /dev/fuse: no ring entries
    rule = exp.inject("hold", opcode="read")["id"]
    pending = client.spawn("pread", exp.mountpoint, 0, 4096)
    exp.wait_held(rule)
    assert observe.waiting(mp) == 1
    exp.release(rule)
    wait_until(lambda: pending.poll() is not None, 10, "the client")
    assert observe.waiting(mp) == 0
