"""The one cleanup helper: every action runs, failures are reported, not raised."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.iotests.cleanup import run_all
from harness.iotests.lifecycle import TRACKER, ExporterProcess, Tracker


def test_run_all_isolates_failures_and_says_what_it_removed() -> None:
    ran = []

    def boom() -> None:
        ran.append("boom")
        raise OSError(16, "Device or resource busy")

    outcome = run_all(
        [
            ("first", lambda: ran.append("first") or ["mount /a"]),
            ("second", boom),
            ("third", lambda: ran.append("third") or ["process 7"]),
        ]
    )
    assert ran == ["first", "boom", "third"]
    assert outcome.removed == ["mount /a", "process 7"]
    assert outcome.failed == ["second: OSError: [Errno 16] Device or resource busy"]
    assert not outcome.ok


class _Broken(ExporterProcess):
    """An exporter whose control socket cannot be closed."""

    def close_qmp(self) -> None:
        raise RuntimeError("socket wedged")


def test_a_failed_exporter_cleanup_keeps_it_registered(tmp_path: Path) -> None:
    """The exporter leaves TRACKER only when nothing of it is left, so the
    end-of-run cleanup still sees it; the other exporters are cleaned up."""
    broken = _Broken(tmp_path, tmp_path / "mp")
    fine = ExporterProcess(tmp_path, tmp_path / "mp2")
    tracker = Tracker()
    for e in (broken, fine):
        tracker.add(e)
        TRACKER.add(e)
    try:
        with pytest.raises(RuntimeError, match="close QMP: RuntimeError: socket wedged"):
            broken.cleanup()
        assert broken in TRACKER._live
        outcome = tracker.cleanup_all()
        assert outcome.failed == [
            f"exporter {tmp_path.name}: RuntimeError: close QMP: RuntimeError: socket wedged"
        ]
        assert fine not in TRACKER._live
    finally:
        TRACKER.discard(broken)
        TRACKER.discard(fine)
