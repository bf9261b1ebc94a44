"""What a running case instance sees: its directory, transcript and cleanups.

YAML steps and Python cases both write through CaseContext.log(), so both
kinds produce the same kind of transcript.  Cleanups registered with
defer() run in reverse order on every exit path: pass, fail, timeout and
Ctrl-C.  On a timeout they run from another thread while the case thread
may still be blocked in a syscall, so a cleanup must be able to unblock it
(abort the FUSE connection, unmount, kill a child), not just close fds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from .cleanup import run_all
from .timeouts import Budget, scaled
from .waiting import wait_until

T = TypeVar("T")

UNBUDGETED = 20.0  # a wait outside a running body (scaled)


class NotRun(Exception):
    """Raised by a Python case: a requirement found missing at run time."""


class Cancelled(Exception):
    """The instance timed out or was interrupted; its case thread must stop."""


@dataclass(frozen=True)
class Instance:
    """One concrete run of a case: the case, a transport or `file`, params."""

    case_id: str
    mode: str  # "file" or "fuse"
    transport: str | None  # "legacy" or "uring" in fuse mode
    params: tuple[tuple[str, Any], ...] = ()
    target: str = ""  # the target's tag; "" for the reference exporter

    def on(self, target: str) -> Instance:
        """The same instance on another target (by its tag).  A -file instance
        runs on the image itself, whatever the target: it keeps no tag."""
        return self if self.mode == "file" else replace(self, target=target)

    @property
    def param_key(self) -> str:
        return ",".join(f"{k}={onoff(v)}" for k, v in self.params)

    @property
    def id(self) -> str:
        head = self.transport if self.mode == "fuse" else "file"
        if self.target:
            head = f"{self.target}-{head}"
        key = self.param_key
        return f"{self.case_id}[{head}-{key}]" if key else f"{self.case_id}[{head}]"


def onoff(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


class CaseContext:
    def __init__(self, instance: Instance, workdir: Path) -> None:
        self.instance = instance
        self.params: dict[str, Any] = dict(instance.params)
        self.workdir = workdir
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._cleaning = threading.Lock()
        self._cleanups: list[tuple[str, Callable[[], None], bool]] = []
        self.diagnostics: list[Callable[[], str]] = []
        # Set when the body failed or timed out: the cleanups then kill what
        # it started at once instead of asking it to stop (it may be hung).
        self.gave_up = False
        self.cancel_reason = ""
        self._cancelled = threading.Event()
        self.budget: Budget | None = None
        # Set once something ran out and gathers the report (see runner).
        self.reporting = threading.Event()

    def cancel(self, reason: str) -> None:
        """Stop the case thread at its next step (set before running cleanups,
        so a thread they unblock starts nothing new)."""
        if not self._cancelled.is_set():
            self.cancel_reason = reason
            self._cancelled.set()

    def check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled(self.cancel_reason)

    def log(self, line: str = "") -> None:
        with self._lock:
            self.lines.extend(str(line).split("\n"))

    def tail(self, n: int) -> list[str]:
        with self._lock:
            return self.lines[-n:]

    def take_since(self, mark: int) -> list[str]:
        """Remove and return the lines logged after len(lines) was mark."""
        with self._lock:
            taken = self.lines[mark:]
            del self.lines[mark:]
            return taken

    def mark(self) -> int:
        with self._lock:
            return len(self.lines)

    def defer(self, fn: Callable[[], None], what: str = "", target: bool = False) -> None:
        """Run fn at the end of the instance, whatever happens (last
        registered, first run; after a failure, what a target registered
        with target=True goes first: killing a hung server is what lets
        its stuck clients finish).

        Register before creating the resource; a cancelled instance refuses
        (raises Cancelled) so nothing is created after its cleanups ran."""
        self.check_cancelled()
        with self._lock:
            self._cleanups.append((what or getattr(fn, "__name__", "cleanup"), fn, target))

    def diagnose(self, fn: Callable[[], str]) -> None:
        """fn() is added to the report of a timeout or a failed wait."""
        self.diagnostics.append(fn)

    def report(self) -> str:
        self.reporting.set()
        parts = []
        for fn in self.diagnostics:
            try:
                parts.append(fn())
            except Exception as e:
                parts.append(f"<diagnostic failed: {e}>")
        return "\n".join(p for p in parts if p)

    def start_clock(self, timeout: float) -> None:
        """The instance's body starts now, with this (scaled) timeout."""
        self.budget = Budget(timeout)

    def bound(self, cap: float | None = None) -> float:
        """How long a wait may take now: what is left of the budget (see
        harness.iotests.timeouts), or a scaled default before it starts."""
        if self.budget is None:
            return scaled(cap if cap is not None else UNBUDGETED)
        return self.budget.bound(cap)

    def wait(
        self,
        condition: Callable[[], T],
        what: str,
        timeout: float | None = None,
        expected: bool = False,
    ) -> T:
        """A bounded poll (default: the budget's bound) that reports the
        instance's diagnostics on timeout, and stops at once when the
        instance is cancelled (Ctrl-C, timeout).  expected: a timeout the
        caller turns into a transcript line (no diagnostics to gather)."""

        def cond() -> T:
            self.check_cancelled()
            return condition()

        bound = self.bound() if timeout is None else timeout
        return wait_until(cond, bound, what, None if expected else self.report)

    def run_cleanups(self) -> list[str]:
        """Run (once) every deferred cleanup; return the errors they raised.

        A second caller (the runner, while Ctrl-C handling in another thread
        is still removing the exporter) waits until those cleanups are done."""
        with self._cleaning:
            with self._lock:
                todo, self._cleanups = self._cleanups[::-1], []
            if self.gave_up:
                todo.sort(key=lambda c: not c[2])  # stable: targets first, else LIFO
            outcome = run_all((f"cleanup {what}", fn) for what, fn, _ in todo)
            return outcome.failed

    @property
    def transcript(self) -> str:
        with self._lock:
            return "\n".join(self.lines) + "\n"
