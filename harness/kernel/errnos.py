"""Errno names as transcripts print them."""

from __future__ import annotations

import errno

# Linux aliases: print the name QEMU and the kernel use.
_PREFERRED = {errno.EOPNOTSUPP: "EOPNOTSUPP", errno.EAGAIN: "EAGAIN", errno.EDEADLK: "EDEADLK"}


def errno_name(code: int) -> str:
    code = abs(code)
    return _PREFERRED.get(code) or errno.errorcode.get(code, f"E{code}")
