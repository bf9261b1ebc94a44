"""The reference exporter (python -m harness.exporter), run as a process.

Its capabilities are those of the code at this revision, so they are
declared here rather than detected: it shares this checkout.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import subprocess
import sys
import threading
from pathlib import Path

from ... import __version__
from ...options import Settings
from .. import runs
from ..lifecycle import REPO, TRACKER, ExporterProcess, child_env
from ..timeouts import scaled
from . import CAPABILITIES, Target

# reference-processes: the same exporter, each io_uring queue in a process
# of its own (--queue-processes); every case must read as with threads.
NAMES = ("reference", "reference-processes")
PREFIX = "export: "  # how the exporter starts its one-line errors


class SparePool:
    """Warm spares: exporter processes that have imported everything and
    wait on stdin for their command line.  Importing the exporter is most of
    a cold start (about 60 of 70 ms here), and the suite starts hundreds.

    One keeper thread, alive as long as this process, starts every spare:
    a child dies with the thread that started it (PR_SET_PDEATHSIG), and
    case threads are short-lived.  A taken spare is replaced at once, off
    the caller's path.  TRACKER.cleanup_all() ends idle spares;
    FUSE_IOTESTS_SPARE=0 turns them off.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[tuple[subprocess.Popen[bytes], dict[str, str]]] = []
        self._ready: set[int] = set()  # pids of spares that said so
        self._wanted: queue.SimpleQueue[dict[str, str]] = queue.SimpleQueue()
        self._spawned = threading.Condition(self._lock)
        self._keeper: threading.Thread | None = None
        self._spawning = threading.Lock()
        self._pending = 0  # asked of the keeper, not yet started

    @staticmethod
    def enabled() -> bool:
        return os.environ.get("FUSE_IOTESTS_SPARE", "1") != "0"

    def take(self, argv: list[str], stderr: Path) -> subprocess.Popen[bytes] | None:
        """A spare, started as argv with stdout and stderr to a file, or None
        (start cold); either way one is on its way for the next start."""
        if not self.enabled():
            return None
        env = child_env()
        with self._lock:
            stale = [x for x in self._idle if x[0].poll() is not None or not _same(x[1], env)]
            fit = [x for x in self._idle if x not in stale]
            self._idle = fit[1:]
            for spare, _ in [*stale, *fit[:1]]:  # no longer idle
                self._ready.discard(spare.pid)
        for spare, _ in stale:
            _end(spare)
        proc = self._hand_over(fit[0][0], argv, stderr) if fit else None
        self._want(env)
        return proc

    def _want(self, env: dict[str, str]) -> None:
        """Have one spare idle or on its way (no more: each costs an import)."""
        with self._lock:
            if self._idle or self._pending:
                return
            self._pending += 1
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep, name="spares", daemon=True)
                self._keeper.start()
        self._wanted.put(env)

    def _keep(self) -> None:
        while True:
            env = self._wanted.get()
            with self._spawning:
                try:
                    spare = runs.spawn(
                        [*exporter_argv(), "--spare"],
                        cwd=REPO,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        env=env,
                    )
                except OSError:  # out of processes or fds: starts go cold
                    with self._lock:
                        self._pending -= 1
                    continue
                with self._lock:
                    self._pending -= 1
                    self._idle.append((spare, env))
                    self._spawned.notify_all()

    @staticmethod
    def _hand_over(
        spare: subprocess.Popen[bytes], argv: list[str], stderr: Path
    ) -> subprocess.Popen[bytes] | None:
        stderr.write_bytes(b"")
        assert spare.stdin is not None and spare.stdout is not None
        try:
            spare.stdin.write(json.dumps({"argv": argv, "stderr": str(stderr)}).encode() + b"\n")
            spare.stdin.close()
        except BrokenPipeError:  # it died meanwhile: start cold
            _end(spare)
            return None
        spare.stdout.close()
        return spare

    def wait_ready(self, timeout: float) -> bool:
        """Have an idle spare that has imported everything: start one if
        there is none, and wait (bounded); False if it did not get ready."""
        if not self.enabled():
            return False
        self._want(child_env())
        with self._lock:
            if not self._spawned.wait_for(lambda: bool(self._idle), timeout):
                return False
            spare = self._idle[0][0]
        if spare.pid in self._ready:
            return True
        assert spare.stdout is not None
        readable, _, _ = select.select([spare.stdout], [], [], timeout)
        if readable and spare.stdout.readline() == b"ready\n":
            self._ready.add(spare.pid)
            return True
        return False

    def settled(self) -> contextlib.AbstractContextManager[None]:
        """While held, no spare is being started: the keeper's fork and its
        pipes would show in a count of this process's fds."""
        return self._spawning

    def idle_pids(self) -> list[int]:
        with self._lock:
            return [spare.pid for spare, _ in self._idle]

    def close_all(self) -> list[str]:
        """End every idle spare, and the ones asked for but not yet started."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._wanted.get_nowait()
                with self._lock:
                    self._pending -= 1
        with self._spawning, self._lock:  # one being started is finished first
            idle, self._idle = self._idle, []
            self._ready.clear()
        return [r for spare, _ in idle for r in _end(spare)]


# Changes from one test to the next and means nothing to the exporter.
VOLATILE = frozenset({"PYTEST_CURRENT_TEST"})


def _same(a: dict[str, str], b: dict[str, str]) -> bool:
    """Would an exporter started with environment a behave as with b?"""
    keys = (a.keys() | b.keys()) - VOLATILE
    return all(a.get(k) == b.get(k) for k in keys)


def _end(spare: subprocess.Popen[bytes]) -> list[str]:
    """Close a spare's stdin (it exits at EOF); kill it if it does not."""
    if spare.stdin is not None and not spare.stdin.closed:
        with contextlib.suppress(BrokenPipeError):
            spare.stdin.close()
    if spare.stdout is not None:
        spare.stdout.close()
    try:
        spare.wait(scaled(SPARE_EXIT))
    except subprocess.TimeoutExpired:
        spare.kill()
        spare.wait(scaled(SPARE_EXIT))
    return [f"spare exporter pid {spare.pid}"]


SPARE_EXIT = 5.0
SPARES = SparePool()
TRACKER.extra_cleanups.append(("warm spares", SPARES.close_all))


class ReferenceExporter(ExporterProcess):
    def __init__(
        self, workdir: Path, mountpoint: Path, image: Path | None, settings: Settings
    ) -> None:
        super().__init__(workdir, mountpoint)
        self.image = image
        self.settings = settings

    def arguments(self) -> list[str]:
        image = [] if self.image is None else ["--image", str(self.image)]
        return [
            *image,
            *self.settings.argv(),
            "--mountpoint", str(self.mountpoint),
            "--pidfile", str(self.pidfile),
            "--qmp", str(self.qmp_path),
        ]  # fmt: skip

    def command(self) -> list[str]:
        return [*exporter_argv(), *self.arguments()]

    def popen(self) -> subprocess.Popen[bytes]:
        proc = SPARES.take(self.arguments(), self.stderr_path)
        return proc if proc is not None else super().popen()

    def start_failure(self) -> str:
        line = super().start_failure()
        return line.removeprefix(PREFIX)


class Reference(Target):
    def settled(self) -> contextlib.AbstractContextManager[None]:
        return SPARES.settled()

    def exporter(
        self, workdir: Path, mountpoint: Path, image: Path | None, settings: Settings
    ) -> ExporterProcess:
        if self.name == "reference-processes" and settings["io-uring"] != "off":
            settings = settings.with_({"queue-processes": True})
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
