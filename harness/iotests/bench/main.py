"""tools/bench: the seed's fio matrix, repeated and interleaved across exporters.

    tools/bench [--repeat N] [--runtime S] [--cells A,B] [--queues N]
                [--startup N] [--no-qsd] [--json FILE] [--plot FILE.png|svg]

Every exporter (our classic and io_uring transports, libfuse's two, QSD 7.2, QSD 11.1 with
one and with N iothreads) is mounted for the whole run.  Each repetition runs
every cell on every exporter, the exporters' order rotating between
repetitions, so machine noise hits all alike; io_uring/classic is taken per
repetition (a paired ratio) and summarised by its median.  Progress goes to
stderr; figures to stdout, whose last line stays
"io_uring/classic IOPS: r1 r2 r3 r4".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...cli import run_tool
from ...kernel.params import ensure_uring, kernel_lock, read_enable_uring, restore_enable_uring
from .. import fingerprint, transport
from ..check import Terminated, ignore_signals, terminate
from ..lifecycle import TRACKER, ExporterProcess, ExportFailed
from ..runs import RUN, reap_stale
from ..waiting import WaitTimeout
from . import fio, plot, profile, startup
from .fio import BenchError, Cell, Sample
from .peers import Peer, PeerSet, collect
from .stats import Spread, paired_ratios, rotate

SETTLE = 0.5  # estimated seconds per fio run beyond runtime + ramp, for the ETA


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="repetitions per cell (default 5)")
    p.add_argument("--runtime", type=float, default=5, help="seconds per fio run (default 5)")
    p.add_argument("--cells", help=f"comma-separated (default {','.join(fio.CELL_NAMES)})")
    p.add_argument("--queues", type=int, default=2, help="our queue threads (default 2)")
    p.add_argument(
        "--qsd-iothreads",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="iothreads of the multi-queue QSD 11.1 row (default: CPUs)",
    )
    p.add_argument(
        "--startup",
        type=int,
        default=20,
        metavar="N",
        help="start/stop latency samples per exporter (default 20; 0: none)",
    )
    p.add_argument("--no-qsd", action="store_true", help="only our two transports")
    p.add_argument(
        "--peers",
        metavar="A,B",
        help="only these rows (labels as the tables print them, e.g. classic,io_uring,"
        "qsd-series,qsd-series-uring)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more run per cell and exporter under perf stat: syscalls, switches per I/O",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="every sample and the fingerprint")
    p.add_argument("--plot", type=Path, metavar="FILE", help="a PNG or SVG figure")
    ns = p.parse_args(argv)
    if ns.repeat < 1 or ns.runtime <= 0 or ns.queues < 1 or ns.startup < 0:
        p.error("--repeat, --runtime and --queues must be positive, --startup >= 0")
    if ns.plot and ns.plot.suffix.lower() not in (".png", ".svg"):
        p.error(f"--plot {ns.plot}: the file must end in .png or .svg")
    for f in (ns.json, ns.plot):
        if f is not None and not f.resolve().parent.is_dir():
            p.error(f"{f}: no directory {f.resolve().parent}")
    return ns


def main(argv: list[str] | None = None) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    initial = read_enable_uring()
    try:
        return _main(parse_args(argv))
    except (BenchError, ExportFailed, WaitTimeout) as e:
        # Could not measure: the reason (a timeout's report is several lines).
        _cleanup()
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        ignore_signals()
        _cleanup()
        left = RUN.leftovers()
        if left:
            print(f"\nInterrupted; NOT removed: {', '.join(left)}", file=sys.stderr)
        else:
            print("\nInterrupted; exporters and mounts of this run were removed.", file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        restore_enable_uring(initial)


def _cleanup() -> None:
    for line in TRACKER.cleanup_all().failed:
        print(f"cleanup: {line}", file=sys.stderr)


@dataclass
class Progress:
    """stderr lines: which cell, which exporter, repetition k/N, time left."""

    total_runs: int
    runtime: float
    startup_runs: int
    done: int = 0
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = time.monotonic()

    def left(self) -> float:
        if self.done:
            per_run = (time.monotonic() - self.started) / self.done
        else:
            per_run = self.runtime + fio.RAMP + SETTLE
        return per_run * (self.total_runs - self.done) + 0.6 * self.startup_runs

    def say(self, text: str) -> None:
        m, s = divmod(int(self.left()), 60)
        print(f"bench: {text} (about {m}m{s:02d}s left)", file=sys.stderr, flush=True)


def _thread_counters(pids: list[int]) -> tuple[int, int, int, int]:
    """utime, stime (clock ticks), voluntary and involuntary switches of
    every thread of pids, summed."""
    ut = st = vcs = ivcs = 0
    tasks = []
    for pid in pids:
        with contextlib.suppress(OSError):
            tasks += [(pid, tid) for tid in os.listdir(f"/proc/{pid}/task")]
    for pid, tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = f.read()
        except OSError:
            continue  # a thread that just ended
        ut, st = ut + int(fields[11]), st + int(fields[12])
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                vcs += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                ivcs += int(line.split()[1])
    return ut, st, vcs, ivcs


def measure(cell: Cell, peer: Peer, exp: ExporterProcess, runtime: float) -> dict[str, Any]:
    """One fio run; the exporter's CPU time and switches per I/O beside it."""
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    pids = exp.pids()  # with its queue processes
    before = _thread_counters(pids)
    sample: Sample = fio.run_cell(cell, exp.mountpoint, runtime)
    after = _thread_counters(pids)
    ut, st, vcs, ivcs = (a - b for a, b in zip(after, before, strict=True))
    ios = sample.ios_spanned(runtime)
    return {
        **asdict(sample),
        "cpu_user_us": ut * tick_us / ios,
        "cpu_sys_us": st * tick_us / ios,
        "cpu_us": (ut + st) * tick_us / ios,
        "vcsw": vcs / ios,
        "ivcsw": ivcs / ios,
    }


@contextlib.contextmanager
def _exports(peers: list[Peer], root: Path) -> Iterator[dict[str, ExporterProcess]]:
    """Every peer's export, mounted for the whole measurement."""
    live: dict[str, ExporterProcess] = {}
    try:
        for p in peers:
            workdir = root / p.label
            workdir.mkdir()
            mp = workdir / "null.fuse"
            mp.touch()
            live[p.label] = exp = p.target.exporter(workdir, mp, None, p.settings).start()
            if p.transport == "io-uring":  # an io_uring row must not time /dev/fuse
                try:
                    transport.check(exp.pids(), mp)
                except transport.TransportError as e:
                    raise BenchError(f"{p.label}: {e}") from None
        yield live
        for exp in live.values():
            exp.stop()
    finally:
        _cleanup()


def _main(ns: argparse.Namespace) -> int:
    for line in reap_stale():
        print(line, file=sys.stderr)
    if shutil.which("fio") is None:
        raise BenchError("fio is not installed (tools/setup installs it)")
    cells = fio.load_cells(ns.cells.split(",") if ns.cells else None)
    if ns.profile and (why := profile.problem()):
        raise BenchError(f"--profile: {why}")
    uring_problem = ensure_uring()
    with kernel_lock(exclusive=False):
        peers = collect(ns.queues, uring_problem, not ns.no_qsd, ns.qsd_iothreads)
        if ns.peers:
            wanted = ns.peers.split(",")
            unknown = sorted(set(wanted) - set(peers.labels()))
            if unknown:
                raise BenchError(f"--peers: no row {', '.join(unknown)} "
                                 f"(rows: {', '.join(peers.labels())})")  # fmt: skip
            peers.peers = [p for p in peers.peers if p.label in wanted]
        for note in peers.skipped:
            print(f"bench: not run: {note}", file=sys.stderr)
        fp = fingerprint.collect(list({p.target.label: p.target for p in peers.peers}.values()))
        root = Path(tempfile.mkdtemp(prefix="fuse-iotests-bench-"))
        RUN.add_dir(root)
        try:
            report = _run(ns, cells, peers, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    report["fingerprint"] = fp
    _print(report)
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"bench: wrote {ns.json}", file=sys.stderr)
    if ns.plot:
        plot.draw(report, ns.plot)
        print(f"bench: wrote {ns.plot}", file=sys.stderr)
    print(last_line(report))
    return 0


def _run(ns: argparse.Namespace, cells: list[Cell], peers: PeerSet, root: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    runs = (ns.repeat + ns.profile) * len(cells) * len(peers.peers)
    # Start-up rows: ours from a warm spare (as the suite starts it) and cold.
    starts = [p for p in peers.peers if not p.variant]
    rows = [(p.label, p, False) for p in starts]
    rows += [(f"{p.label} cold", p, True) for p in starts if p.target.starts_warm]
    progress = Progress(runs, ns.runtime, ns.startup * len(rows))
    samples: list[dict[str, Any]] = []
    with _exports(peers.peers, root) as live:
        for rep in range(ns.repeat):
            for ci, cell in enumerate(cells):
                for order, peer in enumerate(rotate(peers.peers, rep + ci)):
                    progress.say(f"{cell.label} {peer.label} repetition {rep + 1}/{ns.repeat}")
                    m = measure(cell, peer, live[peer.label], ns.runtime)
                    samples.append(
                        {"rep": rep, "cell": cell.name, "peer": peer.label, "order": order, **m}
                    )
                    progress.done += 1
        profiles: dict[str, dict[str, dict[str, float]]] = {}
        for cell in cells if ns.profile else []:
            for peer in peers.peers:
                progress.say(f"{cell.label} {peer.label} under perf stat")
                prof = profile.measure(cell, live[peer.label], ns.runtime)
                profiles.setdefault(cell.name, {})[peer.label] = prof.per_io
    latencies: dict[str, list[startup.Latency]] = {label: [] for label, _, _ in rows}
    failures: dict[str, list[str]] = {}
    for i in range(ns.startup):
        progress.say(f"start-up latency {i + 1}/{ns.startup}")
        for label, peer, cold in rotate(rows, i):
            try:
                latencies[label].append(startup.measure(peer, root, cold))
            except (WaitTimeout, ExportFailed, RuntimeError) as e:
                # A finding, not the end of the run: keep it and go on.
                first = str(e).splitlines()[0]
                failures.setdefault(label, []).append(first)
                progress.say(f"start-up of {label} failed: {first}")
    report = build_report(ns, cells, peers, samples, latencies, time.monotonic() - t0)
    report["startup_failures"] = failures
    report["profile"] = profiles
    return report


def build_report(
    ns: argparse.Namespace,
    cells: list[Cell],
    peers: PeerSet,
    samples: list[dict[str, Any]],
    latencies: dict[str, list[startup.Latency]],
    duration: float,
) -> dict[str, Any]:
    labels = peers.labels()

    def series(cell: str, peer: str, key: str) -> list[float]:
        rows = sorted(
            (s for s in samples if s["cell"] == cell and s["peer"] == peer), key=lambda s: s["rep"]
        )
        return [s[key] for s in rows]

    summary = {
        c.name: {
            p: {
                k: Spread.of(series(c.name, p, k)).as_dict()
                for k in ("iops", "lat_us", "p99_us", "cpu_us", "vcsw")
            }
            for p in labels
        }
        for c in cells
    }

    def ratios(mine: str, other: str) -> dict[str, Any]:
        out = {}
        for c in cells:
            r = paired_ratios(series(c.name, mine, "iops"), series(c.name, other, "iops"))
            out[c.name] = {**Spread.of(r).as_dict(), "values": r}
        return out

    # io_uring against every other row; every other io_uring row (ours in
    # threads, QEMU's) against the rows that are not io_uring and ours.
    uring = {p.label for p in peers.peers if p.transport == "io-uring"}
    ratios_of = {
        mine: {
            other: ratios(mine, other)
            for other in labels
            if other != mine and (mine == "io_uring" or other not in uring or other == "io_uring")
        }
        for mine in labels
        if mine in uring
    }
    versus = ratios_of.get("io_uring", {})
    report: dict[str, Any] = {
        "version": 1,
        "repeat": ns.repeat,
        "runtime": ns.runtime,
        "queues": ns.queues,
        "duration_s": round(duration, 1),
        "cells": [
            {**asdict(c), "jobfile": str(c.jobfile.relative_to(fio.REPO)), "label": c.label}
            for c in cells
        ],
        "peers": [p.describe() for p in peers.peers],
        "skipped": peers.skipped,
        "samples": samples,
        "summary": summary,
        "ratios": versus.get("classic", {}),
        "ratios_vs": versus,
        "ratios_of": ratios_of,
        "startup": {
            p: {
                "start_ms": Spread.of([x.start_ms for x in v]).as_dict(),
                "stop_ms": Spread.of([x.stop_ms for x in v]).as_dict(),
                "samples": [asdict(x) for x in v],
            }
            for p, v in latencies.items()
            if v
        },
    }
    return report


def _fmt(s: dict[str, Any], digits: int = 0) -> str:
    return f"{s['median']:.{digits}f} [{s['low']:.{digits}f}-{s['high']:.{digits}f}]"


def _table(report: dict[str, Any], key: str, title: str, digits: int = 0) -> None:
    cells = report["cells"]
    labels = [p["label"] for p in report["peers"]]
    width = max(
        len(_fmt(report["summary"][c["name"]][p][key], digits)) for c in cells for p in labels
    )
    width = max(width, *(len(c["label"]) for c in cells))
    name_w = max(len(x) for x in labels)
    print(f"\n{title}")
    print(f"{'':<{name_w}}" + "".join(f" | {c['label']:>{width}}" for c in cells))
    for p in labels:
        row = "".join(
            f" | {_fmt(report['summary'][c['name']][p][key], digits):>{width}}" for c in cells
        )
        print(f"{p:<{name_w}}{row}")


def _print(report: dict[str, Any]) -> None:
    for line in fingerprint.format_lines(report["fingerprint"]):
        print(line)
    peers = report["peers"]
    w = max([14] + [len(p["label"]) for p in peers])  # the row label column
    print(
        f"\nfio randrw 70/30 bs=4k libaio direct=1 on a null-co 1G export; {report['repeat']} "
        f"repetitions, exporters interleaved (rotating order), {report['runtime']:g}s per run "
        f"after 1s ramp; run took {report['duration_s']:.0f}s"
    )
    for p in peers:
        print(f"  {p['label']:<{w}} {p['target']} {p['transport']}, {p['queues']} queue(s)")
    for note in report["skipped"]:
        print(f"  not run: {note}")
    n = report["repeat"]
    _table(report, "iops", f"IOPS, median [min-max] of {n}")
    _table(report, "lat_us", f"mean completion latency (us), median [min-max] of {n}", 1)
    p99 = f"99th percentile latency, submit to completion (us), median [min-max] of {n}"
    _table(report, "p99_us", p99)
    cpu = "exporter CPU time per I/O (us, user+sys, all threads and processes)"
    _table(report, "cpu_us", cpu, 1)
    _table(report, "vcsw", "exporter voluntary context switches per I/O", 2)
    for mine, versus in report["ratios_of"].items():
        for other, per_cell in versus.items():
            print(f"\n{mine}/{other} IOPS, paired per repetition: median [min-max] (each)")
            for cell, r in per_cell.items():
                each = " ".join(f"{v:.2f}" for v in r["values"])
                print(f"  {cell:<11} {_fmt(r, 2)}   ({each})")
    if report.get("profile"):
        events = list(profile.EVENTS)
        print("\nper I/O under perf stat (one run each; futex: mostly GIL hand-offs in ours)")
        for cell, per_peer in report["profile"].items():
            print(f"  {cell:<{w}}" + "".join(f"{e:>15}" for e in events))
            for p, per_io in per_peer.items():
                print(f"  {p:<{w}}" + "".join(f"{per_io.get(e, 0.0):>15.2f}" for e in events))
    for p, lines in report.get("startup_failures", {}).items():
        print(f"\nstart-up/teardown of {p} FAILED {len(lines)} time(s); first: {lines[0]}")
    if report["startup"]:
        print("\nexport latency (ms), median [min-max]: start -> first read; stop -> mount gone")
        for p, v in report["startup"].items():
            n_s = v["start_ms"]["n"]
            print(
                f"  {p:<{w}} start {_fmt(v['start_ms'], 1):>22}   "
                f"stop {_fmt(v['stop_ms'], 1):>22}   (n={n_s})"
            )


def last_line(report: dict[str, Any]) -> str:
    ratios = report["ratios"]
    if not ratios:
        return "io_uring/classic IOPS: not run"
    return "io_uring/classic IOPS: " + "  ".join(f"{r['median']:.2f}" for r in ratios.values())


if __name__ == "__main__":
    run_tool(main)
