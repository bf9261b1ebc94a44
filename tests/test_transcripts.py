"""Filters, golden selection, diffs, and tools/check end to end."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.iotests.context import Instance
from harness.iotests.filters import FILTERS, FilterEnv, apply_filters
from harness.iotests.golden import candidates, compare, find_reference
from harness.iotests.lifecycle import REPO, child_env

ENV = FilterEnv("/tmp/x/inst", "/tmp/x/inst/disk.fuse")


FILTER_CASES = [
    ("df: /tmp/x/inst/disk.fuse: gone", "df: TEST_IMG: gone"),
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
    ("reply: protocol 7.45 INIT_EXT", "reply: protocol 7.MINOR INIT_EXT"),
    ("cpus=64 queues=2", "cpus=NCPUS queues=2"),
    ("client: error ECONNABORTED", "client: error ENOTCONN|ECONNABORTED"),
    ("client: error ENOTCONN", "client: error ENOTCONN|ECONNABORTED"),
    (
        "c: read error ECONNABORTED, close error ENOTCONN",
        "c: read error ENOTCONN|ECONNABORTED, close error ENOTCONN|ECONNABORTED",
    ),
    ("c: read ok 4096, close ok", "c: read ok 4096, close ok"),
    (
        "kernel offers: ASYNC_READ POSIX_LOCKS INIT_EXT SOME_FUTURE_FLAG OVER_IO_URING",
        "kernel offers: ASYNC_READ INIT_EXT OVER_IO_URING",
    ),
    ("wrote 4096/4096 bytes at offset 0", "wrote 4096/4096 bytes at offset 0"),
    # What the filters must leave alone:
    ("export: queue 0: all ring entries ended with ENOTCONN",) * 2,
    ("umount: ENOTCONN",) * 2,
    ("queue 1: WRITE=2 possible cpus 2",) * 2,
    ("reply protocol is 7.45",) * 2,
    ("data 65536+65536",) * 2,
    # With -fuse the image itself is not the target.
    ("see /tmp/x/inst/disk.img", "see TEST_DIR/disk.img"),
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
    argv = [sys.executable, "-m", "harness.iotests.check", "--cases", str(tmp_path / "cases")]
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


@pytest.mark.usefixtures("fuse_root")
def test_check_passes_and_writes_json_and_junit(suite: Path) -> None:
    res = check(suite, "-file")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("KERNEL       -- ")
    assert any(line.startswith("FUSE         -- protocol 7.") for line in lines)
    assert any(line.startswith("SCRATCH      -- ") for line in lines)
    assert any(line.startswith("rw-patterns[file]") and " pass " in line for line in lines)
    assert lines[-1] == "Passed all 1 iotests"
    report = json.loads((suite / "res" / "report.json").read_text())
    assert report["summary"] == {
        "pass": 1, "fail": 0, "not run": 0, "xfail": 0, "xpass": 0,
        "xfail-difference": 0, "xfail-defect": 0,
    }  # fmt: skip
    assert report["fingerprint"]["kernel"]
    assert report["results"][0]["id"] == "rw-patterns[file]"
    junit = ET.parse(suite / "res" / "junit.xml").getroot()
    assert junit.get("tests") == "1" and junit.get("failures") == "0"


@pytest.mark.usefixtures("fuse_root")
@pytest.mark.parametrize(
    ("args", "env", "instance"),
    [
        (["-file"], {}, "rw-patterns-file"),
        (["-fuse"], {}, "rw-patterns-legacy"),
        pytest.param(
            ["-fuse"], {"FUSE_OVER_IO_URING": "1"}, "rw-patterns-uring", marks=pytest.mark.uring
        ),
    ],
    ids=["file", "legacy", "uring"],
)
def test_changed_golden_line_fails_with_out_bad_and_diff(
    suite: Path, args: list[str], env: dict[str, str], instance: str
) -> None:
    golden = suite / "golden" / "rw-patterns.out"
    golden.write_text(golden.read_text().replace("size=1048576", "size=1048577"))
    res = check(suite, *args, env=env)
    assert res.returncode == 1
    bad = suite / "res" / f"{instance}.out.bad"
    assert "size=1048576" in bad.read_text()
    assert "-size=1048577\n+size=1048576\n" in res.stdout
    assert res.stdout.splitlines()[-2].startswith("Failures: rw-patterns[")
    assert res.stdout.splitlines()[-1] == "Failed 1 of 1 iotests"
    junit = ET.parse(suite / "res" / "junit.xml").getroot()
    assert junit.get("failures") == "1"


@pytest.mark.usefixtures("fuse_root")
def test_parallel_jobs_pass_in_their_own_directories(suite: Path) -> None:
    for case in ("rw-seek", "race-kill", "eof-dd"):
        shutil.copy(REPO / "cases" / f"{case}.yaml", suite / "cases")
    for golden in (REPO / "golden").glob("*.out"):
        if golden.name.startswith(("rw-seek", "race-kill", "eof-dd")):
            shutil.copy(golden, suite / "golden")
    res = check(suite, "-fuse", "-j", "2")
    assert res.returncode == 0, res.stdout
    report = json.loads((suite / "res" / "report.json").read_text())
    assert [r["id"] for r in report["results"]] == [
        "eof-dd[legacy-growable=off]",
        "eof-dd[legacy-growable=on]",
        "race-kill[legacy-queues=1]",
        "race-kill[legacy-queues=2]",
        "rw-patterns[legacy]",
        "rw-seek[legacy]",
    ]
    assert {r["status"] for r in report["results"]} == {"pass"}
    # Overlapping instances: some started before another ended.
    spans = sorted((r["start"], r["end"]) for r in report["results"])
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))


@pytest.mark.usefixtures("fuse_root")
def test_debug_shows_the_exporters_stderr(suite: Path) -> None:
    shutil.copy(REPO / "cases" / "negotiation-disabled.yaml", suite / "cases")
    for golden in (REPO / "golden").glob("negotiation-disabled[[]*"):
        shutil.copy(golden, suite / "golden")
    quiet = check(suite, "-fuse", "negotiation-disabled")
    assert quiet.returncode == 0, quiet.stdout
    assert "    | " not in quiet.stdout
    res = check(suite, "-fuse", "-d", "negotiation-disabled")
    assert res.returncode == 0, res.stdout
    assert "    | export: System doesn't support FUSE-over-io_uring" in res.stdout
    assert (
        "    | warning: FUSE-over-io_uring not offered by the kernel; using /dev/fuse" in res.stdout
    )


@pytest.mark.usefixtures("fuse_root")
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


@pytest.mark.usefixtures("fuse_root")
def test_missing_requirement_is_not_run(suite: Path) -> None:
    case = suite / "cases" / "rw-patterns.yaml"
    case.write_text(case.read_text().replace("modes:", "requires: {cpus: 4096}\nmodes:"))
    res = check(suite, "-file")
    assert res.returncode == 0
    assert "rw-patterns[file]  not run" in res.stdout
    assert "needs 4096 possible CPUs" in res.stdout
    assert "Not run: rw-patterns[file]" in res.stdout
    assert res.stdout.splitlines()[-1] == "Passed all 0 iotests"


@pytest.mark.usefixtures("fuse_root")
def test_python_case_can_report_not_run(suite: Path) -> None:
    (suite / "cases" / "pyprobe.py").write_text(
        '"""A Python case that finds a requirement missing at run time."""\n\n'
        "# Guards: nothing; a test fixture.\n"
        "from harness.iotests.context import NotRun\n\n"
        "SPEC = {'id': 'pyprobe', 'description': 'd', 'groups': ['quick'], 'modes': ['file']}\n\n\n"
        "def run(ctx):\n"
        "    ctx.log('checking')\n"
        "    raise NotRun('the widget is missing')\n"
    )
    res = check(suite, "-file", "pyprobe")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "pyprobe[file]  not run" in res.stdout
    assert "    the widget is missing" in res.stdout
