"""libfuse 3.18 as a target: its build, our server on it over both
transports, the outside check of the transport (for every target), and the
N-way differential."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.iotests import transport
from harness.iotests.diff import Agreement
from harness.iotests.fixtures import Exports
from harness.iotests.libfuse.build import build, default_prefix
from harness.iotests.lifecycle import REPO, child_env
from harness.iotests.runner import target_problem
from harness.iotests.spec import load_spec
from harness.iotests.targets import Target, libfuse, resolve
from harness.iotests.targets.qsd import FETCHED

LIBFUSE = default_prefix() / "bin" / "fuse-iotests-blk"


@pytest.fixture(scope="module")
def prefix() -> Path:
    """The cached build (tools/test builds it first; built here if not)."""
    return build()


def test_build_is_cached_and_has_io_uring(prefix: Path) -> None:
    started = time.monotonic()
    res = subprocess.run(
        [str(REPO / "tools" / "libfuse"), "build"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == str(prefix)
    assert time.monotonic() - started < 30  # from the cache: no apt, no compiler
    assert "#define HAVE_URING" in (prefix.parent / "build-libfuse" / "fuse_config.h").read_text()
    t = libfuse.detect("libfuse", None)
    assert t.version.startswith("3.18.") and t.capabilities == {"io-uring", "multi-queue"}
    assert t.lacks({"faults"}) == f"target libfuse-{t.version} has no fault injection"


def test_bad_source_is_one_line_and_status_1(tmp_path: Path) -> None:
    res = subprocess.run(
        [str(REPO / "tools" / "libfuse"), "build", "--source", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1
    # The last line: tools/setup may speak first (a new venv).
    last = res.stderr.splitlines()[-1]
    assert last == f"libfuse build: {tmp_path}: not a libfuse tree (no meson.build)"


@pytest.mark.parametrize("mode", ["off", "on"])
def test_libfuse_serves_the_image_and_the_check_sees_its_transport(
    prefix: Path, exports: Exports, mode: str, request: pytest.FixtureRequest
) -> None:
    if mode == "on":
        request.getfixturevalue("uring_kernel")
    img = exports.image(256 << 10)
    exp = exports.start(img, target=resolve("libfuse"), io_uring=mode, writable=True)
    fd = os.open(exp.mountpoint, os.O_RDWR)
    try:
        os.pwrite(fd, b"libfuse" * 8, 4096)
        assert os.pread(fd, 56, 4096) == b"libfuse" * 8
    finally:
        os.close(fd)
    assert img.read_bytes()[4096 : 4096 + 56] == b"libfuse" * 8
    threads = {Path(f"/proc/{exp.pid}/task/{t}/comm").read_text().strip()
               for t in os.listdir(f"/proc/{exp.pid}/task")}  # fmt: skip
    reason = transport.served_over_dev_fuse(exp.pids(), exp.mountpoint)
    if mode == "on":
        assert reason is None and "fuse-ring-0" in threads
    else:
        assert reason is not None and "serves over /dev/fuse" in reason
        assert not any(t.startswith("fuse-ring") for t in threads)
    assert exp.stop() == 0
    exp.wait_unmounted()


def test_check_sees_the_reference_on_dev_fuse(exports: Exports) -> None:
    exp = exports.start(io_uring="off")
    reason = transport.served_over_dev_fuse(exp.pids(), exp.mountpoint)
    assert reason == "asked for FUSE-over-io_uring but serves over /dev/fuse (no io_uring fd)"


@pytest.mark.skipif(not FETCHED.exists(), reason="QSD 11.1 not fetched (tools/qsd fetch)")
def test_check_is_not_fooled_by_rings_that_serve_something_else(exports: Exports) -> None:
    """QSD 11.1 runs its event loop on io_uring (5 rings here) but serves
    FUSE over /dev/fuse: what its processes write decides, not its fds."""
    exp = exports.start(target=resolve("qsd-11.1"), queues=2)
    assert transport.uring_fds(exp.pids()) > 0
    reason = transport.served_over_dev_fuse(exp.pids(), exp.mountpoint)
    assert reason is not None and "32 GETATTR replies: the exporter wrote" in reason


def check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "harness.iotests.check", "--results", str(tmp_path / "res")]
    return subprocess.run(
        [*argv, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=child_env()
    )


@pytest.mark.usefixtures("fuse_root", "uring_kernel", "prefix")
def test_a_silent_fallback_to_dev_fuse_fails_the_instance(tmp_path: Path) -> None:
    """libfuse cannot set up rings of 65536 entries (io_uring's limit is
    32768), logs it and serves over /dev/fuse; the instance fails so."""
    cases = tmp_path / "cases"
    cases.mkdir()
    golden = tmp_path / "golden"
    shutil.copytree(REPO / "golden", golden)
    (cases / "fallback.yaml").write_text(
        "# Guards: the transport check (tests/test_libfuse.py).\n"
        "id: fallback\ndescription: x\ngroups: [quick]\n"
        "export: {io-uring: 'on', ring-depth: 65536}\nsteps:\n  - stat: [size]\n"
    )
    (golden / "fallback.out").write_text("QA output created by fallback\nsize=1048576\n")
    res = check(tmp_path, "--cases", str(cases), "--golden", str(golden),
                "--target", "libfuse", "-fuse", "fallback")  # fmt: skip
    assert res.returncode == 1, res.stdout
    assert "asked for FUSE-over-io_uring but serves over /dev/fuse (no io_uring fd)" in res.stdout


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("export-del", "target libfuse-3.18.3 has no QMP monitor (block-export-del, quit, events)"),
        ("race-faults", "target libfuse-3.18.3 has no fault injection"),
        ("rw-patterns", None),
    ],
)
def test_what_libfuse_cannot_run_names_the_capability(case: str, reason: str | None) -> None:
    spec = load_spec(next((REPO / "cases").glob(f"{case}.*")))
    inst = next(i for i in spec.instances() if i.transport == "uring").on("libfuse")
    caps = frozenset({"io-uring", "multi-queue"})
    target = Target("libfuse", "3.18.3", caps, libfuse.OPTIONS)
    assert target_problem(spec, spec.plan(inst), target) == reason


def _t(name: str) -> Target:
    return Target(name, "1", frozenset())


def test_agreements_are_sorted_by_kind() -> None:
    ref, lf, q = _t("reference"), _t("libfuse"), _t("qsd")
    assert Agreement(((ref, lf, q),)).kind(ref) == ""
    assert Agreement(((ref,), (lf,))).kind(ref) == "differ"
    assert Agreement(((ref,), (lf,), (q,))).kind(ref) == "all differ"
    assert Agreement(((ref,), (lf, q))).kind(ref) == "the others agree, the reference differs"
    assert Agreement(((ref, q), (lf,))).kind(ref) == "one against the rest (libfuse-1)"
    assert Agreement(((lf,), (ref, q))).kind(lf) == "one against the rest (libfuse-1)"
    four = Agreement(((ref, lf), (q, _t("qsd-series"))))
    assert four.kind(ref) == "split"


@pytest.mark.usefixtures("fuse_root", "prefix")
@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="no qemu-storage-daemon")
def test_three_targets_print_who_agrees(tmp_path: Path) -> None:
    res = check(tmp_path, "--diff-targets", "reference,libfuse,qsd", "-fuse",
                "rw-seek", "rw-patterns", "export-del")  # fmt: skip
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "rw-patterns[legacy]" in out and "same" in out.split("rw-patterns[legacy]")[-1][:20]
    # QSD answers SEEK_HOLE at EOF otherwise (golden/known/qsd.yaml): one against the rest.
    assert "agree: reference-" in out and "| qsd-" in out
    assert "Disagreements: 1 one against the rest (qsd-" in out
    assert "export-del[legacy]" in out and "not run on libfuse-" in out
    assert "No unlisted differences" in out
