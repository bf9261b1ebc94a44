"""Warm spares: the reference exporter's start from a pre-imported process."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness.iotests.fixtures import Exports
from harness.iotests.lifecycle import REPO, child_env
from harness.iotests.targets.reference import SPARES, exporter_argv
from harness.iotests.timeouts import scaled
from harness.patterns import offset_pattern


def _idle_pid() -> int | None:
    """The idle spare once it is ready (the keeper starts it off our path)."""
    if not SPARES.wait_ready(scaled(30)):
        return None
    return SPARES.idle_pids()[0]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _read(mp: Path) -> bytes:
    with open(mp, "rb") as f:
        return f.read(4096)


@pytest.fixture(autouse=True)
def spares_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about spares, even in a run that turns them off."""
    monkeypatch.delenv("FUSE_IOTESTS_SPARE", raising=False)


@pytest.mark.usefixtures("fuse_root")
def test_the_next_export_runs_in_the_warm_spare(exports: Exports) -> None:
    first = exports.start(null_size="1M")
    spare = _idle_pid()
    assert spare is not None and spare != first.pid
    first.stop()
    second = exports.start(exports.image(), exports.mountpoint("b.fuse"))
    assert second.pid == spare
    # It serves the image it was told about.
    assert _read(second.mountpoint) == offset_pattern(0, 4096)
    assert second.stop() == 0
    assert "--spare" in Path(f"/proc/{_idle_pid()}/cmdline").read_text()


@pytest.mark.usefixtures("fuse_root")
def test_spares_off_and_spares_of_another_environment(
    exports: Exports, monkeypatch: pytest.MonkeyPatch
) -> None:
    exports.start(null_size="1M").stop()
    spare = _idle_pid()
    assert spare is not None
    # The environment changed since the spare started: not used, ended.
    monkeypatch.setenv("FUSE_IOTESTS_TEST_MARK", "1")
    exp = exports.start(null_size="1M", mountpoint=exports.mountpoint("c.fuse"))
    assert exp.pid != spare and _gone(spare)
    exp.stop()
    monkeypatch.setenv("FUSE_IOTESTS_SPARE", "0")
    SPARES.close_all()
    exp = exports.start(null_size="1M", mountpoint=exports.mountpoint("d.fuse"))
    assert _idle_pid() is None and SPARES.idle_pids() == []
    assert "--spare" not in Path(f"/proc/{exp.pid}/cmdline").read_text()
    exp.stop()


def test_close_all_ends_idle_spares() -> None:
    pid = _idle_pid()  # starts one if there is none
    assert pid is not None and not _gone(pid)
    removed = SPARES.close_all()
    assert removed == [f"spare exporter pid {pid}"]
    assert _gone(pid) and SPARES.idle_pids() == []


def test_a_spare_nobody_needs_exits_quietly_at_eof() -> None:
    res = subprocess.run(
        [*exporter_argv(), "--spare"],
        cwd=REPO,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=scaled(30),
    )
    assert (res.returncode, res.stdout, res.stderr) == (0, b"ready\n", b"")


def test_a_spare_reports_bad_options_like_a_cold_start(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    msg = b'{"argv": ["--bogus"], "stderr": "%s"}\n' % os.fsencode(err)
    res = subprocess.run(
        [*exporter_argv(), "--spare"],
        cwd=REPO,
        env=child_env(),
        input=msg,
        capture_output=True,
        timeout=scaled(30),
    )
    cold = subprocess.run(
        [*exporter_argv(), "--bogus"], cwd=REPO, env=child_env(), capture_output=True
    )
    assert res.returncode == cold.returncode == 1
    assert err.read_bytes() == cold.stderr and err.read_bytes().startswith(b"export: ")
