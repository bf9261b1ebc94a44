"""Ring queue ownership, as a pure function of possible CPUs and queues."""

from __future__ import annotations

import pytest

from harness.exporter.sharing import RingSharing
from harness.layout import layout_table, owner_of, parse_cpu_list, ring_entries_of


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("0") == [0]


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("queues", [1, 2, 3, 4, 8])
def test_every_ring_queue_has_exactly_one_owner(cpus: int, queues: int) -> None:
    table = layout_table(cpus, queues)
    owned = sorted(q for qids in table for q in qids)
    assert owned == list(range(cpus))
    for queue, qids in enumerate(table):
        assert all(owner_of(q, queues) == queue for q in qids)
    # Queues beyond the CPU count own nothing: they stay idle.
    assert [len(qids) == 0 for qids in table] == [q >= cpus for q in range(queues)]


def test_two_cpus_three_queues() -> None:
    assert layout_table(2, 3) == [[0], [1], []]
    assert layout_table(3, 2) == [[0, 2], [1]]


def test_shared_ring_entries_split_the_depth() -> None:
    assert ring_entries_of(1, 3, 4, 64, shared=False) == ([1], 64)
    assert ring_entries_of(1, 3, 4, 64, shared=True) == ([0, 1, 2, 3], 21)
    assert ring_entries_of(2, 4, 2, 2, shared=True) == ([0, 1], 1)  # at least one


def test_sharing_gathers_concurrent_load_at_the_leader_and_sends_one_client_home() -> None:
    s = RingSharing(queues=2, ring_queues=4)
    assert s.owner == [0, 1, 0, 1] and s.home(3) == 1
    # A home thread that sees concurrent load pushes its own ring queues.
    assert s.rebalance(1, alone=False, concurrent=True) == [1, 3]
    assert s.owner == [0, 0, 0, 0] and s.version == 2
    # Nothing left to gather; load that is neither leaves things alone.
    assert s.rebalance(0, alone=False, concurrent=True) == []
    assert s.rebalance(0, alone=False, concurrent=False) == []
    # One client alone: only the leader's view covers every CPU, so only it sends them home.
    assert s.rebalance(1, alone=True, concurrent=False) == []
    assert s.rebalance(0, alone=True, concurrent=False) == [1, 3]
    assert s.owner == [0, 1, 0, 1] and s.version == 4
    # Concurrent load at the leader pulls every ring queue.
    assert s.rebalance(0, alone=False, concurrent=True) == [1, 3]


def test_sharing_with_more_threads_than_cpus() -> None:
    s = RingSharing(queues=3, ring_queues=2)
    assert s.owner == [0, 1]
    # Thread 2 has no home ring queue and owns nothing: it moves nothing.
    assert s.rebalance(2, alone=False, concurrent=True) == []
    assert s.rebalance(1, alone=False, concurrent=True) == [1]
