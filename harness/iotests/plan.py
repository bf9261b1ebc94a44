"""Per-instance plans: a case compiled once, at load time.

compile_plan() turns one instance of a spec (its matrix values substituted)
into a Plan of typed steps: every argument converted once, every step
checked against its StepDef's metadata, with the state the validator
tracks matching what the session will have when it runs: whether an export
is running, which background clients are defined and not yet waited for,
which fault rules exist.  The runner consumes plans and never reads the
raw YAML again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .context import Instance
from .steps import (
    CASE_DEFAULTS,
    CASE_EXPORT_FIELDS,
    IMAGE_FIELDS,
    STEPS,
    FieldError,
    StepDef,
    convert_fields,
)
from .steps.planned import (
    DEFAULT_FILL,
    DEFAULT_IMAGE_SIZE,
    Plan,
    PlannedStep,
    export_settings,
)


class PlanError(ValueError):
    """A step or block that cannot run; line points at it, key at a field."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class RawStep:
    """A step as the case file has it (matrix references not yet replaced)."""

    name: str
    arg: Any
    line: int


@dataclass
class _State:
    """What the session will have at a point of the steps."""

    exported: bool
    clients: set[str] = field(default_factory=set)  # defined, not yet waited for
    rules: set[str] = field(default_factory=set)
    waited: set[str] = field(default_factory=set)  # clients waited for


def compile_plan(
    instance: Instance,
    raw_steps: list[RawStep] | None,
    image: dict[str, Any],
    export: dict[str, Any],
    requires: dict[str, Any],
    serial: bool,
) -> Plan:
    """Compile one instance (raw_steps None: a Python case); raise PlanError."""
    img = _block(image, IMAGE_FIELDS, "image")
    exp = _block(export, CASE_EXPORT_FIELDS, "export")
    start = exp.pop("start", True)
    settings = None
    if instance.mode == "fuse" and raw_steps is not None:
        # The transport's io-uring is implied, not a choice of the case.
        io_uring = "on" if instance.transport == "uring" else "off"
        settings = CASE_DEFAULTS.with_({"io-uring": io_uring}, explicit=False).with_(exp)
    req = dict(requires)
    if instance.mode == "fuse":
        req.setdefault("root", True)
        req.setdefault("dev-fuse", True)
    if instance.transport == "uring" and settings is None:
        req["uring"] = True  # a Python case on the uring transport uses the ring itself
    steps: tuple[PlannedStep, ...] = ()
    if raw_steps is not None:
        state = _State(exported=instance.mode == "fuse" and start)
        steps = tuple(_compile(r, instance, serial, state, req, in_cycles=False) for r in raw_steps)
    # Per instance, from what its exports ask for: io-uring on needs the
    # ring; auto takes it where the kernel has it and falls back where not
    # (the path to test there); off needs /dev/fuse only.
    # With enable_uring=N (kernel-param) an export that asks for the ring
    # is to be refused: it needs no ring, not even a kernel that has one.
    modes = {s["io-uring"] for s in export_settings(settings, steps)}
    if "on" in modes and not req.get("uring-off"):
        req["uring"] = True
    elif "auto" in modes:
        req.setdefault("uring-if-available", True)
    return Plan(
        instance,
        steps,
        img.get("size", DEFAULT_IMAGE_SIZE),
        img.get("fill", DEFAULT_FILL),
        settings,
        start,
        req,
    )


def _block(block: dict[str, Any], fields: Any, name: str) -> dict[str, Any]:
    try:
        return convert_fields(block, fields)
    except FieldError as e:
        line = getattr(block, "key_lines", {}).get(e.key, getattr(block, "line", 1))
        raise PlanError(line, f"{name}: {e}") from None


def _compile(
    raw: RawStep,
    inst: Instance,
    serial: bool,
    state: _State,
    req: dict[str, Any],
    in_cycles: bool,
) -> PlannedStep:
    sd = STEPS.get(raw.name)

    def fail(msg: str) -> PlanError:
        return PlanError(raw.line, f"step '{raw.name}': {msg}")

    if sd is None:
        raise fail(f"unknown step (known: {', '.join(sorted(STEPS))})")
    if (sd.export or sd.fuse) and inst.mode == "file":
        raise fail("needs a FUSE export, so the case cannot have mode 'file'")
    if sd.serial and not serial:
        raise PlanError(raw.line, f"step '{raw.name}' needs the case to run alone: serial: true")
    if in_cycles and not sd.in_cycles:
        raise PlanError(raw.line, f"step '{raw.name}' cannot run inside cycles")
    try:
        value = sd.convert(raw.arg)
    except ValueError as e:
        raise fail(str(e)) from None
    if sd.export and not state.exported and not sd.starts_export:
        raise fail(
            "needs an export, and none is running here (export.start false, or after cycles)"
        )
    _use_names(sd, value, state, fail)
    nested: tuple[PlannedStep, ...] = ()
    if sd.nested is not None:
        # Each cycle runs a new exporter: rules of the old one do not apply.
        inner = _State(exported=True)
        subs = value.pop(sd.nested, [])
        nested = tuple(
            _compile(
                RawStep(str(n), a, getattr(sub, "line", 0) or raw.line),
                inst,
                serial,
                inner,
                req,
                in_cycles=True,
            )
            for sub in subs
            for n, a in sub.items()
        )
        if inner.clients:
            raise fail(f"background client(s) {', '.join(sorted(inner.clients))} not waited for")
    for k, v in sd.requirements(value).items():
        req[k] = max(req.get(k, v), v) if isinstance(v, int) and not isinstance(v, bool) else v
    if sd.starts_export:
        state.exported = True
    if sd.ends_export:
        state.exported = False
        state.rules.clear()  # they lived in the exporter that is gone
    return PlannedStep(sd, value, raw.line, nested)


def _use_names(sd: StepDef, value: Any, state: _State, fail: Any) -> None:
    """Names are defined before use; a client is waited for once."""
    if sd.refers is not None:
        use = sd.refers
        name = use.name_in(value)
        known = state.clients if use.kind == "client" else state.rules
        if use.kind == "client" and name in state.waited:
            raise fail(f"client {name!r} was waited for already")
        if name != use.all_word and name not in known:
            raise fail(f"no earlier step defines {use.kind} {name!r}")
        if use.consumes:
            known.discard(str(name))
            state.waited.add(str(name))
    if sd.defines is not None:
        use = sd.defines
        name = use.name_in(value)
        if name is None:
            return
        known = state.clients if use.kind == "client" else state.rules
        if use.kind == "client" and name in known:
            raise fail(f"client {name!r} is still running: wait for it first")
        known.add(name)
        if use.kind == "client":
            state.waited.discard(name)
