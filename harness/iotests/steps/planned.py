"""What the plan compiler (harness.iotests.plan) produces: Plan and PlannedStep.

They live with the steps because the session runs them; the compiler
above builds them from the case file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ...options import Settings
from ..context import Instance
from .vocabulary import StepDef

DEFAULT_IMAGE_SIZE = 1 << 20
DEFAULT_FILL = "offsets"


@dataclass(frozen=True)
class PlannedStep:
    """A step ready to run: its definition and converted argument."""

    defn: StepDef
    value: Any
    line: int
    steps: tuple[PlannedStep, ...] = ()  # a `cycles` step's own steps

    @property
    def name(self) -> str:
        return self.defn.name


@dataclass(frozen=True)
class Plan:
    """What one instance does, fully converted and checked."""

    instance: Instance
    steps: tuple[PlannedStep, ...] = ()
    image_size: int = DEFAULT_IMAGE_SIZE
    fill: str = DEFAULT_FILL
    settings: Settings | None = None  # the export's options; None: -file, Python cases
    start: bool = True  # start the export before the first step
    requires: dict[str, Any] = field(default_factory=dict)

    def all_steps(self) -> Iterator[PlannedStep]:
        """Every step, those inside cycles included."""
        return flatten(self.steps)

    @property
    def needs(self) -> frozenset[str]:
        """The target capabilities the steps need."""
        return frozenset().union(*(s.defn.needs for s in self.all_steps()))

    @property
    def fault_ops(self) -> frozenset[str]:
        """The opcodes its fault steps hold, fail or delay."""
        return frozenset(
            s.value["op"]
            for s in self.all_steps()
            if "faults" in s.defn.needs and isinstance(s.value, dict) and "op" in s.value
        )

    def export_settings(self) -> list[Settings]:
        """Every set of options an export of this plan starts with."""
        return export_settings(self.settings, self.steps)


def flatten(steps: tuple[PlannedStep, ...]) -> Iterator[PlannedStep]:
    for s in steps:
        yield s
        yield from s.steps


def export_settings(settings: Settings | None, steps: tuple[PlannedStep, ...]) -> list[Settings]:
    if settings is None:
        return []
    extra = [s.value for s in flatten(steps) if s.defn.starts_export and s.value]
    return [settings, *(settings.with_(e) for e in extra)]
