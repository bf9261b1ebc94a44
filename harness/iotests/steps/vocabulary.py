"""The step vocabulary: argument types, step definitions and their registry.

A step is `name: argument` in a case.  Its definition (StepDef) holds
everything the rest of the harness needs to know about it, in one place:
how its argument converts, and the metadata the plan compiler
(harness.iotests.plan), the requirement check (runner) and the docs'
table generator (readme) read: whether it needs an export, the case to run alone, which
names it defines or refers to, whether it may run inside `cycles`, which
target capabilities and which external programs it needs.  The step bodies
live in the concern modules beside this one and register with @step.
"""

from __future__ import annotations

import errno as errno_mod
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ...kernel import abi
from ...options import OPTIONS, Settings, boolean, choice, parse_size
from ...patterns import IMAGE_FILLS
from ..targets import CAPABILITIES

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


# -- step definitions -------------------------------------------------------

# The names steps define and refer to: background clients and fault rules.
NAME_KINDS = ("client", "rule")
# External programs a step can run: requirement key -> program (the
# requirement check in runner.missing_requirement looks them up on PATH).
TOOLS = {"fio": "fio", "qemu-io": "qemu-io", "qemu-img": "qemu-img"}


@dataclass(frozen=True)
class NameUse:
    """A step defining or referring to a client or rule name: the argument
    itself (field None) or one of its fields."""

    kind: str  # one of NAME_KINDS
    field: str | None = None
    consumes: bool = False  # `wait`: a client is waited for once
    all_word: str | None = None  # `release: all` names every rule

    def name_in(self, value: Any) -> str | None:
        if self.field is None:
            return None if value is None else str(value)
        return (
            None
            if not isinstance(value, dict) or self.field not in value
            else str(value[self.field])
        )


# A step body, called with the Session and the converted argument.  The
# session is not named here: it runs planned steps, so it sits above this.
StepBody = Callable[[Any, Any], None]
Body = TypeVar("Body", bound=StepBody)


@dataclass(frozen=True)
class StepDef:
    """One step type: its argument, what it needs, and its body."""

    name: str
    run: StepBody
    doc: str = ""
    fields: Fields | None = None  # a mapping argument
    scalar: Callable[[Any], Any] | None = None  # a scalar argument
    optional: bool = False  # the argument may be left out
    metavar: str = ""
    # Where it can run.
    export: bool = False  # acts on the exporter: -fuse only, after an export started
    fuse: bool = False  # -fuse only, export running or not
    serial: bool = False  # the case must run alone (serial: true)
    in_cycles: bool = True  # may be one of a `cycles` step's steps
    starts_export: bool = False  # an export may be running afterwards
    ends_export: bool = False  # no export is running afterwards
    nested: str | None = None  # the field holding steps of its own (cycles)
    # Names.
    defines: NameUse | None = None
    refers: NameUse | None = None
    # What it needs of the target and of the machine.
    needs: frozenset[str] = frozenset()  # target capabilities (targets.CAPABILITIES)
    tools: tuple[str, ...] = ()  # external programs (TOOLS)
    requires: Callable[[Any], dict[str, Any]] | None = None  # from the argument (pin: cpus)
    check: Callable[[Any], None] | None = None  # more checks of the converted argument

    def convert(self, arg: Any) -> Any:
        """The argument converted and checked; ValueError if it is bad."""
        if arg is None and (self.optional or (self.fields is None and self.scalar is None)):
            value = convert_fields({}, self.fields) if self.fields else None
        elif self.fields is not None:
            value = convert_fields(arg, self.fields)
        elif self.scalar is not None:
            value = self.scalar(arg)
        else:
            raise ValueError("takes no argument")
        if self.check is not None:
            self.check(value)
        return value

    def requirements(self, value: Any) -> dict[str, Any]:
        """What running this step (with this argument) requires of the machine."""
        req: dict[str, Any] = {tool: True for tool in self.tools}
        if self.requires is not None:
            req.update(self.requires(value))
        return req

    def flags(self) -> list[str]:
        """The metadata, as the step table of docs/writing-cases.md shows it."""
        out = []
        if self.export:
            out.append("export")
        elif self.fuse:
            out.append("-fuse only")
        if self.serial:
            out.append("serial cases only")
        if not self.in_cycles:
            out.append("not in cycles")
        if self.defines:
            out.append(f"defines a {self.defines.kind}")
        if self.refers:
            out.append(f"refers to a {self.refers.kind}")
        out += [f"needs {n}" for n in sorted(self.needs)]
        out += [f"runs {t}" for t in self.tools]
        return out


STEPS: dict[str, StepDef] = {}


def step(name: str, fields: Fields | None = None, **meta: Any) -> Callable[[Body], Body]:
    """Register a step body under name, with its StepDef metadata."""
    meta["needs"] = frozenset(meta.get("needs", ()))
    assert meta["needs"] <= set(CAPABILITIES), meta["needs"]
    assert set(meta.get("tools", ())) <= set(TOOLS), meta.get("tools")
    assert name not in STEPS, f"step {name} registered twice"

    def register(fn: Body) -> Body:
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        STEPS[name] = StepDef(name, fn, doc, fields, **meta)
        return fn

    return register


def step_reference() -> str:
    """The vocabulary as Markdown, for docs/writing-cases.md (kept in sync by a test)."""
    lines = []
    for name in sorted(STEPS):
        sd = STEPS[name]
        if sd.fields:
            arg = "{" + ", ".join(k if req else f"{k}?" for k, (_, req) in sd.fields.items()) + "}"
        else:
            arg = sd.metavar
        arg = f"`{arg}`" if arg else " "
        flags = "; ".join(sd.flags()) or " "
        lines.append(f"| `{name}` | {arg} | {sd.doc} | {flags} |")
    return "\n".join(lines)
