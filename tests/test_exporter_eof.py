"""EOF semantics: short writes, growable exports, reads across EOF."""

from __future__ import annotations

import os
import subprocess

import pytest

from harness.patterns import offset_pattern, pattern_bytes

SIZE = 1 << 20


@pytest.mark.parametrize("growable", [False, True], ids=["growable=off", "growable=on"])
def test_writes_at_and_past_eof(exports, transport, growable):
    image = exports.image(SIZE)
    exp = exports.start(image, writable=True, growable=growable)
    fd = os.open(exp.mountpoint, os.O_RDWR)
    try:
        crossing = os.pwrite(fd, pattern_bytes(0x11, 8192), SIZE - 4096)
        at_eof = os.pwrite(fd, pattern_bytes(0x22, 4096), os.fstat(fd).st_size)
        past_eof = os.pwrite(fd, pattern_bytes(0x33, 4096), os.fstat(fd).st_size + 4096)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    expected = bytearray(offset_pattern(0, SIZE))
    if growable:
        # Each write grows the export first; the gap before the last is zeroes.
        assert (crossing, at_eof, past_eof) == (8192, 4096, 4096)
        assert size == SIZE + 4096 + 4096 + 4096 + 4096
        expected[SIZE - 4096 :] = pattern_bytes(0x11, 8192)
        expected += pattern_bytes(0x22, 4096) + bytes(4096) + pattern_bytes(0x33, 4096)
    else:
        # Short at EOF; at or past EOF the reply says 0 bytes.
        assert (crossing, at_eof, past_eof) == (4096, 0, 0)
        assert size == SIZE
        expected[SIZE - 4096 :] = pattern_bytes(0x11, 4096)
    assert exp.stop() == 0
    assert image.read_bytes() == expected


def test_reads_across_and_past_eof(exports, transport):
    exp = exports.start(exports.image(SIZE), writable=False)
    fd = os.open(exp.mountpoint, os.O_RDONLY)
    try:
        assert os.pread(fd, 8192, SIZE - 4096) == offset_pattern(SIZE - 4096, 4096)
        assert os.pread(fd, 4096, SIZE) == b""
        assert os.pread(fd, 4096, SIZE + 65536) == b""
    finally:
        os.close(fd)


def test_read_only_export_eof(exports, transport):
    """Reads at and past EOF of a read-only ("ro") export: short, then empty."""
    exp = exports.start(exports.image(SIZE), writable=False)
    fd = os.open(exp.mountpoint, os.O_RDONLY)
    try:
        assert os.pread(fd, 8192, SIZE - 4096) == offset_pattern(SIZE - 4096, 4096)
        assert os.pread(fd, 4096, SIZE) == b""
    finally:
        os.close(fd)


@pytest.mark.parametrize("notrunc", [True, False], ids=["notrunc", "trunc"])
def test_dd_past_eof(exports, transport, notrunc):
    image = exports.image(SIZE)
    exp = exports.start(image, writable=True)
    conv = ["conv=notrunc"] if notrunc else []
    res = subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={exp.mountpoint}",
            "bs=4k",
            "count=2",
            f"seek={SIZE // 4096}",
            *conv,
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert "No space left on device" in res.stderr
    # Without notrunc dd first truncates to the seek offset: the size stays.
    assert os.stat(exp.mountpoint).st_size == SIZE
    assert exp.stop() == 0
    assert image.read_bytes() == offset_pattern(0, SIZE)
