"""pytest fixtures for exporter tests (loaded by conftest.py).

`transport` parametrizes a test over the FUSE transports, so ids carry
`legacy` or `uring` and `pytest -k uring` selects the io_uring runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..kernel.errnos import errno_name
from ..kernel.params import ENABLE_URING, ensure_uring, kernel_lock, read_param
from ..patterns import make_image
from .cleanup import run_all
from .client import ClientPool
from .lifecycle import TRACKER, ExporterProcess
from .spec import TRANSPORTS
from .steps import CASE_DEFAULTS
from .targets import Target, resolve

IO_URING_MODE = {"legacy": "off", "uring": "on"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "transport" in metafunc.fixturenames:
        params = [pytest.param(t, marks=getattr(pytest.mark, t), id=t) for t in TRANSPORTS]
        metafunc.parametrize("transport", params)


def fuse_problem() -> str | None:
    """Why this process cannot mount FUSE file systems, or None."""
    if os.geteuid() != 0:
        return "needs root: it mounts FUSE file systems"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    return None


@pytest.fixture
def fuse_root() -> None:
    """Skip (with the reason) a test that only root with /dev/fuse can run, so
    the pure tests (spec, filters, golden, layout) run anywhere."""
    problem = fuse_problem()
    if problem:
        pytest.skip(f"not run: {problem}")


@pytest.fixture(scope="session", autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail the run if a test left a FUSE mount or a /dev/fuse holder behind."""
    yield
    found = TRACKER.leftovers()
    outcome = TRACKER.cleanup_all()
    if found or outcome.failed:
        pytest.fail("left behind by the tests: " + "; ".join(found + outcome.failed), pytrace=False)


class Exports:
    """Makes images and starts exporters in one test's directory."""

    def __init__(self, tmp_path: Path, transport: str) -> None:
        self.dir = tmp_path
        self.transport = transport
        self.started: list[ExporterProcess] = []

    def image(self, size: int = 1 << 20, name: str = "disk.img", fill: bool = True) -> Path:
        """A raw image whose bytes encode their own offsets (or a sparse one)."""
        path = self.dir / name
        make_image(str(path), size, "offsets" if fill else "sparse")
        return path

    def mountpoint(self, name: str = "disk.fuse") -> Path:
        mp = self.dir / name
        mp.touch()
        return mp

    def start(
        self,
        image: Path | None = None,
        mountpoint: Path | None = None,
        target: Target | None = None,
        **options: Any,
    ) -> ExporterProcess:
        """Start an exporter and wait until it is live.  options are the option
        table's (harness/options.py) with _ for -: queues=2, io_uring="on";
        unset ones are what a case gets (writable, allow-other off)."""
        options.setdefault("io_uring", IO_URING_MODE[self.transport])
        settings = CASE_DEFAULTS.with_({k.replace("_", "-"): v for k, v in options.items()})
        if image is None and settings["null-size"] is None:
            image = self.image()
        work = self.dir / f"export{len(self.started)}"
        work.mkdir()
        target = target or resolve("reference")
        exp = target.exporter(work, mountpoint or self.mountpoint(), image, settings)
        self.started.append(exp)
        exp.start()
        return exp

    def cleanup(self) -> None:
        outcome = run_all((f"exporter {e.workdir.name}", e.cleanup) for e in self.started)
        if outcome.failed:
            raise RuntimeError("; ".join(outcome.failed))


@pytest.fixture
def uring_kernel() -> Iterator[None]:
    """FUSE-over-io_uring usable for the whole test, or the test is not run.

    enable_uring is set to Y when needed; the shared kernel lock keeps tests
    that flip it (holding the exclusive side) away meanwhile.
    """
    reason = ensure_uring()
    if reason:
        pytest.skip(f"not run: {reason}")
    with kernel_lock(exclusive=False):
        if read_param(ENABLE_URING) != "Y":
            pytest.skip("not run: enable_uring was changed by someone else")
        yield


@pytest.fixture
def exports(tmp_path: Path, request: pytest.FixtureRequest, fuse_root: None) -> Iterator[Exports]:
    transport = (
        request.getfixturevalue("transport") if "transport" in request.fixturenames else "legacy"
    )
    if transport == "uring":
        request.getfixturevalue("uring_kernel")
    ex = Exports(tmp_path, transport)
    try:
        yield ex
    finally:
        ex.cleanup()


@pytest.fixture
def client(fuse_root: None) -> Iterator[ClientPool]:
    c = ClientPool()
    try:
        yield c
    finally:
        c.cleanup()


def errno_of(fn: Callable[[], Any]) -> str:
    """Call fn; return 'ok' or the errno name it raised."""
    try:
        fn()
    except OSError as e:
        return errno_name(e.errno or 0)
    return "ok"
