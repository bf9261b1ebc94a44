"""The reference exporter (python -m harness.exporter), run as a process.

Its capabilities are those of the code at this revision, so they are
declared here rather than detected: it shares this checkout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ... import __version__
from ...options import Settings
from ..lifecycle import REPO, ExporterProcess, child_env
from ..timeouts import scaled
from . import CAPABILITIES, Target

NAMES = ("reference",)
PREFIX = "export: "  # how the exporter starts its one-line errors


class ReferenceExporter(ExporterProcess):
    def __init__(
        self, workdir: Path, mountpoint: Path, image: Path | None, settings: Settings
    ) -> None:
        super().__init__(workdir, mountpoint)
        self.image = image
        self.settings = settings

    def command(self) -> list[str]:
        image = [] if self.image is None else ["--image", str(self.image)]
        return [
            *exporter_argv(),
            *image,
            *self.settings.argv(),
            "--mountpoint", str(self.mountpoint),
            "--pidfile", str(self.pidfile),
            "--qmp", str(self.qmp_path),
        ]  # fmt: skip

    def start_failure(self) -> str:
        line = super().start_failure()
        return line.removeprefix(PREFIX)


class Reference(Target):
    def exporter(
        self, workdir: Path, mountpoint: Path, image: Path | None, settings: Settings
    ) -> ExporterProcess:
        return ReferenceExporter(workdir, mountpoint, image, settings)


def exporter_argv() -> list[str]:
    return [sys.executable, "-S", "-m", "harness.exporter"]


def detect(name: str, binary: str | None) -> Target:
    return Reference(name, __version__, frozenset(CAPABILITIES), binary=" ".join(exporter_argv()))


def run_exporter(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the exporter to completion (for start-up failures); as `user` if given."""
    argv = exporter_argv() + list(args)
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=scaled(30), env=child_env()
    )
