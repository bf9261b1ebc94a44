"""Steps that look at the export from the kernel's side (harness.iotests.observe).

They need nothing of the target: the ring layout, which ring served a
request, the transport and the requests the kernel waits for are read from
/proc and fusectl, so the layout and negotiation cases run on any daemon.
"""

from __future__ import annotations

from ...layout import possible_cpus
from ...options import choice
from .. import observe
from .session import Session
from .vocabulary import step

LOOKS = ("rings", "served", "transport", "waiting")


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
