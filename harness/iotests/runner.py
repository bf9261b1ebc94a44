"""Running one case instance: requirements, locks, timeout, cleanup, golden.

The case body runs in a worker thread so that the runner keeps control:
when the instance's timeout expires, the report gets the exporter's stderr
tail and the kernel stacks of stuck threads, and then the cleanups (stop
the exporter, unmount, abort the connection) unblock the worker.  Cleanups
run on every path: pass, fail, timeout and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..kernel import cpus
from ..kernel.fdtable import helper_of
from ..kernel.mount import mount_table
from ..kernel.params import (
    ENABLE_URING,
    NO_URING,
    ensure_uring,
    kernel_lock,
    read_param,
    uring_in_kernel,
)
from ..layout import possible_cpus
from ..patterns import make_image
from .context import Cancelled, CaseContext, Instance, NotRun
from .filters import FilterEnv, apply_filters
from .golden import compare, find_reference
from .known import Environment, KnownDifferences
from .lifecycle import REPO
from .plan import Plan
from .runs import RUN
from .spec import CaseSpec
from .steps import Session
from .steps.host import CPU_NAMES, named_cpu
from .steps.vocabulary import TOOLS as STEP_TOOLS
from .targets import Target
from .timeouts import scale, scaled
from .waiting import WaitTimeout

GOLDEN_DIR = REPO / "golden"
KNOWN_DIR = GOLDEN_DIR / "known"
CASES_DIR = REPO / "cases"
CLEANUP_JOIN = 15.0
REPORT_GRACE = 60.0  # for a bounded wait's report once it ran out; scaled


def regen_requested() -> bool:
    """FUSE_IOTESTS_REGEN=1: rewrite golden files (tools/check --regen)."""
    return os.environ.get("FUSE_IOTESTS_REGEN") == "1"


@dataclass
class RunOptions:
    results_dir: Path
    work_root: Path
    target: Target
    golden_dir: Path = GOLDEN_DIR
    regen: bool = False
    known: KnownDifferences = field(default_factory=lambda: KnownDifferences([]))

    def environment(self, inst: Instance) -> Environment:
        """What known differences are matched against (-file: no target)."""
        if inst.mode == "file":
            return Environment("", "")
        return Environment(self.target.name, self.target.version)


@dataclass
class Result:
    instance: Instance
    status: str  # "pass", "fail", "not run", "xfail" or "xpass" (see known.py)
    reason: str = ""
    diff: str = ""
    start: float = 0.0
    end: float = 0.0
    golden: str = ""
    bad: str = ""
    exporter_stderr: str = ""
    output: str = ""  # the filtered transcript
    known: str = ""  # xfail/xpass: "difference" or "defect" (known.py)

    @property
    def elapsed(self) -> float:
        return self.end - self.start


# Contexts of running instances, for Ctrl-C in tools/check.
LIVE: set[CaseContext] = set()


def cleanup_live() -> None:
    """Ctrl-C: stop every running instance and remove what it created."""
    for ctx in list(LIVE):
        stop_case(ctx, None, "interrupted")


def target_problem(spec: CaseSpec, plan: Plan, target: Target) -> str | None:
    """Why the target cannot run this instance, from what its plan declares
    (steps' needs, export options): decided before anything runs."""
    if spec.targets and target.name not in spec.targets:
        return f"the case is for target {', '.join(spec.targets)} only"
    if plan.settings is None:
        return None
    first, *others = plan.export_settings()  # what the case starts with, then start-export's
    problems = [target.settings_problem(first), target.lacks(set(plan.needs))]
    problems.append(target.holds_problem(plan.fault_ops))
    problems += [target.settings_problem(s) for s in others]
    return next((p for p in problems if p), None)


# What each requirement a plan can have needs of this machine.
TOOLS = {**STEP_TOOLS, "qsd": "qemu-storage-daemon"}


def missing_requirement(spec: CaseSpec, inst: Instance, target: Target) -> str | None:
    """Why this instance cannot run here, or None."""
    plan = spec.plan(inst)
    problem = target_problem(spec, plan, target)
    if problem:
        return problem
    req = plan.requires
    if req.get("root") and os.geteuid() != 0:
        return "needs root"
    if req.get("dev-fuse") and not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    for key, tool in TOOLS.items():
        if req.get(key) and shutil.which(tool) is None:
            return f"{tool} not installed"
    if req.get("cpus", 0) > possible_cpus():
        return f"needs {req['cpus']} possible CPUs, this machine has {possible_cpus()}"
    problem = cpu_problem(req)
    if problem:
        return problem
    if req.get("kernel-uring") and not uring_in_kernel():
        return NO_URING
    if req.get("uring"):
        return ensure_uring()
    if req.get("uring-if-available") and uring_in_kernel():
        return ensure_uring()  # where the kernel has it, io-uring auto must get it
    return None


def cpu_problem(req: dict[str, Any]) -> str | None:
    """Why the CPUs a plan names (steps/host.py) are not here, or cannot go
    offline and back."""
    names = [n for n in CPU_NAMES if req.get(f"cpu-{n}")]
    if not names and not req.get("hotplug"):
        return None
    topo = cpus.Topology.read()
    for name in names:
        cpu = named_cpu(name, topo)
        if cpu is None or (req.get("hotplug") and not cpus.hotpluggable(cpu)):
            what = "a second online CPU" if name == "spare" else "a second possible CPU"
            return (
                f"needs {what} that can go offline ({topo.describe()}): "
                "boot a VM with --cpus/--max-cpus"
            )
    if req.get("hotplug") and os.geteuid() != 0:
        return "needs root (CPU hotplug)"
    return None


@contextlib.contextmanager
def _kernel_lock(spec: CaseSpec, inst: Instance) -> Iterator[str | None]:
    """Every instance holds the cross-process lock shared, a serial one
    exclusively: it runs alone, to change kernel state or to count
    process-wide resources."""
    uring = spec.plan(inst).requires.get("uring")
    with kernel_lock(exclusive=spec.serial):
        if uring and read_param(ENABLE_URING) != "Y":
            yield "enable_uring was changed by someone else"
        else:
            yield None


def run_instance(spec: CaseSpec, inst: Instance, opts: RunOptions) -> Result:
    result = Result(inst, "not run", start=time.time())
    reason = missing_requirement(spec, inst, opts.target)
    if reason:
        result.reason, result.end = reason, time.time()
        return result
    opts.work_root.mkdir(parents=True, exist_ok=True)
    safe = inst.id.replace("[", "-").replace("]", "").replace(",", "-").replace("=", "_")
    # Short: the exporter's control socket lives in here (sun_path is 108 bytes).
    workdir = Path(tempfile.mkdtemp(prefix=safe[:32] + ".", dir=opts.work_root))
    RUN.add_dir(workdir)
    ctx = CaseContext(inst, workdir)
    LIVE.add(ctx)
    error = ""
    errors: list[str] = []
    try:
        with _kernel_lock(spec, inst) as busy:
            env = FilterEnv(str(workdir), None)
            try:
                if not busy:
                    body, env = _prepare(spec, inst, ctx, opts.target)
                    error, busy = _run_with_timeout(body, ctx, spec.timeout * scale())
                    ctx.gave_up = ctx.gave_up or bool(error)
            except Exception as e:  # e.g. the image cannot be made: this instance fails
                tb = "".join(traceback.format_exception(e)[-3:]).rstrip()
                error = f"harness error: {type(e).__name__}: {e}\n{tb}"
            finally:
                # Under the lock: a cleanup may restore kernel state.
                errors = ctx.run_cleanups()
    finally:
        LIVE.discard(ctx)
        result.exporter_stderr = _exporter_stderr(workdir)
        result.end = time.time()
    if ctx.cancel_reason == "interrupted":
        busy, error = "interrupted", ""
    if busy and not error and not errors:
        result.reason = busy
        shutil.rmtree(workdir, ignore_errors=True)
        return result
    left = _leftovers(workdir)
    if errors or left:
        error = "\n".join([error, *errors, *(f"left behind: {x}" for x in left)]).strip()
    result.status = "pass"
    header = f"QA output created by {inst.case_id}\n"
    actual = result.output = apply_filters(header + ctx.transcript, env)
    # Every instance's filtered transcript, so that runs can be compared.
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    (opts.results_dir / f"{safe}.out").write_text(actual)
    if error:
        result.status, result.reason = "fail", error
    else:
        golden = find_reference(
            opts.golden_dir, inst, spec.golden == "per-transport", uring_in_kernel()
        )
        own_log = "exporter-log" in opts.target.capabilities or inst.mode == "file"
        cmp = compare(golden, actual, opts.results_dir, safe, opts.regen, own_log)
        result.golden = str(golden)
        if not cmp.ok:
            result.status = "fail"
            result.reason = f"output mismatch (see {cmp.bad})"
            result.diff, result.bad = cmp.diff, str(cmp.bad)
    _apply_known(result, opts)
    if result.status == "pass":
        shutil.rmtree(workdir, ignore_errors=True)
    elif not left:  # keep it for inspection, with the results rather than in /tmp
        kept = opts.results_dir / safe
        shutil.rmtree(kept, ignore_errors=True)
        opts.results_dir.mkdir(parents=True, exist_ok=True)
        _keep(workdir, kept)
        result.reason += f"\n(instance directory kept: {kept})"
    else:
        result.reason += f"\n(instance directory kept: {workdir})"
    return result


def _keep(workdir: Path, kept: Path) -> None:
    """Move an instance directory into the results.  Across file systems
    (a VM's /tmp to the repository over 9p) it is copied, without the
    sockets a killed daemon left (QMP): they cannot be copied, and mean
    nothing once their process is gone."""
    try:
        workdir.rename(kept)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise

    def sockets(d: str, names: list[str]) -> list[str]:
        return [n for n in names if stat.S_ISSOCK(os.lstat(os.path.join(d, n)).st_mode)]

    shutil.copytree(workdir, kept, symlinks=True, ignore=sockets)
    shutil.rmtree(workdir, ignore_errors=True)


def _apply_known(result: Result, opts: RunOptions) -> None:
    """A listed instance whose transcript differs is an xfail; one that
    passes, an xpass.  A listed defect also covers an error or a timeout
    that shows its signature; leftovers always stay failures."""
    entries = opts.known.match(result.instance, opts.environment(result.instance))
    if not entries:
        return
    # A hang stops the case before the golden comparison: its transcript
    # so far is part of what a defect's signature may match.
    failure = f"{result.reason}\n{result.diff}\n{result.output}"
    if result.status == "fail" and "left behind:" not in result.reason:
        covering = [e for e in entries if e.covers(failure) and (result.bad or e.kind == "defect")]
        if covering:
            result.status = "xfail"
            result.known = "defect" if any(e.kind == "defect" for e in covering) else "difference"
            result.reason = "\n".join([*(e.describe() for e in covering), result.reason])
    elif result.status == "pass" and not all(e.intermittent for e in entries):
        result.known = entries[0].kind
        where = ", ".join(e.where for e in entries)
        result.status = "xpass"
        result.reason = f"matches its golden file, but {where} lists it: remove the entry"


def _prepare(
    spec: CaseSpec, inst: Instance, ctx: CaseContext, target: Target
) -> tuple[Callable[[], None], FilterEnv]:
    """The instance's body and the paths its filters replace."""
    plan = spec.plan(inst)
    image = ctx.workdir / "disk.img"
    if spec.python:
        fn = spec.run_function()
        session = Session(ctx, plan, image, image, target)
        return (lambda: fn(session)), FilterEnv(str(ctx.workdir), None)
    make_image(str(image), plan.image_size, plan.fill)
    path = image
    if plan.settings is not None:
        path = ctx.workdir / "disk.fuse"
        path.touch()
    env = FilterEnv(str(ctx.workdir), str(path))
    session = Session(ctx, plan, image, path, target, filter_env=env)

    def body() -> None:
        if plan.settings is not None and plan.start:
            session.start_export()
        session.run_steps(plan.steps)

    return body, env


def _run_with_timeout(
    body: Callable[[], None], ctx: CaseContext, timeout: float
) -> tuple[str, str | None]:
    """Run body in a worker thread: (failure report or '', not-run reason or None)."""
    outcome: dict[str, str] = {}
    finished = threading.Event()  # see check._run_all: not Thread.join()

    def worker() -> None:
        try:
            run_body()
        finally:
            finished.set()

    def run_body() -> None:
        try:
            body()
        except NotRun as e:
            outcome["not run"] = str(e)
        except Cancelled:
            pass  # the runner reports why
        except WaitTimeout as e:  # a bounded wait's own report: no traceback
            outcome["error"] = f"bounded wait: {e}"
        except BaseException as e:  # reported, not raised, from the worker
            tb = traceback.format_exception(e)
            outcome["error"] = f"{type(e).__name__}: {e}\n" + "".join(tb[-3:]).rstrip()

    t = threading.Thread(target=worker, name=f"case {ctx.instance.id}", daemon=True)
    ctx.start_clock(timeout)
    t.start()
    try:
        finished.wait(timeout)
        if not finished.is_set() and ctx.reporting.is_set():
            # A bounded wait ran out first and is still gathering its report
            # (gdb on a loaded machine can outlast the budget's margin): the
            # verdict is that wait's, not this timeout's.
            finished.wait(scaled(REPORT_GRACE))
    except KeyboardInterrupt:  # pytest's main thread: stop the case, then go
        stop_case(ctx, finished, "interrupted")
        raise
    if not finished.is_set():
        report = [f"timed out after {timeout:.0f}s; transcript so far ends with:"]
        report += [f"  {line}" for line in ctx.tail(5)]
        report.append(ctx.report())
        report.append(_thread_report(t))
        ctx.gave_up = True
        stop_case(ctx, finished, "timed out")
        if not finished.is_set():
            report.append("the case thread is still stuck after cleanup")
        return "\n".join(r for r in report if r), None
    return outcome.get("error", ""), outcome.get("not run")


def stop_case(ctx: CaseContext, finished: threading.Event | None, reason: str) -> None:
    """Cancel, then clean up: removing the exporter and mount unblocks the case
    thread, which stops at its next step; wait (bounded) for it."""
    ctx.cancel(reason)
    ctx.run_cleanups()
    if finished is not None:
        finished.wait(CLEANUP_JOIN)


def _thread_report(t: threading.Thread) -> str:
    frame = sys._current_frames().get(t.ident or 0)
    py = "".join(traceback.format_stack(frame)[-4:]) if frame else ""
    report = f"case thread, Python stack:\n{py}case thread, kernel stack:\n{_kernel_stack(t)}"
    io = helper_of(t)  # a step's I/O on the target runs there (fdtable.py)
    if io is not None:
        report += f"\nits target I/O thread, kernel stack:\n{_kernel_stack(io)}"
    return report.rstrip()


def _kernel_stack(t: threading.Thread) -> str:
    if t.native_id is None:
        return ""
    try:
        return Path(f"/proc/self/task/{t.native_id}/stack").read_text()
    except OSError as e:
        return f"<{e.strerror}>"


def _exporter_stderr(workdir: Path) -> str:
    parts = []
    for p in sorted(workdir.glob("export*/export.stderr")):
        parts.append(f"--- {p.parent.name} ---\n{p.read_text(errors='replace')}")
    return "\n".join(parts)


def _leftovers(workdir: Path) -> list[str]:
    """FUSE mounts still on this instance's paths after the cleanups."""
    inside = str(workdir) + "/"
    return [
        f"FUSE mount on {e.mountpoint}"
        for e in mount_table()
        if e.is_fuse and e.mountpoint.startswith(inside)
    ]
