"""Filters, golden selection, diffs, and tools/check end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.context import Instance
from harness.filters import FILTERS, FilterEnv, apply_filters
from harness.golden import candidates, compare, find_reference
from harness.lifecycle import REPO, child_env

ENV = FilterEnv("/tmp/x/inst", "/tmp/x/inst/disk.fuse", "/tmp/x/inst/disk.img")


FILTER_CASES = [
    ("df: /tmp/x/inst/disk.fuse: gone", "df: TEST_IMG: gone"),
    ("qemu-io /tmp/x/inst/disk.img", "qemu-io TEST_IMG"),
    ("see /tmp/x/inst/export0/qmp.sock", "see TEST_DIR/export0/qmp.sock"),
    (
        "4 KiB, 1 ops; 00.00 sec (6.852 MiB/sec and 1754.2105 ops/sec)",
        "4 KiB, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)",
    ),
    (
        "8192 bytes (8.2 kB, 8.0 KiB) copied, 0.00123 s, 6.7 MB/s",
        "8192 bytes (8.2 kB, 8.0 KiB) copied, TIME, RATE",
    ),
    ("exporter pid 4242 stuck", "exporter pid PID stuck"),
    ("kernel: protocol 7.45", "kernel: protocol 7.MINOR"),
    ("cpus=64 queues=2", "cpus=NCPUS queues=2"),
    ("client: error ECONNABORTED", "client: error ENOTCONN|ECONNABORTED"),
    ("client: error ENOTCONN", "client: error ENOTCONN|ECONNABORTED"),
    (
        "kernel offers: ASYNC_READ POSIX_LOCKS INIT_EXT SOME_FUTURE_FLAG OVER_IO_URING",
        "kernel offers: ASYNC_READ INIT_EXT OVER_IO_URING",
    ),
    ("wrote 4096/4096 bytes at offset 0", "wrote 4096/4096 bytes at offset 0"),
]


# Numbered ids: flag names in ids would make `pytest -k uring` pick these up.
@pytest.mark.parametrize(
    ("raw", "filtered"), FILTER_CASES, ids=[f"line{i}" for i in range(len(FILTER_CASES))]
)
def test_filters(raw: str, filtered: str) -> None:
    assert apply_filters(raw, ENV) == filtered


def test_every_filter_is_named_and_documented() -> None:
    names = [f.name for f in FILTERS]
    assert len(names) == len(set(names))
    assert all(f.doc for f in FILTERS)


def test_golden_selection_precedence(tmp_path: Path) -> None:
    inst = Instance("eof", "fuse", "uring", (("growable", False),))
    assert [p.name for p in candidates(tmp_path, inst, True, False)] == [
        "eof[growable=off].uring.out",
        "eof[growable=off].no-uring.out",
        "eof[growable=off].out",
    ]
    # Shared goldens ignore the transport: legacy, uring and file share one.
    assert [p.name for p in candidates(tmp_path, inst, False, True)] == ["eof[growable=off].out"]
    plain = tmp_path / "eof[growable=off].out"
    plain.write_text("x\n")
    assert find_reference(tmp_path, inst, True, False) == plain
    variant = tmp_path / "eof[growable=off].no-uring.out"
    variant.write_text("y\n")
    assert find_reference(tmp_path, inst, True, False) == variant
    assert find_reference(tmp_path, inst, True, True) == plain  # kernel has io_uring
    first = tmp_path / "eof[growable=off].uring.out"
    first.write_text("z\n")
    assert find_reference(tmp_path, inst, True, False) == first


def test_compare_writes_bad_and_diff_or_regenerates(tmp_path: Path) -> None:
    golden = tmp_path / "g" / "c.out"
    golden.parent.mkdir()
    golden.write_text("a\nb\n")
    ok = compare(golden, "a\nb\n", tmp_path / "res", "c-legacy", regen=False)
    assert ok.ok and ok.bad is None
    bad = compare(golden, "a\nB\n", tmp_path / "res", "c-legacy", regen=False)
    assert not bad.ok
    assert bad.bad == tmp_path / "res" / "c-legacy.out.bad"
    assert bad.bad.read_text() == "a\nB\n"
    assert "-b\n+B\n" in bad.diff
    regen = compare(golden, "a\nB\n", tmp_path / "res", "c-legacy", regen=True)
    assert regen.ok and golden.read_text() == "a\nB\n"


# -- tools/check end to end -------------------------------------------------


def check(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "harness.check", "--cases", str(tmp_path / "cases")]
    argv += ["--golden", str(tmp_path / "golden"), "--results", str(tmp_path / "res"), *args]
    return subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**child_env(), **(env or {})},
    )


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    """A copy of one real case and its golden file."""
    (tmp_path / "cases").mkdir()
    (tmp_path / "golden").mkdir()
    shutil.copy(REPO / "cases" / "rw-patterns.yaml", tmp_path / "cases")
    shutil.copy(REPO / "golden" / "rw-patterns.out", tmp_path / "golden")
    return tmp_path


def test_check_passes_and_writes_json_and_junit(suite: Path) -> None:
    res = check(suite, "-file")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("KERNEL       -- ")
    assert any(line.startswith("FUSE         -- ") for line in lines)
    assert any(line.startswith("rw-patterns[file]") and " pass " in line for line in lines)
    assert lines[-1] == "Passed all 1 iotests"
    report = json.loads((suite / "res" / "report.json").read_text())
    assert report["summary"] == {"pass": 1, "fail": 0, "not run": 0}
    assert report["fingerprint"]["kernel"]
    assert report["results"][0]["id"] == "rw-patterns[file]"
    junit = ET.parse(suite / "res" / "junit.xml").getroot()
    assert junit.get("tests") == "1" and junit.get("failures") == "0"


def test_changed_golden_line_fails_with_out_bad_and_diff(suite: Path) -> None:
    golden = suite / "golden" / "rw-patterns.out"
    golden.write_text(golden.read_text().replace("size=1048576", "size=1048577"))
    res = check(suite, "-file")
    assert res.returncode == 1
    bad = suite / "res" / "rw-patterns-file.out.bad"
    assert "size=1048576" in bad.read_text()
    assert "-size=1048577\n+size=1048576\n" in res.stdout
    assert "rw-patterns[file]" in res.stdout.splitlines()[-2]  # Failures: ...
    assert res.stdout.splitlines()[-1] == "Failed 1 of 1 iotests"
    junit = ET.parse(suite / "res" / "junit.xml").getroot()
    assert junit.get("failures") == "1"


def test_regen_rewrites_the_golden(suite: Path) -> None:
    golden = suite / "golden" / "rw-patterns.out"
    original = golden.read_text()
    golden.write_text("stale\n")
    res = check(suite, "-file", env={"FUSE_IOTESTS_REGEN": "1"})
    assert res.returncode == 0
    assert golden.read_text() == original


def test_dry_run_lists_instances_per_mode(suite: Path) -> None:
    assert check(suite, "-n", "-file").stdout == "rw-patterns[file]\n"
    assert check(suite, "-n").stdout == "rw-patterns[legacy]\n"
    uring = check(suite, "-n", "-fuse", env={"FUSE_OVER_IO_URING": "1"})
    assert uring.stdout == "rw-patterns[uring]\n"
    assert check(suite, "-n", "-x", "rw").stdout == ""
    assert check(suite, "-n", "-g", "race").stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-bogus"], "check: unrecognized arguments: -bogus"),
        (["-j", "0"], "check: -j must be at least 1"),
        (["no-such-case"], "check: no such case for this mode: no-such-case"),
    ],
)
def test_bad_command_lines_give_one_line(suite: Path, args: list[str], message: str) -> None:
    res = check(suite, *args)
    assert res.returncode == 1
    assert res.stderr == message + "\n"
    assert not (suite / "res").exists()


def test_a_bad_spec_stops_the_run_before_anything_runs(suite: Path) -> None:
    (suite / "cases" / "broken.yaml").write_text("# Guards: x\nid: broken\n")
    res = check(suite, "-file")
    assert res.returncode == 1
    assert res.stderr == f"check: {suite}/cases/broken.yaml:2: missing required key 'description'\n"
    assert res.stdout == ""


def test_missing_requirement_is_not_run(suite: Path) -> None:
    case = suite / "cases" / "rw-patterns.yaml"
    case.write_text(case.read_text().replace("modes:", "requires: {cpus: 4096}\nmodes:"))
    res = check(suite, "-file")
    assert res.returncode == 0
    assert "rw-patterns[file]  not run" in res.stdout
    assert "needs 4096 possible CPUs" in res.stdout
    assert "Not run: rw-patterns[file]" in res.stdout
    assert res.stdout.splitlines()[-1] == "Passed all 0 iotests"
