"""Holding, delaying and failing requests, by whatever means a target has.

The fault steps (hold, fail, delay, wait-held, release) are target-neutral:
they name a FUSE opcode.  A target declares in a Holds which opcodes it can
act on and where the request then waits:

- "exporter": the reference exporter parks the request itself
  (x-inject-fault), after reading it from /dev/fuse or its ring;
- "block layer": a daemon built on a block layer (QSD) reads its image
  through the harness's NBD server (server.py), which holds the block
  request; the FUSE request stays in flight inside the daemon.

An instance whose fault steps name an opcode the target cannot act on is
"not run" with that reason, decided before it starts (runner).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Holds:
    """What a target's fault steps can reach."""

    where: str  # "exporter", "block layer"
    ops: frozenset[str] | None = None  # FUSE opcode names; None: every opcode

    def problem(self, label: str, ops: Iterable[str]) -> str | None:
        """Why this target cannot hold these opcodes, or None."""
        if self.ops is None:
            return None
        missing = sorted(set(ops) - self.ops)
        if not missing:
            return None
        return f"target {label} cannot hold {missing[0]} requests ({self.where} holds only)"

    def describe(self) -> str:
        ops = "any opcode" if self.ops is None else ",".join(sorted(self.ops))
        return f"{self.where} ({ops})"
