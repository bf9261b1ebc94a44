"""tools/qsd iotests: QEMU's own qemu-iotests in the built tree, beside ours.

The series' patch 4/4 adds a FUSE_OVER_IO_URING mode to qemu-iotests: in
`-fuse` mode every generic test runs on an image that _make_test_img
exports, over /dev/fuse or, with FUSE_OVER_IO_URING=1, over io_uring.  This
runs `check -fuse -raw` both ways, and 308 (the FUSE export test, which
makes its own exports: `check -raw -file 308`), with the built binaries.

qemu-iotests' check refuses to start without a system emulator, so the
smallest one from the same tree is built beside the tools (tricore, cached).
Then 308's sections are printed beside this project's parity cases for the
same behaviour, both run on the same daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ...kernel.mount import mount_table, umount_or_detach
from ...kernel.params import ENABLE_URING, ensure_uring, kernel_lock, read_param
from ..lifecycle import REPO
from .build import CONFIGURE, CONFIGURE_BOUND, NINJA_BOUND, Build, _ccache_env, _run, build, say

EMULATOR = "qemu-system-tricore"  # the smallest softmmu target; check picks its board
EMULATOR_CONFIGURE = (
    # Not --without-default-devices: check starts it with -machine
    # tricore_testboard, which that leaves out.
    *(f for f in CONFIGURE if not f.startswith(("--target-list=", "--without-default-devices"))),
    "--target-list=tricore-softmmu",
    "--enable-tcg",
    "--disable-fdt",  # else configure writes subprojects/dtc into the source tree
)
CHECK_BOUND = 3600.0
# check prints "NAME ... [start]" and, on the same line unless stdout is a
# terminal, "NAME status [start] [end]": the last verdict on a line counts.
VERDICT = re.compile(r"(?P<test>[\w-]+)\s+(?P<status>pass|fail|not run)\s+\[")

# 308's sections (its .out headers) and the cases here that check the same.
SECTIONS_308 = {
    "Mountpoint not present": ["export-mountpoint"],
    "Mountpoint is a directory": ["export-mountpoint"],
    "Mountpoint is a regular file": ["export-mountpoint"],
    "Mount over existing file": ["export-over-image"],
    "Double export": ["race-second-export"],
    "Remove export": ["export-del"],
    "Writable export": ["export-readonly", "export-permissions"],
    "Resizing exports": ["export-resize", "eof-dd", "eof-short-write", "eof-resize", "eof-image"],
    "Writing zeroes while unmapping": ["export-write-zeroes"],
    "Multi-threading": ["export-multiqueue", "layout-multiqueue", "race-cycles-mq"],
}


@dataclass
class IotestsRun:
    name: str  # the check arguments
    label: str  # the column: "/dev/fuse", "io_uring", "308"
    verdicts: dict[str, str] = field(default_factory=dict)
    exit: int = 0
    log: Path = Path()


def _emulator(b: Build) -> Path:
    """qemu-system-tricore from the same tree, built once beside the tools
    (a directory per set of flags)."""
    flags = hashlib.sha256("\n".join(EMULATOR_CONFIGURE).encode()).hexdigest()[:8]
    emu_dir = Path(b.root) / f"emu-{flags}"
    binary = emu_dir / EMULATOR
    if binary.exists():
        return binary
    emu_dir.mkdir(exist_ok=True)
    env = _ccache_env()
    say(f"building {EMULATOR} for qemu-iotests' check (once per build)")
    if not (emu_dir / "build.ninja").exists():
        _run([str(b.tree / "configure"), *EMULATOR_CONFIGURE], emu_dir, env, CONFIGURE_BOUND,
             "configure")  # fmt: skip
    _run(["ninja", f"-j{os.cpu_count() or 2}", EMULATOR], emu_dir, env, NINJA_BOUND, "ninja")
    return binary


def _tool(b: Build, name: str) -> Path:
    """A tool of the build, built now if the first build skipped it (qemu-nbd)."""
    path = b.build_dir / name
    if not path.exists():
        _run(["ninja", name], b.build_dir, _ccache_env(), NINJA_BOUND, f"ninja-{name}")
    return path


def _check(b: Build, env: dict[str, str], args: list[str], log: Path, label: str) -> IotestsRun:
    run = IotestsRun(" ".join(args), label, log=log)
    say(f"qemu-iotests check {run.name}")
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["./check", *args],
            cwd=b.build_dir / "tests" / "qemu-iotests",
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its daemons and emulators: one group to kill
        )
        try:
            run.exit = proc.wait(CHECK_BOUND)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            run.exit = -1
        except BaseException:  # Ctrl-C: nothing of it may stay either
            _kill_group(proc)
            raise
    _unmount_below(Path(env["TEST_DIR"]))
    for line in log.read_text(errors="replace").splitlines():
        found = list(VERDICT.finditer(line))
        if found:
            run.verdicts[found[-1].group("test")] = found[-1].group("status")
    return run


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _unmount_below(directory: Path) -> None:
    """FUSE exports a killed or failed test left in its TEST_DIR."""
    for e in mount_table():
        if e.is_fuse and e.mountpoint.startswith(f"{directory}/"):
            umount_or_detach(e.mountpoint)


def sections_differing(out_bad: Path, expected: Path) -> set[str]:
    """The 308 sections whose lines differ: each side read as section -> lines."""

    def split(text: str) -> dict[str, list[str]]:
        sections: dict[str, list[str]] = {}
        name = ""
        for line in text.splitlines():
            m = re.match(r"^=== (.*) ===$", line)
            if m:
                name = m.group(1)
            sections.setdefault(name, []).append(line)
        return sections

    want, got = split(expected.read_text()), split(out_bad.read_text())
    return {s for s in want if want.get(s) != got.get(s)}


def run_iotests(tests: list[str], source: str, patches: list[str]) -> int:
    b = build(source, patches)
    emulator = _emulator(b)
    bins = {
        "QEMU_PROG": emulator,
        "QEMU_IMG_PROG": _tool(b, "qemu-img"),
        "QEMU_IO_PROG": _tool(b, "qemu-io"),
        "QEMU_NBD_PROG": _tool(b, "qemu-nbd"),
        "QSD_PROG": b.daemon.resolve(),
    }
    logs = REPO / "results" / f"qemu-iotests-{b.key}"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fuse-iotests-qemu-iotests.") as tmp:
        base = {**os.environ, **{k: str(v) for k, v in bins.items()}}
        base.pop("FUSE_OVER_IO_URING", None)

        def env(uring: bool, name: str) -> dict[str, str]:
            d = Path(tmp) / name
            (d / "sock").mkdir(parents=True)
            e = {**base, "TEST_DIR": str(d), "SOCK_DIR": str(d / "sock")}
            return {**e, "FUSE_OVER_IO_URING": "1"} if uring else e

        # enable_uring is the kernel's: set before, then held shared, as
        # every io_uring instance of ours holds it (a serial case may turn
        # it off meanwhile).
        problem = ensure_uring()
        with kernel_lock(exclusive=False):
            if problem is None and read_param(ENABLE_URING) != "Y":
                problem = "enable_uring was changed by someone else"
            runs = [
                _check(b, env(False, "legacy"), ["-fuse", "-raw", *tests],
                       logs / "fuse-legacy.log", "/dev/fuse"),
                _check(b, env(True, "uring"), ["-fuse", "-raw", *tests],
                       logs / "fuse-uring.log", "io_uring")
                if problem is None else IotestsRun("-fuse -raw", f"io_uring ({problem})"),
                _check(b, env(False, "308"), ["-raw", "-file", "308"], logs / "308.log", "308"),
            ]  # fmt: skip
        bad308 = next(Path(tmp, "308").rglob("308.out.bad"), None) or next(
            (b.build_dir / "tests" / "qemu-iotests").rglob("308.out.bad"), None
        )
        differing = (
            sections_differing(bad308, b.tree / "tests" / "qemu-iotests" / "308.out")
            if bad308 and runs[2].verdicts.get("308") == "fail"
            else set()
        )
    ours = _our_verdicts(b, sorted({c for cs in SECTIONS_308.values() for c in cs}))
    _print(runs, differing, ours)
    (logs / "summary.json").write_text(json.dumps(
        {"build": b.label, "runs": [{"name": r.name, "exit": r.exit, "verdicts": r.verdicts}
                                    for r in runs],
         "308-sections-differing": sorted(differing), "ours": ours}, indent=2) + "\n")  # fmt: skip
    print(f"logs: {logs}")
    return 0 if all(r.exit == 0 for r in runs) else 1


def _our_verdicts(b: Build, cases: list[str]) -> dict[str, dict[str, str]]:
    """transport -> instance -> status: our parity cases on the same daemon."""
    out: dict[str, dict[str, str]] = {}
    for transport in ("legacy", "uring"):
        with tempfile.TemporaryDirectory(prefix="fuse-iotests-parity.") as tmp:
            env = {**os.environ, "FUSE_OVER_IO_URING": "1" if transport == "uring" else "0"}
            argv = [sys.executable, "-m", "harness.iotests.check", "-fuse", "--target", "qsd",
                    "--qsd", str(b.daemon), "--results", tmp, *cases]  # fmt: skip
            say(f"our parity cases over {transport}")
            subprocess.run(argv, cwd=REPO, env=env, capture_output=True, timeout=CHECK_BOUND)
            try:
                doc = json.loads(Path(tmp, "report.json").read_text())
            except (OSError, ValueError):
                continue
            out[transport] = {r["id"]: r["status"] for r in doc["results"]}
    return out


def _print(runs: list[IotestsRun], differing: set[str], ours: dict[str, dict[str, str]]) -> None:
    labels = [r.label for r in runs]
    ran = sorted({t for r in runs for t, v in r.verdicts.items() if v != "not run"})
    skipped = {t for r in runs for t, v in r.verdicts.items() if v == "not run"} - set(ran)
    print("qemu-iotests (QEMU's own): -fuse -raw over /dev/fuse and io_uring, and 308")
    w = max([8, *map(len, ran)])
    print(f"  {'test':{w}s} " + " ".join(f"{label:>10s}" for label in labels))
    for t in ran:
        print(f"  {t:{w}s} " + " ".join(f"{r.verdicts.get(t, '-'):>10s}" for r in runs))
    print(f"  ({len(skipped)} more not run in any: not suitable for the fuse protocol or raw)")
    print("\n308 section by section, beside this project's cases for the same behaviour:")
    for section, cases in SECTIONS_308.items():
        verdict = "differs" if section in differing else "same"
        mine = []
        for transport, results in ours.items():
            for case in cases:
                statuses = {s for i, s in results.items() if i.startswith(case + "[")}
                mine.append(f"{case}/{transport}: {'/'.join(sorted(statuses)) or '-'}")
        print(f"  {section:32s} 308: {verdict:8s} ours: {', '.join(mine)}")
