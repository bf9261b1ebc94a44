"""tools/check: run case instances the way qemu-iotests' ./check does.

    tools/check [-fuse|-file] [-g GROUPS] [-x GROUPS] [-n] [-d] [-j N] [--regen]
                [--target NAME] [--qsd PATH] [--diff-targets A,B[,C...]]
                [--timeout-scale F] [--kernel K | --kernels K1,K2] [--accel A]
                [--cpus N] [--max-cpus M]
                [--repro INSTANCE] [--cleanup] [CASE...]

-fuse (the default) runs instances through an export on the classic
/dev/fuse transport, or on FUSE-over-io_uring with FUSE_OVER_IO_URING=1.
-file runs the generic I/O cases directly on the image, as a baseline.
--target picks the export implementation (also FUSE_IOTESTS_TARGET);
--diff-targets runs every instance on two or more targets and compares them.
--kernel runs the same in a VM booted with another kernel (harness/iotests/vm),
with --cpus N online of --max-cpus M possible CPUs.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from ..cli import OneLineParser, run_tool
from ..kernel.params import ensure_uring, read_enable_uring, restore_enable_uring, uring_in_kernel
from . import known, targets, timeouts
from .context import Instance
from .diff import diff_targets
from .fingerprint import collect, format_lines
from .lifecycle import REPO, TRACKER
from .report import write_json, write_junit
from .runner import (
    CASES_DIR,
    GOLDEN_DIR,
    KNOWN_DIR,
    Result,
    RunOptions,
    cleanup_live,
    regen_requested,
    run_instance,
)
from .runs import RUN, reap_stale
from .spec import CaseSpec, SpecError, load_all
from .vm import ACCELS
from .vm.run import VmCpus

DEFAULT_EXCLUDED_GROUPS = ("slow",)
INTERRUPT_JOIN = 30.0
SIGNAL_POLL = 0.5  # seconds between checks for a signal while instances run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="check", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-fuse", dest="mode", action="store_const", const="fuse")
    mode.add_argument("-file", dest="mode", action="store_const", const="file")
    p.add_argument("-g", dest="groups", default="", metavar="GROUPS", help="only these groups")
    p.add_argument(
        "-x", dest="exclude", default="", metavar="GROUPS", help="not these groups (default slow)"
    )
    p.add_argument("-n", dest="dry_run", action="store_true", help="list, do not run")
    p.add_argument("-d", dest="debug", action="store_true", help="show the exporters' stderr")
    p.add_argument("-j", dest="jobs", type=int, default=1, metavar="N", help="parallel jobs")
    p.add_argument(
        "--regen",
        action="store_true",
        default=regen_requested(),
        help="rewrite golden files instead of comparing (also FUSE_IOTESTS_REGEN=1)",
    )
    p.add_argument(
        "--target",
        default=os.environ.get("FUSE_IOTESTS_TARGET", targets.DEFAULT),
        metavar="NAME",
        help=f"what serves the exports: {', '.join(targets.names())} "
        "(default reference, or FUSE_IOTESTS_TARGET)",
    )
    p.add_argument("--qsd", metavar="PATH", help="the qemu-storage-daemon for target qsd")
    p.add_argument(
        "--diff-targets",
        metavar="A,B[,C...]",
        help="run each instance on targets A, B (C ...) and compare their transcripts",
    )
    p.add_argument(
        "--kernel",
        metavar="K",
        help="run in a VM booted with kernel K: a Debian series (6.1, 7.3), a package "
        "version, a kernel tree, or BZIMAGE:MODULES_DIR",
    )
    p.add_argument(
        "--kernels",
        metavar="K1,K2",
        help="one VM run per kernel, then a matrix; K@N/M: that kernel with N online CPUs "
        "of M possible (7.3@2/4)",
    )
    p.add_argument(
        "--cpus", type=int, metavar="N", help="with --kernel(s): N CPUs online in the VM (2)"
    )
    p.add_argument(
        "--max-cpus",
        type=int,
        metavar="M",
        help="with --kernel(s): M possible CPUs in the VM, the ones beyond --cpus offline "
        "(default: --cpus)",
    )
    p.add_argument(
        "--repro",
        metavar="INSTANCE",
        help="write a script that runs just INSTANCE (with --kernel: in that VM) and exits "
        "0/1/125 as git bisect run wants; prints its path",
    )
    p.add_argument(
        "--accel",
        choices=ACCELS,
        default="auto",
        help="VM acceleration (auto: try KVM with a bounded boot, else TCG)",
    )
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="only remove what dead runs left (processes, mounts, directories)",
    )
    p.add_argument(
        "--timeout-scale",
        default=os.environ.get(timeouts.SCALE_ENV),
        metavar="F",
        help="multiply every case timeout and wait bound by F, for slow machines and VMs "
        f"(also {timeouts.SCALE_ENV})",
    )
    p.add_argument("--results", metavar="DIR", help="results directory (default results/)")
    p.add_argument("--cases", metavar="DIR", default=str(CASES_DIR), help=argparse.SUPPRESS)
    p.add_argument("--golden", metavar="DIR", default=str(GOLDEN_DIR), help=argparse.SUPPRESS)
    p.add_argument("names", nargs="*", metavar="CASE", help="case or instance ids")
    ns = p.parse_args(argv)
    if ns.jobs < 1:
        p.error("-j must be at least 1")
    # Given on the command line or in the environment, not the default of 1:
    # a VM run measures its own otherwise.
    ns.scale_given = ns.timeout_scale is not None
    try:
        ns.timeout_scale = timeouts.parse_scale(ns.timeout_scale or "1")
    except timeouts.BadScale as e:
        p.error(f"--timeout-scale: {e}")
    ns.mode = ns.mode or "fuse"
    if ns.kernel and ns.kernels:
        p.error("--kernel and --kernels do not go together")
    if ns.repro and (ns.kernels or ns.names or ns.diff_targets):
        p.error("--repro takes one instance (and at most one --kernel)")
    if ns.kernels is not None and not all(ns.kernels.split(",")):
        p.error("--kernels takes kernels separated by commas: 6.1,7.3")
    ns.vm_cpus = None
    if ns.cpus is not None or ns.max_cpus is not None:
        if not (ns.kernel or ns.kernels):
            p.error("--cpus and --max-cpus shape a VM: they need --kernel or --kernels")
        online = ns.cpus if ns.cpus is not None else min(2, ns.max_cpus)
        try:
            ns.vm_cpus = VmCpus(online, ns.max_cpus if ns.max_cpus is not None else online)
        except ValueError as e:
            p.error(f"--cpus/--max-cpus: {e}")
    if ns.diff_targets is not None:
        names = ns.diff_targets.split(",")
        if len(names) < 2 or not all(names) or len(set(names)) != len(names):
            p.error("--diff-targets takes two or more different targets: A,B[,C...]")
        if ns.regen:
            p.error("--regen does not go with --diff-targets")
    return ns


def select(
    specs: list[CaseSpec],
    mode: str,
    transport: str | None,
    groups: set[str],
    excluded: set[str],
    names: list[str],
) -> tuple[list[tuple[CaseSpec, Instance]], list[str]]:
    """The instances to run, and names given on the command line that match none."""
    if not excluded and not groups and not names:
        excluded = set(DEFAULT_EXCLUDED_GROUPS)
    chosen, matched = [], set()
    for spec in specs:
        for inst in spec.instances():
            if inst.mode != mode or (mode == "fuse" and inst.transport != transport):
                continue
            if names:
                hit = [n for n in names if n in (spec.id, inst.id)]
                if not hit:
                    continue
                matched.update(hit)
            if groups and not groups & set(spec.groups):
                continue
            if excluded & set(spec.groups):
                continue
            chosen.append((spec, inst))
    unknown = [n for n in names if n not in matched]
    return chosen, unknown


def status_line(r: Result, width: int) -> str:
    t0 = time.strftime("%H:%M:%S", time.localtime(r.start))
    t1 = time.strftime("%H:%M:%S", time.localtime(r.end))
    return f"{r.instance.id:<{width}} {r.status:<8} [{t0}] [{t1}] {r.elapsed:6.1f}s"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a CI job timeout, a closed terminal): clean up as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def terminate(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def ignore_signals() -> None:
    """While cleaning up after one signal, a second must not cut it short."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    try:
        return _main(argv)
    except KeyboardInterrupt as e:
        ignore_signals()
        cleanup_live()
        for line in TRACKER.cleanup_all().failed:
            print(f"cleanup: {line}", file=sys.stderr)
        left = RUN.leftovers()
        if left:  # said only after looking: the next run reaps these
            print(f"\nInterrupted; NOT removed: {', '.join(left)}", file=sys.stderr)
        else:
            print("\nInterrupted; exporters and mounts of this run were removed.", file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)


def _main(argv: list[str] | None) -> int:
    ns = parse_args(argv)
    initial = read_enable_uring()
    try:
        return _check(ns, argv)
    finally:
        restore_enable_uring(initial)


def _check(ns: argparse.Namespace, argv: list[str] | None) -> int:
    timeouts.set_scale(ns.timeout_scale)
    reaped = reap_stale()  # what runs killed with SIGKILL left
    for line in reaped:
        print(line, file=sys.stderr)
    if ns.cleanup:
        if not reaped:
            print("cleanup: no dead run left anything", file=sys.stderr)
        return 0
    specs, errors = load_all(Path(ns.cases))
    try:
        known_diffs = known.load(Path(ns.golden) / KNOWN_DIR.name)
    except SpecError as e:
        errors.append(str(e))
    if errors:
        for e in errors:
            print(f"check: {e}", file=sys.stderr)
        return 1
    if ns.repro:
        return _repro(ns, specs)
    if ns.kernel or ns.kernels:
        from .vm.matrix import check_on_kernels

        given = argv if argv is not None else sys.argv[1:]
        scale = ns.timeout_scale if ns.scale_given else None
        kernels = [ns.kernel] if ns.kernel else ns.kernels.split(",")
        results = Path(ns.results) if ns.results else None
        return check_on_kernels(kernels, given, ns.accel, scale, results, ns.vm_cpus)
    names = ns.diff_targets.split(",") if ns.diff_targets else [ns.target]
    try:
        chosen_targets = [targets.resolve(n, ns.qsd) for n in names]
    except targets.TargetError as e:
        print(f"check: {e}", file=sys.stderr)
        return 1
    if ns.regen and chosen_targets[0].name != targets.DEFAULT:
        print("check: --regen writes golden files from the reference target only", file=sys.stderr)
        return 1
    transport = None
    if ns.mode == "fuse":
        transport = "uring" if os.environ.get("FUSE_OVER_IO_URING") == "1" else "legacy"
    chosen, unknown = select(
        specs,
        ns.mode,
        transport,
        {g for g in ns.groups.split(",") if g},
        {g for g in ns.exclude.split(",") if g},
        list(ns.names),
    )
    if unknown:
        print(f"check: no such case for this mode: {', '.join(unknown)}", file=sys.stderr)
        return 1
    if ns.dry_run:
        for t in chosen_targets:
            for _, inst in chosen:
                print(inst.on(t.tag).id)
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results_dir = Path(ns.results) if ns.results else REPO / "results" / f"{stamp}-{os.getpid()}"
    results_dir.mkdir(parents=True, exist_ok=True)
    # Instance directories live in /tmp: a UNIX socket path must stay short.
    scratch = Path(tempfile.mkdtemp(prefix="fuse-iotests."))
    RUN.add_dir(scratch)
    # The kernel offers OVER_IO_URING only while enable_uring is Y: probe it
    # as the io_uring instances will see it (put back at the end of the run).
    if uring_in_kernel():
        ensure_uring()
    fp = collect(chosen_targets)
    for line in format_lines(fp):
        print(line)
    print(f"MODE         -- {ns.mode}" + (f" ({transport})" if transport else ""))
    print(f"TIMEOUTS     -- case timeouts x{ns.timeout_scale:g} (--timeout-scale)")
    print(f"RESULTS      -- {results_dir}")
    print()
    runs: list[list[Result]] = []
    try:
        for t in chosen_targets:
            tagged = [(spec, inst.on(t.tag)) for spec, inst in chosen]
            where = results_dir / t.label if ns.diff_targets else results_dir
            opts = RunOptions(where, scratch, t, Path(ns.golden), ns.regen, known=known_diffs)
            width = max((len(i.id) for _, i in tagged), default=10) + 1
            results: list[Result] = []
            runs.append(results)
            _run_all(tagged, opts, ns.jobs, width, ns.debug, results)
    finally:
        order = {inst.id: n for n, (_, inst) in enumerate(chosen)}
        done = [sorted(rs, key=lambda r: order[r.instance.on("").id]) for rs in runs]
        flat = [r for rs in done for r in rs]
        write_json(results_dir / "report.json", fp, [ns.mode, *(argv or sys.argv[1:])], flat)
        write_junit(results_dir / "junit.xml", fp, flat)
        _remove_empty(scratch)
    status = _summary(flat, len(chosen) * len(chosen_targets))
    if ns.diff_targets:
        return diff_targets(done, chosen_targets, sys.stdout) or status
    return status


def _repro(ns: argparse.Namespace, specs: list[CaseSpec]) -> int:
    """Write the bisect script for one instance; its path is the last line."""
    from .qsd import build as qsd_build
    from .repro import write_script

    try:
        target = targets.resolve(ns.target, ns.qsd)
    except targets.TargetError as e:
        print(f"check: {e}", file=sys.stderr)
        return 1
    found = [
        inst.on(target.tag)
        for spec in specs
        for inst in spec.instances()
        if inst.on(target.tag).id == ns.repro
    ]
    if not found:
        print(
            f"check: --repro: no instance {ns.repro!r} (tools/check -n lists them)", file=sys.stderr
        )
        return 1
    # A daemon tools/qsd built: the script builds it again from the same inputs.
    made = qsd_build.info(target.binary) if target.binary else None
    build_from = (made.source_spec, made.patch_paths, None) if made and made.source_spec else None
    kernel = ns.kernel
    if kernel and ns.vm_cpus is not None and "@" not in kernel:
        kernel = f"{kernel}@{ns.vm_cpus.spelling}"  # the script boots the same topology
    print(write_script(found[0], ns.target, ns.qsd, kernel, ns.accel, build_from=build_from))
    return 0


def _run_all(
    chosen: list[tuple[CaseSpec, Instance]],
    opts: RunOptions,
    jobs: int,
    width: int,
    debug: bool,
    results: list[Result],
) -> None:
    todo: queue.Queue[tuple[CaseSpec, Instance]] = queue.Queue()
    for item in chosen:
        todo.put(item)
    lock = threading.Lock()
    stop = threading.Event()

    def worker(finished: threading.Event) -> None:
        try:
            run_queue()
        finally:
            finished.set()

    def run_queue() -> None:
        while not stop.is_set():
            try:
                spec, inst = todo.get_nowait()
            except queue.Empty:
                return
            try:
                r = run_instance(spec, inst, opts)
            except Exception as e:  # never let an instance vanish from the summary
                tb = "".join(traceback.format_exception(e)[-3:]).rstrip()
                r = Result(inst, "fail", f"harness error: {type(e).__name__}: {e}\n{tb}")
                r.start = r.end = time.time()
            with lock:
                results.append(r)
                if not stop.is_set():
                    try:
                        _print_result(r, width, debug)
                    except BrokenPipeError:
                        # Nobody reads any more (| head): start no other
                        # instance; the summary's print ends the run quietly
                        # (cli.run_tool).
                        stop.set()

    # Events, not Thread.join(): a join interrupted by Ctrl-C can make the
    # next join return at once while the thread still runs.
    finished = [threading.Event() for _ in range(jobs)]
    for ev in finished:
        threading.Thread(target=worker, args=(ev,), daemon=True).start()
    try:
        for ev in finished:
            # Polled: a Ctrl-C the kernel hands to a thread asleep in FUSE
            # reaches this thread only when it wakes (and then at once).
            while not ev.wait(SIGNAL_POLL):
                pass
    except KeyboardInterrupt:
        ignore_signals()
        stop.set()
        cleanup_live()
        deadline = time.monotonic() + INTERRUPT_JOIN
        for ev in finished:  # each finishes its instance's cleanup, bounded
            ev.wait(max(0.0, deadline - time.monotonic()))
        raise


def _print_result(r: Result, width: int, debug: bool) -> None:
    print(status_line(r, width), flush=True)
    if r.status != "pass" and r.reason:
        for line in r.reason.splitlines():
            print(f"    {line}")
    if r.diff:
        sys.stdout.write(r.diff if r.diff.endswith("\n") else r.diff + "\n")
    if debug and r.exporter_stderr:
        for line in r.exporter_stderr.splitlines():
            print(f"    | {line}")
    sys.stdout.flush()


def _summary(results: list[Result], expected: int) -> int:
    def ids(status: str) -> list[str]:
        return [r.instance.id for r in results if r.status == status]

    not_run, failed, xpass = ids("not run"), ids("fail"), ids("xpass")
    xfail = [r.instance.id for r in results if r.status == "xfail" and r.known != "defect"]
    defects = [r.instance.id for r in results if r.status == "xfail" and r.known == "defect"]
    n_run = len(results) - len(not_run)
    print()
    if len(results) != expected:
        print(f"Lost {expected - len(results)} instance(s): a harness bug")
        return 1
    if not_run:
        print(f"Not run: {' '.join(not_run)}")
    if xfail:
        print(f"Known differences (xfail): {' '.join(xfail)}")
    if defects:
        print(f"Known defects (xfail): {' '.join(defects)}")
    if xpass:
        print(f"Listed as known differences or defects but passed (xpass): {' '.join(xpass)}")
    if failed or xpass:
        if failed:
            print(f"Failures: {' '.join(failed)}")
        print(f"Failed {len(failed) + len(xpass)} of {n_run} iotests")
        return 1
    if xfail or defects:
        known = [f"{len(xfail)} known differences"] if xfail else []
        known += [f"{len(defects)} known defects"] if defects else []
        print(f"Passed {n_run - len(xfail) - len(defects)} of {n_run} iotests, {', '.join(known)}")
    else:
        print(f"Passed all {n_run} iotests")
    return 0


def _remove_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


if __name__ == "__main__":
    run_tool(main)
