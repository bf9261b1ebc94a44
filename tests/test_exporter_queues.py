"""Multiqueue on the classic transport: N threads, each with its own fd.

Which thread reads a request is up to the kernel, so "requests arrive on
every queue" is shown deterministically: a `stall` fault blocks the thread
that read a READ, which forces the kernel to hand the next READ to a queue
that is still reading.
"""

from __future__ import annotations

import pytest

from harness.iotests.waiting import wait_until


@pytest.mark.parametrize("queues", [1, 2, 4])
def test_requests_arrive_on_every_queue(exports, client, queues):
    exp = exports.start(queues=queues)
    info = exp.query()
    assert [q["index"] for q in info["queues"]] == list(range(queues))
    rule = exp.inject("stall", opcode="read")
    procs = []
    for i in range(queues):
        procs.append(client.spawn("pread", exp.mountpoint, i * 4096, 4096))

        def stalled(n: int = i + 1) -> bool:
            return exp.query()["faults"][0]["stalled"] == n

        wait_until(stalled, 10, f"{i + 1} stalled queue threads", exp.report)
    stalled_queues = [q["index"] for q in exp.query()["queues"] if q["stalled"]]
    assert stalled_queues == list(range(queues))
    assert exp.release(rule["id"]) == queues
    assert [client.result(p) for p in procs] == ["ok 4096"] * queues
    reads = [q["opcodes"].get("READ", 0) for q in exp.query()["queues"]]
    assert reads == [1] * queues
    assert exp.stop() == 0


def test_queue_counters_add_up(exports, client):
    exp = exports.start(queues=2, writable=True)
    for i in range(8):
        assert client.run("pwrite", exp.mountpoint, i * 4096, 4096) == "ok 4096"
    queues = exp.query()["queues"]
    assert sum(q["opcodes"].get("WRITE", 0) for q in queues) == 8
    assert sum(q["requests"] for q in queues) == sum(sum(q["opcodes"].values()) for q in queues)
