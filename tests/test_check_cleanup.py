"""Timeouts and Ctrl-C in tools/check: reports, and nothing left behind."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from harness.lifecycle import REPO, child_env
from harness.mount import mount_table
from harness.waiting import wait_until

STUCK = """\
# Guards: nothing; a test fixture that blocks on a held READ.
id: {case}
description: a foreground read that never completes
groups: [quick]
timeout: {timeout}
steps:
  - hold: {{name: h, op: read}}
  - echo: "about to block"
  - read: {{offset: 0, length: 4k}}
"""


def _suite(tmp_path: Path, case: str, timeout: int) -> list[str]:
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / f"{case}.yaml").write_text(STUCK.format(case=case, timeout=timeout))
    return [
        sys.executable, "-m", "harness.check", "--cases", str(tmp_path / "cases"),
        "--golden", str(tmp_path / "golden"), "--results", str(tmp_path / "res"),
    ]  # fmt: skip


def _mounts_of(case: str) -> list[str]:
    """Mounts of this case's instances only: tests may run in parallel."""
    return [
        e.mountpoint
        for e in mount_table()
        if e.fstype == "fuse.fuse-iotests" and f"/{case}-legacy." in e.mountpoint
    ]


def test_timeout_reports_stderr_and_stacks_then_cleans_up(tmp_path: Path) -> None:
    res = subprocess.run(
        _suite(tmp_path, "stuck-timeout", 2),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert res.returncode == 1
    out = res.stdout
    assert "stuck-timeout[legacy]" in out and " fail " in out
    assert "timed out after 2s" in out
    assert "about to block" in out  # the transcript so far
    assert "exporter stderr (tail):" in out
    assert "kernel stacks of exporter" in out
    assert "case thread, kernel stack:" in out
    assert "fuse" in out  # the case thread is blocked in the FUSE request path
    assert _mounts_of("stuck-timeout") == []


def test_ctrl_c_removes_exporters_and_mounts(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        _suite(tmp_path, "stuck-interrupt", 60),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        wait_until(lambda: _mounts_of("stuck-interrupt"), 20, "the stuck case's mount")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "Interrupted" in err
    assert _mounts_of("stuck-interrupt") == []
