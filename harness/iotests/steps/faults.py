"""Background clients and fault injection: the steps that make races deterministic.

A background client is a one-shot process that may block in the kernel
(a request held by a hold rule); `wait` collects what its syscall returned.
An idle client (`open-idle`) holds the target open with nothing in flight
until `wait` lets it read once and close.
hold / fail / delay / wait-held / release drive the exporter's fault
injection over QMP (x-inject-fault).
"""

from __future__ import annotations

import select
import subprocess
from typing import Any

from ...options import choice, positive
from ..client import ClientPool
from .session import Session
from .vocabulary import NameUse, byte, errno_arg, non_negative, op_arg, size, step, text

# What a background client can do with offset/length/pattern arguments.
BACKGROUND_OPS = {"pread": 2, "pwrite": 2, "fsync": 0, "stat": 0}


def _background_args(value: dict[str, Any]) -> None:
    given = len([k for k in ("offset", "length") if k in value])
    if given != BACKGROUND_OPS[value["op"]]:
        raise ValueError(
            f"{value['op']} takes offset and length"
            if given < 2
            else f"{value['op']} takes no offset or length"
        )
    if "pattern" in value and value["op"] != "pwrite":
        raise ValueError("only pwrite takes a pattern")


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
    defines=NameUse("client", "name"),
    check=_background_args,
)
def _background(s: Session, a: dict[str, Any]) -> None:
    """Start a one-shot client (pread/pwrite/...) that may block; see wait."""
    args: list[int | str] = [a[k] for k in ARG_KEYS if k in a]
    s.background[a["name"]] = s.clients.spawn(a["op"], s.target, *args, cpu=s.cpu)
    shown = [f"0x{v:02x}" if k == "pattern" else str(v) for k, v in a.items() if k in ARG_KEYS]
    s.log(f"{a['name']}: started {a['op']} {' '.join(shown)}".rstrip())


@step("open-idle", scalar=text, export=True, metavar="NAME", defines=NameUse("client"))
def _open_idle(s: Session, name: str) -> None:
    """Start a client that opens the target and keeps it open, idle; see wait."""
    p = s.clients.spawn("idle", s.target, cpu=s.cpu, stdin=subprocess.PIPE)
    s.background[name] = p
    assert p.stdout is not None
    out = p.stdout
    # "open", or the error its open(2) got (the client then exits)
    line = s.wait(
        lambda: select.select([out], [], [], 0)[0] and (out.readline().strip() or "exited"),
        f"idle client {name} to open the target",
    )
    s.log(f"{name}: {line}")


@step("wait", scalar=text, metavar="NAME", refers=NameUse("client", consumes=True))
def _wait(s: Session, name: str) -> None:
    """Wait (bounded) for a background client; print what its syscall returned.
    An idle client now reads 4 KiB at offset 0 and closes; both are printed."""
    p = s.background.pop(name)
    ClientPool.go_on(p)
    s.wait(lambda: p.poll() is not None, f"background client {name}")
    s.log(f"{name}: {ClientPool.result(p)}")


@step(
    "hold",
    {"name": (text, True), "op": (op_arg, True), "offset": (size, False)},
    export=True,
    needs=("faults",),
    defines=NameUse("rule", "name"),
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
    defines=NameUse("rule", "name"),  # unnamed: nothing refers to it
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
    refers=NameUse("rule", "name"),
)
def _wait_held(s: Session, a: dict[str, Any]) -> None:
    """Wait (bounded) until a hold rule holds exactly count requests (default 1)."""
    count = a.get("count", 1)
    s.need_exporter().wait_held(s.rules[a["name"]], count, s.bound())
    s.log(f"{a['name']}: {count} held")


@step(
    "release",
    scalar=text,
    export=True,
    metavar="NAME or all",
    needs=("faults",),
    refers=NameUse("rule", all_word="all"),
)
def _release(s: Session, name: str) -> None:
    """Release a hold rule by name, or every rule with 'all'."""
    rule_id = None if name == "all" else s.rules[name]
    s.log(f"{name}: released {s.need_exporter().release(rule_id)}")
