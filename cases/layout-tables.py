"""Pure multiqueue layout tables: which ring queues each queue thread owns."""

# Guards: qid-to-queue ownership for any CPU count, idle queues too (seed review: get_nprocs()).
from harness.iotests.steps import Session
from harness.layout import layout_table

SPEC = {
    "id": "layout-tables",
    "description": "Ring queue ownership for possible CPUs 1..64 x queues 1..8 (no kernel needed)",
    "groups": ["quick", "layout"],
    # Pure computation: no root, no /dev/fuse, no io_uring, no target: it
    # runs with -file, once, since no export serves it.  The ownership is the
    # reference exporter's and the FUSE-over-io_uring series' alike (ring
    # queue k -> queue k mod N); layout-routing checks a live export's.
    "requires": {"root": False, "dev-fuse": False},
    "modes": ["file"],
}

POSSIBLE_CPUS = (1, 2, 3, 4, 8, 16, 64)
QUEUES = (1, 2, 3, 4, 8)


def _ranges(qids: list[int]) -> str:
    """[0, 2, 4] -> '0,2,4'; long strided lists stay readable as 'a..b step s'."""
    if len(qids) > 4:
        return f"{qids[0]}..{qids[-1]} step {qids[1] - qids[0]} ({len(qids)})"
    return ",".join(map(str, qids))


def run(s: Session) -> None:
    for cpus in POSSIBLE_CPUS:
        s.log(f"=== {cpus} possible CPU(s) ===")
        for queues in QUEUES:
            table = layout_table(cpus, queues)
            owned = [f"q{q}:{_ranges(qids)}" for q, qids in enumerate(table) if qids]
            idle = [f"q{q}" for q, qids in enumerate(table) if not qids]
            line = f"queues={queues}: " + " ".join(owned)
            if idle:
                line += f"  idle: {' '.join(idle)}"
            s.log(line)
