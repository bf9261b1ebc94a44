"""Ring queue ownership, as a pure function of possible CPUs and queues."""

from __future__ import annotations

import pytest

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
