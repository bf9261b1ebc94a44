"""CPU topology: which CPUs are possible, present and online, and CPU hotplug.

FUSE-over-io_uring keeps one ring queue per *possible* CPU and uses the
ring only once every one of them has an entry; a request goes to the queue
of the CPU its task runs on, which must be *online*.  Exporters that count
online CPUs (get_nprocs()) instead of possible ones, or that forget a CPU
can go away while its queue holds entries, only show it on a machine where
the two differ: a VM booted with maxcpus=, or a host CPU taken offline.

Taking a CPU offline changes the whole machine, so the harness does it only
in serial instances and puts every CPU back as it found it (runs.py, also
after a SIGKILL of the run).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

SYSFS = Path("/sys/devices/system/cpu")


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]"""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def format_cpu_list(cpus: list[int] | tuple[int, ...]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8' (the kernel's own spelling)."""
    parts: list[str] = []
    ids = sorted(set(cpus))
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts) or "none"


def _read(name: str, root: Path) -> tuple[int, ...]:
    try:
        return tuple(parse_cpu_list((root / name).read_text()))
    except OSError:
        return ()


@dataclass(frozen=True)
class Topology:
    possible: tuple[int, ...]
    present: tuple[int, ...]
    online: tuple[int, ...]

    @classmethod
    def read(cls, root: Path = SYSFS) -> Topology:
        return cls(_read("possible", root), _read("present", root), _read("online", root))

    @property
    def offline(self) -> tuple[int, ...]:
        return tuple(c for c in self.possible if c not in self.online)

    def describe(self) -> str:
        """'possible 0-3, present 0-3, online 0-1'"""
        return (
            f"possible {format_cpu_list(self.possible)}, present {format_cpu_list(self.present)}, "
            f"online {format_cpu_list(self.online)}"
        )

    def as_dict(self) -> dict[str, str]:
        return {
            "possible": format_cpu_list(self.possible),
            "present": format_cpu_list(self.present),
            "online": format_cpu_list(self.online),
        }


def hotpluggable(cpu: int, root: Path = SYSFS) -> bool:
    """Whether CPU `cpu` can be taken offline and back (x86 has no switch
    for CPU 0)."""
    return (root / f"cpu{cpu}" / "online").exists()


def is_online(cpu: int, root: Path = SYSFS) -> bool:
    return cpu in _read("online", root)


def set_online(cpu: int, online: bool, root: Path = SYSFS) -> None:
    """Bring a CPU up or down.  The write returns once the kernel has done
    it (tasks migrated off a CPU going down), so no wait follows; writing
    the state a CPU is already in is a no-op."""
    path = root / f"cpu{cpu}" / "online"
    try:
        path.write_text("1" if online else "0")
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise OSError(e.errno, f"CPU {cpu} cannot be hotplugged (no {path})") from None
        raise
