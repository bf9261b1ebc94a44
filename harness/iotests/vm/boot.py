"""What the host (run.py) and the guest entry point (guest.py) agree on.

The guest prints MARKER first; the host times the boot by it.  Both sides
time the same import of the runner, and the ratio is the guest's slowdown.
Kept light (stdlib only): the guest imports it before it prints the marker.
"""

from __future__ import annotations

import subprocess
import sys
import time

MARKER = "VM-GUEST-UP"
IMPORT_PROBE = "import harness.iotests.check"
IMPORT_BOUND = 600.0  # ~0.2 s on the host, ~10 s under TCG


def import_time(python: str = sys.executable) -> float:
    """Seconds to start Python and import the runner (best of three)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.monotonic()
        subprocess.run([python, "-c", IMPORT_PROBE], check=True, timeout=IMPORT_BOUND)
        best = min(best, time.monotonic() - t0)
    return best
