"""tools/bench: its statistics, its fio job files, its bad input, and one real
(short) run.  Never timed: figures are printed, not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.exporter.affinity import ALONE, SAME_SOURCE, FollowClient
from harness.exporter.polling import POLL_MAX_NS, POLL_START_NS, AdaptivePoll
from harness.iotests.bench import fio
from harness.iotests.bench.fio import BenchError
from harness.iotests.bench.stats import Spread, paired_ratios, rotate
from harness.iotests.lifecycle import REPO, child_env
from harness.kernel import abi
from harness.kernel.mount import mount_table

BENCH = [sys.executable, "-m", "harness.iotests.bench"]


def test_spread_median_quartiles_and_range() -> None:
    s = Spread.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.n, s.median, s.low, s.high, s.q1, s.q3) == (5, 3.0, 1.0, 5.0, 2.0, 4.0)
    one = Spread.of([7.0])
    assert (one.median, one.low, one.high, one.q1, one.q3) == (7.0, 7.0, 7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        Spread.of([])


def test_paired_ratios_are_per_repetition() -> None:
    assert paired_ratios([2.0, 3.0, 1.0], [1.0, 3.0, 0.0]) == [2.0, 1.0, float("inf")]
    with pytest.raises(ValueError, match="unpaired"):
        paired_ratios([1.0], [1.0, 2.0])


def test_rotation_puts_each_exporter_first_once() -> None:
    peers = ["classic", "io_uring", "qsd"]
    firsts = [rotate(peers, k)[0] for k in range(len(peers))]
    assert sorted(firsts) == sorted(peers)
    assert all(sorted(rotate(peers, k)) == sorted(peers) for k in range(5))


def test_job_files_are_the_seed_matrix() -> None:
    cells = fio.load_cells()
    assert [(c.name, c.iodepth, c.numjobs) for c in cells] == [
        ("qd1-jobs1", 1, 1),
        ("qd1-jobs4", 1, 4),
        ("qd64-jobs1", 64, 1),
        ("qd64-jobs4", 64, 4),
    ]
    for c in cells:  # what docs/bench.md promises: plain fio can run them
        text = c.jobfile.read_text()
        for line in ("rw=randrw", "rwmixread=70", "bs=4k", "ioengine=libaio", "direct=1"):
            assert line in text.splitlines(), (c.jobfile, line)


def test_bad_job_file_and_unknown_cell(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match=r"no cell .qd2-jobs9.*cells: qd1-jobs1"):
        fio.load_cell("qd2-jobs9")
    (tmp_path / "bad.fio").write_text("[global]\nrw=randrw\n[a]\niodepth=x\nnumjobs=1\n")
    with pytest.raises(BenchError, match="must be integers"):
        fio.load_cell("bad", tmp_path)
    (tmp_path / "two.fio").write_text("[a]\niodepth=1\nnumjobs=1\n[b]\niodepth=1\nnumjobs=1\n")
    with pytest.raises(BenchError, match="one job section, found 2"):
        fio.load_cell("two", tmp_path)


def test_fio_output_parsed_from_a_real_run(tmp_path: Path) -> None:
    """A real fio run of a repository job file on a plain file."""
    target = tmp_path / "disk"
    target.write_bytes(b"")
    os.truncate(target, 1 << 30)
    try:  # the job files ask for direct I/O; some scratch file systems refuse it
        os.close(os.open(target, os.O_RDONLY | os.O_DIRECT))
    except OSError as e:
        pytest.skip(f"{tmp_path} refuses O_DIRECT: {e.strerror}")
    s = fio.run_cell(fio.load_cell("qd1-jobs4"), target, 1)
    assert s.iops > 0 and s.ios > 0 and s.lat_us > 0 and s.p99_us > 0
    assert s.iops == pytest.approx(s.read_iops + s.write_iops)
    # randrw 70/30
    assert 0.6 < s.read_iops / s.iops < 0.8


def test_bad_options_give_one_line_and_mount_nothing(tmp_path: Path) -> None:
    # The bench makes its directories (and mounts) under TMPDIR: a private
    # one must stay empty (the global mount table changes with other tests).
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**child_env(), "TMPDIR": str(scratch)}
    cases = [
        (["--plot", str(tmp_path / "out.gif")], 2, "must end in .png or .svg"),
        (["--json", str(tmp_path / "nodir" / "x.json")], 2, "no directory"),
        (["--repeat", "0"], 2, "must be positive"),
        (["--cells", "qd1-jobs1,nope"], 1, "bench: no cell 'nope'"),
        (
            ["--no-qsd", "--peers", "classic,qsd-9"],
            1,
            "bench: --peers: no row qsd-9 (rows: classic",
        ),
    ]
    for args, code, text in cases:
        res = subprocess.run([*BENCH, *args], cwd=REPO, capture_output=True, text=True, env=env)
        assert res.returncode == code, (args, res.stderr)
        assert text in res.stderr.strip().splitlines()[-1], (args, res.stderr)
        assert res.stdout == "", args
    assert list(scratch.iterdir()) == []
    assert not [e for e in mount_table() if str(scratch) in e.mountpoint]


def test_follow_client_pins_for_one_synchronous_client() -> None:
    applied: list[set[int]] = []
    a = FollowClient([0, 1], {0, 1}, apply=applied.append)
    for _ in range(SAME_SOURCE + 1):
        a.observe(1, 1, 100)
    assert applied == [{1}] and a.pinned_to == 1
    # Requests pile up: roam again, once.
    for _ in range(30):
        a.observe(8, 1, 100)
    assert applied == [{1}, {0, 1}] and a.pinned_to is None


def test_follow_client_polls_for_a_client_that_hops_between_cpus() -> None:
    applied: list[set[int]] = []
    a = FollowClient([0, 1], {0, 1}, apply=applied.append)
    for _ in range(SAME_SOURCE + 1):
        a.observe(1, 0, 100)
    assert applied == [{0}] and a.synchronous
    # A few requests from the other CPU: still one synchronous client, still pinned.
    for _ in range(3):
        a.observe(1, 1, 100)
    assert applied == [{0}] and a.synchronous
    # It stays there: followed.
    for _ in range(SAME_SOURCE):
        a.observe(1, 1, 100)
    assert applied == [{0}, {1}] and a.pinned_to == 1
    # Another task: neither pinned nor polling.
    a.observe(1, 1, 200)
    assert applied == [{0}, {1}, {0, 1}] and not a.synchronous


def test_follow_client_roams_for_clients_on_several_cpus() -> None:
    applied: list[set[int]] = []
    a = FollowClient([0, 1], {0, 1}, apply=applied.append)
    for k in range(50):
        a.observe(1, k % 2, 100)
    assert applied == [] and a.pinned_to is None
    assert a.synchronous  # one task hopping at every request: polled, not pinned
    # Two clients on one CPU taking turns: roaming too.
    for k in range(200):
        a.observe(1, 0, 100 + k % 2)
    assert applied == [] and a.pinned_to is None
    # Never pins outside what the process may use.
    b = FollowClient([0, 1], {0}, apply=applied.append)
    for _ in range(10):
        b.observe(1, 1, 100)
    assert applied == [] and b.pinned_to is None


def test_follow_client_tells_concurrent_load_from_a_client_alone() -> None:
    a = FollowClient([0, 1], {0, 1}, apply=lambda cpus: None)
    for _ in range(ALONE):  # the first wakeup has no task to compare with
        a.observe(1, 1, 100)
    assert a.synchronous and not a.alone and not a.concurrent
    a.observe(1, 1, 100)
    assert a.alone
    # Two tasks taking turns, one request per wakeup or both in one.
    for k in range(10):
        a.observe(1, 1, 100 + k % 2)
    assert a.concurrent and not a.synchronous and not a.alone
    b = FollowClient([0, 1], {0, 1}, apply=lambda cpus: None)
    for _ in range(10):
        b.observe(2, 0, 100, first_pid=200)
    assert b.concurrent
    # Requests in batches from one task: concurrent too.
    c = FollowClient([0, 1], {0, 1}, apply=lambda cpus: None)
    for _ in range(30):
        c.observe(8, 0, 100)
    assert c.concurrent
    # Ring queues moved: concurrent or alone is judged afresh; pinning and
    # polling keep their evidence (the client did not change).
    d = FollowClient([0, 1], {0, 1}, apply=lambda cpus: None)
    for _ in range(ALONE + 1):
        d.observe(1, 1, 100)
    assert d.alone and d.pinned_to == 1
    d.forget_load()
    assert not (d.alone or d.concurrent) and d.synchronous and d.pinned_to == 1
    d.observe(1, 1, 100)
    assert d.pinned_to == 1 and not d.alone


def test_adaptive_poll_grows_to_the_gap_and_shrinks_after_long_waits() -> None:
    p = AdaptivePoll()
    windows = []
    for _ in range(6):
        p.slept(40_000)  # a client that comes back after 40 us
        windows.append(p.window_ns)
    assert windows[0] == POLL_START_NS
    assert windows == sorted(windows) and windows[-1] == POLL_MAX_NS > 40_000
    # A client that went to another CPU for a while: halved, and regrown.
    p.slept(POLL_MAX_NS + 1)
    assert p.window_ns == POLL_MAX_NS // 2
    p.slept(40_000)
    assert p.window_ns == POLL_MAX_NS
    # Long waits go on: polling would not catch them, stop.
    shrunk = []
    for _ in range(5):
        p.slept(POLL_MAX_NS + 1)
        shrunk.append(p.window_ns)
    assert shrunk == [32_000, 16_000, 8_000, 4_000, 0] and p.sleeps == 13
    assert p.as_dict() == {"window-ns": 0, "caught": 0, "sleeps": 13}


def test_uring_header_structs_match_the_two_halves() -> None:
    """The hot path's single pack/unpack equals the two structs it replaces."""
    hdr = bytearray(abi.URING_HEADER_SIZE)
    abi.URING_REPLY.pack_into(hdr, 0, 16 + 5, -2, 77, 0, 9, 5, 0, 0)
    assert hdr[:16] == abi.OUT_HEADER.pack(21, -2, 77)
    off = abi.URING_ENT_IN_OUT_OFFSET
    assert hdr[off:] == abi.URING_ENT_IN_OUT.pack(0, 9, 5, 0, 0)
    req = bytearray(abi.URING_HEADER_SIZE)
    abi.IN_HEADER.pack_into(req, 0, 40, 15, 3, 1, 0, 0, 42, 0, 0)
    abi.URING_ENT_IN_OUT.pack_into(req, off, 0, 11, 4096, 0, 0)
    f = abi.URING_REQUEST.unpack_from(req)
    assert (f[1], f[2], f[6], f[10], f[11]) == (15, 3, 42, 11, 4096)


@pytest.mark.usefixtures("fuse_root")
def test_a_short_real_run_writes_every_sample(tmp_path: Path) -> None:
    """Both transports, one cell, two repetitions: the JSON holds a sample per
    (repetition, exporter), the plot is written, and the last stdout line is
    the ratio line scripts read."""
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    args = ["--no-qsd", "--repeat", "2", "--runtime", "1", "--cells", "qd1-jobs1"]
    args += ["--startup", "2", "--json", str(out), "--plot", str(png)]
    res = subprocess.run([*BENCH, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    peers = [p["label"] for p in report["peers"]]
    assert peers[0] == "classic"
    assert len(report["samples"]) == 2 * len(peers)
    assert all(s["iops"] > 0 and s["cpu_us"] > 0 for s in report["samples"])
    assert {s["rep"] for s in report["samples"]} == {0, 1}
    assert all(len(v["samples"]) == 2 for v in report["startup"].values())
    assert "repetition 2/2" in res.stderr
    last = res.stdout.strip().splitlines()[-1]
    if "io_uring" in peers:
        ratio = report["ratios"]["qd1-jobs1"]
        assert last == f"io_uring/classic IOPS: {ratio['median']:.2f}"
        assert len(ratio["values"]) == 2
    else:
        assert last == "io_uring/classic IOPS: not run"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
