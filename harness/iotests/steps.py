"""The step vocabulary of YAML cases: each step's arguments and what it does.

A step is `name: argument`.  check_step() validates an argument at load
time; Session.run_steps() performs it and writes transcript lines.  I/O steps
print the way qemu-io does, so one set of filters serves real qemu-io runs
and ours, and `-file` and `-fuse` instances produce the same transcript.
"""

from __future__ import annotations

import errno as errno_mod
import gc
import json
import mmap
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..kernel import abi
from ..kernel.errnos import errno_name
from ..kernel.libc import fallocate
from ..kernel.mount import fuse_mounted, umount
from ..kernel.params import ENABLE_URING, read_param, write_param
from ..options import OPTIONS, Settings, boolean, choice, parse_size, positive
from ..patterns import IMAGE_FILLS, offset_pattern, pattern_bytes
from . import runs
from .client import ClientPool
from .context import CaseContext, Instance, onoff
from .filters import FilterEnv, apply_filters
from .lifecycle import ExporterProcess, ExportFailed
from .targets import CAPABILITIES, Target
from .waiting import WaitTimeout

IO_TIMEOUT = 20.0

# -- argument types (each converts or raises ValueError) ------------------


def size(v: Any) -> int:
    """4096, '64k', '1M-4k', '1M+512': qemu-style sizes, added and subtracted."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a size")
    if isinstance(v, int):
        return v
    if not isinstance(v, str):
        raise ValueError(f"{v!r} is not a size")
    total, sign = 0, 1
    for tok in re.split(r"\s*([+-])\s*", v.strip()):
        if tok in "+-":
            sign = -1 if tok == "-" else 1
            continue
        total += sign * parse_size(tok)
    if total < 0:
        raise ValueError(f"size {v!r} is negative")
    return total


def pattern(v: Any) -> int | str:
    """A byte (qemu-io -P), 'offsets' (bytes that encode their offset) or 'zero'."""
    if v in ("offsets", "zero"):
        return str(v)
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255:
        return v
    raise ValueError(f"pattern must be a byte, 'offsets' or 'zero', not {v!r}")


def integer(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{v!r} is not an integer")
    return v


def non_negative(v: Any) -> int:
    if integer(v) < 0:
        raise ValueError(f"{v!r} is negative")
    return int(v)


def qid_list(v: Any) -> list[int]:
    if not isinstance(v, list):
        raise ValueError("qids must be a list of ring queue numbers")
    return [non_negative(x) for x in v]


def byte(v: Any) -> int:
    if not 0 <= integer(v) <= 255:
        raise ValueError(f"{v!r} is not a byte (0..255)")
    return int(v)


def mapping(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError(f"{v!r} is not a mapping")
    return dict(v)


def step_list(v: Any) -> list[dict[str, Any]]:
    """Steps as in a case: 'name: argument' mappings or bare names."""
    if not isinstance(v, list):
        raise ValueError("must be a list of 'name: argument' steps")
    out = [{x: None} if isinstance(x, str) else x for x in v]
    if not all(isinstance(x, dict) and len(x) == 1 for x in out):
        raise ValueError("must be a list of 'name: argument' steps or bare step names")
    return out


def text(v: Any) -> str:
    if not isinstance(v, str | int | float) or isinstance(v, bool):
        raise ValueError(f"{v!r} is not a string")
    return str(v)


def errno_arg(v: Any) -> str:
    if not isinstance(v, str) or not hasattr(errno_mod, v):
        raise ValueError(f"{v!r} is not an errno name")
    return v


def texts(v: Any) -> list[str]:
    items = v if isinstance(v, list) else [v]
    return [text(x) for x in items]


def ops(v: Any) -> list[str]:
    return [op_arg(x) for x in (v if isinstance(v, list) else [v])]


def op_arg(v: Any) -> str:
    name = text(v).upper()
    if name not in abi.Op.__members__:
        raise ValueError(f"unknown FUSE opcode {v!r}")
    return name


FALLOC_MODES = {
    "keep-size": abi.FALLOC_FL_KEEP_SIZE,
    "punch-hole": abi.FALLOC_FL_PUNCH_HOLE,
    "zero-range": abi.FALLOC_FL_ZERO_RANGE,
}


def falloc_mode(v: Any) -> str:
    s = "" if v is None else text(v)
    for part in filter(None, s.split(",")):
        if part not in FALLOC_MODES:
            raise ValueError(f"fallocate mode {part!r} is not one of {', '.join(FALLOC_MODES)}")
    return s


def region_list(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list):
        raise ValueError("regions must be a list")
    return [convert_fields(r, REGION_FIELDS) for r in v]


# What a background client can do with offset/length/pattern arguments.
BACKGROUND_OPS = {"pread": 2, "pwrite": 2, "fsync": 0, "stat": 0}
SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "INT": signal.SIGINT}
STAT_FIELDS = ("size", "mode", "blocks", "blksize", "nlink")
SHOW = ("negotiation", "layout", "counters", "export")
REGION_FIELDS = {"offset": (size, True), "length": (size, True), "pattern": (pattern, True)}
Fields = dict[str, tuple[Callable[[Any], Any], bool]]

# The option table's converters (harness/options.py), for a case's `export:`
# (plus `start: false`: the case starts it with start-export) and the
# start-export step.
EXPORT_FIELDS: Fields = {o.key: (o.convert, False) for o in OPTIONS if o.step}
CASE_EXPORT_FIELDS: Fields = {
    **{o.key: (o.convert, False) for o in OPTIONS},
    "start": (boolean, False),
}
IMAGE_FIELDS: Fields = {"size": (size, False), "fill": (choice(*IMAGE_FILLS), False)}
# What a case exports unless it says otherwise: the harness writes, and runs
# as root, so allow_other would only add a mount option nobody uses.
CASE_DEFAULTS = Settings({**Settings().values, "writable": True, "allow-other": "off"})


class FieldError(ValueError):
    """A bad argument; key names it, so a spec error can point at its line."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key


def convert_fields(arg: Any, fields: Fields) -> dict[str, Any]:
    if arg is None:
        arg = {}
    if not isinstance(arg, dict):
        raise FieldError(None, f"expected a mapping with {', '.join(fields)}")
    for k in arg:
        if k not in fields:
            raise FieldError(k, f"unknown argument '{k}' (known: {', '.join(fields)})")
    out = {}
    for k, (conv, required) in fields.items():
        if k in arg:
            try:
                out[k] = conv(arg[k])
            except (ValueError, TypeError) as e:
                raise FieldError(k, f"{k}: {e}") from None
        elif required:
            raise FieldError(None, f"missing argument '{k}'")
    return out


@dataclass
class StepDef:
    run: Callable[[Session, Any], None]
    fields: Fields | None = None  # a mapping argument
    scalar: Callable[[Any], Any] | None = None  # a scalar argument
    optional: bool = False  # the argument may be left out
    export: bool = False  # needs a FUSE export (not in -file mode)
    doc: str = ""
    metavar: str = ""
    needs: frozenset[str] = frozenset()  # target capabilities (targets.CAPABILITIES)
    fuse: bool = False  # fuse mode only (not -file), export running or not

    def convert(self, arg: Any) -> Any:
        if arg is None and (self.optional or (self.fields is None and self.scalar is None)):
            return convert_fields({}, self.fields) if self.fields else None
        if self.fields is not None:
            return convert_fields(arg, self.fields)
        if self.scalar is not None:
            return self.scalar(arg)
        raise ValueError("takes no argument")


STEPS: dict[str, StepDef] = {}


def step(
    name: str,
    fields: Fields | None = None,
    scalar: Callable[[Any], Any] | None = None,
    optional: bool = False,
    export: bool = False,
    metavar: str = "",
    needs: tuple[str, ...] = (),
    fuse: bool = False,
) -> Callable[[Callable[[Session, Any], None]], Callable[[Session, Any], None]]:
    assert set(needs) <= set(CAPABILITIES), needs

    def register(fn: Callable[[Session, Any], None]) -> Callable[[Session, Any], None]:
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        STEPS[name] = StepDef(
            fn, fields, scalar, optional, export, doc, metavar, frozenset(needs), fuse
        )
        return fn

    return register


def check_step(name: str, arg: Any, inst: Instance) -> None:
    """Validate one step for one instance; raise ValueError."""
    sd = STEPS.get(name)
    if sd is None:
        raise ValueError(f"unknown step (known: {', '.join(sorted(STEPS))})")
    if (sd.export or sd.fuse) and inst.mode == "file":
        raise ValueError("needs a FUSE export, so the case cannot have mode 'file'")
    value = sd.convert(arg)
    if name == "background":
        given = len([k for k in ("offset", "length") if k in value])
        if given != BACKGROUND_OPS[value["op"]]:
            raise ValueError(
                f"{value['op']} takes offset and length"
                if given < 2
                else f"{value['op']} takes no offset or length"
            )
        if "pattern" in value and value["op"] != "pwrite":
            raise ValueError("only pwrite takes a pattern")
    if name == "cycles":
        for sub in value.get("steps", []):
            (sub_name, sub_arg), *_ = sub.items()
            if sub_name in ("cycles", "kernel-param", "start-export"):
                raise ValueError(f"'{sub_name}' cannot run inside cycles")
            check_step(sub_name, sub_arg, inst)


# -- output helpers -------------------------------------------------------


def cvtstr(n: float) -> str:
    """qemu-io's human-readable byte counts: '4 KiB', '2.500 KiB', '512 bytes'."""
    for unit, scale in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40)):
        if n >= scale:
            return _trim(n / scale, unit)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return _trim(n / scale, unit)
    return f"{n:.0f} bytes"


def _trim(v: float, unit: str) -> str:
    s = f"{v:.3f}".rstrip("0").rstrip(".")
    return f"{s} {unit}"


def timing_line(count: int, seconds: float) -> str:
    """The second line qemu-io prints for every request; filtered later."""
    seconds = max(seconds, 1e-9)
    return (
        f"{cvtstr(count)}, 1 ops; {seconds:05.2f} sec "
        f"({cvtstr(count / seconds)}/sec and {1 / seconds:.4f} ops/sec)"
    )


def fill_bytes(pat: int | str, offset: int, length: int) -> bytes:
    if pat == "offsets":
        return offset_pattern(offset, length)
    if pat == "zero":
        return bytes(length)
    return pattern_bytes(int(pat), length)


def page_buffer(length: int) -> mmap.mmap:
    """A page-aligned buffer: the kernel splits direct I/O at page boundaries,
    so an unaligned one would change how many requests the export sees."""
    return mmap.mmap(-1, max(length, 1))


def describe(e: OSError) -> str:
    return os.strerror(e.errno or 0)


# -- the session ----------------------------------------------------------


@dataclass
class Session:
    """Runs one YAML instance's steps against its target."""

    ctx: CaseContext
    image: Path
    target: Path  # the FUSE mountpoint, or the image itself in -file mode
    fill: str
    settings: Settings | None  # the export's options; None in -file mode
    export_target: Target | None = None  # what serves the export
    exporter: ExporterProcess | None = None
    clients: ClientPool = field(default_factory=ClientPool)
    background: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)
    filter_env: FilterEnv | None = None
    cpu: int | None = None
    unpinned: set[int] | None = None  # the case thread's CPUs before `pin`
    disk_usage: int | None = None  # the image's st_blocks at the last disk-usage

    def __post_init__(self) -> None:
        self.ctx.defer(self.clients.cleanup, "background clients")

    def log(self, line: str = "") -> None:
        self.ctx.log(line)

    def expand(self, s: str) -> str:
        return (
            s.replace("$TARGET", str(self.target))
            .replace("$IMAGE", str(self.image))
            .replace("$TEST_DIR", str(self.ctx.workdir))
        )

    def run_steps(self, steps: list[tuple[str, Any]]) -> None:
        for name, arg in steps:
            self.ctx.check_cancelled()
            sd = STEPS[name]
            sd.run(self, sd.convert(arg))

    # -- exporters ---------------------------------------------------------

    def new_exporter(self, settings: Settings) -> ExporterProcess:
        assert self.export_target is not None
        n = len(list(self.ctx.workdir.glob("export*")))
        work = self.ctx.workdir / f"export{n}"
        work.mkdir()
        image = None if settings["null-size"] is not None else self.image
        exp = self.export_target.exporter(work, self.target, image, settings)
        self.ctx.defer(exp.cleanup, f"exporter {work.name}")
        self.ctx.diagnose(exp.report)
        return exp

    def start_export(self) -> None:
        assert self.settings is not None
        self.exporter = self.launch(self.new_exporter(self.settings))

    def launch(self, exp: ExporterProcess) -> ExporterProcess:
        """Start an exporter with the case thread's own CPUs, not a `pin`."""
        if self.cpu is None or self.unpinned is None:
            return exp.start()
        os.sched_setaffinity(0, self.unpinned)
        try:
            return exp.start()
        finally:
            os.sched_setaffinity(0, {self.cpu})

    def need_exporter(self) -> ExporterProcess:
        if self.exporter is None:
            raise RuntimeError("no export is running (export.start is false?)")
        return self.exporter

    def open(self, flags: int, what: str) -> int | None:
        """The target opened, or None after logging why open(2) failed for the
        step `what`: a read-only mount refuses O_RDWR with EROFS before any
        request reaches the export."""
        try:
            return os.open(self.target, flags | os.O_CLOEXEC)
        except OSError as e:
            self.log(f"{what}: open failed: {describe(e)}")
            return None


# -- I/O ------------------------------------------------------------------


@step(
    "write",
    {"offset": (size, True), "length": (size, True), "pattern": (pattern, False)},
)
def _write(s: Session, a: dict[str, Any]) -> None:
    """pwrite(2) a pattern (default 0xab); print as qemu-io's write."""
    off, length = a["offset"], a["length"]
    buf = page_buffer(length)
    buf[:length] = fill_bytes(a.get("pattern", 0xAB), off, length)
    fd = s.open(os.O_RDWR, "write")
    if fd is None:
        return
    try:
        t0 = time.monotonic()
        n = os.pwrite(fd, memoryview(buf)[:length], off)
        dt = time.monotonic() - t0
    except OSError as e:
        s.log(f"write failed: {describe(e)}")
        return
    finally:
        os.close(fd)
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
    fd = s.open(os.O_RDONLY, "read")
    if fd is None:
        return
    try:
        t0 = time.monotonic()
        n = os.preadv(fd, [memoryview(buf)[:length]], off)
        dt = time.monotonic() - t0
        data = buf[:n]
    except OSError as e:
        s.log(f"read failed: {describe(e)}")
        return
    finally:
        os.close(fd)
    if "pattern" in a and data != fill_bytes(a["pattern"], off, len(data)):
        s.log(f"Pattern verification failed at offset {off}, {len(data)} bytes")
    s.log(f"read {len(data)}/{length} bytes at offset {off}")
    s.log(timing_line(len(data), dt))


@step("qemu-io", scalar=texts, metavar="CMD or [CMD, ...]")
def _qemu_io(s: Session, cmds: list[str]) -> None:
    """Run the real qemu-io (-f raw) with these -c commands on the target."""
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", s.expand(c)]
    _run_tool(s, [*argv, str(s.target)], "qemu-io")


@step("qemu-img", scalar=text, metavar="ARGS")
def _qemu_img(s: Session, args: str) -> None:
    """Run the real qemu-img with these arguments ($TARGET, $IMAGE, $TEST_DIR expanded)."""
    _run_tool(s, ["qemu-img", *s.expand(args).split()], "qemu-img")


@step("chmod", scalar=text, metavar="MODE")
def _chmod(s: Session, mode: str) -> None:
    """Run chmod(1) with a mode (u+x, 0600) on the target; print its errors and status."""
    _run_tool(s, ["chmod", mode, str(s.target)], "chmod")


def _run_tool(s: Session, argv: list[str], name: str) -> None:
    res = runs.run(argv, IO_TIMEOUT)
    for line in (res.stdout + res.stderr).splitlines():
        s.log(line)
    if res.returncode:
        s.log(f"{name}: exit {res.returncode}")


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
    fd = s.open(os.O_RDWR, f"truncate {length}")
    if fd is None:
        return
    try:
        os.ftruncate(fd, length)
        s.log(f"truncate {length}: ok")
    except OSError as e:
        s.log(f"truncate {length}: {errno_name(e.errno or 0)}")
    finally:
        os.close(fd)


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
    fd = s.open(os.O_RDWR, what)
    if fd is None:
        return
    try:
        fallocate(fd, mode, a["offset"], a["length"])
        s.log(f"{what}: ok")
    except OSError as e:
        s.log(f"{what}: {errno_name(e.errno or 0)}")
    finally:
        os.close(fd)


WHENCE = {"data": os.SEEK_DATA, "hole": os.SEEK_HOLE, "set": os.SEEK_SET, "end": os.SEEK_END}


@step("lseek", {"offset": (size, True), "whence": (choice(*WHENCE), True)})
def _lseek(s: Session, a: dict[str, Any]) -> None:
    """lseek(2) with SEEK_DATA/SEEK_HOLE/SEEK_SET/SEEK_END; print the result or errno."""
    fd = s.open(os.O_RDONLY, f"lseek {a['whence']} {a['offset']}")
    if fd is None:
        return
    try:
        s.log(
            f"lseek {a['whence']} {a['offset']}: {os.lseek(fd, a['offset'], WHENCE[a['whence']])}"
        )
    except OSError as e:
        s.log(f"lseek {a['whence']} {a['offset']}: {errno_name(e.errno or 0)}")
    finally:
        os.close(fd)


@step("map")
def _map(s: Session, _: None) -> None:
    """Print the data/hole map from SEEK_DATA/SEEK_HOLE, like qemu-img map."""
    fd = s.open(os.O_RDONLY, "map")
    if fd is None:
        return
    try:
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
    finally:
        os.close(fd)


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
    fd = s.open(os.O_RDWR, "fsync")
    if fd is None:
        return
    try:
        os.fsync(fd)
        s.log("fsync: ok")
    except OSError as e:
        s.log(f"fsync: {errno_name(e.errno or 0)}")
    finally:
        os.close(fd)


@step("dd", scalar=text, metavar="OPERANDS")
def _dd(s: Session, args: str) -> None:
    """Run dd with these operands ($TARGET, $IMAGE, $TEST_DIR expanded); print its report."""
    res = runs.run(["dd", *s.expand(args).split()], IO_TIMEOUT)
    for line in res.stderr.splitlines():
        s.log(line)
    s.log(f"dd: exit {res.returncode}")


FIO_FIELDS: Fields = {
    "rw": (choice("read", "write", "randread", "randwrite", "rw", "randrw"), True),
    "bs": (text, True),
    "size": (text, True),
    "offset": (text, False),
    "iodepth": (integer, False),
    "numjobs": (integer, False),
    "ioengine": (choice("libaio", "io_uring", "psync"), False),
    "direct": (boolean, False),
    "verify": (choice("crc32c", "md5", "pattern"), False),
}


@step("fio", FIO_FIELDS)
def _fio(s: Session, a: dict[str, Any]) -> None:
    """Run fio on the target; print the job, exit status, error count and bytes moved."""
    argv = [
        "fio",
        "--name=case",
        f"--filename={s.target}",
        f"--rw={a['rw']}",
        f"--bs={a['bs']}",
        f"--size={a['size']}",
        f"--iodepth={a.get('iodepth', 1)}",
        f"--numjobs={a.get('numjobs', 1)}",
        f"--ioengine={a.get('ioengine', 'libaio')}",
        f"--direct={int(a.get('direct', True))}",
        "--group_reporting",
        "--output-format=json",
    ]
    if "offset" in a:
        argv.append(f"--offset={a['offset']}")
    if "verify" in a:
        argv += [
            f"--verify={a['verify']}",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ]
        # Jobs verifying one region would overwrite each other's data.
        argv.append(f"--offset_increment={a['size']}")
    res = runs.run(argv, IO_TIMEOUT * 3, cwd=s.ctx.workdir)
    desc = " ".join(f"{k}={onoff(v)}" for k, v in a.items())
    try:
        job = json.loads(res.stdout[res.stdout.index("{") :])["jobs"][0]
        summary = (
            f"errors={job['error']} read={job['read']['io_bytes']} "
            f"written={job['write']['io_bytes']}"
        )
    except (ValueError, KeyError, IndexError):
        summary = "no report: " + (res.stderr.strip().splitlines() or ["?"])[-1]
    s.log(f"fio {desc}: exit {res.returncode} {summary}")


# -- background I/O and fault injection ------------------------------------


ARG_KEYS = ("offset", "length", "pattern")  # the client's positional arguments


@step(
    "background",
    {
        "name": (text, True),
        "op": (choice(*BACKGROUND_OPS), True),
        "offset": (size, False),
        "length": (size, False),
        "pattern": (byte, False),
    },
    export=False,
)
def _background(s: Session, a: dict[str, Any]) -> None:
    """Start a one-shot client (pread/pwrite/...) that may block; see wait."""
    args: list[int | str] = [a[k] for k in ARG_KEYS if k in a]
    s.background[a["name"]] = s.clients.spawn(a["op"], s.target, *args, cpu=s.cpu)
    shown = [f"0x{v:02x}" if k == "pattern" else str(v) for k, v in a.items() if k in ARG_KEYS]
    s.log(f"{a['name']}: started {a['op']} {' '.join(shown)}".rstrip())


@step("wait", scalar=text, metavar="NAME")
def _wait(s: Session, name: str) -> None:
    """Wait (bounded) for a background client; print what its syscall returned."""
    p = s.background.pop(name, None)
    if p is None:
        raise RuntimeError(f"no background client '{name}'")
    s.ctx.wait(lambda: p.poll() is not None, IO_TIMEOUT, f"background client {name}")
    s.log(f"{name}: {ClientPool.result(p)}")


@step(
    "hold",
    {"name": (text, True), "op": (op_arg, True), "offset": (size, False)},
    export=True,
    needs=("faults",),
)
def _hold(s: Session, a: dict[str, Any]) -> None:
    """Hold matching requests in the exporter until released (fault injection)."""
    rule = s.need_exporter().inject("hold", opcode=a["op"], offset=a.get("offset"))
    s.rules[a["name"]] = rule["id"]
    s.log(f"{a['name']}: holding {a['op']} requests")


@step(
    "fail",
    {
        "name": (text, False),
        "op": (op_arg, True),
        "errno": (errno_arg, False),
        "count": (positive, False),
        "offset": (size, False),
    },
    export=True,
    needs=("faults",),
)
def _fail(s: Session, a: dict[str, Any]) -> None:
    """Fail the next matching request(s) with an errno (default EIO, once)."""
    en = a.get("errno", "EIO")
    rule = s.need_exporter().inject(
        "fail", opcode=a["op"], errno=en, count=a.get("count", 1), offset=a.get("offset")
    )
    s.rules[a.get("name", rule["id"])] = rule["id"]
    s.log(f"failing {a.get('count', 1)} {a['op']} request(s) with {en}")


@step(
    "delay",
    {"op": (op_arg, True), "ms": (non_negative, True), "count": (positive, False)},
    export=True,
    needs=("faults",),
)
def _delay(s: Session, a: dict[str, Any]) -> None:
    """Delay the next matching request(s) by ms milliseconds."""
    s.need_exporter().inject("delay", opcode=a["op"], delay_ms=a["ms"], count=a.get("count", 1))
    s.log(f"delaying {a.get('count', 1)} {a['op']} request(s) by {a['ms']} ms")


@step(
    "wait-held",
    {"name": (text, True), "count": (non_negative, False)},
    export=True,
    needs=("faults",),
)
def _wait_held(s: Session, a: dict[str, Any]) -> None:
    """Wait (bounded) until a hold rule holds exactly count requests (default 1)."""
    count = a.get("count", 1)
    s.need_exporter().wait_held(s.rules[a["name"]], count, IO_TIMEOUT)
    s.log(f"{a['name']}: {count} held")


@step("release", scalar=text, export=True, metavar="NAME or all", needs=("faults",))
def _release(s: Session, name: str) -> None:
    """Release a hold rule by name, or every rule with 'all'."""
    rule_id = None if name == "all" else s.rules[name]
    s.log(f"{name}: released {s.need_exporter().release(rule_id)}")


# -- the exporter and the mount ------------------------------------------


@step("signal", scalar=choice(*SIGNALS), export=True, metavar="TERM, KILL or INT")
def _signal(s: Session, name: str) -> None:
    """Send SIGTERM, SIGKILL or SIGINT to the exporter."""
    s.need_exporter().signal(SIGNALS[name])
    s.log(f"sent SIG{name} to the exporter")


@step("wait-exit", export=True)
def _wait_exit(s: Session, _: None) -> None:
    """Wait (bounded) for the exporter to exit; print its status."""
    code = s.need_exporter().wait_exit(IO_TIMEOUT)
    if code < 0:
        s.log(f"exporter killed by {signal.Signals(-code).name}")
    else:
        s.log(f"exporter exited with status {code}")


@step("qmp", {"execute": (text, True), "arguments": (mapping, False)}, export=True)
def _qmp(s: Session, a: dict[str, Any]) -> None:
    """Send a command on the control socket; print the response as iotests does."""
    resp = s.need_exporter().qmp().cmd_raw(a["execute"], a.get("arguments"))
    resp.pop("id", None)
    s.log(json.dumps(resp, sort_keys=True))


@step("qmp-event", scalar=text, export=True, metavar="EVENT")
def _qmp_event(s: Session, name: str) -> None:
    """Wait (bounded) for a QMP event; print it without its timestamp, or that none came."""
    qmp = s.need_exporter().qmp()
    seen: list[str] = []

    def arrived() -> dict[str, Any] | None:
        event = qmp.pull_event(wait=False)
        if event is not None and event["event"] != name:
            seen.append(event["event"])
            return None
        return event

    try:
        event = s.ctx.wait(arrived, IO_TIMEOUT, f"QMP event {name}")
    except WaitTimeout:  # what the target did, for the transcript to show
        others = f" (others: {', '.join(seen)})" if seen else ""
        s.log(f"no {name} event within {IO_TIMEOUT:.0f} s{others}")
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
    s.need_exporter().wait_unmounted(IO_TIMEOUT)
    s.log("unmounted (mount table)")


@step("mounted", export=True)
def _mounted(s: Session, _: None) -> None:
    """Print whether the mount table lists our FUSE mount (the authoritative check)."""
    if s.exporter is not None and s.exporter.mount_id is not None:
        there = s.exporter.is_mounted()
    else:
        there = fuse_mounted(str(s.target))
    s.log(f"mount table: {'our FUSE mount is there' if there else 'no mount'}")


@step("df", export=True)
def _df(s: Session, _: None) -> None:
    """Run df on the target; print its errors and exit status (not authoritative)."""
    res = runs.run(["df", str(s.target)], IO_TIMEOUT)
    for line in res.stderr.splitlines():
        s.log(line)
    s.log(f"df: exit {res.returncode}")


@step("start-export", EXPORT_FIELDS, optional=True, export=True)
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
    export=True,
)
def _cycles(s: Session, a: dict[str, Any]) -> None:
    """Stop and restart the export count times, running steps in each cycle.

    Prints the cycle transcript once if every cycle printed the same, and
    whether the exporter's and the harness's fd and thread counts stayed the
    same.  The harness's counts are process-wide, so a case with cycles must
    be serial (it then runs alone).
    """
    assert s.settings is not None
    subs = [next(iter(d.items())) for d in a.get("steps", [])]
    outputs: list[list[str]] = []
    exporter_res, own_res = set(), []
    for _ in range(a["count"]):
        if s.exporter is not None and s.exporter.returncode() is None:
            s.exporter.stop(IO_TIMEOUT)
            s.exporter.cleanup()
        mark = s.ctx.mark()
        s.start_export()
        exp = s.need_exporter()
        s.run_steps(subs)
        exporter_res.add(_resources(exp.pid))
        s.log(f"stop: exporter exited with status {exp.stop(IO_TIMEOUT)}")
        exp.cleanup()
        outputs.append(s.ctx.take_since(mark))
        gc.collect()  # closed-but-unreferenced objects are not leaks
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


@step("pin", scalar=lambda v: None if v is None else non_negative(v), optional=True, metavar="CPU")
def _pin(s: Session, cpu: int | None) -> None:
    """Pin this case's I/O (and later background clients, dd, fio) to one CPU.

    Only the case thread is pinned, and it ends with the instance; exporters
    are started unpinned (Session.launch)."""
    if s.unpinned is None:
        s.unpinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, s.unpinned if cpu is None else {cpu})
    s.cpu = cpu
    s.log("unpinned" if cpu is None else f"pinned to CPU {cpu}")


@step(
    "show",
    {"what": (choice(*SHOW), True), "ops": (ops, False), "qids": (qid_list, False)},
    export=True,
    needs=("introspection",),
)
def _show(s: Session, a: dict[str, Any]) -> None:
    """Print the export's negotiation, ring layout, per-queue counters or size/flags."""
    info = s.need_exporter().query()
    what = a["what"]
    if what == "negotiation":
        n = info["negotiation"]
        s.log(f"kernel: protocol {n['kernel-major']}.{n['kernel-minor']}")
        s.log(f"kernel offers: {' '.join(n['offered-names'])}")
        s.log(f"reply: protocol 7.{n['minor']} {' '.join(n['replied-names'])}")
        s.log(f"max_write={n['max-write']} max_pages={n['max-pages']}")
        s.log(f"payload-size={info['payload-size']} transport={info['transport']}")
    elif what == "layout":
        s.log(f"cpus={info.get('possible-cpus', 0)} queues={len(info['queues'])}")
        layout = info.get("ring-layout", [])
        if "qids" in a:  # just these ring queues: the same on any CPU count
            for r in (r for r in layout if r["qid"] in a["qids"]):
                s.log(f"ring queue {r['qid']}: queue {r['queue']}, depth {r['depth']}")
            return
        owned: dict[int, list[int]] = {q["index"]: [] for q in info["queues"]}
        for r in layout:
            owned[r["queue"]].append(r["qid"])
        for q, qids in owned.items():
            s.log(f"queue {q}: ring queues {qids or 'none (idle)'}")
    elif what == "counters":
        names = a.get("ops", ["READ", "WRITE"])
        for q in info["queues"]:
            counts = " ".join(f"{op}={q['opcodes'].get(op, 0)}" for op in names)
            s.log(f"queue {q['index']}: {counts}")
    else:
        s.log(f"size={info['size']} writable={info['writable']} growable={info['growable']}")


@step("kernel-param", {"enable_uring": (choice("Y", "N"), True)})
def _kernel_param(s: Session, a: dict[str, Any]) -> None:
    """Set enable_uring for the rest of the instance (serial cases only); restored after."""
    before = read_param(ENABLE_URING)
    if before is None:
        raise RuntimeError(f"{ENABLE_URING} missing")
    s.ctx.defer(lambda: write_param(ENABLE_URING, before), "restore enable_uring")
    write_param(ENABLE_URING, a["enable_uring"])
    s.log(f"enable_uring={a['enable_uring']}")


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


def step_reference() -> str:
    """The vocabulary as Markdown, for the README (kept in sync by a test)."""
    lines = []
    for name in STEPS:
        sd = STEPS[name]
        if sd.fields:
            arg = "{" + ", ".join(k if req else f"{k}?" for k, (_, req) in sd.fields.items()) + "}"
        else:
            arg = sd.metavar
        mark = " (export)" if sd.export else ""
        arg = f"`{arg}`" if arg else ""
        lines.append(f"| `{name}` | {arg} | {sd.doc}{mark} |".replace("||", "| |"))
    return "\n".join(lines)


@step("exporter-log", scalar=text, export=True, metavar="TEXT", needs=("exporter-log",))
def _exporter_log(s: Session, needle: str) -> None:
    """Print the exporter's stderr lines that contain a string."""
    lines = [ln for ln in s.need_exporter().stderr().splitlines() if needle in ln]
    for line in lines or [f"(no exporter output containing {needle!r})"]:
        s.log(line)
