"""Steps that look at the export from the kernel's side (harness.iotests.observe).

They need nothing of the target: the ring layout, which ring served a
request, the transport and the requests the kernel waits for are read from
/proc and fusectl, so the layout and negotiation cases run on any daemon.
"""

from __future__ import annotations

import os
from typing import Any

from ...kernel import cpus
from ...layout import possible_cpus
from ...options import choice
from ...patterns import pattern_bytes
from .. import observe
from ..client import ClientPool
from .session import Session
from .vocabulary import size, step

LOOKS = ("queues", "rings", "served", "transport", "waiting")


@step("observe", scalar=choice(*LOOKS), export=True, metavar=", ".join(LOOKS))
def _observe(s: Session, what: str) -> None:
    """Print what the kernel shows: FUSE rings, which served, the transport, waiting requests."""
    exp = s.need_exporter()
    if what == "waiting":
        s.log(f"kernel: {observe.waiting(str(s.target))} request(s) waiting for the daemon")
        return
    # Only once the kernel waits for no answer has every request reached a
    # ring: a close() sends its RELEASE in the background.
    s.wait(lambda: observe.waiting(str(s.target)) == 0, "no request waiting (fusectl)")
    snap = observe.rings(exp.pids())
    fuse = snap.fuse_rings
    if what == "transport":
        seen = "io-uring (ring entries waiting)" if fuse else "dev-fuse (no ring entries)"
        s.log(f"kernel: transport {seen}")
    elif what == "queues":
        # Every ring entry waits for a request at rest, and each ring queue
        # gets ring-depth of them: the total says how many queues have entries.
        depth, total = exp.settings["ring-depth"], sum(r.in_flight for r in fuse)
        covered, rest = divmod(total, depth)
        if covered == possible_cpus() and not rest:
            s.log("kernel: ring entries for every possible CPU's queue")
        else:
            s.log(
                f"kernel: ring entries for {total / depth:g} of {possible_cpus()} possible CPUs' "
                f"queues ({total} entries, {depth} per queue)"
            )
    elif what == "rings":
        total = sum(r.in_flight for r in fuse)
        per_qid, rest = divmod(total, possible_cpus())
        depth = f"{per_qid} per ring queue" if not rest else f"{total} in all"
        s.log(f"kernel: {len(fuse)} ring(s) with FUSE entries, {depth}")
    else:  # served: the rings that completed commands since the last look
        before = {r.key: r.completed for r in (s.kernel.last or snap).rings}
        served = [r.key for r in fuse if r.completed > before.get(r.key, 0)]
        names = sorted(s.kernel.name(key) for key in served)
        s.log(f"kernel: served by {', '.join(f'ring {n}' for n in names) or 'no ring'}")
    s.kernel.last = snap


@step("route", {"length": (size, False)}, export=True)
def _route(s: Session, a: dict[str, Any]) -> None:
    """From each online CPU, a pinned client writes and reads back; over io_uring, by one ring."""
    exp = s.need_exporter()
    length = a.get("length", 4096)
    online = cpus.Topology.read().online
    problems: list[str] = []
    for cpu in online:
        # A write and a read back, each from its own process on this CPU:
        # both must be served, by the same ring (the kernel sends a request
        # to the ring queue of its task's CPU, and one ring holds that queue).
        s.wait(lambda: observe.waiting(str(s.target)) == 0, "no request waiting (fusectl)")
        before = {r.key: r.completed for r in observe.rings(exp.pids()).rings}
        pat = 0x40 + cpu % 0x40
        for op, args in (
            ("pwrite", (cpu * length, length, pat)),
            ("pread", (cpu * length, length)),
        ):
            p = s.clients.spawn(op, s.target, *args, cpu=cpu)
            s.wait(lambda p=p: p.poll() is not None, f"{op} from CPU {cpu}")
            got = ClientPool.result(p)
            if got != f"ok {length}":
                problems.append(f"CPU {cpu}: {op} gave {got!r}")
        s.wait(lambda: observe.waiting(str(s.target)) == 0, "no request waiting (fusectl)")
        after = observe.rings(exp.pids())
        served = sorted(
            s.kernel.name(r.key) for r in after.fuse_rings if r.completed > before.get(r.key, 0)
        )
        if exp.wants_ring and len(served) != 1:
            rings = ", ".join(f"ring {n}" for n in served) or "no ring"
            problems.append(f"CPU {cpu}: served by {rings}")
        s.kernel.last = after

    def read_back(fd: int) -> None:
        for cpu in online:
            if os.pread(fd, length, cpu * length) != pattern_bytes(0x40 + cpu % 0x40, length):
                problems.append(f"CPU {cpu}: its data did not read back")

    s.on_target(os.O_RDONLY, "route", read_back)
    for line in problems:
        s.log(f"route: {line}")
    if not problems:
        # The same line over /dev/fuse, where no ring is there to check.
        s.log("route: every online CPU served, data intact")
