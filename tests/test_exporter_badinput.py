"""Bad input: one line on stderr, exit 1, nothing mounted, image untouched."""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.iotests.targets.reference import run_exporter
from harness.kernel.mount import find_mount
from harness.layout import possible_cpus


def fingerprint(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\x5a" * 65536)
    mp = tmp_path / "disk.fuse"
    mp.touch()
    (tmp_path / "dir").mkdir()
    return {"img": img, "mp": mp, "dir": tmp_path / "dir", "tmp": tmp_path}


# The cases about ring limits start from an io_uring export of the image.
URING = ["--image", "{img}", "--mountpoint", "{mp}", "--io-uring", "on"]
CASES = {
    "missing-image": (
        ["--image", "{tmp}/nope.img", "--mountpoint", "{mp}"],
        "Could not open '{tmp}/nope.img': No such file or directory",
    ),
    "image-is-dir": (["--image", "{dir}", "--mountpoint", "{mp}"], "Could not open '{dir}': "),
    "bad-null-size": (["--null-size", "12x", "--mountpoint", "{mp}"], "Invalid size '12x'"),
    "zero-null-size": (["--null-size", "0", "--mountpoint", "{mp}"], "Invalid size '0'"),
    "image-and-null": (
        ["--image", "{img}", "--null-size", "1M", "--mountpoint", "{mp}"],
        "exactly one of --image and --null-size is required",
    ),
    "unknown-option": (
        ["--image", "{img}", "--mountpoint", "{mp}", "--frobnicate"],
        "unrecognized arguments: --frobnicate",
    ),
    "bad-allow-other": (
        ["--image", "{img}", "--mountpoint", "{mp}", "--allow-other", "maybe"],
        "'maybe' is not one of on, off, auto",
    ),
    "bad-queues": (
        ["--image", "{img}", "--mountpoint", "{mp}", "--queues", "0"],
        "argument --queues: 0 is not a positive integer",
    ),
    "bad-max-write": (
        ["--image", "{img}", "--mountpoint", "{mp}", "--max-write", "1000"],
        "--max-write must be a multiple of 4 KiB",
    ),
    "growable-read-only": (
        ["--image", "{img}", "--mountpoint", "{mp}", "--growable"],
        "--growable requires --writable",
    ),
    "missing-mountpoint": (
        ["--image", "{img}", "--mountpoint", "{tmp}/nope"],
        "Failed to stat '{tmp}/nope': No such file or directory",
    ),
    "mountpoint-is-dir": (
        ["--image", "{img}", "--mountpoint", "{dir}"],
        "'{dir}' is not a regular file",
    ),
    "no-mountpoint": (["--image", "{img}"], "the following arguments are required: --mountpoint"),
    # Limits are checked before anything is mounted, naming the option.
    "too-many-queues": (
        ["--image", "{img}", "--mountpoint", "{mp}", "--queues", "100000"],
        "--queues 100000: at most 256 queue threads",
    ),
    "ring-deeper-than-io-uring": (
        [*URING, "--ring-depth", "100000"],
        "--ring-depth 100000: a queue thread would own",
    ),
    # Shared, any thread's ring may come to hold every thread's entries;
    # owned, 30000 entries per ring would do.
    "shared-rings-deeper-than-io-uring": (
        [*URING, "--queues", "4", "--share-ring-queues", "--ring-depth", "30000"],
        "--ring-depth 30000: a queue thread would hold (shared) up to",
    ),
    "queue-processes-without-io-uring": (
        ["--image", "{img}", "--mountpoint", "{mp}", "--queue-processes"],
        "--queue-processes needs --io-uring on or auto",
    ),
    "queue-processes-and-shared-rings": (
        [*URING, "--queues", "2", "--queue-processes", "--share-ring-queues"],
        "--queue-processes and --share-ring-queues exclude each other",
    ),
    "ring-bigger-than-memory": (
        [*URING, "--queues", "64", "--ring-depth", "30000", "--max-write", "1M"],
        "--ring-depth 30000: the ring buffers would take",
    ),
    "max-write-too-big": (
        ["--image", "{img}", "--mountpoint", "{mp}", "--max-write", "2M"],
        "--max-write must be a multiple of 4 KiB between 4 KiB and 1 MiB",
    ),
    "pidfile-dir-missing": (
        ["--image", "{img}", "--mountpoint", "{mp}", "--pidfile", "{tmp}/x/pid"],
        "Cannot write pidfile '{tmp}/x/pid'",
    ),
}


class MountWatcher:
    """Every mount seen under a directory while it runs, not only what is left
    at the end.  The kernel wakes it on each mount table change (POLLPRI on
    /proc/self/mountinfo) and it rescans at once; a mount that comes and goes
    between two scans (well under a millisecond) could still slip by, which
    is far shorter than the seconds an unvalidated option used to keep one."""

    def __init__(self, under: Path) -> None:
        self.under = f" {under}/"
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _scan(self) -> None:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = iter(lambda: os.read(self._fd, 1 << 16), b"")
        for line in b"".join(chunks).decode().splitlines():
            if self.under in line:
                self.seen.add(line.split()[4])

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLPRI | select.POLLERR)
        while not self._stop.is_set():
            poller.poll(20)
            self._scan()

    def __enter__(self) -> MountWatcher:
        self._scan()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._scan()
        os.close(self._fd)


@pytest.fixture
def watcher(files: dict[str, Path]) -> Iterator[MountWatcher]:
    with MountWatcher(files["tmp"]) as w:
        yield w


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(files: dict[str, Path], watcher: MountWatcher, case: str) -> None:
    args, message = CASES[case]
    if case.startswith("shared-") and possible_cpus() < 2:
        pytest.skip("not run: with one possible CPU shared and owned rings are the same size")
    subst = {k: str(v) for k, v in files.items()}
    before = fingerprint(files["img"])
    extra = [] if case == "growable-read-only" else ["--writable"]
    res = run_exporter(*(a.format(**subst) for a in args), *extra)
    assert_refused(res, message.format(**subst), files, before, watcher)


def assert_refused(res, message, files, before, watcher):  # type: ignore[no-untyped-def]
    assert res.returncode == 1, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert message in lines[0]
    for p in (files["mp"], files["dir"]):
        assert find_mount(str(p)) is None
    assert watcher.seen == set(), f"mounted for a moment: {watcher.seen}"
    assert fingerprint(files["img"]) == before


def test_the_watcher_sees_a_mount_that_comes_and_goes(files: dict[str, Path], exports) -> None:  # type: ignore[no-untyped-def]
    """The watcher itself: an export started and removed while it runs is seen."""
    with MountWatcher(files["tmp"]) as w:
        exports.start(mountpoint=files["mp"]).cleanup()
    assert w.seen == {str(files["mp"])}


@pytest.mark.usefixtures("fuse_root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
def test_unreadable_image(files: dict[str, Path]) -> None:
    files["img"].chmod(0o600)
    os.chmod(files["tmp"], 0o755)
    before = fingerprint(files["img"])
    with MountWatcher(files["tmp"]) as w:
        res = run_exporter(
            "--image", str(files["img"]), "--mountpoint", str(files["mp"]), user="65534"
        )
    assert_refused(res, f"Could not open '{files['img']}': Permission denied", files, before, w)


def test_mountpoint_already_exported(exports) -> None:  # type: ignore[no-untyped-def]
    first = exports.start(writable=True)
    image = exports.image(name="other.img")
    before = fingerprint(image)
    res = run_exporter("--image", str(image), "--mountpoint", str(first.mountpoint), "--writable")
    assert res.returncode == 1
    assert res.stderr.strip() == f"export: There already is a FUSE export on '{first.mountpoint}'"
    assert find_mount(str(first.mountpoint)).mount_id == first.mount_id  # type: ignore[union-attr]
    assert fingerprint(image) == before
    assert first.query()["shutting-down"] is False
