"""qemu-storage-daemon's FUSE export, driven as qemu-iotests drives it.

The daemon starts with a QMP monitor only; the export is then set up over
QMP with blockdev-add, object-add iothread and block-export-add, so events
(BLOCK_EXPORT_DELETED) and errors arrive as they do in iotests.

`qsd` is the qemu-storage-daemon on PATH (or QSD=PATH, or --qsd PATH);
`qsd-11.1` is upstream QSD fetched by `tools/qsd fetch`; `qsd-series` is
QEMU built from source with the patch stack in FUSE_IOTESTS_SERIES
(`tools/qsd build`, cached), labelled with its version and the stack's hash
so that known-differences and defect files can name that exact build.  What it can do is
read from its QMP schema (query-qmp-schema), never from its version:
`iothread` as a list (multi-queue, QEMU 10.1+) and `io-uring` in the FUSE
export options (the FUSE-over-io_uring patches).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ...options import OPTIONS as TABLE
from ...options import Settings
from ..holds.blocklayer import HOLDS, BlockLayerHolds
from ..lifecycle import ExporterProcess, ExportFailed
from ..qsd import build, fetch, series
from ..waiting import WaitTimeout
from . import NativeExporter, Target, TargetError

NAMES = ("qsd", "qsd-11.1", "qsd-series")
FETCHED = fetch.WRAPPER
# The export options QSD has: the table's rows with a qsd column.
OPTIONS = frozenset(o.key for o in TABLE if o.qsd)
# What it always does where it has no option: ring entries per ring queue
# (FUSE_DEFAULT_RING_QUEUE_DEPTH in the FUSE-over-io_uring series).
FIXED = {"ring-depth": 64}
# The series' io-uring is a bool: on or off, no fallback (auto).
VALUES = {"io-uring": ("off", "on")}


def qmp_monitor_argv(binary: str, qmp: Path) -> list[str]:
    return [
        binary,
        "--chardev", f"socket,id=qmp0,path={qmp},server=on,wait=off",
        "--monitor", "chardev=qmp0",
    ]  # fmt: skip


class QsdExporter(BlockLayerHolds, NativeExporter):
    fstype = "fuse"  # libfuse's plain type: ownership is by mount id

    def command(self) -> list[str]:
        monitor = qmp_monitor_argv(self.target.binary, self.qmp_path)
        return [*monitor, "--pidfile", str(self.pidfile)]

    def configure(self) -> None:
        s = self.settings
        if s["null-size"] is not None:
            node = {"driver": "null-co", "size": s["null-size"], "read-zeroes": True}
        elif self.wants_holds and self.image is not None:
            node = self.hold_node(self.image)
        else:
            node = {"driver": "file", "filename": str(self.image)}
        self._setup("blockdev-add", {"node-name": "n0", **node})
        export = export_arguments(s, self.mountpoint)
        for t in export.get("iothread", []):
            self._setup("object-add", {"qom-type": "iothread", "id": t})
        resp = self.cmd_raw("block-export-add", export)
        if "error" in resp:
            raise ExportFailed(resp["error"]["desc"])

    def _setup(self, command: str, args: dict[str, Any]) -> None:
        resp = self.cmd_raw(command, args)
        if "error" in resp:
            raise RuntimeError(f"{command}: {resp['error']['desc']}")


def export_arguments(s: Settings, mountpoint: Path) -> dict[str, Any]:
    """block-export-add's arguments for these settings (node n0, export e0).
    Whether the target has io-uring and iothread lists is checked before
    (Target.settings_problem), from its schema."""
    export: dict[str, Any] = {
        "type": "fuse",
        "id": "e0",
        "node-name": "n0",
        "mountpoint": str(mountpoint),
        "writable": s["writable"],
        "growable": s["growable"],
        "allow-other": s["allow-other"],
    }
    if s["queues"] > 1:
        export["iothread"] = [f"iothread{i}" for i in range(s["queues"])]
    if s["io-uring"] != "off":  # checked against the schema before
        export["io-uring"] = True
    return export


class Qsd(Target):
    def exporter(
        self, workdir: Path, mountpoint: Path, image: Path | None, settings: Settings
    ) -> ExporterProcess:
        return QsdExporter(self, workdir, mountpoint, image, settings)


def detect(name: str, binary: str | None) -> Target:
    if name == "qsd-11.1":  # always the fetched one: --qsd and QSD= name "qsd"
        if not FETCHED.exists():
            raise TargetError("target qsd-11.1 is not fetched: run tools/qsd fetch")
        path: str | None = str(FETCHED)
    elif name == "qsd-series":  # always the stack's build: built here when missing
        try:
            path = str(series.series_build().daemon)
        except build.BuildError as e:
            raise TargetError(f"target qsd-series: {str(e).splitlines()[0]}") from None
    else:
        path = binary or os.environ.get("QSD") or shutil.which("qemu-storage-daemon")
    if not path or not os.access(path, os.X_OK):
        raise TargetError(
            f"target {name}: no qemu-storage-daemon ({path or 'not on PATH'}; set QSD=PATH)"
        )
    version, schema = query(path)
    made = build.info(path)  # one of tools/qsd build's: name the stack too
    if made is not None:
        version = made.label
    caps = capabilities(schema) | {"faults"}  # block-layer holds (holds/blocklayer.py)
    return Qsd("qsd", version, caps, OPTIONS, binary=path, holds=HOLDS, fixed=FIXED, values=VALUES)


class _Monitor(ExporterProcess):
    """A daemon with nothing but a QMP monitor, to ask what it can do."""

    fstype = "fuse"

    def __init__(self, binary: str, workdir: Path) -> None:
        super().__init__(workdir, workdir / "no-mountpoint")
        self.binary = binary

    def command(self) -> list[str]:
        return [*qmp_monitor_argv(self.binary, self.qmp_path), "--pidfile", str(self.pidfile)]


def query(binary: str) -> tuple[str, list[dict[str, Any]]]:
    """(version, QMP schema) from a daemon with nothing but a monitor."""
    from qemu.qmp import QMPError

    with tempfile.TemporaryDirectory(prefix="fuse-iotests-qsd-") as tmp:
        monitor = _Monitor(binary, Path(tmp))
        try:
            monitor.wait_ready()
            v = monitor.cmd("query-version")["qemu"]
            schema = monitor.cmd("query-qmp-schema")
        except (ExportFailed, OSError, QMPError, WaitTimeout) as e:
            raise TargetError(f"{binary}: cannot query its QMP schema: {e}") from None
        finally:
            monitor.cleanup()
    return f"{v['major']}.{v['minor']}.{v['micro']}", schema


def capabilities(schema: list[dict[str, Any]]) -> frozenset[str]:
    """What the block-export-add arguments in a QMP schema allow.

    Type names in query-qmp-schema are opaque, so the FUSE options are found
    from the command: its argument type, the 'fuse' variant, its members."""
    types = {e["name"]: e for e in schema}
    cmd = types.get("block-export-add")
    if cmd is None:
        return frozenset()
    args = types[cmd["arg-type"]]
    caps = {"qmp"}
    for m in args.get("members", []):
        if m["name"] == "iothread" and types.get(m["type"], {}).get("meta-type") == "alternate":
            caps.add("multi-queue")  # str or [str]: one FUSE queue per iothread
    for v in args.get("variants", []):
        fuse = types[v["type"]] if v["case"] == "fuse" else {}
        if "io-uring" in {m["name"] for m in fuse.get("members", [])}:
            caps.add("io-uring")
    return frozenset(caps)
