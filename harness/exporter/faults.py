"""Fault injection: hold, fail, delay or stall requests that match a rule.

Rules are set over the control socket.  "stall" blocks the queue thread
itself until the rule is released, so the kernel must hand the next request
to another queue (how multiqueue is shown deterministically).  A held or delayed request is parked
here; when it is released (by a command, its timer, or a FUSE_INTERRUPT for
it) it is posted back to the queue that received it, because only that
queue's thread may reply on its fd or ring.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..kernel.abi import Op, op_name
from .protocol import Request

ACTIONS = ("hold", "fail", "delay", "stall")


class FaultError(ValueError):
    """A bad x-inject-fault command."""


@dataclass
class Rule:
    id: str
    action: str
    opcode: int
    offset: int | None = None
    errno: int = errno.EIO
    delay_ms: int = 0
    # Matches left; None means every match until the rule is released.
    remaining: int | None = None
    hits: int = 0
    released: threading.Event = field(default_factory=threading.Event, repr=False)
    stalled: int = 0

    def matches(self, req: Request) -> bool:
        return req.opcode == self.opcode and (self.offset is None or req.offset == self.offset)

    def as_dict(self, held: int) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "action": self.action,
            "opcode": op_name(self.opcode),
            "hits": self.hits,
            "held": held,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        if self.action == "fail":
            d["errno"] = errno.errorcode.get(self.errno, str(self.errno))
        if self.action == "delay":
            d["delay-ms"] = self.delay_ms
        if self.action == "stall":
            d["stalled"] = self.stalled
        if self.remaining is not None:
            d["remaining"] = self.remaining
        return d


class Poster(Protocol):
    """The queue that parked a request (transport.Queue): takes it back."""

    def post(self, d: Deferred) -> None: ...


@dataclass(eq=False)
class Deferred:
    """A request that the handler has not seen yet."""

    queue: Poster
    req: Request
    token: Any  # the transport's handle to reply on (e.g. a ring entry)
    rule: Rule
    result: int | None = None  # set to -EINTR when interrupted
    timer: threading.Timer | None = field(default=None, repr=False)


class FaultInjector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_id = 1
        # Read without the lock on the hot path: an empty list means no work.
        self.rules: list[Rule] = []
        self._parked: dict[int, Deferred] = {}  # by unique
        # Told how many rules there are whenever that changes: queue
        # processes (processes.py) read it from a shared page.
        self.on_change: Callable[[int], None] | None = None

    # -- control side -----------------------------------------------------

    def add(
        self,
        action: str,
        opcode: str,
        offset: int | None = None,
        errno_: int | str | None = None,
        delay_ms: int | None = None,
        count: int | None = None,
    ) -> Rule:
        if action not in ACTIONS:
            raise FaultError(f"unknown action '{action}', expected one of {', '.join(ACTIONS)}")
        try:
            op = Op[opcode.upper()]
        except KeyError:
            raise FaultError(f"unknown opcode '{opcode}'") from None
        err = _parse_errno(errno_) if errno_ is not None else errno.EIO
        if action == "delay" and (delay_ms is None or delay_ms < 0):
            raise FaultError("delay needs a non-negative 'delay-ms'")
        if count is None and action not in ("hold", "stall"):
            count = 1  # fail or delay one request unless told otherwise
        if count is not None and count < 1:
            raise FaultError("'count' must be at least 1")
        with self._lock:
            rule = Rule(f"f{self._next_id}", action, op, offset, err, delay_ms or 0, count)
            self._next_id += 1
            self.rules = [*self.rules, rule]
        self._changed()
        return rule

    def release(self, rule_id: str | None = None) -> int:
        """Remove a rule (all rules without an id) and release what it holds."""
        with self._lock:
            if rule_id is not None and not any(r.id == rule_id for r in self.rules):
                raise FaultError(f"no fault rule '{rule_id}'")
            gone = [r for r in self.rules if rule_id is None or r.id == rule_id]
            self.rules = [r for r in self.rules if r not in gone]
            freed = [d for d in self._parked.values() if rule_id is None or d.rule.id == rule_id]
            for d in freed:
                del self._parked[d.req.unique]
            stalled = sum(r.stalled for r in gone)
        self._changed()
        for r in gone:
            r.released.set()
        for d in freed:
            self._complete(d)
        return len(freed) + stalled

    def query(self) -> list[dict[str, Any]]:
        with self._lock:
            held: dict[str, int] = {}
            for d in self._parked.values():
                if d.rule.action == "hold":
                    held[d.rule.id] = held.get(d.rule.id, 0) + 1
            return [r.as_dict(held.get(r.id, 0)) for r in self.rules]

    @property
    def parked(self) -> int:
        return len(self._parked)

    # -- queue side -------------------------------------------------------

    def match(self, req: Request) -> Rule | None:
        for rule in self.rules:
            if rule.matches(req):
                with self._lock:
                    if rule.remaining is not None:
                        if rule.remaining == 0:
                            continue
                        rule.remaining -= 1
                    rule.hits += 1
                return rule
        return None

    def stall(self, rule: Rule) -> None:
        """Block the calling queue thread until the rule is released."""
        with self._lock:
            rule.stalled += 1
        rule.released.wait()
        with self._lock:
            rule.stalled -= 1

    def park(self, d: Deferred) -> None:
        with self._lock:
            live = d.rule in self.rules
            if live:
                self._parked[d.req.unique] = d
                if d.rule.action == "delay":
                    delay = d.rule.delay_ms / 1000
                    d.timer = threading.Timer(delay, self._expire, (d.req.unique,))
                    d.timer.daemon = True
                    d.timer.start()
        if not live:
            # Released between match() and here: nothing holds it any more.
            self._complete(d)

    def interrupt(self, unique: int) -> bool:
        """FUSE_INTERRUPT: a parked request finishes with EINTR."""
        with self._lock:
            d = self._parked.pop(unique, None)
        if d is None:
            return False
        d.result = -errno.EINTR
        self._complete(d)
        return True

    def shutdown(self) -> None:
        """Drop everything parked: the kernel aborts those requests."""
        with self._lock:
            for d in self._parked.values():
                if d.timer:
                    d.timer.cancel()
            self._parked.clear()
            for r in self.rules:
                r.released.set()
            self.rules = []
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(len(self.rules))

    def _expire(self, unique: int) -> None:
        with self._lock:
            d = self._parked.pop(unique, None)
        if d is not None:
            self._complete(d)

    @staticmethod
    def _complete(d: Deferred) -> None:
        if d.timer:
            d.timer.cancel()
        d.queue.post(d)


def _parse_errno(value: int | str) -> int:
    if isinstance(value, int):
        if value <= 0:
            raise FaultError("'errno' must be positive")
        return value
    code = getattr(errno, value.upper(), None)
    if not isinstance(code, int):
        raise FaultError(f"unknown errno '{value}'")
    return code
