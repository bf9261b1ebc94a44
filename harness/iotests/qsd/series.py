"""The patch stack the qsd-series target is built from.

FUSE_IOTESTS_SERIES names it (a directory of patches, applied in name
order); by default ../shared/qemu-series beside the repository, where the
project keeps the FUSE-over-io_uring series as test input.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..lifecycle import REPO
from .build import DEFAULT_SOURCE, Build, BuildError, build

DEFAULT_SERIES = REPO.parent / "shared" / "qemu-series"


def default_patches() -> list[str]:
    where = os.environ.get("FUSE_IOTESTS_SERIES") or (
        str(DEFAULT_SERIES) if DEFAULT_SERIES.is_dir() else ""
    )
    if not where:
        raise BuildError(f"no patch stack: set FUSE_IOTESTS_SERIES or provide {DEFAULT_SERIES}")
    if not Path(where).exists():
        raise BuildError(f"FUSE_IOTESTS_SERIES={where}: no such file or directory")
    return [where]


def series_build(upto: int | None = None) -> Build:
    """The cached build of Debian's QEMU with the series (built when missing)."""
    return build(DEFAULT_SOURCE, default_patches(), upto)
