"""Collects the case instances in cases/ as pytest items (loaded by conftest.py).

Item names are the instance ids, which carry the transport (and a target
other than the reference), so `pytest -k uring` selects the io_uring
instances and `pytest --target qsd -k qsd` the QSD ones; the markers legacy,
uring, file, slow, serial and the target's name select the same way with -m.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..kernel.params import read_enable_uring, restore_enable_uring
from . import known, targets, timeouts
from .context import Instance
from .runner import CASES_DIR, KNOWN_DIR, Result, RunOptions, regen_requested, run_instance
from .runs import reap_stale
from .spec import CaseSpec, SpecError, is_case_file, load_spec

RESULTS = CASES_DIR.parent / "results" / "pytest"
SCRATCH = Path(tempfile.gettempdir()) / "fuse-iotests.pytest"


# enable_uring as the run found it: put back afterwards if the run set it.
_ENABLE_URING = pytest.StashKey[str | None]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--target",
        default=os.environ.get("FUSE_IOTESTS_TARGET", targets.DEFAULT),
        help=f"what serves the case exports: {', '.join(targets.names())}",
    )
    parser.addoption("--qsd", default=None, help="the qemu-storage-daemon for target qsd")
    parser.addoption(
        "--timeout-scale",
        default=os.environ.get(timeouts.SCALE_ENV, "1"),
        help="multiply every case timeout and wait bound (slow machines, VMs)",
    )


_TARGET = pytest.StashKey[targets.Target]()
_KNOWN = pytest.StashKey[known.KnownDifferences]()


def pytest_configure(config: pytest.Config) -> None:
    for name in targets.names():  # qsd-11.1 and reference-processes too
        config.addinivalue_line("markers", f"{name}: a case instance run on target {name}")
    try:
        config.stash[_TARGET] = targets.resolve(config.getoption("target"), config.getoption("qsd"))
        config.stash[_KNOWN] = known.load(KNOWN_DIR)
        timeouts.set_scale(timeouts.parse_scale(config.getoption("timeout_scale")))
    except (targets.TargetError, SpecError, timeouts.BadScale) as e:
        raise pytest.UsageError(str(e)) from None
    if not hasattr(config, "workerinput"):  # the controller, not an xdist worker
        config.stash[_ENABLE_URING] = read_enable_uring()
        for line in reap_stale():  # what runs killed with SIGKILL left
            print(line, file=sys.stderr)


def _target(config: pytest.Config) -> targets.Target:
    return config.stash[_TARGET]


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        restore_enable_uring(config.stash.get(_ENABLE_URING, None))


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> CaseFile | None:
    if file_path.parent == CASES_DIR and is_case_file(file_path):
        return CaseFile.from_parent(parent, path=file_path)
    return None


class CaseFile(pytest.File):
    def collect(self) -> Iterator[CaseItem]:
        try:
            spec = load_spec(self.path)
        except SpecError as e:
            raise self.CollectError(str(e)) from None
        target = _target(self.config)
        for inst in spec.instances():
            inst = inst.on(target.tag)
            item = CaseItem.from_parent(self, name=inst.id, spec=spec, instance=inst)
            item.add_marker(inst.transport or "file")
            if inst.mode == "fuse":
                item.add_marker(target.name)
            if "slow" in spec.groups:
                item.add_marker("slow")
            if spec.serial:
                item.add_marker("serial")
            yield item


class CaseFailed(Exception):
    def __init__(self, result: Result) -> None:
        super().__init__(result.reason)
        self.result = result


class CaseItem(pytest.Item):
    def __init__(self, *, spec: CaseSpec, instance: Instance, **kw: Any) -> None:
        super().__init__(**kw)
        self.spec = spec
        self.instance = instance

    def runtest(self) -> None:
        opts = RunOptions(
            RESULTS,
            SCRATCH,
            _target(self.config),
            regen=regen_requested(),
            known=self.config.stash[_KNOWN],
        )
        result = run_instance(self.spec, self.instance, opts)
        if result.status == "not run":
            pytest.skip(f"not run: {result.reason}")
        if result.status == "xfail":
            pytest.xfail(result.reason.splitlines()[0])
        if result.status in ("fail", "xpass"):
            raise CaseFailed(result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, CaseFailed):
            r = excinfo.value.result
            return "\n".join(x for x in (r.reason, r.diff) if x)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.name
