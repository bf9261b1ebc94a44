"""One timeout policy.

A case's `timeout:` is the instance's whole budget, times the scale
(`--timeout-scale`, or FUSE_IOTESTS_TIMEOUT_SCALE, for slow machines and
VMs under TCG).  Every bounded wait inside the instance (a background
client, a held request, a QMP event, an external tool, an exporter's start)
gets what is left of that budget less a margin, so a wait that runs out
reports what it saw before the runner's own timeout has to stop a stuck
case thread.  Bounds outside an instance (cleanup, the harness's own
tests) are fixed figures, scaled alike.
"""

from __future__ import annotations

import os
import time

SCALE_ENV = "FUSE_IOTESTS_TIMEOUT_SCALE"
MIN_BOUND = 1.0  # however late, a wait gets this long


class BadScale(ValueError):
    pass


def parse_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadScale(f"timeout scale {text!r} is not a number") from None
    if not 0 < value <= 1000:
        raise BadScale(f"timeout scale {text!r} must be above 0 and at most 1000")
    return value


def scale() -> float:
    """The scale this process (and its children) use."""
    return parse_scale(os.environ.get(SCALE_ENV, "1"))


def set_scale(value: float) -> None:
    """Set the scale for this process and every process it starts."""
    os.environ[SCALE_ENV] = repr(parse_scale(str(value)))


def scaled(seconds: float) -> float:
    return seconds * scale()


class Budget:
    """An instance's time: started when its body starts."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        # Room for a wait's own report before the runner's hard timeout.
        self.margin = min(0.2 * timeout, scaled(5.0))

    def bound(self, cap: float | None = None) -> float:
        """How long a wait may take now: the time left less the margin,
        at most cap (scaled) when given."""
        left = max(self.deadline - time.monotonic() - self.margin, MIN_BOUND)
        return left if cap is None else min(left, scaled(cap))
