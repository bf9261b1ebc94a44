"""Every FUSE operation of the export, driven by real syscalls on the mount.

The test process is the client; the exporter is a separate process.  Data is
checked through the mount and again in the image after the export stopped.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

from harness.iotests.fixtures import errno_of
from harness.iotests.waiting import wait_until
from harness.kernel.abi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from harness.kernel.libc import fallocate
from harness.kernel.mount import find_mount
from harness.patterns import offset_pattern, pattern_bytes

MiB = 1 << 20


def stop_and_read_image(exp, image) -> bytes:  # type: ignore[no-untyped-def]
    assert exp.stop() == 0
    assert not exp.is_mounted()
    return image.read_bytes()


def test_write_read_roundtrip(exports, transport):
    image = exports.image(MiB)
    exp = exports.start(image)
    expected = bytearray(offset_pattern(0, MiB))
    writes = [
        (0, 4096, 0x11),
        (4096 * 3 + 17, 1000, 0x22),
        (MiB - 512, 512, 0x33),
        (65536, 65536, 0x44),
    ]
    fd = os.open(exp.mountpoint, os.O_RDWR)
    try:
        for off, length, pat in writes:
            assert os.pwrite(fd, pattern_bytes(pat, length), off) == length
            expected[off : off + length] = pattern_bytes(pat, length)
        for off, length, pat in writes:
            assert os.pread(fd, length, off) == pattern_bytes(pat, length)
        assert os.pread(fd, MiB, 0) == expected
    finally:
        os.close(fd)
    assert stop_and_read_image(exp, image) == expected


def test_large_io_is_split_by_the_kernel(exports, transport):
    image = exports.image(4 * MiB)
    exp = exports.start(image)
    data = offset_pattern(7 * MiB, MiB)  # a distinct pattern of 1 MiB
    fd = os.open(exp.mountpoint, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, MiB) == MiB
        assert os.pread(fd, MiB, MiB) == data
    finally:
        os.close(fd)
    ops = exp.query()["queues"][0]["opcodes"]
    max_write = exp.query()["negotiation"]["max-write"]
    assert ops["WRITE"] >= MiB // max_write > 1
    assert stop_and_read_image(exp, image)[MiB : 2 * MiB] == data


def test_stat_attributes(exports, transport):
    image = exports.image(3 * MiB + 512)
    exp = exports.start(image, writable=True, allow_other="off")
    st = os.stat(exp.mountpoint)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid, st.st_nlink, st.st_ino) == (os.getuid(), os.getgid(), 1, 1)
    assert st.st_size == 3 * MiB + 512
    assert st.st_blocks * 512 >= 3 * MiB  # the image is fully allocated


def test_mode_follows_writable_not_allow_other(exports, transport):
    ro = exports.start(writable=False, allow_other="off")
    assert stat.S_IMODE(os.stat(ro.mountpoint).st_mode) == 0o400
    # As in QEMU, allow_other opens the mount to others but the mode still
    # has to be chmod-ed before they pass default_permissions.
    other = exports.start(
        exports.image(name="b.img"), exports.mountpoint("b.fuse"), writable=True, allow_other="on"
    )
    assert stat.S_IMODE(os.stat(other.mountpoint).st_mode) == 0o600
    entry = find_mount(str(other.mountpoint))
    assert entry is not None and "allow_other" in entry.options.split(",")
    os.chmod(other.mountpoint, 0o644)
    assert stat.S_IMODE(os.stat(other.mountpoint).st_mode) == 0o644


def test_setattr_rules(exports, transport):
    exp = exports.start(writable=True, allow_other="off")
    mp = exp.mountpoint
    os.chmod(mp, 0o400)
    assert stat.S_IMODE(os.stat(mp).st_mode) == 0o400
    # Without allow_other nobody else can open it: group/other bits refused.
    assert errno_of(lambda: os.chmod(mp, 0o644)) == "EPERM"
    # uid/gid only with allow_other, as in QEMU.
    assert errno_of(lambda: os.chown(mp, 0, 0)) == "EOPNOTSUPP"
    # atime/mtime are not stored: touch is refused.
    assert errno_of(lambda: os.utime(mp, (1, 1))) == "EOPNOTSUPP"

    ro = exports.start(exports.image(name="b.img"), exports.mountpoint("b.fuse"), writable=False)
    assert errno_of(lambda: os.chmod(ro.mountpoint, 0o600)) == "EROFS"
    assert errno_of(lambda: os.truncate(ro.mountpoint, 4096)) == "EROFS"


def test_chown_with_allow_other(exports, transport):
    exp = exports.start(writable=True, allow_other="on")
    os.chown(exp.mountpoint, 1234, 5678)
    st = os.stat(exp.mountpoint)
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_truncate_grows_and_shrinks(exports, transport):
    image = exports.image(MiB)
    exp = exports.start(image, writable=True)
    os.truncate(exp.mountpoint, 2 * MiB + 123)
    assert os.stat(exp.mountpoint).st_size == 2 * MiB + 123
    with open(exp.mountpoint, "rb") as f:
        assert f.read() == offset_pattern(0, MiB) + bytes(MiB + 123)
    os.truncate(exp.mountpoint, 4096)
    assert os.stat(exp.mountpoint).st_size == 4096
    data = stop_and_read_image(exp, image)
    assert data == offset_pattern(0, 4096)


def test_open_with_o_trunc_truncates(exports, transport):
    image = exports.image(MiB)
    exp = exports.start(image, writable=True)
    fd = os.open(exp.mountpoint, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(exp.mountpoint).st_size == 0
    assert stop_and_read_image(exp, image) == b""


def test_fallocate_modes(exports, transport):
    image = exports.image(MiB)
    exp = exports.start(image, writable=True)
    fd = os.open(exp.mountpoint, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8192, 8192)
        assert os.pread(fd, 8192, 8192) == bytes(8192)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 65536 + 100, 1000)
        assert os.pread(fd, 1000, 65536 + 100) == bytes(1000)
        # Mode 0 can only grow; a ZERO_RANGE past EOF grows unless KEEP_SIZE.
        assert errno_of(lambda: fallocate(fd, 0, 0, 4096)) == "EOPNOTSUPP"
        fallocate(fd, 0, MiB, 3 * 65536 + 1000)
        assert os.fstat(fd).st_size == MiB + 3 * 65536 + 1000
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 2 * MiB, 4096)
        assert os.fstat(fd).st_size == MiB + 3 * 65536 + 1000
        # Punch without KEEP_SIZE, collapse and insert are not supported.
        assert errno_of(lambda: fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096)) == "EOPNOTSUPP"
        assert errno_of(lambda: fallocate(fd, 0x08, 0, 4096)) == "EOPNOTSUPP"  # COLLAPSE_RANGE
        assert errno_of(lambda: fallocate(fd, 0x20, 0, 4096)) == "EOPNOTSUPP"  # INSERT_RANGE
    finally:
        os.close(fd)
    expected = bytearray(offset_pattern(0, MiB))
    expected[8192:16384] = bytes(8192)
    expected[65536 + 100 : 65536 + 1100] = bytes(1000)
    expected += bytes(3 * 65536 + 1000)
    assert stop_and_read_image(exp, image) == expected


def test_lseek_data_and_hole(exports, transport):
    image = exports.image(MiB, fill=False)
    with open(image, "r+b") as f:
        f.seek(256 * 1024)
        f.write(pattern_bytes(0x55, 128 * 1024))
    exp = exports.start(image, writable=False)
    fd = os.open(exp.mountpoint, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 256 * 1024
        assert os.lseek(fd, 256 * 1024, os.SEEK_HOLE) == 384 * 1024
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 300 * 1024, os.SEEK_DATA) == 300 * 1024
        # No data after the last extent, and nothing at or past EOF.
        assert errno_of(lambda: os.lseek(fd, 384 * 1024, os.SEEK_DATA)) == "ENXIO"
        assert errno_of(lambda: os.lseek(fd, MiB, os.SEEK_DATA)) == "ENXIO"
        assert errno_of(lambda: os.lseek(fd, MiB + 1, os.SEEK_HOLE)) == "ENXIO"
    finally:
        os.close(fd)
    assert exp.query()["queues"][0]["opcodes"]["LSEEK"] >= 4


def test_fsync_and_flush_reach_the_export(exports, transport):
    exp = exports.start(writable=True)
    fd = os.open(exp.mountpoint, os.O_RDWR)
    os.pwrite(fd, b"x" * 512, 0)
    os.fsync(fd)
    os.close(fd)

    def ops() -> dict[str, int]:
        return exp.query()["queues"][0]["opcodes"]

    # The kernel sends RELEASE asynchronously after close(): wait for it.
    wait_until(lambda: ops().get("RELEASE", 0) >= 1, 10, "RELEASE after close()",
               lambda: f"opcodes seen: {ops()}")  # fmt: skip
    seen = ops()
    assert seen.get("FSYNC") == 1, seen
    assert seen.get("FLUSH", 0) >= 1, seen


def test_statfs(exports, transport):
    exp = exports.start()
    st = os.statvfs(exp.mountpoint)
    assert (st.f_bsize, st.f_namemax, st.f_blocks, st.f_files) == (512, 255, 0, 0)


def test_dd_through_the_mount(exports, transport):
    image = exports.image(MiB)
    exp = exports.start(image, writable=True)
    src = exports.dir / "src.bin"
    src.write_bytes(offset_pattern(5 * MiB, 256 * 1024))
    subprocess.run(
        ["dd", f"if={src}", f"of={exp.mountpoint}", "bs=64k", "seek=2", "conv=notrunc,fsync"],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        ["dd", f"if={exp.mountpoint}", "bs=64k", "skip=2", "count=4"],
        check=True,
        capture_output=True,
    ).stdout
    assert out == src.read_bytes()
    expected = bytearray(offset_pattern(0, MiB))
    expected[128 * 1024 : 384 * 1024] = src.read_bytes()
    assert stop_and_read_image(exp, image) == expected


def test_read_only_export_refuses_writes(exports, transport):
    """Mounted "ro" as upstream: even root cannot open it for writing."""
    image = exports.image(MiB)
    exp = exports.start(image, writable=False)
    assert "ro" in find_mount(str(exp.mountpoint)).options.split(",")
    assert errno_of(lambda: os.open(exp.mountpoint, os.O_RDWR)) == "EROFS"
    assert errno_of(lambda: os.truncate(exp.mountpoint, 4096)) == "EROFS"
    fd = os.open(exp.mountpoint, os.O_RDONLY)
    try:
        assert errno_of(lambda: fallocate(fd, 0, MiB, 4096)) == "EBADF"
        assert os.pread(fd, 4096, 0) == offset_pattern(0, 4096)
    finally:
        os.close(fd)
    assert stop_and_read_image(exp, image) == offset_pattern(0, MiB)


def test_null_backend(exports, transport):
    exp = exports.start(null_size="64M", writable=True)
    fd = os.open(exp.mountpoint, os.O_RDWR)
    try:
        assert os.fstat(fd).st_size == 64 * MiB
        assert os.pwrite(fd, b"\xff" * 4096, 4096) == 4096
        assert os.pread(fd, 8192, 0) == bytes(8192)  # writes are discarded
    finally:
        os.close(fd)


def test_unknown_operations_get_enosys(exports, transport):
    exp = exports.start()
    with pytest.raises(OSError) as e:
        os.getxattr(exp.mountpoint, "user.foo")
    assert e.value.errno in (errno.EOPNOTSUPP, errno.ENOSYS)  # the kernel maps ENOSYS
    ops = exp.query()["queues"][0]["opcodes"]
    assert ops["GETXATTR"] == 1
