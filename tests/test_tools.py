"""The commands under tools/ work as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from harness.cli import PIPE_CLOSED
from harness.iotests.lifecycle import REPO


def test_tools_export_version_and_bad_option() -> None:
    ok = subprocess.run([REPO / "tools/export", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("fuse-iotests exporter ")
    bad = subprocess.run([REPO / "tools/export", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[-1].startswith("export: ")


@pytest.mark.usefixtures("fuse_root")
def test_tools_demo_passes() -> None:
    res = subprocess.run([REPO / "tools/demo"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "image holds the written bytes" in res.stdout


def _closed_stdout(
    argv: list[str], timeout: float, unbuffered: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run argv with a stdout pipe whose reader is gone already (| head).
    Python's stdout is buffered by default: the write that fails is the
    flush at the end, unless PYTHONUNBUFFERED makes it the first print."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(
            argv, stdout=w, stderr=subprocess.PIPE, text=True, timeout=timeout, env=env
        )
    finally:
        os.close(w)


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "-n"],
        ["check", "--help"],
        ["bench", "--help"],
        ["compare", "--help"],
        ["demo", "--help"],
        ["export", "--help"],
        ["export", "--version"],
        ["stress", "--help"],
        ["qsd", "--help"],
    ],
    ids=" ".join,
)
def test_tools_end_quietly_on_a_closed_pipe(argv: list[str]) -> None:
    res = _closed_stdout([str(REPO / "tools" / argv[0]), *argv[1:]], timeout=120)
    assert (res.returncode, res.stderr) == (PIPE_CLOSED, "")


def test_check_list_ends_quietly_on_its_first_unbuffered_print() -> None:
    res = _closed_stdout([str(REPO / "tools/check"), "-n"], timeout=120, unbuffered=True)
    assert (res.returncode, res.stderr) == (PIPE_CLOSED, "")


@pytest.mark.usefixtures("fuse_root")
def test_check_run_stops_quietly_when_its_reader_goes(tmp_path: Path) -> None:
    """The instance that found the pipe closed is cleaned up and reported;
    no other instance starts.  tools/compare on its report ends quietly too."""
    argv = [REPO / "tools/check", "-fuse", "-g", "quick", "--results", tmp_path]
    res = _closed_stdout([str(a) for a in argv], timeout=300)
    assert (res.returncode, res.stderr) == (PIPE_CLOSED, "")
    report = tmp_path / "report.json"
    assert [r["status"] for r in json.loads(report.read_text())["results"]] == ["pass"]
    res = _closed_stdout([str(REPO / "tools/compare"), str(report), str(report)], timeout=120)
    assert (res.returncode, res.stderr) == (PIPE_CLOSED, "")
