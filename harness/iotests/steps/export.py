"""Steps on the exporter and its mount: signals, QMP, umount, restarts, cycles.

They act on the running export (StepDef.export), except those that set it
up (mountpoint, start-export) or restart it (cycles).
"""

from __future__ import annotations

import gc
import json
import os
import signal
from typing import Any

from ...kernel.errnos import errno_name
from ...kernel.mount import fuse_mounted, umount
from ...options import boolean, choice, positive
from ..filters import apply_filters
from ..golden import REFERENCE_ONLY
from ..lifecycle import ExportFailed
from ..waiting import WaitTimeout
from .session import Session
from .vocabulary import EXPORT_FIELDS, mapping, ops, qid_list, step, step_list, text

SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "INT": signal.SIGINT}
SHOW = ("negotiation", "layout", "counters", "export")
# An event that does not come: how long to look (scaled).  Exporters emit
# them within milliseconds of the cause; a hung one never does.
QMP_EVENT_WAIT = 5.0
# An exporter exits or unmounts within milliseconds of being told to (QSD
# about 2 ms, the reference about 6 ms); waiting longer only delays the
# report of one that hangs (scaled).
STOP_WAIT = 5.0


@step("signal", scalar=choice(*SIGNALS), export=True, metavar="TERM, KILL or INT")
def _signal(s: Session, name: str) -> None:
    """Send SIGTERM, SIGKILL or SIGINT to the exporter."""
    s.need_exporter().signal(SIGNALS[name])
    s.log(f"sent SIG{name} to the exporter")


@step("wait-exit", export=True)
def _wait_exit(s: Session, _: None) -> None:
    """Wait (bounded) for the exporter to exit; print its status."""
    exp = s.need_exporter()
    code = exp.settle(lambda: exp.wait_exit(s.bound(STOP_WAIT)), s.log)
    if code < 0:
        s.log(f"exporter killed by {signal.Signals(-code).name}")
    else:
        s.log(f"exporter exited with status {code}")


@step(
    "qmp",
    {"execute": (text, True), "arguments": (mapping, False)},
    export=True,
    needs=("qmp",),
)
def _qmp(s: Session, a: dict[str, Any]) -> None:
    """Send a command on the control socket; print the response as iotests does."""
    exp = s.need_exporter()
    resp = exp.settle(lambda: exp.cmd_raw(a["execute"], a.get("arguments")), s.log)
    resp.pop("id", None)
    s.log(json.dumps(resp, sort_keys=True))


@step("qmp-event", scalar=text, export=True, metavar="EVENT", needs=("qmp",))
def _qmp_event(s: Session, name: str) -> None:
    """Wait (bounded) for a QMP event; print it without its timestamp, or that none came."""
    exp = s.need_exporter()
    seen: list[str] = []

    def arrived() -> dict[str, Any] | None:
        event = exp.pull_event(wait=False)
        if event is not None and event["event"] != name:
            seen.append(event["event"])
            return None
        return event

    try:
        event = s.wait(arrived, f"QMP event {name}", cap=QMP_EVENT_WAIT, expected=True)
    except WaitTimeout:  # what the target did, for the transcript to show
        others = f" (others: {', '.join(seen)})" if seen else ""
        s.log(f"no {name} event{others}")
        return
    s.log(json.dumps({"data": event.get("data"), "event": name}, sort_keys=True))


@step("umount", {"lazy": (boolean, False)}, optional=True, export=True)
def _umount(s: Session, a: dict[str, Any]) -> None:
    """Unmount the export from outside (umount2, MNT_DETACH with lazy: true)."""
    exp = s.need_exporter()
    if not exp.is_mounted():
        raise RuntimeError("umount step: our mount is not there")
    what = "umount -l" if a.get("lazy") else "umount"
    try:
        umount(str(s.target), lazy=bool(a.get("lazy")))
        s.log(f"{what}: ok")
    except OSError as e:
        s.log(f"{what}: {errno_name(e.errno or 0)}")


@step("wait-unmounted", export=True)
def _wait_unmounted(s: Session, _: None) -> None:
    """Wait (bounded) until the mount table no longer lists our mount."""
    exp = s.need_exporter()
    exp.settle(lambda: exp.wait_unmounted(s.bound(STOP_WAIT)), s.log)
    s.log("unmounted (mount table)")


@step("mounted", export=True)
def _mounted(s: Session, _: None) -> None:
    """Print whether the mount table lists our FUSE mount (the authoritative check)."""
    if s.exporter is not None and s.exporter.mount_id is not None:
        there = s.exporter.is_mounted()
    else:
        there = fuse_mounted(str(s.target))
    s.log(f"mount table: {'our FUSE mount is there' if there else 'no mount'}")


@step(
    "start-export", EXPORT_FIELDS, optional=True, export=True, starts_export=True, in_cycles=False
)
def _start_export(s: Session, a: dict[str, Any]) -> None:
    """Start an exporter (another, or the first with export.start false); print the outcome."""
    assert s.settings is not None
    exp = s.new_exporter(s.settings.with_(a))
    try:
        s.launch(exp)
    except ExportFailed as e:
        s.log(f"export: failed: {e}")
        return
    if s.exporter is None or s.exporter.returncode() is not None:
        s.exporter = exp  # later steps act on it
    s.log("export: started")


@step("cleanup", export=True)
def _cleanup(s: Session, _: None) -> None:
    """Run the harness's own cleanup of the export now; print what it removed."""
    removed = s.need_exporter().cleanup()
    for r in removed or ["nothing"]:
        s.log(f"cleanup removed: {r}")


def _resources(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


@step(
    "cycles",
    {"count": (positive, True), "steps": (step_list, False)},
    fuse=True,
    serial=True,
    in_cycles=False,
    nested="steps",
    ends_export=True,
)
def _cycles(s: Session, a: dict[str, Any]) -> None:
    """Stop and restart the export count times, running steps in each cycle.

    Prints the cycle transcript once if every cycle printed the same, and
    whether the exporter's and the harness's fd and thread counts stayed the
    same.  The harness's counts are process-wide, so a case with cycles must
    be serial (it then runs alone).
    """
    assert s.settings is not None
    assert s.current is not None
    subs = s.current.steps
    outputs: list[list[str]] = []
    exporter_res, own_res = set(), []
    for _ in range(a["count"]):
        if s.exporter is not None and s.exporter.returncode() is None:
            s.exporter.stop(s.bound(STOP_WAIT))
            s.exporter.cleanup()
        mark = s.ctx.mark()
        s.start_export()
        exp = s.need_exporter()
        s.run_steps(subs)
        exporter_res.add(_resources(exp.pid))
        s.log(f"stop: exporter exited with status {exp.stop(s.bound(STOP_WAIT))}")
        exp.cleanup()
        outputs.append(s.ctx.take_since(mark))
        gc.collect()  # closed-but-unreferenced objects are not leaks
        assert s.export_target is not None
        with s.export_target.settled():  # a warm spare being started is no leak
            own_res.append(_resources(os.getpid()))
    s.exporter = None
    env = s.filter_env
    if env is not None:  # compare what the golden file would see
        outputs = [apply_filters("\n".join(o), env).split("\n") for o in outputs]
    distinct = {tuple(o) for o in outputs}
    s.log(f"{a['count']} start/stop cycles, {len(distinct)} distinct transcript(s):")
    for out in outputs[:1] if len(distinct) == 1 else outputs:
        for line in out:
            s.log(f"  {line}")
    if len(exporter_res) == 1:
        s.log("exporter fds and threads: the same in every cycle")
    else:
        s.log(f"exporter (fds, threads) VARIED: {sorted(exporter_res)}")
    # After the first cycle (which may create lasting lazy state, such as an
    # event loop) nothing may grow; valid because the case is serial.
    if len(set(own_res[1:])) <= 1:
        s.log("harness fds and threads: the same after every cycle")
    else:
        s.log(f"harness (fds, threads) GREW: {own_res}")


MOUNTPOINTS = ("missing", "directory", "file", "image")


@step(
    "mountpoint",
    scalar=choice(*MOUNTPOINTS),
    fuse=True,
    metavar="missing, directory, file or image",
)
def _mountpoint(s: Session, kind: str) -> None:
    """Make the next export's mountpoint missing, a directory, a file, or the image itself."""
    if s.exporter is not None and s.exporter.is_mounted():
        raise RuntimeError("mountpoint step: an export is mounted there")
    if kind == "image":
        s.target = s.image
    else:
        s.target = s.ctx.workdir / "disk.fuse"
        if s.target.is_dir():
            s.target.rmdir()
        else:
            s.target.unlink(missing_ok=True)
        if kind == "directory":
            s.target.mkdir()
        elif kind == "file":
            s.target.touch()
    s.log(f"mountpoint: {kind}")


@step(
    "show",
    {"what": (choice(*SHOW), True), "ops": (ops, False), "qids": (qid_list, False)},
    export=True,
)
def _show(s: Session, a: dict[str, Any]) -> None:
    """Print the reference exporter's own report: negotiation, layout, counters (reference-only)."""
    exp = s.need_exporter()
    if s.export_target is None or "introspection" not in s.export_target.capabilities:
        return  # compared without these lines; `observe` shows what the kernel sees
    info = exp.query()
    what = a["what"]

    def log(line: str) -> None:
        s.log(REFERENCE_ONLY + line)

    if what == "negotiation":
        n = info["negotiation"]
        log(f"kernel: protocol {n['kernel-major']}.{n['kernel-minor']}")
        log(f"kernel offers: {' '.join(n['offered-names'])}")
        log(f"reply: protocol 7.{n['minor']} {' '.join(n['replied-names'])}")
        log(f"max_write={n['max-write']} max_pages={n['max-pages']}")
        log(f"payload-size={info['payload-size']} transport={info['transport']}")
    elif what == "layout":
        log(f"cpus={info.get('possible-cpus', 0)} queues={len(info['queues'])}")
        layout = info.get("ring-layout", [])
        if "qids" in a:  # just these ring queues: the same on any CPU count
            for r in (r for r in layout if r["qid"] in a["qids"]):
                log(f"ring queue {r['qid']}: queue {r['queue']}, depth {r['depth']}")
            return
        owned: dict[int, list[int]] = {q["index"]: [] for q in info["queues"]}
        for r in layout:
            owned[r["queue"]].append(r["qid"])
        for q, qids in owned.items():
            log(f"queue {q}: ring queues {qids or 'none (idle)'}")
    elif what == "counters":
        names = a.get("ops", ["READ", "WRITE"])
        for q in info["queues"]:
            counts = " ".join(f"{op}={q['opcodes'].get(op, 0)}" for op in names)
            log(f"queue {q['index']}: {counts}")
    else:
        log(f"size={info['size']} writable={info['writable']} growable={info['growable']}")


@step("exporter-log", scalar=text, export=True, metavar="TEXT")
def _exporter_log(s: Session, needle: str) -> None:
    """Print the reference exporter's stderr lines that contain a string (reference-only)."""
    exp = s.need_exporter()
    if s.export_target is None or "exporter-log" not in s.export_target.capabilities:
        return  # another daemon's log is its own: compared without these lines
    lines = [ln for ln in exp.stderr().splitlines() if needle in ln]
    for line in lines or [f"(no exporter output containing {needle!r})"]:
        s.log(REFERENCE_ONLY + line)
