"""The one cleanup helper: every action runs, failures are reported, not raised."""

from __future__ import annotations

import os
import time
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


def test_a_registration_cannot_make_the_reaper_delete_a_foreign_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registration names only directories the harness makes; anything else
    it lists is left alone and reported, and a registry that is a symlink
    (someone else's) is not read at all."""
    import json

    from harness.iotests import runs

    victim = tmp_path / "src"
    victim.mkdir()
    (victim / "work.c").write_text("precious")
    ours = tmp_path / "fuse-iotests.abc"
    ours.mkdir()
    registry = tmp_path / "runs"
    registry.mkdir()
    state = {"pid": 999999999, "started": 0.0, "dirs": [str(victim), str(ours)]}
    (registry / "1-1.json").write_text(json.dumps(state))
    monkeypatch.setattr(runs, "STATE_DIR", registry)
    lines = runs.reap_stale()
    assert (victim / "work.c").read_text() == "precious"
    assert not ours.exists()
    assert any(f"removed directory {ours}" in ln for ln in lines)
    assert any(
        "could NOT remove" in ln and "not a directory the harness makes" in ln for ln in lines
    )
    link = tmp_path / "link"
    link.symlink_to(registry)
    monkeypatch.setattr(runs, "STATE_DIR", link)
    assert runs.reap_stale() == []  # not ours to read


def test_an_empty_cgroup_of_a_finished_run_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that finished while the kernel still held its cgroup (EBUSY
    after killing children) left an empty cgroup behind; the next run's
    reaping removes it, and leaves a live run's cgroup alone."""
    from harness.iotests import runs

    root = runs.cgroup2_root()
    if root is None:
        pytest.skip("not run: no writable cgroup v2 here")
    registry = tmp_path / "runs"
    registry.mkdir()
    monkeypatch.setattr(runs, "STATE_DIR", registry)
    orphan = root / f"{runs.CGROUP_PREFIX}test-orphan-{os.getpid()}"
    live = root / f"{runs.CGROUP_PREFIX}test-live-{os.getpid()}"
    (registry / f"test-live-{os.getpid()}.json").write_text("{}")
    # A live run registered elsewhere (another worker's state dir), before
    # it adopted a child: named after a pid that runs.
    elsewhere = root / f"{runs.CGROUP_PREFIX}{os.getpid()}-{time.time_ns()}"
    orphan.mkdir()
    live.mkdir()
    elsewhere.mkdir()
    try:
        lines = runs.reap_stale()
        assert not orphan.exists()
        assert f"cleanup: removed the empty cgroup {orphan} of a finished run" in lines
        assert live.exists() and elsewhere.exists()
    finally:
        for c in (orphan, live, elsewhere):
            if c.exists():
                c.rmdir()
