"""Steps that do I/O on the target with plain syscalls, and check the image.

They print the way qemu-io does, so one set of filters serves real qemu-io
runs and ours, and `-file` and `-fuse` instances produce the same transcript.
"""

from __future__ import annotations

import errno as errno_mod
import os
import time
from collections.abc import Callable
from typing import Any

from ...kernel.errnos import errno_name
from ...kernel.libc import fallocate
from ...options import choice
from .session import Session, describe, fill_bytes, page_buffer, timing_line
from .vocabulary import FALLOC_MODES, falloc_mode, pattern, region_list, size, step, text, texts


def _timed(s: Session, flags: int, what: str, io: Callable[[int], int]) -> tuple[int, float] | None:
    """One syscall on the target, timed: (its result, seconds), or None when
    open or the call failed (logged as qemu-io words it)."""

    def timed(fd: int) -> tuple[int, float] | None:
        try:
            t0 = time.monotonic()
            n = io(fd)
            return n, time.monotonic() - t0
        except OSError as e:
            s.log(f"{what} failed: {describe(e)}")
            return None

    return s.on_target(flags, what, timed)


@step(
    "write",
    {"offset": (size, True), "length": (size, True), "pattern": (pattern, False)},
)
def _write(s: Session, a: dict[str, Any]) -> None:
    """pwrite(2) a pattern (default 0xab); print as qemu-io's write."""
    off, length = a["offset"], a["length"]
    buf = page_buffer(length)
    buf[:length] = fill_bytes(a.get("pattern", 0xAB), off, length)
    done = _timed(s, os.O_RDWR, "write", lambda fd: os.pwrite(fd, memoryview(buf)[:length], off))
    if done is not None:
        n, dt = done
        s.log(f"wrote {n}/{length} bytes at offset {off}")
        s.log(timing_line(n, dt))


@step(
    "read",
    {"offset": (size, True), "length": (size, True), "pattern": (pattern, False)},
)
def _read(s: Session, a: dict[str, Any]) -> None:
    """pread(2) and verify against a pattern if given; print as qemu-io's read."""
    off, length = a["offset"], a["length"]
    buf = page_buffer(length)
    done = _timed(s, os.O_RDONLY, "read", lambda fd: os.preadv(fd, [memoryview(buf)[:length]], off))
    if done is None:
        return
    n, dt = done
    data = buf[:n]
    if "pattern" in a and data != fill_bytes(a["pattern"], off, n):
        s.log(f"Pattern verification failed at offset {off}, {n} bytes")
    s.log(f"read {n}/{length} bytes at offset {off}")
    s.log(timing_line(n, dt))


@step("disk-usage")
def _disk_usage(s: Session, _: None) -> None:
    """Print whether the image's allocated blocks grew since the last disk-usage."""
    blocks = os.stat(s.image).st_blocks
    before, s.disk_usage = s.disk_usage, blocks
    if before is None:
        s.log("disk usage: recorded")
    else:
        s.log(f"disk usage: {'grew' if blocks > before else 'did not grow'}")


@step("truncate", scalar=size, metavar="SIZE")
def _truncate(s: Session, length: int) -> None:
    """ftruncate(2) the target to a size."""

    def truncate(fd: int) -> None:
        try:
            os.ftruncate(fd, length)
            s.log(f"truncate {length}: ok")
        except OSError as e:
            s.log(f"truncate {length}: {errno_name(e.errno or 0)}")

    s.on_target(os.O_RDWR, f"truncate {length}", truncate)


@step(
    "fallocate",
    {"mode": (falloc_mode, False), "offset": (size, True), "length": (size, True)},
)
def _fallocate(s: Session, a: dict[str, Any]) -> None:
    """fallocate(2) with modes keep-size, punch-hole, zero-range (comma-separated)."""
    mode_s = a.get("mode", "")
    mode = 0
    for part in filter(None, mode_s.split(",")):
        mode |= FALLOC_MODES[part]
    what = f"fallocate {mode_s or 'default'} {a['offset']}+{a['length']}"

    def allocate(fd: int) -> None:
        try:
            fallocate(fd, mode, a["offset"], a["length"])
            s.log(f"{what}: ok")
        except OSError as e:
            s.log(f"{what}: {errno_name(e.errno or 0)}")

    s.on_target(os.O_RDWR, what, allocate)


WHENCE = {"data": os.SEEK_DATA, "hole": os.SEEK_HOLE, "set": os.SEEK_SET, "end": os.SEEK_END}


@step("lseek", {"offset": (size, True), "whence": (choice(*WHENCE), True)})
def _lseek(s: Session, a: dict[str, Any]) -> None:
    """lseek(2) with SEEK_DATA/SEEK_HOLE/SEEK_SET/SEEK_END; print the result or errno."""
    what = f"lseek {a['whence']} {a['offset']}"

    def seek(fd: int) -> None:
        try:
            s.log(f"{what}: {os.lseek(fd, a['offset'], WHENCE[a['whence']])}")
        except OSError as e:
            s.log(f"{what}: {errno_name(e.errno or 0)}")

    s.on_target(os.O_RDONLY, what, seek)


@step("map")
def _map(s: Session, _: None) -> None:
    """Print the data/hole map from SEEK_DATA/SEEK_HOLE, like qemu-img map."""

    def walk(fd: int) -> None:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno_mod.ENXIO:
                    raise
                data = end
            if data > pos:
                s.log(f"hole {pos}+{data - pos}")
            if data >= end:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            s.log(f"data {data}+{hole - data}")
            pos = hole

    s.on_target(os.O_RDONLY, "map", walk)


STAT_FIELDS = ("size", "mode", "blocks", "blksize", "nlink")


@step(
    "stat",
    scalar=lambda v: [choice(*STAT_FIELDS)(f) for f in texts(v)],
    optional=True,
    metavar="[FIELD, ...]",
)
def _stat(s: Session, fields: list[str] | None) -> None:
    """stat(2) the target; print the fields asked for (default size)."""
    try:
        st = os.stat(s.target)
    except OSError as e:
        s.log(f"stat: {errno_name(e.errno or 0)}")
        return
    values = {
        "size": st.st_size,
        "mode": f"{st.st_mode & 0o7777:04o}",
        "blocks": st.st_blocks,
        "blksize": st.st_blksize,
        "nlink": st.st_nlink,
    }
    s.log(" ".join(f"{f}={values[f]}" for f in fields or ["size"]))


@step("fsync")
def _fsync(s: Session, _: None) -> None:
    """fsync(2) the target."""

    def sync(fd: int) -> None:
        try:
            os.fsync(fd)
            s.log("fsync: ok")
        except OSError as e:
            s.log(f"fsync: {errno_name(e.errno or 0)}")

    try:
        s.on_target(os.O_RDWR, "fsync", sync)
    except OSError as e:  # the close sends FUSE_FLUSH, which an export may fail as well
        s.log(f"close: {errno_name(e.errno or 0)}")


@step("echo", scalar=text, metavar="TEXT")
def _echo(s: Session, line: str) -> None:
    """Print a line (section headers such as '=== Held READ ===')."""
    s.log(line)


@step(
    "check-image",
    {"size": (size, True), "regions": (region_list, False)},
)
def _check_image(s: Session, a: dict[str, Any]) -> None:
    """Compare the image file with its initial fill overlaid by regions, at size."""
    want_size = a["size"]
    expected = bytearray(fill_bytes(s.fill if s.fill != "sparse" else "zero", 0, want_size))
    for r in a.get("regions", []):
        end = min(r["offset"] + r["length"], want_size)
        if end <= r["offset"]:
            continue  # wholly past the expected EOF
        expected[r["offset"] : end] = fill_bytes(r["pattern"], r["offset"], end - r["offset"])
    data = s.image.read_bytes()
    if len(data) != want_size:
        s.log(f"image: size {len(data)}, expected {want_size}")
        return
    if data == expected:
        s.log(f"image: {want_size} bytes as expected")
        return
    bad = next(i for i in range(want_size) if data[i] != expected[i])
    s.log(f"image: differs from offset {bad} (0x{data[bad]:02x}, expected 0x{expected[bad]:02x})")
