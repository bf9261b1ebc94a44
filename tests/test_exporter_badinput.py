"""Bad input: one line on stderr, exit 1, nothing mounted, image untouched."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from harness.iotests.targets.reference import run_exporter
from harness.kernel.mount import find_mount


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
    "pidfile-dir-missing": (
        ["--image", "{img}", "--mountpoint", "{mp}", "--pidfile", "{tmp}/x/pid"],
        "Cannot write pidfile '{tmp}/x/pid'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(files: dict[str, Path], case: str) -> None:
    args, message = CASES[case]
    subst = {k: str(v) for k, v in files.items()}
    before = fingerprint(files["img"])
    extra = [] if case == "growable-read-only" else ["--writable"]
    res = run_exporter(*(a.format(**subst) for a in args), *extra)
    assert_refused(res, message.format(**subst), files, before)


def assert_refused(res, message, files, before):  # type: ignore[no-untyped-def]
    assert res.returncode == 1, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert message in lines[0]
    for p in (files["mp"], files["dir"]):
        assert find_mount(str(p)) is None
    assert fingerprint(files["img"]) == before


@pytest.mark.usefixtures("fuse_root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
def test_unreadable_image(files: dict[str, Path]) -> None:
    files["img"].chmod(0o600)
    os.chmod(files["tmp"], 0o755)
    before = fingerprint(files["img"])
    res = run_exporter("--image", str(files["img"]), "--mountpoint", str(files["mp"]), user="65534")
    assert_refused(res, f"Could not open '{files['img']}': Permission denied", files, before)


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
