"""The session: what one instance's steps (and a Python case) act through.

A Session holds the instance's state while it runs (the image, the target
path, the exporter, background clients, fault rules, a CPU pin) and the
services every step uses: logging to the transcript, deferred cleanups,
bounded waits and external tools under the instance's one timeout budget
(harness.iotests.timeouts).  Python cases get the same object.
"""

from __future__ import annotations

import mmap
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ...kernel.cpus import Topology
from ...kernel.fdtable import in_private_table
from ...options import Settings
from ...patterns import offset_pattern, pattern_bytes
from .. import runs, transport
from ..client import ClientPool
from ..context import CaseContext
from ..filters import FilterEnv
from ..lifecycle import ExporterProcess
from ..observe import Looks
from ..targets import Target
from ..waiting import WaitTimeout
from .planned import Plan, PlannedStep

T = TypeVar("T")


class StepTimeout(WaitTimeout):
    """A bounded wait inside a step ran out; str() names the step."""


def cvtstr(n: float) -> str:
    """qemu-io's human-readable byte counts: '4 KiB', '2.500 KiB', '512 bytes'."""
    for unit, scale in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40)):
        if n >= scale:
            return _trim(n / scale, unit)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return _trim(n / scale, unit)
    return f"{n:.0f} bytes"


def _trim(v: float, unit: str) -> str:
    s = f"{v:.3f}".rstrip("0").rstrip(".")
    return f"{s} {unit}"


def timing_line(count: int, seconds: float) -> str:
    """The second line qemu-io prints for every request; filtered later."""
    seconds = max(seconds, 1e-9)
    return (
        f"{cvtstr(count)}, 1 ops; {seconds:05.2f} sec "
        f"({cvtstr(count / seconds)}/sec and {1 / seconds:.4f} ops/sec)"
    )


def fill_bytes(pat: int | str, offset: int, length: int) -> bytes:
    if pat == "offsets":
        return offset_pattern(offset, length)
    if pat == "zero":
        return bytes(length)
    return pattern_bytes(int(pat), length)


def page_buffer(length: int) -> mmap.mmap:
    """A page-aligned buffer: the kernel splits direct I/O at page boundaries,
    so an unaligned one would change how many requests the export sees."""
    return mmap.mmap(-1, max(length, 1))


def describe(e: OSError) -> str:
    return os.strerror(e.errno or 0)


# -- the session ----------------------------------------------------------


FIRST_ANSWER = 10.0  # a started export answers a GETATTR in milliseconds (scaled)


@dataclass
class Session:
    """Runs one instance's steps against its target."""

    ctx: CaseContext
    plan: Plan
    image: Path
    target: Path  # the FUSE mountpoint, or the image itself in -file mode
    export_target: Target | None = None  # what serves the export
    exporter: ExporterProcess | None = None
    clients: ClientPool = field(default_factory=ClientPool)
    background: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)
    filter_env: FilterEnv | None = None
    cpu: int | None = None
    unpinned: set[int] | None = None  # the case thread's CPUs before `pin`
    disk_usage: int | None = None  # the image's st_blocks at the last disk-usage
    current: PlannedStep | None = None  # the step running now, for reports
    kernel: Looks = field(default_factory=Looks)  # what `observe` saw last
    # The CPUs as the instance found them: what `spare` and `last` name.
    cpus_at_start: Topology = field(default_factory=Topology.read)
    cpus_changed: set[int] = field(default_factory=set)  # put back at the end

    def __post_init__(self) -> None:
        self.ctx.defer(self.clients.cleanup, "background clients")

    # -- what Python cases use too ------------------------------------------

    @property
    def params(self) -> dict[str, Any]:
        return self.ctx.params

    @property
    def workdir(self) -> Path:
        return self.ctx.workdir

    @property
    def fill(self) -> str:
        return self.plan.fill

    @property
    def settings(self) -> Settings | None:
        return self.plan.settings

    def log(self, line: str = "") -> None:
        self.ctx.log(line)

    def defer(self, fn: Callable[[], Any], what: str = "") -> None:
        self.ctx.defer(fn, what)

    def diagnose(self, fn: Callable[[], str]) -> None:
        self.ctx.diagnose(fn)

    def bound(self, cap: float | None = None) -> float:
        """How long a wait may take now (the instance's budget; see timeouts)."""
        return self.ctx.bound(cap)

    def wait(
        self,
        condition: Callable[[], T],
        what: str,
        cap: float | None = None,
        expected: bool = False,
    ) -> T:
        """A bounded poll within the instance's budget; WaitTimeout reports
        the instance's diagnostics (unless expected: see CaseContext.wait)."""
        return self.ctx.wait(condition, what, self.bound(cap), expected)

    def tool(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run an external program (dd, fio, qemu-io ...) within the budget:
        an overrun is a bounded-wait report with its kernel stack and output."""
        return runs.run(argv, self.bound(), diagnose=self.ctx.report, **kw)

    def expand(self, s: str) -> str:
        return (
            s.replace("$TARGET", str(self.target))
            .replace("$IMAGE", str(self.image))
            .replace("$TEST_DIR", str(self.ctx.workdir))
        )

    def run_steps(self, steps: Sequence[PlannedStep]) -> None:
        """Run steps in order; a bounded wait that runs out names its step."""
        outer = self.current
        for ps in steps:
            self.ctx.check_cancelled()
            self.current = ps
            try:
                ps.defn.run(self, ps.value)
            except WaitTimeout as e:
                if isinstance(e, StepTimeout):
                    raise
                raise StepTimeout(f"step '{ps.name}' (line {ps.line}): {e}") from None
        self.current = outer

    # -- exporters ---------------------------------------------------------

    def new_exporter(self, settings: Settings) -> ExporterProcess:
        assert self.export_target is not None
        n = len(list(self.ctx.workdir.glob("export*")))
        work = self.ctx.workdir / f"export{n}"
        work.mkdir()
        image = None if settings["null-size"] is not None else self.image
        exp = self.export_target.exporter(work, self.target, image, settings)
        exp.wants_holds = "faults" in self.plan.needs
        self.ctx.defer(
            lambda: exp.cleanup(kill=self.ctx.gave_up), f"exporter {work.name}", target=True
        )
        self.ctx.diagnose(exp.report)
        exp.wants_ring = settings["io-uring"] == "on"
        return exp

    def start_export(self) -> None:
        assert self.settings is not None
        self.exporter = self.launch(self.new_exporter(self.settings))

    def launch(self, exp: ExporterProcess) -> ExporterProcess:
        """Start an exporter with the case thread's own CPUs, not a `pin`;
        one asked for io_uring must really serve on the ring."""
        if self.cpu is None or self.unpinned is None:
            exp.start(self.bound())
        else:
            os.sched_setaffinity(0, self.unpinned)
            try:
                exp.start(self.bound())
            finally:
                os.sched_setaffinity(0, {self.cpu})
        if exp.wants_ring:
            # Bounded: a server the kernel never lets serve is a finding.
            first = transport.FirstAnswer.send(exp.mountpoint)
            try:
                self.wait(first.answered.is_set, "the export to answer a request", FIRST_ANSWER)
            except WaitTimeout as e:
                raise WaitTimeout(f"{e}\nthe request's kernel stack:\n{first.where()}") from None
            transport.check(exp.pids(), exp.mountpoint)
        return exp

    def need_exporter(self) -> ExporterProcess:
        if self.exporter is None:
            raise RuntimeError("no export is running (export.start is false?)")
        return self.exporter

    def on_target(self, flags: int, what: str, use: Callable[[int], T]) -> T | None:
        """use(fd) with the target open, then closed, in an fd table of its
        own, so that no process another case thread forks meanwhile holds
        the mount (harness/kernel/fdtable.py).  None after logging why
        open(2) failed for the step `what`: a read-only mount refuses O_RDWR
        with EROFS before any request reaches the export."""

        def opened() -> T | None:
            try:
                fd = os.open(self.target, flags | os.O_CLOEXEC)
            except OSError as e:
                self.log(f"{what}: open failed: {describe(e)}")
                return None
            try:
                return use(fd)
            finally:
                os.close(fd)

        return in_private_table(opened)
