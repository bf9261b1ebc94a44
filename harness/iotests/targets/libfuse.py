"""libfuse 3.18 (with its FUSE-over-io_uring transport) serving one image.

The server is ours (harness/iotests/libfuse/blkexport.c, on libfuse's low-level
API, QEMU's export semantics); every transport detail is libfuse's:
/dev/fuse or `-o io_uring`, clone fds for queues, INIT, teardown.  It is
built with `tools/libfuse build` into .cache/libfuse/prefix, or another
prefix named by LIBFUSE_PREFIX (`tools/libfuse build --source DIR` prints
one).  It has no QMP monitor, no fault injection and no introspection:
instances that need them are not run, with the capability named.  Whether
the library has io_uring is read from the library, never assumed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ...options import Settings
from .. import runs
from ..libfuse.build import default_prefix, server_path
from ..lifecycle import ExporterProcess, child_env
from . import NativeExporter, Target, TargetError

NAMES = ("libfuse",)
FSTYPE = "fuse.fuse-iotests-libfuse"  # blkexport.c's subtype
# The export options blkexport.c takes (the same flags as the reference).
OPTIONS = frozenset(
    {"writable", "growable", "allow-other", "queues", "io-uring", "ring-depth", "max-write",
     "null-size"}
)  # fmt: skip
# libfuse reads these too; an export's transport is its settings' alone.
LIBFUSE_ENV = ("FUSE_URING_ENABLE", "FUSE_URING_QUEUE_DEPTH")
# Compiled into libfuse only with HAVE_URING (lib/fuse_uring.c's thread names).
URING_MARK = b"fuse-ring-%d"


class LibfuseExporter(NativeExporter):
    fstype = FSTYPE

    def command(self) -> list[str]:
        image = [] if self.image is None else ["--image", str(self.image)]
        # The ring depth always: the option table's default (64) is not
        # libfuse's (8), and argv() leaves defaults out.
        depth = ["--ring-depth", str(self.settings["ring-depth"])]
        return [
            self.target.binary, *image, *self.settings.argv(), *depth,
            "--mountpoint", str(self.mountpoint), "--pidfile", str(self.pidfile),
        ]  # fmt: skip

    def popen(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in child_env().items() if k not in LIBFUSE_ENV}
        with open(self.stderr_path, "wb") as err:
            return runs.spawn(
                self.command(), stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                **self.cores(),
            )  # fmt: skip

    def connect_qmp(self) -> None:
        """No monitor: steps that need one are not run (capability qmp)."""


class Libfuse(Target):
    def exporter(
        self, workdir: Path, mountpoint: Path, image: Path | None, settings: Settings
    ) -> ExporterProcess:
        return LibfuseExporter(self, workdir, mountpoint, image, settings)


def _version(prefix: Path) -> str:
    pc = prefix / "lib" / "pkgconfig" / "fuse3.pc"
    for line in pc.read_text().splitlines() if pc.exists() else []:
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _has_uring(prefix: Path) -> bool:
    libs = sorted((prefix / "lib").glob("libfuse3.so.*"))
    return any(URING_MARK in lib.read_bytes() for lib in libs if not lib.is_symlink())


def detect(name: str, binary: str | None) -> Target:
    env = os.environ.get("LIBFUSE_PREFIX")
    prefix = Path(binary or env or default_prefix())
    server = server_path(prefix)
    if not os.access(server, os.X_OK):
        how = "LIBFUSE_PREFIX" if binary or env else "run tools/libfuse build"
        raise TargetError(f"target libfuse: no {server} ({how})")
    caps = {"multi-queue"} | ({"io-uring"} if _has_uring(prefix) else set())
    return Libfuse("libfuse", _version(prefix), frozenset(caps), OPTIONS, binary=str(server))
