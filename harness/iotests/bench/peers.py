"""The exporters a bench run compares, each with the settings it runs with."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...options import Settings
from ..targets import Target, TargetError, resolve

# A null-co export: the figures measure the FUSE path, not a disk.
NULL_SIZE = "1G"


@dataclass(frozen=True)
class Peer:
    label: str  # the row name: classic, io_uring, io_uring-threads, qsd-7.2, qsd-11.1, ...
    target: Target
    settings: Settings
    transport: str  # dev-fuse or io-uring
    queues: int
    # A variant of another row's exporter (same start-up): no start-up rows.
    variant: bool = False

    def describe(self) -> dict[str, object]:
        return {
            "label": self.label,
            "target": self.target.label,
            "version": self.target.version,
            "transport": self.transport,
            "queues": self.queues,
            "variant": self.variant,
            "argv": self.settings.argv(),
        }


@dataclass
class PeerSet:
    peers: list[Peer] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "label: reason"

    def labels(self) -> list[str]:
        return [p.label for p in self.peers]


def _base(queues: int) -> Settings:
    return Settings().with_({"null-size": NULL_SIZE, "writable": True, "queues": queues})


def _short(version: str) -> str:
    return ".".join(version.split(".")[:2])


def collect(queues: int, uring_problem: str | None, qsd: bool, mq: int) -> PeerSet:
    """Our two transports with `queues` queues (io_uring in processes, in
    threads, and in threads with shared ring queues); then QSD 7.2 (one
    queue, its only mode), QSD 11.1 with one and with `mq` iothreads, and
    the series build the same way over /dev/fuse and over io_uring."""
    out = PeerSet()
    reference = resolve("reference")
    classic = _base(queues)
    out.peers.append(Peer("classic", reference, classic, "dev-fuse", queues))
    if uring_problem:
        out.skipped.append(f"io_uring: {uring_problem}")
    else:
        threads = classic.with_({"io-uring": "on"})
        # The io_uring row: each queue in a process of its own, so ring
        # queues run in parallel (exporter/processes.py); then the same
        # layout in threads, which share a GIL.
        procs = threads.with_({"queue-processes": True})
        out.peers.append(Peer("io_uring", reference, procs, "io-uring", queues))
        out.peers.append(
            Peer("io_uring-threads", reference, threads, "io-uring", queues, variant=True)
        )
        if queues > 1:
            # Each ring queue thread may serve every CPU's ring queue, as
            # classic's threads all read one kernel queue.
            shared = threads.with_({"share-ring-queues": True})
            out.peers.append(
                Peer("io_uring-shared", reference, shared, "io-uring", queues, variant=True)
            )
    _libfuse(out, queues, uring_problem)
    if not qsd:
        return out
    # allow-other off: QSD's default (auto) would try it and need fuse.conf.
    single = _base(1).with_({"allow-other": "off"})
    for name in ("qsd", "qsd-11.1", "qsd-series"):
        try:
            t = resolve(name)
        except TargetError as e:
            out.skipped.append(f"{name}: {e}")
            continue
        # The series build's version is the base's: its rows say "series".
        label = name if name == "qsd-series" else f"qsd-{_short(t.version)}"
        rows = [(label, single, "dev-fuse")]
        if "io-uring" in t.capabilities:  # QEMU's own FUSE-over-io_uring
            if uring_problem:
                out.skipped.append(f"{label}-uring: {uring_problem}")
            else:
                rows.append((f"{label}-uring", single.with_({"io-uring": "on"}), "io-uring"))
        for row, settings, transport in rows:
            out.peers.append(Peer(row, t, settings, transport, 1))
            if mq > 1:
                multi = settings.with_({"queues": mq})
                problem = t.settings_problem(multi)
                if problem:
                    out.skipped.append(f"{row}-mq{mq}: {problem}")
                else:
                    out.peers.append(Peer(f"{row}-mq{mq}", t, multi, transport, mq))
    return out


def _libfuse(out: PeerSet, queues: int, uring_problem: str | None) -> None:
    """Rows after ours, when built: libfuse over /dev/fuse (`queues`
    threads on cloned fds) and over its ring (a ring thread per CPU)."""
    try:
        t = resolve("libfuse")
    except TargetError as e:
        out.skipped.append(f"libfuse: {e}")
        return
    classic = _base(queues)
    out.peers.append(Peer("libfuse-classic", t, classic, "dev-fuse", queues))
    if uring_problem:
        out.skipped.append(f"libfuse-io_uring: {uring_problem}")
    else:
        uring = classic.with_({"io-uring": "on"})
        out.peers.append(Peer("libfuse-io_uring", t, uring, "io-uring", queues))
