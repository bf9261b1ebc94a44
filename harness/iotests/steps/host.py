"""Steps on the test machine itself: CPU pinning, CPU hotplug and kernel parameters.

A CPU is a number or a name, so that one case fits every topology:
`last` is the highest possible CPU, `spare` the highest CPU online when the
instance started other than CPU 0 (which x86 cannot take offline).  The
transcript says the name, not the number.
"""

from __future__ import annotations

import os
from typing import Any

from ...kernel import cpus
from ...kernel.params import ENABLE_URING, read_param, write_param
from ...options import choice
from ..runs import RUN
from .session import Session
from .vocabulary import non_negative, step

CPU_NAMES = ("last", "spare")
CpuRef = int | str


def cpu_ref(v: Any) -> CpuRef:
    """A CPU: its number, or `last` or `spare`."""
    return str(v) if v in CPU_NAMES else non_negative(v)


def cpu_requires(ref: CpuRef | None) -> dict[str, Any]:
    if ref is None:
        return {}
    return {"cpus": ref + 1} if isinstance(ref, int) else {f"cpu-{ref}": True}


def named_cpu(ref: CpuRef, topo: cpus.Topology) -> int | None:
    """The CPU a reference names in this topology, or None: no such CPU."""
    if isinstance(ref, int):
        return ref if ref in topo.possible else None
    if ref == "last":
        return max(topo.possible, default=None)
    return max((c for c in topo.online if c != 0), default=None)


def resolve_cpu(s: Session, ref: CpuRef) -> int:
    cpu = named_cpu(ref, s.cpus_at_start)
    if cpu is None:  # the runner checked the topology first
        raise RuntimeError(f"no CPU {ref} here ({s.cpus_at_start.describe()})")
    return cpu


@step(
    "pin",
    scalar=lambda v: None if v is None else cpu_ref(v),
    optional=True,
    metavar="CPU",
    requires=cpu_requires,
)
def _pin(s: Session, ref: CpuRef | None) -> None:
    """Pin this case's I/O (and later background clients, dd, fio) to one CPU.

    Only the case thread is pinned, and it ends with the instance; exporters
    are started unpinned (Session.launch)."""
    if s.unpinned is None:
        s.unpinned = os.sched_getaffinity(0)
    cpu = None if ref is None else resolve_cpu(s, ref)
    os.sched_setaffinity(0, s.unpinned if cpu is None else {cpu})
    s.cpu = cpu
    s.log("unpinned" if ref is None else f"pinned to CPU {ref}")


def _hotplug_requires(ref: CpuRef) -> dict[str, Any]:
    return {**cpu_requires(ref), "hotplug": True}


def _set_cpu(s: Session, ref: CpuRef, online: bool) -> None:
    """Take a CPU down or up; the first change of each CPU is undone at the
    end of the instance, and recorded so that a killed run's is undone by
    the next (runs.py)."""
    cpu = resolve_cpu(s, ref)
    was = cpus.is_online(cpu)
    if was != online and cpu not in s.cpus_changed:
        s.cpus_changed.add(cpu)
        RUN.changing_cpu(cpu, was)

        def put_back() -> None:
            cpus.set_online(cpu, was)
            RUN.restored_cpu(cpu)

        s.defer(put_back, f"put CPU {cpu} back {'online' if was else 'offline'}")
    cpus.set_online(cpu, online)
    s.log(f"CPU {ref}: {'online' if online else 'offline'}")


# The two hotplug steps differ only in direction.
_HOTPLUG: dict[str, Any] = {
    "scalar": cpu_ref,
    "metavar": "CPU",
    "fuse": True,
    "serial": True,
    "in_cycles": False,
    "requires": _hotplug_requires,
}


@step("cpu-offline", **_HOTPLUG)
def _cpu_offline(s: Session, ref: CpuRef) -> None:
    """Take a CPU offline (tasks on it move); put back as found after the instance."""
    _set_cpu(s, ref, online=False)


@step("cpu-online", **_HOTPLUG)
def _cpu_online(s: Session, ref: CpuRef) -> None:
    """Bring a CPU online; put back as found after the instance."""
    _set_cpu(s, ref, online=True)


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
