"""Which queue thread owns which FUSE-over-io_uring ring queue.

The kernel has one ring queue per possible CPU (num_possible_cpus() in
fs/fuse/dev_uring.c fuse_uring_create(), read here from
/sys/devices/system/cpu/possible; get_nprocs() counts only online CPUs, a
bug caught in review of QEMU's FUSE-over-io_uring series, 2025) and routes
a request to the ring queue of the CPU its task runs on.  Ring queue k
goes to queue thread k mod N, as in QEMU's series; or, shared, every queue
thread registers entries on every ring queue.
"""

from __future__ import annotations

from .kernel.cpus import parse_cpu_list


def possible_cpu_ids(path: str = "/sys/devices/system/cpu/possible") -> list[int]:
    with open(path) as f:
        return parse_cpu_list(f.read())


def possible_cpus() -> int:
    """How many ring queues the kernel has: one per possible CPU."""
    return len(possible_cpu_ids())


def ring_queues_of(queue: int, queues: int, ring_queues: int) -> list[int]:
    """The ring queues (qids) that queue thread `queue` of `queues` owns."""
    return list(range(queue, ring_queues, queues))


def ring_entries_of(
    queue: int, queues: int, ring_queues: int, depth: int, shared: bool
) -> tuple[list[int], int]:
    """The ring queues queue thread `queue` registers entries on, and how many on each.

    Shared, the depth is split (at least one entry each); which thread
    serves a ring queue then follows the load (exporter/sharing.py).
    """
    if shared:
        return list(range(ring_queues)), max(1, depth // queues)
    return ring_queues_of(queue, queues, ring_queues), depth


def owner_of(qid: int, queues: int) -> int:
    return qid % queues


def layout_table(ring_queues: int, queues: int) -> list[list[int]]:
    """For each queue thread, its ring queues; an empty list is an idle queue."""
    return [ring_queues_of(q, queues, ring_queues) for q in range(queues)]
