"""The FUSE kernel ABI: opcodes, flags and struct layouts (protocol 7.45).

The installed <linux/fuse.h> is 7.38 and lacks the io_uring structs, so
everything is defined here from the kernel uapi.  Sizes are asserted at
import time against the values verified on the target kernel (FACTS.md).
"""

from __future__ import annotations

import enum
import struct

KERNEL_VERSION = 7
# Highest minor we implement; the INIT reply carries min(kernel's, ours).
OUR_MINOR = 45
ROOT_ID = 1


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


def op_name(opcode: int) -> str:
    try:
        return Op(opcode).name
    except ValueError:
        return f"OP_{opcode}"


# FUSE_INIT flags as one 64-bit word: bits 32..63 travel in flags2, which the
# kernel only reads when the reply carries INIT_EXT.
INIT_FLAG_NAMES: dict[int, str] = {
    0: "ASYNC_READ",
    1: "POSIX_LOCKS",
    2: "FILE_OPS",
    3: "ATOMIC_O_TRUNC",
    4: "EXPORT_SUPPORT",
    5: "BIG_WRITES",
    6: "DONT_MASK",
    7: "SPLICE_WRITE",
    8: "SPLICE_MOVE",
    9: "SPLICE_READ",
    10: "FLOCK_LOCKS",
    11: "HAS_IOCTL_DIR",
    12: "AUTO_INVAL_DATA",
    13: "DO_READDIRPLUS",
    14: "READDIRPLUS_AUTO",
    15: "ASYNC_DIO",
    16: "WRITEBACK_CACHE",
    17: "NO_OPEN_SUPPORT",
    18: "PARALLEL_DIROPS",
    19: "HANDLE_KILLPRIV",
    20: "POSIX_ACL",
    21: "ABORT_ERROR",
    22: "MAX_PAGES",
    23: "CACHE_SYMLINKS",
    24: "NO_OPENDIR_SUPPORT",
    25: "EXPLICIT_INVAL_DATA",
    26: "MAP_ALIGNMENT",
    27: "SUBMOUNTS",
    28: "HANDLE_KILLPRIV_V2",
    29: "SETXATTR_EXT",
    30: "INIT_EXT",
    31: "INIT_RESERVED",
    32: "SECURITY_CTX",
    33: "HAS_INODE_DAX",
    34: "CREATE_SUPP_GROUP",
    35: "HAS_EXPIRE_ONLY",
    36: "DIRECT_IO_ALLOW_MMAP",
    37: "PASSTHROUGH",
    38: "NO_EXPORT_SUPPORT",
    39: "HAS_RESEND",
    40: "ALLOW_IDMAP",
    41: "OVER_IO_URING",
    42: "REQUEST_TIMEOUT",
}
INIT_FLAG_BITS = {name: 1 << bit for bit, name in INIT_FLAG_NAMES.items()}

# The offered flags transcripts keep: the ones the export relies on.  A flag
# a newer kernel adds must not change a golden file.
STABLE_INIT_FLAGS = (
    "ASYNC_READ",
    "BIG_WRITES",
    "ASYNC_DIO",
    "MAX_PAGES",
    "INIT_EXT",
    "OVER_IO_URING",
)

ASYNC_READ = INIT_FLAG_BITS["ASYNC_READ"]
BIG_WRITES = INIT_FLAG_BITS["BIG_WRITES"]
ASYNC_DIO = INIT_FLAG_BITS["ASYNC_DIO"]
MAX_PAGES = INIT_FLAG_BITS["MAX_PAGES"]
INIT_EXT = INIT_FLAG_BITS["INIT_EXT"]
OVER_IO_URING = INIT_FLAG_BITS["OVER_IO_URING"]


def flag_names(flags: int) -> list[str]:
    """Names of the set bits, lowest first; unknown bits as BIT_n."""
    return [INIT_FLAG_NAMES.get(bit, f"BIT_{bit}") for bit in range(64) if flags >> bit & 1]


# SETATTR valid bits.
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# fallocate(2) modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# _IOR(229, 0, uint32_t): clone a /dev/fuse fd onto an existing session.
FUSE_DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (229 << 8) | 0

# io_uring commands (struct fuse_uring_cmd_req lives in the SQE's cmd area).
FUSE_IO_URING_CMD_REGISTER = 1
FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2
URING_CMD_NAMES = {
    FUSE_IO_URING_CMD_REGISTER: "REGISTER",
    FUSE_IO_URING_CMD_COMMIT_AND_FETCH: "COMMIT_AND_FETCH",
}
# REGISTER's sqe->addr: struct iovec[2], the 288-byte header then the payload.
URING_IOVEC2 = struct.Struct("=QQQQ")

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
INIT_IN = struct.Struct("=IIIII11I")  # major minor max_readahead flags flags2 unused
INIT_OUT = struct.Struct("=IIIIHHIIHHIIH11H")
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
ATTR_OUT = struct.Struct("=QII" + ATTR.format[1:])  # attr_valid attr_valid_nsec dummy attr
GETATTR_IN = struct.Struct("=IIQ")
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
OPEN_IN = struct.Struct("=II")
OPEN_OUT = struct.Struct("=QIi")
READ_IN = struct.Struct("=QQIIQII")  # fh offset size read_flags lock_owner flags pad
WRITE_IN = READ_IN  # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("=II")
FALLOCATE_IN = struct.Struct("=QQQII")  # fh offset length mode pad
LSEEK_IN = struct.Struct("=QQII")  # fh offset whence pad
LSEEK_OUT = struct.Struct("=Q")
INTERRUPT_IN = struct.Struct("=Q")
STATFS_OUT = struct.Struct("=QQQQQIIII6I")
URING_ENT_IN_OUT = struct.Struct("=QQIIQ")  # flags commit_id payload_sz pad reserved
URING_CMD_REQ = struct.Struct("=QQH6x")  # flags commit_id qid

# Every request's first argument sits at this offset in the header (classic
# transport) or in op_in (io_uring); requests with a file offset keep it at
# byte 8 of that argument (fh comes first).
OFFSET_OPS = frozenset({Op.READ, Op.WRITE, Op.FALLOCATE, Op.LSEEK})

URING_HEADER_SIZE = 288  # struct fuse_uring_req_header
URING_IN_OUT_SIZE = 128
URING_OP_IN_OFFSET = 128
URING_ENT_IN_OUT_OFFSET = 256
# The header's two halves a request is read from (in_out as fuse_in_header,
# ent_in_out) and a reply written to (in_out as fuse_out_header, ent_in_out),
# each in one call: the ring queue's hot path.  op_in lies in the gap, which
# the reply's pack zero-fills (the kernel reads only in_out and ent_in_out
# back on COMMIT_AND_FETCH).
URING_REQUEST = struct.Struct(f"={IN_HEADER.format[1:]}216x{URING_ENT_IN_OUT.format[1:]}")
URING_REPLY = struct.Struct(f"={OUT_HEADER.format[1:]}240x{URING_ENT_IN_OUT.format[1:]}")

_EXPECTED_SIZES = {
    IN_HEADER: 40,
    OUT_HEADER: 16,
    INIT_IN: 64,
    INIT_OUT: 64,
    ATTR_OUT: 104,
    GETATTR_IN: 16,
    SETATTR_IN: 88,
    OPEN_OUT: 16,
    READ_IN: 40,
    WRITE_OUT: 8,
    FALLOCATE_IN: 32,
    LSEEK_IN: 24,
    STATFS_OUT: 80,
    URING_ENT_IN_OUT: 32,
    URING_CMD_REQ: 24,
    URING_REQUEST: URING_HEADER_SIZE,
    URING_REPLY: URING_HEADER_SIZE,
}
for _s, _size in _EXPECTED_SIZES.items():
    assert _s.size == _size, (_s.format, _s.size, _size)
