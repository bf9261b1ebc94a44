"""Steps on the test machine itself: CPU pinning and kernel parameters."""

from __future__ import annotations

import os
from typing import Any

from ...kernel.params import ENABLE_URING, read_param, write_param
from ...options import choice
from .session import Session
from .vocabulary import non_negative, step


@step(
    "pin",
    scalar=lambda v: None if v is None else non_negative(v),
    optional=True,
    metavar="CPU",
    requires=lambda cpu: {} if cpu is None else {"cpus": cpu + 1},
)
def _pin(s: Session, cpu: int | None) -> None:
    """Pin this case's I/O (and later background clients, dd, fio) to one CPU.

    Only the case thread is pinned, and it ends with the instance; exporters
    are started unpinned (Session.launch)."""
    if s.unpinned is None:
        s.unpinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, s.unpinned if cpu is None else {cpu})
    s.cpu = cpu
    s.log("unpinned" if cpu is None else f"pinned to CPU {cpu}")


def _param_requires(a: dict[str, Any]) -> dict[str, Any]:
    # A kernel without the parameter has the ring switched off for good.
    return {"kernel-uring": True} if a["enable_uring"] == "Y" else {"uring-off": True}


@step(
    "kernel-param",
    {"enable_uring": (choice("Y", "N"), True)},
    fuse=True,
    serial=True,
    in_cycles=False,
    requires=_param_requires,
)
def _kernel_param(s: Session, a: dict[str, Any]) -> None:
    """Set enable_uring for the rest of the instance (serial cases only); restored after.
    N is met as it is on a kernel without FUSE-over-io_uring; Y is not run there."""
    before = read_param(ENABLE_URING)
    if before is None:  # N (see _param_requires): the ring is off already
        s.log(f"enable_uring={a['enable_uring']}")
        return
    s.ctx.defer(lambda: write_param(ENABLE_URING, before), "restore enable_uring")
    write_param(ENABLE_URING, a["enable_uring"])
    s.log(f"enable_uring={a['enable_uring']}")
