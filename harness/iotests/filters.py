"""Transcript filters, in the spirit of qemu-iotests' common.filter.

Each filter is named and documented, and they run in the order listed.
They make a transcript independent of where and when it ran: paths,
timings, PIDs, the kernel's FUSE minor and the CPU count become
placeholders, so one golden file serves every machine and both transports.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..kernel.abi import STABLE_INIT_FLAGS as STABLE_FLAGS


@dataclass(frozen=True)
class FilterEnv:
    """What the filters replace: this instance's paths (a Python case has
    no target of its own)."""

    test_dir: str
    target: str | None


@dataclass(frozen=True)
class Filter:
    name: str
    doc: str
    apply: Callable[[str, FilterEnv], str]


def _sub(pattern: str, repl: str, flags: int = 0) -> Callable[[str, FilterEnv], str]:
    rx = re.compile(pattern, flags)
    return lambda text, env: rx.sub(repl, text)


_CLIENT_RESULT = re.compile(r"^[\w-]+: (?:error \w+|read .*, close .*)$", re.M)
_CONN_ERRNO = re.compile(r"\b(?:ENOTCONN|ECONNABORTED)\b")


def _conn_errno(text: str, env: FilterEnv) -> str:
    # a dead server's connection is torn down after its exit, asynchronously
    # when its io_uring holds /dev/fuse: a request may still be queued then
    return _CLIENT_RESULT.sub(lambda m: _CONN_ERRNO.sub("ENOTCONN|ECONNABORTED", m[0]), text)


def _paths(text: str, env: FilterEnv) -> str:
    # The target first: it lies inside the test dir.  With -fuse the image
    # stays TEST_DIR/disk.img, so a case that touches it by mistake cannot
    # match a -file transcript.
    if env.target:
        text = text.replace(env.target, "TEST_IMG")
    return text.replace(env.test_dir, "TEST_DIR")


def _stable_flags(text: str, env: FilterEnv) -> str:
    def keep(m: re.Match[str]) -> str:
        names = [n for n in m.group(2).split() if n in STABLE_FLAGS]
        return m.group(1) + " ".join(names)

    return re.sub(r"^((?:reference-only: )?kernel offers: )(.*)$", keep, text, flags=re.M)


FILTERS: list[Filter] = [
    Filter(
        "paths",
        "the target (the FUSE mountpoint, or with -file the image) becomes TEST_IMG, so "
        "-file and -fuse transcripts match; the instance directory becomes TEST_DIR",
        _paths,
    ),
    Filter(
        "qemu_io_timing",
        "qemu-io's per-request line '4 KiB, 1 ops; 00.00 sec (...)' keeps the byte count "
        "only, as _filter_qemu_io does",
        _sub(
            r"[0-9]+ ops; [0-9/:. sec]+ \([0-9/.inf]+ [EPTGMKiBbytes]+/sec "
            r"and [0-9/.inf]+ ops/sec\)",
            "X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)",
        ),
    ),
    Filter(
        "dd_timing",
        "dd's '... copied, 0.01 s, 1 MB/s' loses the time and the rate",
        _sub(r"copied, [0-9.e-]+ s, [0-9.,]+ [kMGT]?B/s", "copied, TIME, RATE"),
    ),
    Filter(
        "qemu_img_bench",
        "qemu-img bench's 'Run completed in 0.51 seconds.' loses the time, as 308 does",
        _sub(r"^Run completed in [0-9.]+ seconds\.$", "Run completed in X.XXX seconds.", re.M),
    ),
    Filter("pid", "'pid 1234' becomes 'pid PID'", _sub(r"\bpid [0-9]+", "pid PID")),
    Filter(
        "fuse_minor",
        "'protocol 7.45' becomes 'protocol 7.MINOR': the kernel's FUSE minor moves with the "
        "kernel version",
        _sub(r"\bprotocol 7\.[0-9]+", "protocol 7.MINOR"),
    ),
    Filter(
        "init_flags",
        "'kernel offers:' keeps only the INIT flags the export relies on "
        f"({', '.join(STABLE_FLAGS)}), so flags a newer kernel adds do not break the "
        "golden file",
        _stable_flags,
    ),
    Filter("cpus", "'cpus=2' becomes 'cpus=NCPUS'", _sub(r"\bcpus=[0-9]+", "cpus=NCPUS")),
    Filter(
        "conn_errno",
        "in a client's result ('NAME: error ECONNABORTED', an idle client's 'NAME: read "
        "error ..., close error ...'), ECONNABORTED and ENOTCONN, which kernels give for a "
        "dead connection depending on timing and version, become ENOTCONN|ECONNABORTED",
        _conn_errno,
    ),
]


def apply_filters(text: str, env: FilterEnv) -> str:
    for f in FILTERS:
        text = f.apply(text, env)
    return text


def filter_reference() -> str:
    return "\n".join(f"| `{f.name}` | {f.doc.replace('|', '&#124;')} |" for f in FILTERS)
