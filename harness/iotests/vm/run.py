"""tools/check --kernel: the same run, inside a VM booted with another kernel.

virtme-ng boots the kernel with the host's root file system shared
read-only over 9p and this repository writable, so the guest runs the
project's own venv and writes its results straight into results/ here.
Its lines stream out live; the host adds the boot time and the total time
(vm.json beside the guest's report.json).  The VM is an adopted child of
this run (its cgroup, its own process group): Ctrl-C or SIGTERM of
tools/check stop it, and after a SIGKILL the next run (or --cleanup) kills
what is left through the run's cgroup.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from .. import runs
from ..lifecycle import REPO, child_env
from ..timeouts import scaled
from .boot import MARKER, import_time
from .kernels import CACHE, Kernel

VNG = REPO / ".venv" / "bin" / "vng"
KVM_PROBE = 60.0  # a boot that works takes ~10 s; a paravirtual KVM hangs (scaled)
BOOT_BOUND = 600.0  # from starting QEMU to the guest's first line (~20 s under TCG)
IDLE_BOUND = 1800.0  # between two lines of the guest's run (an instance under TCG)
EXIT_BOUND = 60.0  # from the end of the guest's output to QEMU's exit
MAX_CPUS = 64  # what a TCG guest on a small host still boots in its bound
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class VmCpus:
    """The guest's CPUs: `online` of them up at boot, `possible` in all.

    QEMU's -smp N,maxcpus=M gives a virtme-ng guest M possible CPUs only
    as hotplug slots its kernel does not count, so M CPUs are booted with
    the kernel option maxcpus=N instead: all M possible and present, N
    online, the rest brought up by writing cpuN/online."""

    online: int = 2
    possible: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.online <= self.possible <= MAX_CPUS:
            raise ValueError(
                f"CPUs: {self.online} online of {self.possible} possible "
                f"(needs 1 <= online <= possible <= {MAX_CPUS})"
            )

    @classmethod
    def parse(cls, text: str) -> VmCpus:
        """'2/4' (2 online of 4 possible) or '4' (4 of 4)."""
        online, _, possible = text.partition("/")
        if not online.isdigit() or not (possible or online).isdigit():
            raise ValueError(f"CPUs {text!r}: not N or N/M (2/4: 2 online of 4 possible)")
        return cls(int(online), int(possible or online))

    @property
    def spelling(self) -> str:
        """As --kernels takes it: '2/4', '2'."""
        return (
            str(self.online) if self.online == self.possible else f"{self.online}/{self.possible}"
        )

    @property
    def label(self) -> str:
        """For directory names: '2of4'."""
        return (
            str(self.online) if self.online == self.possible else f"{self.online}of{self.possible}"
        )

    def describe(self) -> str:
        return f"{self.online} online of {self.possible} possible CPUs"

    def vng_args(self) -> list[str]:
        extra = ["--append", f"maxcpus={self.online}"] if self.online < self.possible else []
        return ["--cpus", str(self.possible), *extra]


@dataclass
class VmRun:
    """What one VM run did, as vm.json keeps it."""

    kernel: str
    image: str
    release: str
    accel: str
    command: list[str]
    cpus: str = ""  # VmCpus.describe()
    booted: bool = False
    boot_s: float | None = None  # start -> the guest's first line
    total_s: float = 0.0
    exit_code: int | None = None
    guest_release: str = ""
    notes: list[str] = field(default_factory=list)


def vng_argv(
    kernel: Kernel, accel: str, command: str, rwdirs: list[Path], cpus: VmCpus | None = None
) -> list[str]:
    argv = [str(VNG), "--force-9p", "-r", str(kernel.boot), *(cpus or VmCpus()).vng_args()]
    argv += ["--memory", "2G"]
    for d in rwdirs:
        argv += ["--rwdir", str(d)]
    if accel == "tcg":
        argv.append("--disable-kvm")
    return [*argv, "--append", f"PATH={GUEST_PATH}", "--exec", command]


def _vng_env(tmp: Path) -> dict[str, str]:
    """vng runs virtme-run from PATH (the venv's bin first) and keeps its
    temporary files in tmp, a directory of this run: a VM killed with us
    leaves nothing in /tmp, and a SIGKILLed run's is reaped by the next."""
    path = f"{VNG.parent}:{os.environ.get('PATH', GUEST_PATH)}"
    return {**child_env(), "PATH": path, "TMPDIR": str(tmp)}


@contextlib.contextmanager
def _private_tmp() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="fuse-iotests-vm."))
    runs.RUN.add_dir(tmp)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def choose_accel(kernel: Kernel, accel: str, say: TextIO) -> str:
    """kvm or tcg.  auto tries KVM with a short, bounded boot and falls back
    to TCG (a paravirtual /dev/kvm hangs stock kernels); the answer is kept
    per host kernel and guest kernel, and said either way."""
    if accel != "auto":
        return accel
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("VM: accel tcg (no usable /dev/kvm)", file=say, flush=True)
        return "tcg"
    memo = CACHE / "accel.json"
    key = f"{os.uname().release} {kernel.boot}"
    known = json.loads(memo.read_text()) if memo.exists() else {}
    if key not in known:
        print(
            f"VM: probing KVM (a boot bounded at {scaled(KVM_PROBE):.0f} s) ...",
            file=say,
            flush=True,
        )
        argv = vng_argv(kernel, "kvm", "true", [])
        with _private_tmp() as tmp:
            proc = runs.spawn(argv, env=_vng_env(tmp), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
            try:
                code: int | None = proc.wait(scaled(KVM_PROBE))
            except subprocess.TimeoutExpired:
                code = None  # hung: what a paravirtual KVM does to stock kernels
            finally:
                _kill_group(proc)
        if code not in (0, None):  # vng failed for another reason: ask again next time
            print(f"VM: accel tcg (the KVM probe failed with status {code})", file=say, flush=True)
            return "tcg"
        # Kept: a clean boot, or a hang (delete .cache/vm/accel.json to probe again).
        known[key] = "kvm" if code == 0 else "tcg"
        memo.write_text(json.dumps(known, indent=1))
    chosen = str(known[key])
    why = "KVM boots it" if chosen == "kvm" else "KVM did not boot it in time"
    print(f"VM: accel {chosen} ({why})", file=say, flush=True)
    return chosen


def _kill_group(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """The VM (vng and its QEMU) is one process group of ours: end it all."""
    runs.kill_group(proc.pid)
    proc.wait(runs.REAP_TIMEOUT)


def run_check(
    kernel: Kernel,
    check_args: list[str],
    results: Path,
    accel: str,
    timeout_scale: float | None,
    env: dict[str, str],
    out: TextIO = sys.stdout,
    cpus: VmCpus | None = None,
) -> VmRun:
    """Boot kernel, run tools/check check_args in it (results in results/),
    stream its lines to out; the record is written to results/vm.json."""
    results.mkdir(parents=True, exist_ok=True)
    chosen = choose_accel(kernel, accel, out)
    host_import = import_time()
    env = {**env, "TMPDIR": "/tmp"}  # the guest's own (an overlay), not the host's
    guest = [
        "env", *(f"{k}={v}" for k, v in sorted(env.items())),
        str(REPO / ".venv/bin/python"), "-m", "harness.iotests.vm.guest",
        "--host-import", f"{host_import:.3f}",
        *(["--timeout-scale", str(timeout_scale)] if timeout_scale else []),
        "--", *check_args, "--results", str(results),
    ]  # fmt: skip
    command = f"cd {_quote(str(REPO))} && exec " + " ".join(map(_quote, guest))
    rwdirs = [REPO] if results.resolve().is_relative_to(REPO) else [REPO, results.resolve()]
    cpus = cpus or VmCpus()
    argv = vng_argv(kernel, chosen, command, rwdirs, cpus)
    record = VmRun(kernel.name, str(kernel.boot), kernel.release, chosen, argv, cpus.describe())
    print(
        f"VM: booting {kernel.name} ({kernel.boot.name}, {chosen}, {cpus.describe()}) ...",
        file=out,
        flush=True,
    )
    t0 = time.monotonic()
    with _private_tmp() as tmp:
        _boot(argv, tmp, record, t0, results, out)
    boot = f"boot {record.boot_s:.1f} s, " if record.boot_s is not None else "no boot, "
    print(f"VM: {kernel.name}: {boot}total {record.total_s:.1f} s, exit {record.exit_code}",
          file=out, flush=True)  # fmt: skip
    return record


def _boot(argv: list[str], tmp: Path, record: VmRun, t0: float, results: Path, out: TextIO) -> None:
    """Run the VM to its end, streaming its lines; record what happened."""
    proc = runs.spawn(argv, env=_vng_env(tmp), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True, bufsize=1,
                      start_new_session=True)  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # EOF

    threading.Thread(target=reader, daemon=True, name="vm output").start()
    try:
        while True:
            # A guest that hangs (a kernel that never boots, a panic without
            # reboot) is killed after a bound, not waited for forever.
            bound = scaled(BOOT_BOUND if not record.booted else IDLE_BOUND)
            try:
                line = lines.get(timeout=bound)
            except queue.Empty:
                what = "did not boot" if not record.booted else "said nothing"
                record.notes.append(f"the guest {what} within {bound:.0f} s: killed")
                print(
                    f"VM: the guest {what} within {bound:.0f} s: killing it", file=out, flush=True
                )
                break
            if line is None:  # the guest's output ended: QEMU exits with its status
                try:
                    proc.wait(scaled(EXIT_BOUND))
                except subprocess.TimeoutExpired:
                    record.notes.append("QEMU did not exit after the guest's output ended: killed")
                break
            if line.startswith(MARKER) and not record.booted:
                record.booted, record.boot_s = True, time.monotonic() - t0
                record.guest_release = line.split()[2] if len(line.split()) > 2 else ""
                print(
                    f"VM: up after {record.boot_s:.1f} s ({record.guest_release})",
                    file=out,
                    flush=True,
                )
                continue
            out.write(line)
            out.flush()
        _kill_group(proc)
        record.exit_code = None if record.notes else proc.returncode
    finally:
        _kill_group(proc)  # Ctrl-C, SIGTERM: the VM goes with us
        record.total_s = time.monotonic() - t0
        if not record.booted:
            record.notes.append("the guest never started the run: boot failure")
        (results / "vm.json").write_text(json.dumps(asdict(record), indent=1) + "\n")


def _quote(s: str) -> str:
    if s and all(c.isalnum() or c in "@%+=:,./-_" for c in s):
        return s
    return "'" + s.replace("'", "'\\''") + "'"
