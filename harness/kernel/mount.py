"""mount(2)/umount2(2) and the mount table.

Whether something is mounted is read from /proc/self/mountinfo only:
statfs() or df on a dying FUSE mount can block or fail (ENOTCONN once
fs/fuse/dev.c fuse_dev_release() has aborted the connection) while the
mount table is authoritative.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from dataclasses import dataclass

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOATIME = 0x400
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str
    dev: str = ""  # st_dev as "major:minor"

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith(("fuse.", "fuseblk"))

    @property
    def fusectl_name(self) -> str:
        """Its directory under /sys/fs/fuse/connections: the kernel dev_t."""
        major, minor = map(int, self.dev.split(":"))
        return str(major << 20 | minor)


def mount_table() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            entries.append(
                MountEntry(
                    int(fields[0]),
                    _unescape(fields[4]),
                    tail[0],
                    _unescape(tail[1]),
                    fields[5] + "," + tail[2],
                    fields[2],
                )
            )
    return entries


def find_mount(path: str) -> MountEntry | None:
    """The topmost mount whose mount point is path (not resolved further)."""
    path = os.path.abspath(path)
    found = None
    for entry in mount_table():
        if entry.mountpoint == path:
            found = entry
    return found


def fuse_mounted(path: str) -> bool:
    entry = find_mount(path)
    return entry is not None and entry.is_fuse


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def umount(target: str, lazy: bool = False) -> None:
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if _libc.umount2(target.encode(), flags):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def umount_or_detach(target: str) -> None:
    """umount, or a lazy detach if a client still holds the mount (EBUSY)."""
    try:
        umount(target)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        umount(target, lazy=True)
