"""tools/stress: the suite under load, and runs interrupted at random moments.

    tools/stress [--runs N] [--interrupts N] [--seed S]
    tools/stress --repeat N [--target T] [--uring] [--keep DIR] INSTANCE...

1. N times `pytest -n 2` with two busy CPU loops beside it (default 20):
   every failure is a flake to fix at its cause.
2. N runs of `tools/check -fuse -j 2 -g race,eof` (alternately over
   io_uring) interrupted at a random moment by SIGINT, SIGTERM or SIGKILL
   in turn (default 30); after each, `check --cleanup`, then a check that no
   FUSE mount, exporter, client or instance directory of the harness is
   left.  Run it alone: that check looks at the whole machine.

--repeat: N runs of `tools/check -fuse INSTANCE...` with two busy CPU loops
beside it, then per instance the outcomes seen and how often: "pass", or a
failure's status, known entry and signature (harness.iotests.signature), so
a listed defect that hangs the same way every time is one outcome too.
Exits 1 when an instance had more than one.  --keep DIR keeps each run's
results directory as DIR/run-K, so a rare outcome can be read afterwards;
INSTANCE may be any of tools/check's selectors after `--` (`-- -g race -j 2`).

Not part of .ci/run (it takes about half an hour); docs/running.md has its
last result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..cli import run_tool
from ..kernel.mount import mount_table
from .lifecycle import REPO, child_env
from .signature import Signature

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
PYTEST_TIMEOUT = 900
CHECK_TIMEOUT = 120
REPEAT_TIMEOUT = 3600  # one check run of the instances asked for


def busy_loops(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(n)]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def pytest_runs(n: int) -> int:
    failed = 0
    loops = busy_loops(2)
    try:
        for i in range(1, n + 1):
            t0 = time.monotonic()
            res = subprocess.run(
                [str(REPO / ".venv/bin/pytest"), "-n", "2", "-q", "-p", "no:cacheprovider"],
                cwd=REPO, capture_output=True, text=True, timeout=PYTEST_TIMEOUT,
            )  # fmt: skip
            last = (res.stdout.strip().splitlines() or ["?"])[-1]
            failed += res.returncode != 0
            print(f"pytest run {i}/{n}: exit {res.returncode}, {last} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
            if res.returncode:
                for line in res.stdout.splitlines():
                    if line.startswith(("FAILED", "ERROR")):
                        print(f"    {line}", flush=True)
    finally:
        stop(loops)
    return failed


def leftovers() -> list[str]:
    """Anything of the harness's still on the machine (run this alone)."""
    scratch = tempfile.gettempdir() + "/fuse-iotests."
    found = [
        f"FUSE mount {e.mountpoint}"
        for e in mount_table()
        if e.is_fuse and e.mountpoint.startswith(scratch)
    ]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if scratch in cmd and ("harness." in cmd or "qemu-storage-daemon" in cmd):
            found.append(f"process {pid}: {cmd[:100]}")
    found += [
        f"directory {d}" for d in Path(tempfile.gettempdir()).glob("fuse-iotests.*")
        if d.name != "fuse-iotests.pytest" and d.is_dir()
    ]  # fmt: skip
    return found


def interrupt_runs(n: int, rng: random.Random) -> int:
    failed = 0
    for i in range(n):
        sig = SIGNALS[i % len(SIGNALS)]
        env = {**child_env(), "FUSE_OVER_IO_URING": "1" if i % 2 else "0"}
        argv = [str(REPO / "tools/check"), "-fuse", "-j", "2", "-g", "race,eof"]
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            # As from a terminal, whatever started us (a background job ignores SIGINT).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        delay = rng.uniform(0.5, 6.0)  # the random moment: chosen, not waited for
        time.sleep(delay)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=CHECK_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            err += "\n(did not exit within the bound after the signal)"
        cleanup = subprocess.run(
            [str(REPO / "tools/check"), "--cleanup"],
            cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=CHECK_TIMEOUT,
        )  # fmt: skip
        removed = [ln for ln in cleanup.stderr.splitlines() if ln.startswith("cleanup: removed")]
        left = leftovers()
        ok = not left and "could NOT" not in cleanup.stderr
        failed += not ok
        said = (err.strip().splitlines() or [""])[-1]
        outcome = "nothing left" if ok else "LEFT: " + "; ".join(left)
        print(f"interrupt {i + 1}/{n}: {signal.Signals(sig).name} at {delay:.1f} s, "
              f"exit {proc.returncode}, cleanup removed {len(removed)}, {outcome} | {said}",
              flush=True)  # fmt: skip
    return failed


def outcome(result: dict[str, Any]) -> str:
    """One instance's outcome in a run, comparable across runs."""
    status = str(result["status"])
    reason = str(result.get("reason") or "")
    if status == "pass":
        return "pass"
    if status not in ("fail", "xfail"):
        return f"{status}: {reason.splitlines()[0] if reason else ''}".rstrip(": ")
    sig = Signature.of(result)
    text = sig.text
    if sig.kind == "mismatch":
        text = "transcript " + hashlib.sha256(text.encode()).hexdigest()[:12]
    entry = reason.split(": ", 1)[0] if reason.startswith("known ") else ""
    return " ".join(filter(None, (status, f"({entry})" if entry else "", text)))


def repeat_runs(n: int, check_args: list[str], uring: bool, keep: Path | None = None) -> int:
    """n check runs beside two busy loops; the instances with more than one outcome."""
    seen: dict[str, Counter[str]] = {}
    env = {**child_env(), "FUSE_OVER_IO_URING": "1" if uring else "0"}
    loops = busy_loops(2)
    try:
        for i in range(1, n + 1):
            if i > 1:
                _print_outcomes(seen)  # so far: Ctrl-C loses nothing seen
            with tempfile.TemporaryDirectory(prefix="stress-repeat.") as tmp:
                d = str(keep / f"run-{i}") if keep is not None else tmp
                t0 = time.monotonic()
                res = subprocess.run(
                    [str(REPO / "tools/check"), "-fuse", "--results", d, *check_args],
                    cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                    text=True, timeout=REPEAT_TIMEOUT,
                )  # fmt: skip
                try:
                    report = json.loads((Path(d) / "report.json").read_text())
                except (OSError, ValueError):
                    tail = (res.stderr.strip().splitlines() or ["?"])[-1]
                    raise RuntimeError(
                        f"run {i}: no report (exit {res.returncode}): {tail}"
                    ) from None
            for r in report["results"]:
                seen.setdefault(r["id"], Counter())[outcome(r)] += 1
            print(f"repeat run {i}/{n}: exit {res.returncode} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
    finally:
        stop(loops)
    _print_outcomes(seen)
    return sum(len(c) > 1 for c in seen.values())


def _print_outcomes(seen: dict[str, Counter[str]]) -> None:
    for inst, counts in seen.items():
        kinds = "; ".join(f"{k} x{v}" for k, v in counts.most_common())
        print(f"{inst}: {len(counts)} outcome(s) in {sum(counts.values())} runs: {kinds}")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stress", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="pytest -n 2 runs under load")
    p.add_argument("--interrupts", type=int, default=30, help="interrupted check runs")
    p.add_argument("--seed", type=int, default=None, help="for the interrupt moments")
    p.add_argument("--repeat", type=int, metavar="N", help="run INSTANCEs N times instead")
    p.add_argument("--target", help="with --repeat: tools/check's --target")
    p.add_argument("--uring", action="store_true", help="with --repeat: over io_uring")
    p.add_argument("--keep", type=Path, metavar="DIR", help="with --repeat: keep runs in DIR")
    p.add_argument("instances", nargs="*", metavar="INSTANCE", help="with --repeat")
    ns = p.parse_args(argv)
    if ns.repeat is not None:
        if ns.repeat < 1 or not ns.instances:
            p.error("--repeat needs a positive N and at least one instance")
        if ns.keep is not None and ns.keep.exists() and any(ns.keep.iterdir()):
            p.error(f"--keep {ns.keep}: not an empty directory")
        target = ["--target", ns.target] if ns.target else []
        varied = repeat_runs(ns.repeat, [*target, *ns.instances], ns.uring, ns.keep)
        print(f"repeat: {varied} instance(s) with more than one outcome")
        return 1 if varied else 0
    if ns.instances or ns.target or ns.uring or ns.keep:
        p.error("INSTANCE, --target, --uring and --keep go with --repeat")
    seed = ns.seed if ns.seed is not None else random.randrange(1 << 32)
    print(f"stress: seed {seed}", flush=True)
    failed_runs = pytest_runs(ns.runs) if ns.runs else 0
    failed_irq = interrupt_runs(ns.interrupts, random.Random(seed)) if ns.interrupts else 0
    print(f"pytest under load: {ns.runs - failed_runs} passed, {failed_runs} failed")
    print(f"interrupts: {ns.interrupts - failed_irq} passed, {failed_irq} failed")
    return 1 if failed_runs or failed_irq else 0


if __name__ == "__main__":
    run_tool(main)
