"""The environment fingerprint tools/check prints first and stores with results.

A regression between kernels is only reproducible with the kernel, the
FUSE minor and INIT flags it offered, the io_uring knobs and the CPU
layout on record, so every run records them.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .. import __version__
from ..kernel import abi
from ..kernel.cpus import Topology
from ..kernel.mount import mount_table
from ..kernel.params import ENABLE_URING, IO_URING_DISABLED, read_param
from .lifecycle import REPO
from .runs import RUN
from .targets import CAPABILITIES, Target
from .timeouts import scaled


def git_revision() -> str:
    try:
        res = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=scaled(10),
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return res.stdout.strip() or "unknown"


def _probe_init() -> dict[str, Any]:
    """FUSE_INIT as the kernel offers it, from a throw-away probe mount."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        return {"error": "needs root and /dev/fuse"}
    from .probe import read_kernel_init

    try:
        with tempfile.TemporaryDirectory(prefix="fuse-iotests-probe-") as tmp:
            RUN.add_dir(tmp)
            init = read_kernel_init(Path(tmp))
    except Exception as e:  # a fingerprint never stops the run
        return {"error": f"{type(e).__name__}: {e}"}
    return {
        "protocol": f"{init.major}.{init.minor}",
        "offered": abi.flag_names(init.flags),
    }


def _filesystem_of(path: str) -> str:
    """The fs type under the instances' images: SEEK_HOLE and punch-hole
    granularity, which the rw cases print, come from it."""
    best = max(
        (
            e
            for e in mount_table()
            if path == e.mountpoint or path.startswith(e.mountpoint.rstrip("/") + "/")
        ),
        key=lambda e: len(e.mountpoint),
        default=None,
    )
    return best.fstype if best else "unknown"


def collect(targets: list[Target] | None = None) -> dict[str, Any]:
    topo = Topology.read()
    scratch = tempfile.gettempdir()
    return {
        "kernel": os.uname().release,
        "fuse": _probe_init(),
        "enable_uring": read_param(ENABLE_URING) or "missing",
        "io_uring_disabled": read_param(IO_URING_DISABLED) or "missing",
        "possible_cpus": len(topo.possible),
        "possible_cpu_list": ",".join(map(str, topo.possible)),
        # Which CPUs a ring queue exists for, and which can send requests.
        "cpus": topo.as_dict(),
        "exporter": f"harness.exporter {__version__} ({git_revision()})",
        "scratch": f"{scratch} ({_filesystem_of(os.path.realpath(scratch))})",
        "targets": [t.describe() for t in targets or []],
    }


def format_lines(fp: dict[str, Any]) -> list[str]:
    """The iotests-style header: 'NAME -- value'."""
    fuse = fp["fuse"]
    if "error" in fuse:
        fuse_line = f"probe failed: {fuse['error']}"
    else:
        fuse_line = f"protocol {fuse['protocol']}, offers {' '.join(fuse['offered'])}"
    return [
        f"KERNEL       -- {fp['kernel']}",
        f"FUSE         -- {fuse_line}",
        f"IO_URING     -- enable_uring={fp['enable_uring']} "
        f"io_uring_disabled={fp['io_uring_disabled']}",
        f"CPUS         -- {_cpus_line(fp)}",
        f"EXPORTER     -- {fp['exporter']}",
        f"SCRATCH      -- {fp['scratch']}",
        *(f"TARGET       -- {_target_line(t)}" for t in fp.get("targets", [])),
    ]


def _cpus_line(fp: dict[str, Any]) -> str:
    c = fp.get("cpus")
    if not c:  # a report written before the topology was recorded
        return f"{fp['possible_cpus']} possible ({fp['possible_cpu_list']})"
    return f"possible {c['possible']}, present {c['present']}, online {c['online']}"


def _target_line(t: dict[str, Any]) -> str:
    caps = " ".join(f"{c}={'yes' if c in t['capabilities'] else 'no'}" for c in CAPABILITIES)
    return f"{t['name']} {t['version']} ({t['binary']}): {caps}"
