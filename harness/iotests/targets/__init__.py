"""Targets: the FUSE export implementations the cases run against.

A target is one module in this package.  It defines NAMES (the names
`--target` accepts) and `detect(name, binary) -> Target`, which finds the
implementation, asks it what it can do and raises TargetError (one line)
when it cannot be used.  Capabilities are detected (QSD: from its QMP
schema), never assumed from a version.  Which instances a target cannot run
follows from the spec alone, what each step and export option declares it
needs (runner.target_problem), and is decided before an instance starts
anything, so nothing runs half-supported.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ...options import OPTIONS, Settings
from ..holds import Holds
from ..lifecycle import ExporterProcess

# What a target may be able to do beyond serving the mount, with the words
# a "not run" reason uses.
CAPABILITIES = {
    "faults": "fault injection",
    "introspection": "export introspection (negotiation, queues and ring layout in "
    "query-block-exports)",
    "exporter-log": "the reference exporter's log lines",
    "qmp": "QMP monitor (block-export-del, quit, events)",
    "io-uring": "FUSE-over-io_uring",
    "multi-queue": "multi-queue exports",
}
DEFAULT = "reference"


class TargetError(Exception):
    """The target cannot be used here; str() is one line for the user."""


@dataclass(frozen=True)
class Target:
    name: str  # "reference", "qsd": the tag in instance ids
    version: str
    capabilities: frozenset[str]
    options: frozenset[str] = field(default_factory=lambda: frozenset(o.key for o in OPTIONS))
    binary: str = ""
    # Which requests its fault steps can hold, and where they wait (with
    # the capability "faults").
    holds: Holds = field(default_factory=lambda: Holds("exporter"))
    # Options it lacks but always has one value of: an instance asking for
    # that value runs (without passing it), any other is not run.
    fixed: dict[str, Any] = field(default_factory=dict, hash=False)  # a Target is a dict key
    # Options of which it offers only some values (QSD's io-uring is a bool:
    # no auto); an instance asking for another value is not run.
    values: dict[str, tuple[Any, ...]] = field(default_factory=dict, hash=False)

    @property
    def label(self) -> str:
        """'qsd-7.2.22': what reasons and known-difference files name."""
        return f"{self.name}-{self.version}"

    @property
    def tag(self) -> str:
        """The target in instance ids: none for the reference, so ids and
        golden names stay as they are."""
        return "" if self.name == DEFAULT else self.name

    @property
    def starts_warm(self) -> bool:
        """Its exporters start from warm spares (targets/reference.py)."""
        return self.name == DEFAULT

    def settled(self) -> contextlib.AbstractContextManager[None]:
        """Held while the harness counts its own fds and threads: what the
        target's support code does in the background pauses meanwhile."""
        return contextlib.nullcontext()

    def lacks(self, needs: Iterable[str]) -> str | None:
        """Why capabilities `needs` are not all here, or None."""
        missing = sorted(set(needs) - self.capabilities)
        return f"target {self.label} has no {CAPABILITIES[missing[0]]}" if missing else None

    def holds_problem(self, ops: Iterable[str]) -> str | None:
        """Why its fault steps cannot reach requests of these opcodes, or None."""
        return self.holds.problem(self.label, ops)

    def settings_problem(self, settings: Settings) -> str | None:
        """Why this target cannot export with these settings, or None."""
        unknown = sorted(settings.explicit - self.options)
        for key in unknown:
            if key not in self.fixed:
                return f"target {self.label} has no export option '{key}'"
            if settings[key] != self.fixed[key]:  # the matrix narrows to its own value
                always = self.fixed[key]
                return f"target {self.label} has no export option '{key}' (always {always})"
        if settings["queues"] > 1 and "multi-queue" not in self.capabilities:
            return self.lacks({"multi-queue"})
        if settings["io-uring"] != "off" and "io-uring" not in self.capabilities:
            return self.lacks({"io-uring"})
        for key, offered in self.values.items():
            if settings[key] not in offered:
                return f"target {self.label} has no {key}={settings[key]}"
        return None

    def exporter(
        self, workdir: Path, mountpoint: Path, image: Path | None, settings: Settings
    ) -> ExporterProcess:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """For the fingerprint and report.json."""
        return {
            "name": self.name,
            "version": self.version,
            "binary": self.binary,
            "capabilities": sorted(self.capabilities),
            "options": sorted(self.options),
            "holds": self.holds.describe() if "faults" in self.capabilities else "",
        }


class NativeExporter(ExporterProcess):
    """The process of a target other than ours (QSD, the libfuse server):
    started for one image (None: the export is of null-co) and the option
    table's settings.  Native servers carry debug info: a hang report walks
    their threads with gdb."""

    backtraces = True

    def __init__(
        self, target: Target, workdir: Path, mountpoint: Path, image: Path | None,
        settings: Settings,
    ) -> None:  # fmt: skip
        super().__init__(workdir, mountpoint)
        self.target = target
        self.image = image
        self.settings = settings


def _modules() -> list[ModuleType]:
    return [
        importlib.import_module(f"{__name__}.{m.name}")
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_")
    ]


def names() -> list[str]:
    """Every name --target accepts."""
    return [n for mod in _modules() for n in mod.NAMES]


def kinds() -> list[str]:
    """Target.name of each target module: what a case's `targets:` lists."""
    return [mod.NAMES[0] for mod in _modules()]


_DETECTED: dict[tuple[str, str | None], Target] = {}


def resolve(name: str, binary: str | None = None) -> Target:
    """The target called name (binary: a path that overrides where it is)."""
    key = (name, binary)
    if key not in _DETECTED:
        for mod in _modules():
            if name in mod.NAMES:
                _DETECTED[key] = mod.detect(name, binary)
                break
        else:
            raise TargetError(f"unknown target '{name}' (known: {', '.join(names())})")
    return _DETECTED[key]
